"""Risk levels and the actions they lead to."""

from __future__ import annotations

import enum


class RiskLevel(enum.IntEnum):
    """How much a client is suspected of extraction; ordered, higher is worse."""

    NORMAL = 0
    ELEVATED = 1
    SUSPICIOUS = 2
    ABUSIVE = 3

    @property
    def label(self) -> str:
        return _LABELS[self]

    @classmethod
    def parse(cls, text: str) -> RiskLevel:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(level.label for level in cls)
            raise ValueError(f"unknown risk level {text!r} (expected one of: {names})") from None


_LABELS = {level: level.name.lower() for level in RiskLevel}


class Action(enum.Enum):
    """The verdict on one request, mildest first."""

    ALLOW = "allow"
    THROTTLE = "throttle"
    CHALLENGE = "challenge"
    BLOCK = "block"

    @classmethod
    def parse(cls, text: str) -> Action:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(action.value for action in cls)
            raise ValueError(f"unknown action {text!r} (expected one of: {names})") from None


ACTION_SEVERITY = {Action.ALLOW: 0, Action.THROTTLE: 1, Action.CHALLENGE: 2, Action.BLOCK: 3}


def strictest(*actions: Action) -> Action:
    """Return the most severe of ``actions`` (ALLOW when none)."""
    return max(actions, key=ACTION_SEVERITY.__getitem__, default=Action.ALLOW)
