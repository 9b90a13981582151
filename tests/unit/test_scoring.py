"""Risk scoring: noisy-OR of detectors, thresholds with hysteresis, decay, shadow detectors."""

from __future__ import annotations

import pytest

from extauthz.core.risk import RiskLevel
from extauthz.core.scoring import NO_RISK, Risk, Scoring, combine, level_for, update

SCORING = Scoring(
    weights={"prada": 1.0, "margin": 0.8, "volume": 0.5}, shadow=frozenset({"coverage"})
)


class TestCombine:
    """One strong signal suffices; weak ones add up; shadow detectors never act."""

    def test_noisy_or(self) -> None:
        score, reasons = combine(
            {"prada": (0.5, "prada_non_normal"), "margin": (0.5, "boundary_probing")}, SCORING
        )
        assert score == pytest.approx(1 - 0.5 * 0.6)
        assert reasons == ("prada_non_normal", "boundary_probing")

    def test_shadow_and_weak_reasons(self) -> None:
        score, reasons = combine(
            {"coverage": (1.0, "input_coverage"), "volume": (0.2, "volume_spike")}, SCORING
        )
        assert score == pytest.approx(0.1)
        assert reasons == ()  # 0.1 is below the reason floor; coverage is shadow


class TestLevels:
    """Levels are entered at their thresholds and left only below threshold - hysteresis."""

    @pytest.mark.parametrize(
        ("score", "previous", "expected"),
        [
            (0.29, RiskLevel.NORMAL, RiskLevel.NORMAL),
            (0.30, RiskLevel.NORMAL, RiskLevel.ELEVATED),
            (0.61, RiskLevel.ELEVATED, RiskLevel.SUSPICIOUS),
            (0.55, RiskLevel.SUSPICIOUS, RiskLevel.SUSPICIOUS),  # inside the band
            (0.49, RiskLevel.SUSPICIOUS, RiskLevel.ELEVATED),
            (0.95, RiskLevel.NORMAL, RiskLevel.ABUSIVE),
        ],
    )
    def test_thresholds_and_hysteresis(
        self, score: float, previous: RiskLevel, expected: RiskLevel
    ) -> None:
        assert level_for(score, previous, SCORING) is expected

    def test_decay_brings_a_quiet_client_back(self) -> None:
        risk = update(NO_RISK, {"prada": (0.7, "prada_non_normal")}, 1000.0, SCORING)
        assert risk.level is RiskLevel.SUSPICIOUS
        quiet = update(risk, {}, 1000.0 + 3600.0, SCORING)  # one half-life later: 0.35
        assert quiet.score == pytest.approx(0.35)
        assert quiet.level is RiskLevel.ELEVATED
        assert quiet.reasons == ("prada_non_normal",)
        later = update(quiet, {}, 1000.0 + 4 * 3600.0, SCORING)
        assert later.level is RiskLevel.NORMAL

    def test_new_evidence_wins_over_decayed(self) -> None:
        old = Risk(0.2, RiskLevel.NORMAL, ("volume_spike",), 0.0)
        new = update(old, {"margin": (1.0, "boundary_probing")}, 10.0, SCORING)
        assert new.score == pytest.approx(0.8)
        assert new.reasons == ("boundary_probing",)
