"""Boundary probing: a client whose answers keep landing near the decision boundary scores high."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from extauthz.detect.base import Observation, Verdict
from extauthz.detect.features import top1_margin
from extauthz.detect.margin import REASON, MarginDetector, baseline_share

Margins = npt.NDArray[np.float32]


def natural_margins(seed: int, n: int) -> Margins:
    """Margins of a confident 10-class model on natural inputs: softmax of scaled logits."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)) * 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return top1_margin(probs)[1]


def boundary_margins(seed: int, n: int) -> Margins:
    """Answers of a line search homing in on the boundary: margins shrinking toward 0."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.0, 0.3, n) * 0.5 ** np.minimum(np.arange(n) % 8, 6)).astype(np.float32)


BASELINE = baseline_share(natural_margins(100, 20_000), 0.1)


def observe(margins: Margins) -> Observation:
    """An observation carrying only answer margins."""
    return Observation("c", 0.0, margins.size, margin=margins)


def run(detector: MarginDetector, margins: Margins, batch: int = 1) -> tuple[bytes, list[Verdict]]:
    """Feed margins in batches; return the final state and each batch's verdict."""
    state: bytes | None = None
    verdicts = []
    for start in range(0, margins.size, batch):
        state, verdict = detector.update(state, observe(margins[start : start + batch]))
        verdicts.append(verdict)
    assert state is not None
    return state, verdicts


class TestBaselineShare:
    """The share of normal traffic's margins below the threshold."""

    def test_share_of_small_margins_ignoring_non_finite(self) -> None:
        """Two of four finite margins are below 0.1; NaN and inf are left out."""
        margins = np.array([0.05, 0.09, 0.1, 0.5, np.nan, np.inf])
        assert baseline_share(margins, 0.1) == 0.5

    def test_no_margins_give_zero(self) -> None:
        """Nothing to measure: 0.0."""
        assert baseline_share(np.array([np.nan]), 0.1) == 0.0

    def test_natural_traffic_baseline_is_small(self) -> None:
        """The confident model here answers with margin < 0.1 a few percent of the time."""
        assert 0.02 < BASELINE < 0.15


class TestBoundaryProbing:
    """Low-margin answers far above the baseline raise the score; natural ones do not."""

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_line_search_scores_high_within_50_queries(self, seed: int) -> None:
        """A line search's answers reach score >= 0.9 with the reason by the 50th query."""
        _, verdicts = run(MarginDetector(BASELINE), boundary_margins(seed, 50))
        assert verdicts[-1].score >= 0.9
        assert verdicts[-1].reason == REASON and "low_margin=" in verdicts[-1].detail

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_natural_answers_score_about_zero(self, seed: int) -> None:
        """2,000 natural answers: mean score under 0.02, never above 0.3, 0 at the end."""
        _, verdicts = run(MarginDetector(BASELINE), natural_margins(seed, 2000), batch=4)
        scores = np.array([v.score for v in verdicts])
        assert scores.mean() < 0.02 and scores.max() < 0.3
        assert verdicts[-1].score == 0.0 and verdicts[-1].reason == ""

    def test_nothing_before_min_queries(self) -> None:
        """29 boundary answers say nothing; the 30th gives a score."""
        _, verdicts = run(MarginDetector(BASELINE), np.zeros(30, dtype=np.float32))
        assert all(v == Verdict(0.0) for v in verdicts[:29])
        assert verdicts[29].score == 1.0

    def test_the_window_forgets_old_answers(self) -> None:
        """After a probing burst, a window of natural answers brings the score back to 0."""
        margins = np.concatenate((np.zeros(200, np.float32), natural_margins(3, 256)))
        _, verdicts = run(MarginDetector(BASELINE), margins, batch=8)
        assert verdicts[24].score == 1.0 and verdicts[-1].score == 0.0

    def test_score_follows_the_binomial_z(self) -> None:
        """10 low of 100 against a 2% baseline: z = 8/1.4 = 5.71, score (z - 2) / 4 = 0.93."""
        margins = np.where(np.arange(100) % 10 == 0, 0.0, 0.5).astype(np.float32)
        _, verdicts = run(MarginDetector(0.02, window=100), margins, batch=100)
        z = (10 - 2) / np.sqrt(100 * 0.02 * 0.98)
        assert verdicts[-1].score == pytest.approx((z - 2) / 4)

    def test_zero_baseline_does_not_divide_by_zero(self) -> None:
        """A baseline of 0 is floored at 0.001: one low answer in 100 gives z = 2.85, a finite
        score of 0.21 rather than an infinite surprise."""
        margins = np.where(np.arange(100) == 0, 0.0, 0.5).astype(np.float32)
        _, verdicts = run(MarginDetector(0.0, window=100), margins, batch=100)
        z = (1 - 0.1) / np.sqrt(100 * 0.001 * 0.999)
        assert verdicts[-1].score == pytest.approx((z - 2) / 4)
        assert 0.2 < verdicts[-1].score < 0.25


class TestState:
    """State is a packed bit ring: small, bounded, the same for batches and single answers."""

    def test_state_is_bounded_by_the_window(self) -> None:
        """10,000 answers keep 256 bits: 14 header bytes and 32 bytes of bits."""
        state, _ = run(MarginDetector(BASELINE), natural_margins(0, 10_000), batch=100)
        assert len(state) == 14 + 32

    def test_batches_equal_single_answers(self) -> None:
        """A batch of 64 leaves the same bytes and verdict as 64 single answers."""
        margins = np.concatenate((natural_margins(1, 300), boundary_margins(1, 84)))
        batched = run(MarginDetector(BASELINE), margins, batch=64)
        single = run(MarginDetector(BASELINE), margins, batch=1)
        assert batched[0] == single[0] and batched[1][-1] == single[1][-1]

    def test_answers_without_margins_change_nothing(self) -> None:
        """An observation without margins (or only NaN) leaves the state as it was."""
        detector = MarginDetector(BASELINE)
        state, _ = run(detector, boundary_margins(0, 40))
        assert detector.update(state, Observation("c", 0.0, 1))[0] == state
        nan = observe(np.array([np.nan], dtype=np.float32))
        assert detector.update(state, nan)[0] == state

    def test_foreign_state_starts_afresh_and_a_smaller_window_trims(self) -> None:
        """Garbage bytes are a new client; a detector with a smaller window keeps the last bits."""
        detector = MarginDetector(BASELINE)
        one = observe(np.array([0.0], dtype=np.float32))
        assert detector.update(b"junk", one) == detector.update(None, one)
        state, _ = run(detector, np.zeros(200, dtype=np.float32), batch=50)
        small = MarginDetector(BASELINE, window=64)
        assert len(small.update(state, one)[0]) == 14 + 8
