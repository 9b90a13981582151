"""Input coverage: uniform-noise queries land where natural traffic never goes; natural ones do not."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

from extauthz.detect.base import Observation
from extauthz.detect.coverage import CoverageDetector, reference_from
from extauthz.detect.features import Projector

F32 = npt.NDArray[np.float32]

_DIGITS = load_digits()
_ORDER = np.random.default_rng(0).permutation(_DIGITS.data.shape[0])
PROJECTOR = Projector(dim=32, seed=0)
REFERENCE: F32 = PROJECTOR.project(_DIGITS.data[_ORDER[:1200]])
HELD_OUT = _DIGITS.data[_ORDER[1200:]].astype(np.float32)  # 597 rows never in the reference


def feed(
    detector: CoverageDetector, rows: npt.ArrayLike, batch: int = 16, state: bytes | None = None
) -> tuple[bytes, list[float]]:
    """Send raw (n, 64) rows, projected, ``batch`` at a time; return the state and the scores."""
    vectors = PROJECTOR.project(np.asarray(rows, dtype=np.float32))
    scores: list[float] = []
    for start in range(0, vectors.shape[0], batch):
        chunk = vectors[start : start + batch]
        obs = Observation("key:c", now=float(start), instances=chunk.shape[0], vectors=chunk)
        state, verdict = detector.update(state, obs)
        scores.append(verdict.score)
    assert state is not None
    return state, scores


@pytest.fixture(scope="module")
def detector() -> CoverageDetector:
    return CoverageDetector(reference_from(REFERENCE))


class TestCoverage:
    """Scores grow with the share of queries in cells normal traffic almost never visits."""

    def test_natural_held_out_rows_score_zero(self, detector: CoverageDetector) -> None:
        _, scores = feed(detector, HELD_OUT)
        assert max(scores) == 0.0

    def test_one_class_of_natural_rows_scores_zero(self, detector: CoverageDetector) -> None:
        threes = HELD_OUT[_DIGITS.target[_ORDER[1200:]] == 3]
        _, scores = feed(detector, threes, batch=4)
        assert max(scores) == 0.0

    def test_uniform_noise_over_the_input_box_scores_one(self, detector: CoverageDetector) -> None:
        noise = np.random.default_rng(1).uniform(0, 16, (200, 64))
        _, scores = feed(detector, noise)
        assert scores[-1] == 1.0

    def test_noise_after_natural_history_rises(self, detector: CoverageDetector) -> None:
        state, natural = feed(detector, HELD_OUT[:300])
        noise = np.random.default_rng(2).uniform(0, 16, (300, 64))
        _, scores = feed(detector, noise, state=state)
        assert max(natural) == 0.0 and scores[-1] > 0.5

    def test_no_score_before_min_queries(self, detector: CoverageDetector) -> None:
        noise = np.random.default_rng(3).uniform(0, 16, (48, 64))
        _, scores = feed(detector, noise)
        assert max(scores) == 0.0

    def test_cells_are_seeded_and_in_range(self, detector: CoverageDetector) -> None:
        cells = detector.cells(REFERENCE)
        assert cells.min() >= 0 and cells.max() < 256
        again = CoverageDetector(REFERENCE)
        other = CoverageDetector(REFERENCE, seed=1)
        assert np.array_equal(again.cells(REFERENCE), cells)
        assert not np.array_equal(other.cells(REFERENCE), cells)
        assert 0.0 < detector.reference_rare < 0.2


class TestState:
    """Counts round-trip through bytes and stay within 2 bytes per cell."""

    def test_round_trip_and_bounded(self, detector: CoverageDetector) -> None:
        rows = np.random.default_rng(4).uniform(0, 16, (10_000, 64))
        state, _ = feed(detector, rows, batch=500)
        assert len(state) == 7 + 2 * 256
        counts = np.frombuffer(state, "<u2", 256, 7)
        assert 0 < counts.sum() < 8192
        copy = bytes(bytearray(state))
        obs = Observation("c", 0.0, 2, vectors=PROJECTOR.project(HELD_OUT[:2]))
        assert detector.update(state, obs) == detector.update(copy, obs)

    def test_foreign_state_and_missing_vectors(self, detector: CoverageDetector) -> None:
        state, verdict = detector.update(b"\x00" * 10, Observation("c", 0.0, 1))
        assert verdict.score == 0.0 and np.frombuffer(state, "<u2", 256, 7).sum() == 0
        smaller = CoverageDetector(REFERENCE, buckets=64)
        assert len(smaller.update(state, Observation("c", 0.0, 1))[0]) == 7 + 2 * 64

    def test_non_finite_vectors_count_as_off_manifold(self, detector: CoverageDetector) -> None:
        vectors = PROJECTOR.project(HELD_OUT[:3])
        vectors[1, 4] = np.nan
        assert detector.cells(vectors)[1] == 255

    def test_reference_from_keeps_finite_rows_within_cap(self) -> None:
        rows = np.vstack([REFERENCE, np.full((1, 32), np.inf, dtype=np.float32)])
        kept = reference_from(rows, max_rows=500)
        assert kept.shape == (500, 32) and np.isfinite(kept).all()
        assert np.array_equal(kept[0], REFERENCE[0])

    def test_rejects_bad_settings(self) -> None:
        with pytest.raises(ValueError):
            CoverageDetector(REFERENCE, buckets=100)
        with pytest.raises(ValueError):
            CoverageDetector(REFERENCE[:10])
        with pytest.raises(ValueError):
            CoverageDetector(REFERENCE, min_queries=0)
