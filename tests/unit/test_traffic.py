"""Red-team traffic: natural clients and extraction attackers as deterministic query generators."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from extauthz.demo.model import load_data
from extauthz.redteam.traffic import (
    AdaptiveKnockoff,
    BenignClient,
    JacobianAttacker,
    LineSearchAttacker,
    QuerySource,
    SybilSplitter,
    UniformNoiseAttacker,
    arrival_times,
    natural_pool,
    popular_inputs,
)

FloatArray = npt.NDArray[np.float64]
Oracle = Callable[[FloatArray], FloatArray]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def pool() -> tuple[FloatArray, npt.NDArray[np.int64]]:
    return natural_pool(0)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    """Return predict_proba of a logistic regression trained on the digits' training split."""
    from sklearn.linear_model import LogisticRegression

    x_train, _, y_train, _ = load_data(0)
    model = LogisticRegression(max_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x_train / 16.0, y_train)

    def predict_proba(x: FloatArray) -> FloatArray:
        return np.asarray(model.predict_proba(x / 16.0), dtype=np.float64)

    return predict_proba


def in_box(batch: FloatArray) -> bool:
    return bool(batch.shape[1] == 64 and (batch >= 0).all() and (batch <= 16).all())


def drive(source: QuerySource, oracle: Oracle, batches: int, n: int) -> list[FloatArray]:
    """Send ``batches`` batches of ``n`` and feed every answer back, as a red-team caller does."""
    sent = []
    for _ in range(batches):
        batch = source.next_batch(n)
        source.observe(batch, oracle(batch))
        sent.append(batch)
    return sent


class TestNaturalPool:
    """natural_pool is the held-out split of load_data: the rows the model never trained on."""

    def test_returns_the_held_out_split(self) -> None:
        x, y = natural_pool(0)
        _, x_test, _, y_test = load_data(0)
        assert x.shape == (450, 64)
        np.testing.assert_array_equal(x, x_test)
        np.testing.assert_array_equal(y, y_test)
        assert set(np.unique(y).tolist()) == set(range(10))

    def test_another_seed_gives_another_split(self) -> None:
        assert not np.array_equal(natural_pool(0)[0], natural_pool(1)[0])


class TestBenignClient:
    """A benign client sends jittered pool rows in the box, deterministic per seed."""

    def test_shape_range_and_determinism(self, pool: tuple[FloatArray, object]) -> None:
        x = pool[0]
        first = BenignClient(x, rng=rng(3)).next_batch(200)
        again = BenignClient(x, rng=rng(3)).next_batch(200)
        other = BenignClient(x, rng=rng(4)).next_batch(200)
        assert first.shape == (200, 64) and in_box(first)
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)

    def test_zero_rows(self, pool: tuple[FloatArray, object]) -> None:
        assert BenignClient(pool[0], rng=rng()).next_batch(0).shape == (0, 64)

    def test_jitter_has_the_requested_sd(self) -> None:
        flat = np.full((5, 64), 8.0)
        batch = BenignClient(flat, rng=rng(), jitter=0.3, popular_share=0.0).next_batch(500)
        residual = batch - 8.0
        assert abs(residual.std() - 0.3) < 0.01
        assert abs(residual.mean()) < 0.01

    def test_jitter_is_clipped_to_the_box(self) -> None:
        edges = np.concatenate([np.zeros((1, 64)), np.full((1, 64), 16.0)])
        batch = BenignClient(edges, rng=rng(), jitter=2.0).next_batch(100)
        assert in_box(batch)
        assert (batch == 0).any() and (batch == 16).any()

    def test_each_pool_row_once_before_any_repeat(self) -> None:
        distinct = np.arange(10, dtype=np.float64)[:, None].repeat(64, axis=1)
        client = BenignClient(distinct, rng=rng(), jitter=0.0)
        first, second = client.next_batch(7), client.next_batch(13)
        walk = np.concatenate([first, second])[:, 0]
        assert sorted(walk[:10].tolist()) == list(range(10))
        assert sorted(walk[10:].tolist()) == list(range(10))

    def test_popular_share_of_exact_repeats(self, pool: tuple[FloatArray, object]) -> None:
        x = pool[0]
        popular = popular_inputs(x, 3, rng(9))
        batch = BenignClient(x, rng=rng(), popular=popular, popular_share=0.25).next_batch(4000)
        exact = (batch[:, None, :] == popular[None, :, :]).all(axis=2)
        assert abs(exact.any(axis=1).mean() - 0.25) < 0.03
        assert exact.any(axis=0).all()  # every popular input appears

    def test_popular_inputs_repeat_across_clients(self, pool: tuple[FloatArray, object]) -> None:
        x = pool[0]
        popular = popular_inputs(x, 1, rng(9))
        a = BenignClient(x, rng=rng(1), popular=popular, popular_share=0.5).next_batch(50)
        b = BenignClient(x, rng=rng(2), popular=popular, popular_share=0.5).next_batch(50)
        assert (a == popular).all(axis=1).any() and (b == popular).all(axis=1).any()

    def test_without_popular_no_row_is_an_exact_pool_row(
        self, pool: tuple[FloatArray, object]
    ) -> None:
        x = pool[0]
        batch = BenignClient(x, rng=rng(), popular_share=0.9).next_batch(300)
        exact = (batch[:, None, :] == x[None, :, :]).all(axis=2)
        assert not exact.any()

    @pytest.mark.parametrize(
        "kwargs",
        [{"jitter": -0.1}, {"popular_share": 1.5}, {"popular_share": -0.1}],
    )
    def test_rejects_bad_settings(self, kwargs: dict[str, float]) -> None:
        with pytest.raises(ValueError):
            BenignClient(np.zeros((3, 64)), rng=rng(), **kwargs)

    def test_rejects_a_pool_of_the_wrong_width(self) -> None:
        with pytest.raises(ValueError, match="shape"):
            BenignClient(np.zeros((3, 63)), rng=rng())


class TestPopularInputs:
    """popular_inputs picks k distinct pool rows, deterministic per seed."""

    def test_distinct_rows_of_the_pool(self, pool: tuple[FloatArray, object]) -> None:
        x = pool[0]
        popular = popular_inputs(x, 5, rng(2))
        assert popular.shape == (5, 64)
        assert all((x == row).all(axis=1).any() for row in popular)
        assert np.unique(popular, axis=0).shape[0] == 5
        np.testing.assert_array_equal(popular, popular_inputs(x, 5, rng(2)))

    def test_rejects_k_beyond_the_pool(self) -> None:
        with pytest.raises(ValueError):
            popular_inputs(np.zeros((3, 64)), 4, rng())


class TestArrivalTimes:
    """arrival_times is a Poisson process: increasing, exponential gaps of mean 1/rate."""

    def test_increasing_with_the_right_rate(self) -> None:
        times = arrival_times(20_000, 50.0, rng(1))
        assert times.shape == (20_000,)
        assert (np.diff(times) > 0).all() and times[0] > 0
        assert abs(np.diff(times).mean() - 0.02) < 0.001
        # Exponential gaps: the sd equals the mean.
        assert abs(np.diff(times).std() - 0.02) < 0.001

    def test_deterministic_per_seed(self) -> None:
        np.testing.assert_array_equal(
            arrival_times(10, 5.0, rng(7)), arrival_times(10, 5.0, rng(7))
        )

    def test_bad_arguments(self) -> None:
        assert arrival_times(0, 1.0, rng()).shape == (0,)
        with pytest.raises(ValueError):
            arrival_times(5, 0.0, rng())
        with pytest.raises(ValueError):
            arrival_times(-1, 1.0, rng())


class TestUniformNoise:
    """UniformNoiseAttacker fills the whole box [0, 16]^64 uniformly."""

    def test_covers_the_box(self) -> None:
        batch = UniformNoiseAttacker(rng=rng()).next_batch(5000)
        assert batch.shape == (5000, 64) and in_box(batch)
        assert batch.min() < 0.01 and batch.max() > 15.99
        assert abs(batch.mean() - 8.0) < 0.05

    def test_deterministic_per_seed(self) -> None:
        a = UniformNoiseAttacker(rng=rng(5)).next_batch(3)
        np.testing.assert_array_equal(a, UniformNoiseAttacker(rng=rng(5)).next_batch(3))
        assert not np.array_equal(a, UniformNoiseAttacker(rng=rng(6)).next_batch(3))


class TestLineSearch:
    """Line search bisects to the boundary with answers and walks a fixed grid without them."""

    def test_converges_to_the_boundary_with_answers(
        self, pool: tuple[FloatArray, object], oracle: Oracle
    ) -> None:
        seeds = pool[0][:12]
        steps = 10
        attacker = LineSearchAttacker(seeds, steps, rng=rng())
        # The first batch is exactly the seeds, so every search bisects from its first step.
        drive(attacker, oracle, batches=1 + steps, n=12)
        brackets = attacker.brackets()
        assert len(brackets) >= 10
        labels = oracle(seeds).argmax(axis=1)
        for bracket in brackets:
            start_class = labels[(seeds == bracket.start).all(axis=1)][0]
            end_class = labels[(seeds == bracket.end).all(axis=1)][0]
            assert start_class != end_class
            assert bracket.hi - bracket.lo == pytest.approx(2.0**-steps)
            assert bracket.width < 0.05 * float(np.linalg.norm(bracket.end - bracket.start))
            assert oracle(bracket.inside[None])[0].argmax() == start_class
            assert oracle(bracket.outside[None])[0].argmax() != start_class

    def test_queries_home_in_on_one_point_per_search(
        self, pool: tuple[FloatArray, object], oracle: Oracle
    ) -> None:
        seeds = pool[0][:8]
        sent = drive(LineSearchAttacker(seeds, 8, rng=rng()), oracle, batches=9, n=8)
        # Row j of each later batch is search j: its consecutive queries get closer each step.
        moves = np.array(
            [np.linalg.norm(sent[k + 1] - sent[k], axis=1) for k in range(1, 8)]
        )  # (steps - 1, searches)
        live = moves[0] > 0
        assert live.any()
        assert (np.diff(moves[:, live], axis=0) < 1e-9).all()
        assert (moves[-1, live] < moves[0, live] / 16).all()

    def test_given_labels_skip_the_seed_queries_and_pair_different_classes(
        self, pool: tuple[FloatArray, npt.NDArray[np.int64]]
    ) -> None:
        x, y = pool
        seeds, labels = x[:20], y[:20]
        attacker = LineSearchAttacker(seeds, 4, rng=rng(), labels=labels)
        batch = attacker.next_batch(20)
        assert not (batch[:, None, :] == seeds[None]).all(axis=2).any()
        # Every query is a segment midpoint of two seeds of different classes.
        mids = (seeds[:, None, :] + seeds[None, :, :]) / 2
        differ = labels[:, None] != labels[None, :]
        for row in batch:
            hits = np.isclose(mids, row).all(axis=2)
            assert (hits & differ).any()

    def test_without_answers_walks_a_fixed_grid(self, pool: tuple[FloatArray, object]) -> None:
        seeds = pool[0][:6]
        steps = 5
        attacker = LineSearchAttacker(seeds, steps, rng=rng())
        first = attacker.next_batch(6)
        np.testing.assert_array_equal(first, seeds)  # it asks for the seeds' classes first
        walk = np.stack([attacker.next_batch(6) for _ in range(steps)])  # (steps, searches, 64)
        spacing = np.diff(walk, axis=0)
        np.testing.assert_allclose(spacing, np.broadcast_to(spacing[:1], spacing.shape), atol=1e-9)
        assert np.linalg.norm(spacing[0], axis=1).min() > 0
        assert attacker.brackets() == []
        assert in_box(walk.reshape(-1, 64))

    def test_lost_answers_fall_back_to_the_grid_then_resume(
        self, pool: tuple[FloatArray, npt.NDArray[np.int64]], oracle: Oracle
    ) -> None:
        x, _ = pool
        seeds = x[:10]
        labels = oracle(seeds).argmax(axis=1)
        attacker = LineSearchAttacker(seeds, 6, rng=rng(), labels=labels)
        attacker.next_batch(10)  # refused by the guard: never observed
        drive(attacker, oracle, batches=5, n=10)
        brackets = attacker.brackets()
        assert brackets
        for bracket in brackets:
            start_class = labels[(seeds == bracket.start).all(axis=1)][0]
            assert oracle(bracket.inside[None])[0].argmax() == start_class
            assert oracle(bracket.outside[None])[0].argmax() != start_class

    def test_accepts_labels_as_answers(
        self, pool: tuple[FloatArray, object], oracle: Oracle
    ) -> None:
        seeds = pool[0][:8]
        with_labels = LineSearchAttacker(seeds, 5, rng=rng())
        with_scores = LineSearchAttacker(seeds, 5, rng=rng())
        for _ in range(6):
            a, b = with_labels.next_batch(8), with_scores.next_batch(8)
            np.testing.assert_array_equal(a, b)
            with_labels.observe(a, oracle(a).argmax(axis=1))
            with_scores.observe(b, oracle(b))

    def test_observe_refuses_answers_to_another_batch(
        self, pool: tuple[FloatArray, object]
    ) -> None:
        attacker = LineSearchAttacker(pool[0][:4], 3, rng=rng())
        with pytest.raises(ValueError, match="pending"):
            attacker.observe(np.zeros((4, 64)), np.zeros((4, 10)))
        batch = attacker.next_batch(4)
        with pytest.raises(ValueError, match="last batch"):
            attacker.observe(batch + 1, np.zeros((4, 10)))
        with pytest.raises(ValueError, match="shape"):
            attacker.observe(batch, np.zeros((3, 10)))

    def test_deterministic_per_seed(self, pool: tuple[FloatArray, object], oracle: Oracle) -> None:
        seeds = pool[0][:10]
        a = drive(LineSearchAttacker(seeds, 4, rng=rng(1)), oracle, 4, 7)
        b = drive(LineSearchAttacker(seeds, 4, rng=rng(1)), oracle, 4, 7)
        c = drive(LineSearchAttacker(seeds, 4, rng=rng(2)), oracle, 4, 7)
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
        assert not np.array_equal(np.concatenate(a), np.concatenate(c))

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError):
            LineSearchAttacker(np.zeros((1, 64)), 3, rng=rng())
        with pytest.raises(ValueError):
            LineSearchAttacker(np.zeros((4, 64)), 0, rng=rng())
        with pytest.raises(ValueError):
            LineSearchAttacker(np.zeros((4, 64)), 3, rng=rng(), labels=[0, 1])


def nearest_linf(rows: FloatArray, earlier: FloatArray) -> FloatArray:
    """Return, per row, the L-infinity distance to the closest earlier point."""
    gaps: FloatArray = np.abs(rows[:, None, :] - earlier[None, :, :]).max(axis=2).min(axis=1)
    return gaps


class TestJacobian:
    """Jacobian augmentation makes many small-step variations of few seeds."""

    def test_every_query_is_one_small_step_from_an_earlier_point(
        self, pool: tuple[FloatArray, object], oracle: Oracle
    ) -> None:
        seeds = pool[0][:10]
        step = 0.5
        attacker = JacobianAttacker(seeds, step, rng=rng())
        sent = np.concatenate(drive(attacker, oracle, batches=10, n=25))
        np.testing.assert_array_equal(sent[:10], seeds)  # seeds are labelled first
        children = sent[10:]
        for k in range(children.shape[0]):
            earlier = np.concatenate([seeds, children[:k]])
            assert nearest_linf(children[k : k + 1], earlier)[0] <= step + 1e-12
        assert in_box(sent)
        # 240 children of 10 seeds after a few rounds: all within rounds * step * 8 in L2.
        l2 = np.linalg.norm(children[:, None, :] - seeds[None], axis=2).min(axis=1)
        assert attacker.round >= 4
        assert l2.max() <= attacker.round * step * 8 + 1e-9
        assert attacker.size == 250

    def test_children_move_toward_another_class_mean(
        self, pool: tuple[FloatArray, npt.NDArray[np.int64]]
    ) -> None:
        x, y = pool
        zeros, ones = x[y == 0][:5], x[y == 1][:5]
        seeds = np.concatenate([zeros, ones])
        labels = np.array([0] * 5 + [1] * 5)
        attacker = JacobianAttacker(seeds, 1.0, rng=rng(), labels=labels)
        children = attacker.next_batch(10)  # one round: one child per seed
        mean_zero, mean_one = zeros.mean(axis=0), ones.mean(axis=0)
        for child in children:
            parent = seeds[np.abs(seeds - child).max(axis=1) <= 1.0 + 1e-12][0]
            target = mean_one if (zeros == parent).all(axis=1).any() else mean_zero
            assert np.linalg.norm(child - target) < np.linalg.norm(parent - target)

    def test_without_answers_steps_in_random_sign_directions(
        self, pool: tuple[FloatArray, object]
    ) -> None:
        seeds = np.full((3, 64), 8.0)  # the middle of the box: no clipping
        attacker = JacobianAttacker(seeds, 0.5, rng=rng())
        attacker.next_batch(3)
        children = attacker.next_batch(3)
        np.testing.assert_allclose(np.abs(children - 8.0), 0.5)
        assert len({tuple(np.sign(c - 8.0)) for c in children}) == 3

    def test_uses_a_substitute_gradient_when_given(self) -> None:
        seeds = np.full((4, 64), 8.0)
        direction = np.where(np.arange(64) % 2 == 0, 1.0, -1.0)
        calls: list[npt.NDArray[np.int64]] = []

        def gradient(points: FloatArray, labels: npt.NDArray[np.int64]) -> FloatArray:
            calls.append(labels)
            return np.broadcast_to(direction * 3.0, points.shape).copy()

        attacker = JacobianAttacker(seeds, 0.25, rng=rng(), labels=[0, 1, 2, 3], gradient=gradient)
        children = attacker.next_batch(4)
        np.testing.assert_allclose(children, 8.0 + 0.25 * np.broadcast_to(direction, (4, 64)))
        assert sorted(np.concatenate(calls).tolist()) == [0, 1, 2, 3]

    def test_reservoir_caps_each_round(self) -> None:
        attacker = JacobianAttacker(np.full((6, 64), 8.0), rng=rng(), labels=[0] * 6, reservoir=4)
        attacker.next_batch(4)
        assert attacker.round == 1
        attacker.next_batch(1)  # the 6 seeds were sampled down to 4: a new round starts
        assert attacker.round == 2

    def test_deterministic_per_seed(self, pool: tuple[FloatArray, object], oracle: Oracle) -> None:
        seeds = pool[0][:5]
        a = np.concatenate(drive(JacobianAttacker(seeds, rng=rng(1)), oracle, 3, 9))
        b = np.concatenate(drive(JacobianAttacker(seeds, rng=rng(1)), oracle, 3, 9))
        c = np.concatenate(drive(JacobianAttacker(seeds, rng=rng(2)), oracle, 3, 9))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError):
            JacobianAttacker(np.zeros((2, 64)), 0.0, rng=rng())
        with pytest.raises(ValueError):
            JacobianAttacker(np.zeros((2, 64)), rng=rng(), reservoir=0)


class TestSybilSplitter:
    """A Sybil splitter hands one attacker's consecutive batches to K identities in turn."""

    def test_round_robin_over_identities(self) -> None:
        splitter = SybilSplitter(UniformNoiseAttacker(rng=rng()), identities=3)
        turns = [splitter.next_batch(2).identity for _ in range(7)]
        assert turns == [0, 1, 2, 0, 1, 2, 0]
        assert splitter.sent.tolist() == [6, 4, 4]

    def test_the_split_stream_is_the_single_attacker_stream(self) -> None:
        single = UniformNoiseAttacker(rng=rng(4))
        splitter = SybilSplitter(UniformNoiseAttacker(rng=rng(4)), identities=2)
        for _ in range(4):
            np.testing.assert_array_equal(splitter.next_batch(5).inputs, single.next_batch(5))

    def test_next_for_counts_the_named_identity(self) -> None:
        splitter = SybilSplitter(UniformNoiseAttacker(rng=rng()), identities=4)
        assert splitter.next_for(2, 7).shape == (7, 64)
        assert splitter.sent.tolist() == [0, 0, 7, 0]
        assert splitter.next_batch(1).identity == 0  # next_for does not take a turn
        with pytest.raises(ValueError):
            splitter.next_for(4, 1)
        with pytest.raises(ValueError):
            SybilSplitter(UniformNoiseAttacker(rng=rng()), identities=0)

    def test_answers_reach_the_attacker(
        self, pool: tuple[FloatArray, object], oracle: Oracle
    ) -> None:
        seeds = pool[0][:6]
        attacker = LineSearchAttacker(seeds, 4, rng=rng())
        splitter = SybilSplitter(attacker, identities=3)
        for _ in range(5):
            batch = splitter.next_batch(6)
            splitter.observe(batch.inputs, oracle(batch.inputs))
        direct = LineSearchAttacker(seeds, 4, rng=rng())
        drive(direct, oracle, batches=5, n=6)
        assert len(direct.brackets()) > 0
        split = [(b.lo, b.hi) for b in attacker.brackets()]
        assert split == [(b.lo, b.hi) for b in direct.brackets()]
        assert splitter.sent.sum() == 30


def class_pool(per_class: int = 6) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Return a pool whose class-c rows are all pixels ``c`` plus a row index offset below 0.5."""
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    offsets = np.tile(np.arange(per_class) / (2.0 * per_class), 10)
    rows = labels[:, None] + offsets[:, None] + np.zeros((1, 64))
    return rows.astype(np.float64), labels


def pixel_class(batch: FloatArray) -> npt.NDArray[np.int64]:
    """Return the class of each row of a ``class_pool`` row sent with small jitter."""
    classes: npt.NDArray[np.int64] = np.floor(batch.mean(axis=1) + 0.1).astype(np.int64)
    return classes


def margin_oracle(favoured: int) -> Oracle:
    """Answer with a 0.9 top-2 margin for rows of class ``favoured``, 0.1 for the others."""

    def answer(batch: FloatArray) -> FloatArray:
        scores = np.full((batch.shape[0], 10), 0.6 / 8)
        scores[:, 0], scores[:, 1] = 0.25, 0.15
        sure = pixel_class(batch) == favoured
        scores[sure] = 0.0
        scores[sure, 0], scores[sure, 1] = 0.95, 0.05
        return scores

    return answer


class TestAdaptiveKnockoff:
    """Knockoff's adaptive sampling sends pool rows of classes a gradient bandit learns to favour."""

    def test_shape_range_and_determinism(
        self, pool: tuple[FloatArray, npt.NDArray[np.int64]], oracle: Oracle
    ) -> None:
        x, y = pool
        a = drive(AdaptiveKnockoff(x, y, rng=rng(1)), oracle, 4, 25)
        b = drive(AdaptiveKnockoff(x, y, rng=rng(1)), oracle, 4, 25)
        c = drive(AdaptiveKnockoff(x, y, rng=rng(2)), oracle, 4, 25)
        assert all(batch.shape == (25, 64) and in_box(batch) for batch in a)
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
        assert not np.array_equal(np.concatenate(a), np.concatenate(c))
        assert AdaptiveKnockoff(x, y, rng=rng()).next_batch(0).shape == (0, 64)

    def test_jitter_is_clipped_to_the_box(self) -> None:
        x, y = np.full((4, 64), 16.0), np.zeros(4, dtype=np.int64)
        batch = AdaptiveKnockoff(x, y, rng=rng(), jitter=5.0).next_batch(50)
        assert in_box(batch)
        assert (batch < 16).mean() > 0.3  # noise was added, then clipped

    def test_each_row_of_a_class_once_before_any_repeat(self) -> None:
        x, y = class_pool(per_class=7)
        attacker = AdaptiveKnockoff(x[y == 4], y[y == 4], rng=rng(), jitter=0.0)
        first, second = attacker.next_batch(7), attacker.next_batch(7)
        for batch in (first, second):
            np.testing.assert_array_equal(np.unique(batch, axis=0), np.unique(x[y == 4], axis=0))
        assert not np.array_equal(first, second)  # the class was reshuffled

    def test_starts_uniform_and_stays_so_without_answers(self) -> None:
        x, y = class_pool()
        attacker = AdaptiveKnockoff(x, y, rng=rng())
        np.testing.assert_array_equal(attacker.classes, np.arange(10))
        for _ in range(3):
            attacker.next_batch(20)
        np.testing.assert_allclose(attacker.policy, np.full(10, 0.1))

    def test_policy_moves_to_the_class_with_high_margins(self) -> None:
        x, y = class_pool()
        attacker = AdaptiveKnockoff(x, y, rng=rng(3), jitter=0.05)
        sent = drive(attacker, margin_oracle(favoured=3), batches=15, n=40)
        assert attacker.policy[3] > 0.5
        assert attacker.policy.argmax() == 3
        early, late = pixel_class(sent[0]), pixel_class(sent[-1])
        assert (late == 3).mean() > (early == 3).mean() + 0.3
        assert 0.05 < attacker.mean_reward < 0.95

    def test_label_only_answers_reward_disagreement(self) -> None:
        x, y = class_pool()
        attacker = AdaptiveKnockoff(x, y, rng=rng(4), jitter=0.05)

        def labels(batch: FloatArray) -> FloatArray:
            truth = pixel_class(batch)
            return np.where(truth == 7, 1, truth).astype(np.float64)  # disagrees only on 7s

        drive(attacker, labels, batches=15, n=40)
        assert attacker.policy.argmax() == 7
        assert attacker.policy[7] > 0.5

    def test_div_reward_ignores_margins(self) -> None:
        x, y = class_pool()
        attacker = AdaptiveKnockoff(x, y, rng=rng(3), jitter=0.05, reward="div")
        favour_three = margin_oracle(favoured=3)

        def scores(batch: FloatArray) -> FloatArray:
            # Argmax is the row's own class everywhere: no disagreement, whatever the margin.
            answers = favour_three(batch)
            answers[np.arange(batch.shape[0]), pixel_class(batch)] = 2.0
            return answers

        drive(attacker, scores, batches=10, n=40)
        np.testing.assert_allclose(attacker.policy, np.full(10, 0.1))

    def test_update_is_the_gradient_bandit_step(self) -> None:
        x, y = class_pool(per_class=3)
        attacker = AdaptiveKnockoff(x[y < 2], y[y < 2], rng=rng(5), jitter=0.0, step_size=0.5)
        batch = attacker.next_batch(8)
        action = pixel_class(batch)
        rewards = np.where(action == 1, 0.8, 0.2) + np.arange(8) / 100
        scores = np.stack([0.5 + rewards / 2, 0.5 - rewards / 2], axis=1)
        attacker.observe(batch, scores)
        advantage = rewards - rewards.mean()  # first batch: its own mean is the baseline
        onehot = (action[:, None] == np.arange(2)).astype(np.float64)
        h = 0.5 * (advantage[:, None] * (onehot - 0.5)).sum(axis=0)
        np.testing.assert_allclose(attacker.policy, np.exp(h) / np.exp(h).sum())
        assert attacker.mean_reward == pytest.approx(rewards.mean())
        # A later batch with the same reward for every row moves H by (r - r̄) on no net class.
        before = attacker.policy
        batch = attacker.next_batch(6)
        attacker.observe(
            batch, np.tile([0.5 + rewards.mean() / 2, 0.5 - rewards.mean() / 2], (6, 1))
        )
        np.testing.assert_allclose(attacker.policy, before)

    def test_observe_refuses_answers_to_another_batch(self) -> None:
        x, y = class_pool()
        attacker = AdaptiveKnockoff(x, y, rng=rng())
        with pytest.raises(ValueError, match="pending"):
            attacker.observe(np.zeros((4, 64)), np.zeros((4, 10)))
        batch = attacker.next_batch(4)
        with pytest.raises(ValueError, match="last batch"):
            attacker.observe(batch + 1, np.zeros((4, 10)))
        with pytest.raises(ValueError, match="shape"):
            attacker.observe(batch, np.zeros((3, 10)))

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"jitter": -0.1}, "jitter"),
            ({"step_size": 0.0}, "step_size"),
            ({"reward": "loss"}, "reward"),
        ],
    )
    def test_rejects_bad_settings(self, kwargs: dict[str, object], match: str) -> None:
        x, y = class_pool()
        with pytest.raises(ValueError, match=match):
            AdaptiveKnockoff(x, y, rng=rng(), **kwargs)  # type: ignore[arg-type]

    def test_rejects_bad_pools_and_labels(self) -> None:
        x, y = class_pool()
        with pytest.raises(ValueError, match="labels"):
            AdaptiveKnockoff(x, y[:-1], rng=rng())
        with pytest.raises(ValueError, match="labels"):
            AdaptiveKnockoff(x, -y - 1, rng=rng())
        with pytest.raises(ValueError, match="pool"):
            AdaptiveKnockoff(x[:, :10], y, rng=rng())
