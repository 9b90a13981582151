"""Detector verdicts into one risk score and a level, with hysteresis and decay.

Scores combine as a noisy-OR of weighted verdicts (any one strong signal is enough, and
independent weak ones add up): risk = 1 - prod(1 - w_i * s_i). The stored risk decays with a
half-life when evidence stops, and a level is left only once the risk falls a hysteresis band
below its threshold, so a client does not flap between levels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from extauthz.core.risk import RiskLevel


@dataclass(frozen=True, slots=True)
class Scoring:
    """How verdicts become a level (from the policy's ``detection`` section)."""

    weights: Mapping[str, float]
    shadow: frozenset[str] = frozenset()
    elevated: float = 0.3
    suspicious: float = 0.6
    abusive: float = 0.9
    hysteresis: float = 0.1
    half_life_s: float = 3600.0
    reason_floor: float = 0.2

    def thresholds(self) -> list[tuple[RiskLevel, float]]:
        return [
            (RiskLevel.ABUSIVE, self.abusive),
            (RiskLevel.SUSPICIOUS, self.suspicious),
            (RiskLevel.ELEVATED, self.elevated),
        ]


@dataclass(frozen=True, slots=True)
class Risk:
    """A client's risk now: the score, the level it gives, and the reasons that drove it."""

    score: float
    level: RiskLevel
    reasons: tuple[str, ...]
    updated_at: float


NO_RISK = Risk(0.0, RiskLevel.NORMAL, (), 0.0)


def combine(
    verdicts: Mapping[str, tuple[float, str]], scoring: Scoring
) -> tuple[float, tuple[str, ...]]:
    """Noisy-OR of the weighted scores of acting (non-shadow) detectors, and their reasons,
    strongest first."""
    survive = 1.0
    weighted: list[tuple[float, str]] = []
    for name, (score, reason) in verdicts.items():
        if name in scoring.shadow:
            continue
        contribution = min(1.0, max(0.0, scoring.weights.get(name, 1.0) * score))
        survive *= 1.0 - contribution
        if contribution >= scoring.reason_floor and reason:
            weighted.append((contribution, reason))
    weighted.sort(reverse=True)
    return 1.0 - survive, tuple(reason for _, reason in weighted)


def decayed(previous: Risk, now: float, scoring: Scoring) -> float:
    """The previous score after the time since its update (half-life decay)."""
    if previous.updated_at <= 0 or now <= previous.updated_at:
        return previous.score
    return previous.score * math.pow(0.5, (now - previous.updated_at) / scoring.half_life_s)


def update(
    previous: Risk, verdicts: Mapping[str, tuple[float, str]], now: float, scoring: Scoring
) -> Risk:
    """Fold this request's verdicts into the client's risk."""
    current, reasons = combine(verdicts, scoring)
    carried = decayed(previous, now, scoring)
    score = max(current, carried)
    if current < carried:
        reasons = previous.reasons  # the evidence that still dominates
    return Risk(score, level_for(score, previous.level, scoring), reasons, now)


def level_for(score: float, previous: RiskLevel, scoring: Scoring) -> RiskLevel:
    """The level for ``score``: entered at its threshold, left only below threshold - hysteresis."""
    for level, threshold in scoring.thresholds():
        if score >= threshold:
            return level
        if previous >= level and score >= threshold - scoring.hysteresis:
            return level
    return RiskLevel.NORMAL
