"""PRADA over bounded per-client state: natural queries pass, synthetic ones alarm, state is bytes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from extauthz.detect.base import Observation, Verdict
from extauthz.detect.prada import REASON, PradaDetector, PradaStatus

Rows = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
Stream = tuple[Rows, Labels]


@cache
def digits() -> Stream:
    """The 1,797 8x8 digit images (64 values in 0..16) and their classes."""
    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def natural_stream(seed: int, n: int) -> Stream:
    """Distinct digit rows in random order with small jitter, labelled by their class."""
    x, y = digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))[:n]
    return x[order] + rng.normal(0.0, 0.05, (n, 64)).astype(np.float32), y[order]


def jacobian_stream(seed: int, n: int, seeds: int = 10) -> Stream:
    """JbDA-style synthetic queries: seed images plus signed steps whose size grows every 100."""
    x, y = digits()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(x), seeds, replace=False)[np.arange(n) % seeds]
    step = (0.1 * (1 + np.arange(n) // 100))[:, None]
    rows = x[chosen] + step * np.sign(rng.normal(size=(n, 64)))
    return rows.astype(np.float32), y[chosen]


def noise_stream(seed: int, n: int, seeds: int = 3) -> Stream:
    """Uniform noise around a few seed images (T-RND-like)."""
    x, y = digits()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(x), seeds, replace=False)[np.arange(n) % seeds]
    return (x[chosen] + rng.uniform(-1.0, 1.0, (n, 64))).astype(np.float32), y[chosen]


def observe(rows: Rows, labels: Labels, *, raw: bool = True) -> Observation:
    """An observation of one client carrying ``rows`` as raw inputs (or as vectors)."""
    return Observation(
        client_id="c",
        now=0.0,
        instances=rows.shape[0],
        raw=rows if raw else None,
        vectors=None if raw else rows,
        top1=labels,
    )


def run(
    detector: PradaDetector, stream: Stream, batch: int = 1, state: bytes | None = None
) -> tuple[bytes, list[Verdict]]:
    """Feed a stream in batches; return the final state and the verdict after each batch."""
    rows, labels = stream
    verdicts = []
    for start in range(0, rows.shape[0], batch):
        end = start + batch
        state, verdict = detector.update(state, observe(rows[start:end], labels[start:end]))
        verdicts.append(verdict)
    assert state is not None
    return state, verdicts


def status(detector: PradaDetector, state: bytes) -> PradaStatus:
    """The state's summary (which must decode)."""
    summary = detector.status(state)
    assert summary is not None
    return summary


class ExactPrada:
    """The unbounded algorithm of the reference (growing sets and distances never trimmed), in
    float64, written here to measure how far the bounded detector strays from it."""

    def __init__(self, delta: float = 0.9, check_every: int = 10, min_distances: int = 100):
        self.delta, self.check_every, self.min_distances = delta, check_every, min_distances
        self.sets: dict[int, list[npt.NDArray[np.float64]]] = {}
        self.joined: dict[int, list[float]] = {}
        self.threshold: dict[int, float] = {}
        self.distances: dict[int, list[float]] = {}
        self.queries = 0
        self.alarm = False
        self.w = float("nan")

    def query(self, x: Rows, label: int) -> None:
        """One query, then the check when it is due."""
        point = x.astype(np.float64)
        if label not in self.sets:
            self.sets[label], self.joined[label], self.threshold[label] = [point], [0.0], 0.0
        else:
            members = np.asarray(self.sets[label])
            d_min = float(np.sqrt(((members - point) ** 2).sum(axis=1)).min())
            self.distances.setdefault(label, []).append(d_min)
            if d_min > self.threshold[label]:
                self.sets[label].append(point)
                self.joined[label].append(d_min)
                joined = np.asarray(self.joined[label])
                self.threshold[label] = max(self.threshold[label], joined.mean() - joined.std())
        if self.queries % self.check_every == 0:
            self.check()
        self.queries += 1

    def check(self) -> None:
        """Pool classes with >= 10 distances, drop 3-sigma outliers, Shapiro-Wilk."""
        parts = [np.asarray(d) for d in self.distances.values() if len(d) >= 10]
        if not parts:
            return
        pooled = np.concatenate(parts)
        pooled = pooled[np.abs(pooled - pooled.mean()) < 3 * pooled.std()]
        if pooled.size > self.min_distances:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.w = float(stats.shapiro(pooled).statistic)
            self.alarm = self.w < self.delta


class TestNaturalQueries:
    """Distinct natural images in random order keep their distances near-normal: no alarm."""

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_no_alarm_over_1000_digits(self, seed: int) -> None:
        """1,000 jittered digit rows never reach score 1; W is computed and stays above delta."""
        detector = PradaDetector()
        state, verdicts = run(detector, natural_stream(seed, 1000))
        assert max(v.score for v in verdicts) < 1.0
        summary = status(detector, state)
        assert not summary.alarm and summary.w > 0.95 and summary.pooled > 900


class TestSyntheticQueries:
    """Synthetic perturbation queries skew the distance distribution: the alarm rises."""

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_jacobian_stream_alarms_within_a_few_hundred(self, seed: int) -> None:
        """Signed steps around 10 seeds reach score 1.0 with the PRADA reason by query 300."""
        _, verdicts = run(PradaDetector(), jacobian_stream(seed, 300))
        first = next(i for i, v in enumerate(verdicts) if v.score == 1.0)
        assert first < 300
        assert verdicts[first].reason == REASON and verdicts[first].detail.startswith("W=")

    def test_alarm_holds_until_the_next_check(self) -> None:
        """Checks run every 10 queries (indices 0, 10, ...): the verdict only changes there."""
        _, verdicts = run(PradaDetector(), jacobian_stream(0, 400))
        scores = np.array([v.score for v in verdicts])
        changes = np.flatnonzero(np.diff(scores)) + 1
        assert changes.size > 0 and np.all(changes % 10 == 0)

    def test_score_rises_as_w_falls_before_the_alarm(self) -> None:
        """With delta 0.5 the same stream does not alarm, but its score follows W below 0.98."""
        detector = PradaDetector(delta=0.5)
        state, verdicts = run(detector, jacobian_stream(0, 300))
        w = status(detector, state).w
        assert w < 0.98
        assert verdicts[-1].score == pytest.approx(min((0.98 - w) / 0.48, 1.0) * 0.6, rel=1e-5)
        assert 0.0 < verdicts[-1].score <= 0.6 and verdicts[-1].reason == REASON

    def test_nothing_before_enough_distances(self) -> None:
        """Below min_distances pooled distances there is no W and no score."""
        detector = PradaDetector()
        state, verdicts = run(detector, jacobian_stream(0, 100))
        assert all(v == Verdict(0.0) for v in verdicts)
        assert np.isnan(status(detector, state).w)


class TestState:
    """State is compact bytes: pure updates, any replica continues it, bounded by the caps."""

    def test_update_is_pure_and_replicas_continue_the_same_state(self) -> None:
        """The same state and observation give the same bytes, in this or a new detector."""
        rows, labels = jacobian_stream(0, 200)
        state, _ = run(PradaDetector(), (rows[:150], labels[:150]))
        nxt = observe(rows[150:], labels[150:])
        assert PradaDetector().update(state, nxt) == PradaDetector().update(state, nxt)
        single, _ = run(PradaDetector(), (rows, labels), batch=200)
        assert PradaDetector().update(state, nxt)[0] == single

    def test_status_reads_the_bytes(self) -> None:
        """The summary counts queries, classes, members and ring distances from the bytes."""
        detector = PradaDetector()
        state, _ = run(detector, natural_stream(0, 500))
        summary = status(detector, state)
        assert summary.queries == 500 and summary.classes == 10
        assert summary.distances == 490  # every query but each class's first
        assert 10 <= summary.members <= 500

    def test_state_that_is_not_ours_starts_a_new_client(self) -> None:
        """Garbage or truncated bytes are not an error: the client starts afresh."""
        detector = PradaDetector()
        rows, labels = natural_stream(0, 20)
        state, _ = run(detector, (rows, labels))
        fresh, _ = detector.update(None, observe(rows[:1], labels[:1]))
        for bad in (b"garbage", state[:-3], b"PRD1" + bytes(40)):
            assert detector.update(bad, observe(rows[:1], labels[:1]))[0] == fresh

    def test_batch_of_32_equals_32_single_queries(self) -> None:
        """Instances of one observation are processed in order, checks included."""
        stream = jacobian_stream(3, 32 * 12)
        detector = PradaDetector()
        batched, batched_verdicts = run(detector, stream, batch=32)
        single, single_verdicts = run(detector, stream, batch=1)
        assert batched == single
        assert batched_verdicts[-1] == single_verdicts[-1]

    def test_state_is_bounded_at_10000_queries(self) -> None:
        """Random points (nearly all join their set) fill the caps and stay within them."""
        rng = np.random.default_rng(5)
        rows = rng.uniform(0.0, 16.0, (10_000, 64)).astype(np.float32)
        labels = rng.integers(0, 10, 10_000)
        detector = PradaDetector(max_growing=256, max_distances=1024)
        state, _ = run(detector, (rows[:5000], labels[:5000]), batch=100)
        half = len(state)
        state, _ = run(detector, (rows[5000:], labels[5000:]), batch=100, state=state)
        summary = status(detector, state)
        assert summary.queries == 10_000
        assert summary.members == 10 * 256 and summary.distances == 1024
        bound = 32 + 10 * (256 * 4 * 64 + 44) + 6 * 1024
        assert len(state) == half <= bound

    def test_classes_beyond_the_cap_evict_the_least_recent(self) -> None:
        """300 classes with max_classes 16: 16 kept, and their distances stay consistent."""
        rng = np.random.default_rng(6)
        rows = rng.normal(size=(3000, 8)).astype(np.float32)
        labels = rng.integers(0, 300, 3000)
        detector = PradaDetector(max_classes=16)
        state, _ = run(detector, (rows, labels), batch=50)
        summary = status(detector, state)
        assert summary.classes == 16 and summary.members <= 16 * 512
        assert len(state) == 32 + 16 * 44 + summary.members * 8 * 4 + 6 * summary.distances

    def test_smaller_caps_trim_an_existing_state(self) -> None:
        """After a policy change the next update fits the new caps."""
        state, _ = run(PradaDetector(), jacobian_stream(0, 600, seeds=2))
        small = PradaDetector(max_growing=50, max_distances=200, max_classes=1)
        rows, labels = jacobian_stream(1, 1, seeds=1)
        after = status(small, small.update(state, observe(rows, labels))[0])
        assert after.classes == 1 and after.members <= 50 and after.distances <= 200


class TestInputs:
    """Which rows PRADA measures, and what it does without them."""

    def test_raw_inputs_are_preferred_and_vectors_serve_without_them(self) -> None:
        """With both, raw rows (input space) are kept; with vectors only, vectors are."""
        rows, labels = natural_stream(0, 5)
        detector = PradaDetector()
        both = Observation("c", 0.0, 5, raw=rows, vectors=rows[:, :32], top1=labels)
        state, _ = detector.update(None, both)
        assert (status(detector, state).space, status(detector, state).dim) == ("raw", 64)
        vectors_only, _ = detector.update(None, observe(rows[:, :32], labels, raw=False))
        assert (status(detector, vectors_only).space, status(detector, vectors_only).dim) == (
            "vectors",
            32,
        )

    def test_without_classes_or_rows_the_state_is_unchanged(self) -> None:
        """No top1, no rows, or counts that disagree: nothing is folded in."""
        rows, labels = natural_stream(0, 50)
        detector = PradaDetector()
        state, _ = run(detector, (rows, labels))
        no_top1 = Observation("c", 0.0, 5, raw=rows[:5])
        no_rows = Observation("c", 0.0, 5, top1=labels[:5])
        mismatched = observe(rows[:5], labels[:4])
        for observation in (no_top1, no_rows, mismatched):
            assert detector.update(state, observation)[0] == state
        assert detector.update(None, no_rows) == (b"", Verdict(0.0))

    def test_a_new_input_width_restarts_the_client(self) -> None:
        """Rows of another width than the client's cannot be compared: its state restarts."""
        rows, labels = natural_stream(0, 50)
        detector = PradaDetector()
        state, _ = run(detector, (rows, labels))
        wider = np.zeros((1, 100), dtype=np.float32)
        assert status(detector, detector.update(state, observe(wider, labels[:1]))[0]).queries == 1


def natural_then_jacobian(seed: int) -> Stream:
    """All the digits in random order, then 1,200 Jacobian-style queries around 3 seeds."""
    natural, synthetic = natural_stream(seed, 1797), jacobian_stream(seed, 1200, seeds=3)
    return np.concatenate((natural[0], synthetic[0])), np.concatenate((natural[1], synthetic[1]))


COMPARED: dict[str, Callable[[int], Stream]] = {
    "digits": lambda seed: natural_stream(seed, 1797),
    "jacobian_3_seeds": lambda seed: jacobian_stream(seed, 3000, seeds=3),
    "noise_3_seeds": lambda seed: noise_stream(seed, 3000),
    "digits_then_jacobian": natural_then_jacobian,
}


class TestCappedAgainstExact:
    """The bounded detector (growing sets of 512, a ring of 2,048 distances) decides as the
    unbounded algorithm does on streams of a few thousand queries, with W within 0.03."""

    @pytest.mark.parametrize("name", sorted(COMPARED))
    def test_same_alarms_and_close_w(self, name: str) -> None:
        """At every check: the same alarm decision; |W - W_exact| printed and bounded."""
        rows, labels = COMPARED[name](0)
        exact, capped = ExactPrada(), PradaDetector()
        state: bytes | None = None
        agree, gaps, w = 0, [], float("nan")
        for i in range(rows.shape[0]):
            exact.query(rows[i], int(labels[i]))
            state, _ = capped.update(state, observe(rows[i : i + 1], labels[i : i + 1]))
            if i % 10 or np.isnan(exact.w):
                continue
            summary = status(capped, state)
            agree += summary.alarm == exact.alarm
            gaps.append(abs(summary.w - exact.w))
            w = summary.w
        gap = np.asarray(gaps)
        assert state is not None
        print(
            f"\n{name}: {rows.shape[0]} queries, {gap.size} checks, alarm agreement "
            f"{agree}/{gap.size}, max |W - W_exact| {gap.max():.4f}, mean {gap.mean():.4f}, "
            f"final W {w:.4f} vs {exact.w:.4f}, state {len(state)} bytes"
        )
        assert agree == gap.size
        assert gap.max() < 0.03
        if rows.shape[0] <= 2048 and name == "digits":
            # Caps never reached: only float32 rounding separates the two.
            assert gap.max() < 1e-4
