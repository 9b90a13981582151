"""The sign-step augmentation detector: Jacobian attackers flagged at once, natural traffic never."""

from __future__ import annotations

import numpy as np
import pytest

from extauthz.demo.model import DemoModel
from extauthz.detect.augmentation import REASON, AugmentationDetector
from extauthz.detect.base import Observation
from extauthz.redteam.attacks import attack_data, make_source
from extauthz.redteam.traffic import BenignClient, SybilSplitter, natural_pool, popular_inputs

SUSPICIOUS_AT = 0.6 / 0.8  # the score that takes a client to suspicious at the default weight


def _observe(
    detector: AugmentationDetector, batches: list[np.ndarray]
) -> tuple[bytes, list[float]]:
    state: bytes | None = None
    scores = []
    for batch in batches:
        state, verdict = detector.update(state, Observation("c", 0.0, batch.shape[0], raw=batch))
        scores.append(verdict.score)
    assert state is not None
    return state, scores


def _steps_in(detector: AugmentationDetector, stream: np.ndarray) -> int:
    return int(detector.steps(np.zeros((0, stream.shape[1]), np.float32), stream).sum())


@pytest.fixture(scope="module")
def model() -> DemoModel:
    return DemoModel.train(0)


def _attack(model: DemoModel, name: str, identities: int, seed: int) -> list[list[np.ndarray]]:
    data = attack_data(0)
    source = make_source(name, data.pool, np.random.default_rng(seed), data.pool_labels)
    splitter = SybilSplitter(source, identities)
    batches: list[list[np.ndarray]] = [[] for _ in range(identities)]
    for _ in range(2000 // 32):
        step = splitter.next_batch(32)
        splitter.observe(step.inputs, model.predict_proba(step.inputs))
        batches[step.identity].append(step.inputs)
    return batches


class TestAttackers:
    @pytest.mark.parametrize("seed", [1, 2])
    @pytest.mark.parametrize("identities", [1, 4])
    def test_jacobian_keys_reach_suspicious_after_their_first_batch(
        self, model: DemoModel, seed: int, identities: int
    ) -> None:
        for key_batches in _attack(model, "jacobian", identities, seed):
            _, scores = _observe(AugmentationDetector(), key_batches)
            assert scores[0] >= SUSPICIOUS_AT
            assert min(scores) >= SUSPICIOUS_AT

    @pytest.mark.parametrize("name", ["uniform", "linesearch", "equation", "knockoff"])
    def test_other_attacks_make_no_steps(self, model: DemoModel, name: str) -> None:
        (batches,) = _attack(model, name, 1, 1)
        assert _steps_in(AugmentationDetector(), np.vstack(batches)) == 0

    def test_a_step_inside_one_batch_counts(self) -> None:
        rng = np.random.default_rng(0)
        x = rng.integers(1, 15, size=(8, 64)).astype(np.float32)
        children = x + rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
        found = AugmentationDetector().steps(
            np.zeros((0, 64), np.float32), np.vstack([x, children])
        )
        assert found.tolist() == [False] * 8 + [True] * 8

    def test_siblings_two_steps_apart_count(self) -> None:
        rng = np.random.default_rng(1)
        parent = rng.integers(2, 14, size=64).astype(np.float32)
        signs = rng.choice([-1.0, 1.0], size=(2, 64)).astype(np.float32)
        found = AugmentationDetector().steps(np.zeros((0, 64), np.float32), parent + signs)
        assert found.tolist() == [False, True]

    def test_a_parent_older_than_the_ring_is_forgotten(self) -> None:
        rng = np.random.default_rng(2)
        parent = rng.integers(2, 14, size=(1, 64)).astype(np.float32)
        others = rng.uniform(0, 16, size=(4, 64)).astype(np.float32)
        child = parent + rng.choice([-1.0, 1.0], size=(1, 64)).astype(np.float32)
        detector = AugmentationDetector(ring=4)
        assert detector.steps(np.vstack([parent, others]), child).tolist() == [False]
        assert detector.steps(np.vstack([parent, others[:3]]), child).tolist() == [True]


class TestNaturalTraffic:
    def test_ten_benign_clients_make_no_step_in_20000_queries(self) -> None:
        pool, _ = natural_pool(0)
        popular = popular_inputs(pool, 10, np.random.default_rng(7))
        total = 0
        for j in range(10):
            client = BenignClient(pool, rng=np.random.default_rng(100 + j), popular=popular)
            stream = client.next_batch(2000).astype(np.float32)
            total += _steps_in(AugmentationDetector(), stream)
        assert total == 0

    def test_brightness_changes_repeats_and_varied_steps_are_not_steps(self) -> None:
        pool, _ = natural_pool(0)
        rng = np.random.default_rng(3)
        x = pool[:50].astype(np.float32)
        detector = AugmentationDetector()
        assert _steps_in(detector, np.clip(np.vstack([x, x + 1, x - 1]), 0, 16)) == 0
        assert _steps_in(detector, np.vstack([x, x, x])) == 0
        varied = x + rng.choice([-1.0, 1.0], x.shape) * rng.uniform(0.5, 1.5, x.shape)
        assert _steps_in(detector, np.vstack([x, np.clip(varied, 0, 16)]).astype(np.float32)) == 0

    def test_one_step_alone_scores_zero(self) -> None:
        rng = np.random.default_rng(4)
        x = rng.integers(2, 14, size=(1, 64)).astype(np.float32)
        step = x + rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
        _, scores = _observe(AugmentationDetector(), [x, step])
        assert scores == [0.0, 0.0]


class TestState:
    def test_state_is_bounded_and_wide_inputs_keep_a_keyed_subset(self) -> None:
        rng = np.random.default_rng(5)
        detector = AugmentationDetector(key=b"k")
        batches = [rng.uniform(0, 1, size=(100, 784)).astype(np.float32) for _ in range(20)]
        state, _ = _observe(detector, batches)
        assert len(state) <= 32 + 64 * 64 * 4 + 128 // 8

    def test_steps_in_wide_inputs_are_found_on_the_subset(self) -> None:
        rng = np.random.default_rng(6)
        x = rng.uniform(0.2, 0.8, size=(16, 784)).astype(np.float32)
        children = x + np.float32(0.05) * rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
        _, scores = _observe(AugmentationDetector(key=b"k"), [x, children])
        assert scores[-1] == 1.0

    def test_nan_inputs_a_new_width_and_bad_state_start_cleanly(self) -> None:
        detector = AugmentationDetector()
        bad = np.full((4, 64), np.nan, dtype=np.float32)
        state, verdict = detector.update(None, Observation("c", 0.0, 4, raw=bad))
        assert verdict.score == 0.0
        state, verdict = detector.update(state, Observation("c", 0.0, 2, raw=np.ones((2, 10))))
        assert verdict.score == 0.0
        # A malformed state starts afresh: the same state as a new client's.
        fresh, _ = detector.update(None, Observation("c", 0.0, 2, raw=np.ones((2, 10))))
        garbled, _ = detector.update(b"AUG1garbage", Observation("c", 0.0, 2, raw=np.ones((2, 10))))
        assert garbled == fresh
        same, verdict = detector.update(state, Observation("c", 0.0, 0))
        assert same == state and verdict.score == 0.0

    def test_the_verdict_names_the_reason_once_it_scores(self) -> None:
        rng = np.random.default_rng(7)
        x = rng.integers(2, 14, size=(8, 64)).astype(np.float32)
        child = x + rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)
        state, verdict = AugmentationDetector().update(
            None, Observation("c", 0.0, 16, raw=np.vstack([x, child]))
        )
        assert verdict.reason == REASON and verdict.score == 1.0
        assert verdict.detail == "sign_steps=8/16"
        assert state

    def test_settings_out_of_range_are_refused(self) -> None:
        with pytest.raises(ValueError):
            AugmentationDetector(tolerance=0.7)
        with pytest.raises(ValueError):
            AugmentationDetector(full_at=1)
