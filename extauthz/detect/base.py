"""The detector seam: what a detector sees of one request and what it says about the client.

A detector is pure: it takes its previous state (bytes, kept in the Store so any replica can
continue it) and one observation, and returns its new state and a verdict. State is bounded by
each detector's caps, so a million clients cannot exhaust memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class Observation:
    """One request of one client, with the model's answer.

    ``vectors`` are the instances' feature vectors (float32, (n, d), already reduced by the fixed
    random projection of ``detect.features``); ``raw`` the unreduced numeric inputs (n, D) when
    small enough to keep (PRADA measures distances in input space); ``minhash`` text signatures
    (n, m) uint64; ``top1`` and ``margin`` come from the answer (predicted class, top-1 minus
    top-2 probability). Any may be None when the dialect cannot give it.
    """

    client_id: str
    now: float
    instances: int
    vectors: np.ndarray | None = None
    raw: np.ndarray | None = None
    minhash: np.ndarray | None = None
    top1: np.ndarray | None = None
    margin: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detector's opinion of the client after this observation: ``score`` in [0, 1] (0 is
    normal, 1 certain extraction) and a stable ``reason`` code when the score matters."""

    score: float
    reason: str = ""
    detail: str = ""


class Detector(Protocol):
    """One detector. ``update`` is pure: the same state and observation give the same result."""

    name: str

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Fold ``observation`` into ``state`` (None: a new client); return the new state."""
        ...
