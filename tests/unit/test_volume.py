"""Volume: spikes against the client's own history, sustained volume against the tier."""

from __future__ import annotations

import numpy as np
import pytest

from extauthz.detect.base import Observation, Verdict
from extauthz.detect.volume import VolumeDetector

T0 = 1_700_000_000.0


def steady(
    detector: VolumeDetector,
    per_min: float,
    minutes: float,
    rng: np.random.Generator,
    start: float = T0,
    state: bytes | None = None,
) -> tuple[bytes, list[Verdict], float]:
    """Send single-instance requests with exponential gaps (Poisson at ``per_min``)."""
    verdicts: list[Verdict] = []
    now = start
    end = start + 60.0 * minutes
    while now < end:
        state, verdict = detector.update(state, Observation("key:v", now=now, instances=1))
        verdicts.append(verdict)
        now += float(rng.exponential(60.0 / per_min))
    assert state is not None
    return state, verdicts, now


def burst(
    detector: VolumeDetector, state: bytes, count: int, start: float, seconds: float = 30.0
) -> tuple[bytes, Verdict]:
    """Send ``count`` single-instance requests evenly over ``seconds``; return the last verdict."""
    verdict = Verdict(0.0)
    for now in np.linspace(start, start + seconds, count):
        state, verdict = detector.update(state, Observation("key:v", now=float(now), instances=1))
    return state, verdict


class TestSpike:
    """A 10x jump over the client's usual rate raises the z-score; a steady rate does not."""

    def test_steady_irregular_rate_never_alarms(self) -> None:
        detector = VolumeDetector(sustained_per_min=1000)
        _, verdicts, _ = steady(detector, 10, 120, np.random.default_rng(1))
        assert max(v.score for v in verdicts) == 0.0

    def test_tenfold_spike_alarms(self) -> None:
        detector = VolumeDetector(sustained_per_min=1000)
        state, verdicts, now = steady(detector, 10, 30, np.random.default_rng(2))
        assert max(v.score for v in verdicts) == 0.0
        _, verdict = burst(detector, state, 100, now)
        assert verdict.score == 1.0 and verdict.reason == "volume_spike"
        assert float(verdict.detail.split("z=")[1].split()[0]) > 4.0

    def test_one_batch_counts_its_instances(self) -> None:
        detector = VolumeDetector(sustained_per_min=1000)
        state, _, now = steady(detector, 10, 30, np.random.default_rng(3))
        _, verdict = detector.update(state, Observation("key:v", now=now, instances=100))
        assert verdict.reason == "volume_spike"

    def test_new_client_is_not_judged_by_its_own_empty_past(self) -> None:
        detector = VolumeDetector(sustained_per_min=1000)
        _, verdict = burst(detector, b"", 200, T0)
        assert verdict.score == 0.0

    def test_back_from_an_idle_gap_at_the_usual_pace_is_not_a_spike(self) -> None:
        detector = VolumeDetector(sustained_per_min=1000)
        rng = np.random.default_rng(4)
        state, _, now = steady(detector, 10, 60, rng)
        _, verdicts, _ = steady(detector, 10, 30, rng, start=now + 2 * 3600, state=state)
        assert max(v.score for v in verdicts) == 0.0


class TestSustained:
    """Volume above the tier's reference for several windows scores, even without history."""

    def test_sustained_high_volume_alarms_after_several_windows(self) -> None:
        detector = VolumeDetector(sustained_per_min=100, sustained_windows=5)
        _, verdicts, _ = steady(detector, 200, 10, np.random.default_rng(5))
        assert verdicts[-1].score == 1.0 and verdicts[-1].reason == "sustained_volume"
        assert verdicts[300].score < 1.0  # two minutes in: not yet

    def test_below_the_reference_never_sustained(self) -> None:
        detector = VolumeDetector(sustained_per_min=100)
        _, verdicts, _ = steady(detector, 50, 30, np.random.default_rng(6))
        assert max(v.score for v in verdicts) == 0.0

    def test_an_idle_gap_resets_the_run(self) -> None:
        detector = VolumeDetector(sustained_per_min=100, sustained_windows=5)
        rng = np.random.default_rng(7)
        state, _, now = steady(detector, 200, 4, rng)
        _, verdicts, _ = steady(detector, 200, 1.5, rng, start=now + 600, state=state)
        assert verdicts[-1].score < 0.5


class TestState:
    """The state is a few floats, round-trips through bytes and tolerates odd input."""

    def test_round_trip_and_size(self) -> None:
        detector = VolumeDetector(sustained_per_min=100)
        state, _, now = steady(detector, 10, 600, np.random.default_rng(8))
        assert len(state) < 64
        copy = bytes(bytearray(state))
        obs = Observation("key:v", now=now, instances=5)
        assert detector.update(state, obs) == detector.update(copy, obs)

    def test_foreign_state_starts_afresh_and_old_timestamps_count_now(self) -> None:
        detector = VolumeDetector(sustained_per_min=100)
        state, verdict = detector.update(b"nonsense", Observation("key:v", now=T0, instances=1))
        assert verdict.score == 0.0
        state, verdict = detector.update(state, Observation("key:v", now=T0 - 500, instances=2))
        assert "window_count=3" in verdict.detail

    def test_rejects_bad_settings_and_times(self) -> None:
        with pytest.raises(ValueError):
            VolumeDetector(sustained_per_min=0)
        with pytest.raises(ValueError):
            VolumeDetector(sustained_per_min=10, window_s=-1)
        with pytest.raises(ValueError):
            VolumeDetector(sustained_per_min=10).update(
                None, Observation("c", now=float("nan"), instances=1)
            )
