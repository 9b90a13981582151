"""Watermarks in served answers: DAWN-style label marks and a CosWM-style soft mark.

Two marks, both derived from one deployment key (a :class:`~extauthz.keys.KeyRing`), the same for
every client, so the same input gets the same answer whoever asks and Sybil accounts pool nothing
that removes them:

- **Label marks** (DAWN, Szyller et al. 2021): each input gets a keyed number
  ``u(x) in [0, 1)`` from HMAC-SHA256 over its *whole* canonical bytes
  (:func:`~extauthz.protect.perturb.canonical_rows`; never a prefix, unlike DAWN's ``strip``
  quirk). An input is marked iff ``u(x) < rate``, so a higher rate marks a superset of a lower
  rate's inputs (nested tiers). A marked input's top-1 becomes a keyed other class; for
  probabilities the target's and the top-1's entries trade places, so the row keeps its shape.
- **Soft mark** (CosWM, Charette et al. 2022): on every probability answer, a keyed class ``c*``
  gets a periodic bump along a keyed direction ``v``:
  ``q_c* = (p_c* + eps(1 + cos(f<v,x>))) / (1 + 2 eps)``, ``q_j = p_j / (1 + 2 eps)``, then the
  row renormalised and its top-1 restored where the bump would move it. A clone distilled from the soft labels learns the
  bump; :func:`extauthz.evidence.verify.verify_soft_mark` finds it as a spectral peak at ``f``.

Every result names the key id (``kid``) that made it, so evidence recorded before a rotation still
verifies while the old key stays in the ring.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from extauthz.keys import KeyRing
from extauthz.protect.perturb import canonical_rows, restore_argmax

__all__ = [
    "LabelMarks",
    "MarkSettings",
    "SoftKey",
    "apply_label_marks",
    "apply_soft_mark",
    "mark_selection",
    "marked_label",
    "soft_key",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Key purposes: a MAC made for one use is worthless for another.
_SELECT: Final = "watermark/select"
_LABEL: Final = "watermark/label"
_SOFT: Final = "watermark/soft"
#: A keyed soft frequency (radians per unit of <v, x>) falls in this band when none is set. It
#: suits inputs whose projections spread over a few units (the demo digits: std ~3 on 0..16
#: features): under one period per data span, smooth enough for a distilled clone to learn.
SOFT_FREQUENCY_BAND: Final = (0.2, 0.35)
# The grid inputs are quantized to before selection: serving and verification must agree on it.
CANONICAL_QUANTUM: Final = 1e-3
_TWO64: Final = float(2**64)


@dataclass(frozen=True, slots=True)
class MarkSettings:
    """How much to mark: ``label_rate`` of inputs get a keyed wrong top-1; ``soft_epsilon`` is the
    soft mark's amplitude (0 turns it off); ``soft_frequency`` 0 means keyed in
    :data:`SOFT_FREQUENCY_BAND`."""

    label_rate: float
    soft_epsilon: float = 0.05
    soft_frequency: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_rate < 1.0:
            raise ValueError("label_rate must be in [0, 1)")
        if not 0.0 <= self.soft_epsilon <= 0.5:
            raise ValueError("soft_epsilon must be in [0, 0.5]")
        if not self.soft_frequency >= 0.0 or not math.isfinite(self.soft_frequency):
            raise ValueError("soft_frequency must be a finite number >= 0")


@dataclass(frozen=True, slots=True)
class LabelMarks:
    """Served probabilities after label marks, which rows were marked, their targets, the key."""

    served: FloatArray
    marked: BoolArray
    targets: IntArray
    """Per row: the keyed other class (also for unmarked rows, for the ledger and decoys)."""
    kid: str


@dataclass(frozen=True, slots=True)
class SoftKey:
    """The soft mark's keyed parameters for one key id: class, unit direction, frequency."""

    target_class: int
    direction: FloatArray
    frequency: float
    kid: str


def _kid(keys: KeyRing, kid: str | None) -> str:
    """Return ``kid`` or the ring's current id; refuse an id the ring does not hold."""
    chosen = keys.current_id if kid is None else kid
    if chosen not in keys.keys:
        raise KeyError(f"watermark: key id {chosen!r} is not in the ring")
    return chosen


def _uniform(secret: bytes, canonical: Sequence[bytes]) -> FloatArray:
    """Return one keyed number in [0, 1) per input: the first 8 bytes of its full-input HMAC."""
    macs = b"".join(hmac.new(secret, row, hashlib.sha256).digest()[:8] for row in canonical)
    words = np.frombuffer(macs, dtype=">u8").astype(np.float64)
    out: FloatArray = np.minimum(words / _TWO64, np.nextafter(1.0, 0.0))
    return out


def mark_selection(
    keys: KeyRing, canonical: Sequence[bytes], *, kid: str | None = None
) -> tuple[FloatArray, str]:
    """Return ``(u, kid)``: a keyed ``u(x) in [0, 1)`` per input; marked at rate r iff ``u < r``.

    Thresholding one keyed number makes the tiers nested by construction.
    """
    chosen = _kid(keys, kid)
    return _uniform(keys.derive(_SELECT).keys[chosen], canonical), chosen


def marked_label(
    keys: KeyRing,
    canonical: Sequence[bytes],
    classes: int,
    original: npt.ArrayLike,
    kid: str | None = None,
) -> IntArray:
    """Return a keyed class per input, never the input's ``original`` top-1.

    The offset ``1 + floor(u (K - 1))`` from the original is uniform over the other classes, so a
    model that never saw the marks matches it at rate ``1 / (K - 1)`` at most where it errs.
    """
    if classes < 2:
        raise ValueError("label marks need at least 2 classes")
    chosen = _kid(keys, kid)
    u = _uniform(keys.derive(_LABEL).keys[chosen], canonical)
    offset = 1 + np.floor(u * (classes - 1)).astype(np.int64)
    out: IntArray = (np.asarray(original, dtype=np.int64) + offset) % classes
    return out


def apply_label_marks(
    p: npt.ArrayLike,
    canonical: Sequence[bytes],
    keys: KeyRing,
    rate: float,
    *,
    kid: str | None = None,
) -> LabelMarks:
    """Make the keyed target the top-1 of each selected row by trading it with the top-1 entry.

    Swapping keeps the row's multiset of values (it still looks like a confident answer, just for
    another class); unmarked rows are served unchanged. A top-1 tied with the target after the
    swap cannot happen: the target took the old maximum.
    """
    probs = np.array(p, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(canonical):
        raise ValueError("p must be (n, K) with one canonical input per row")
    n, k = probs.shape
    chosen = _kid(keys, kid)
    if k < 2 or n == 0:
        return LabelMarks(probs, np.zeros(n, bool), np.zeros(n, np.int64), chosen)
    u, _ = mark_selection(keys, canonical, kid=chosen)
    top = np.argmax(probs, axis=1)
    targets = marked_label(keys, canonical, k, top, chosen)
    marked = u < rate
    rows = np.flatnonzero(marked)
    high = probs[rows, top[rows]]
    probs[rows, top[rows]] = probs[rows, targets[rows]]
    probs[rows, targets[rows]] = high
    # Equal entries swap to a tie; lift the target one ulp so argmax names it.
    tied = rows[probs[rows, top[rows]] >= probs[rows, targets[rows]]]
    probs[tied, targets[tied]] = np.nextafter(probs[tied, targets[tied]], np.inf)
    return LabelMarks(probs, marked, targets, chosen)


def soft_key(
    keys: KeyRing, classes: int, dim: int, *, frequency: float = 0.0, kid: str | None = None
) -> SoftKey:
    """Return the soft mark's class ``c*``, unit direction ``v`` and frequency for key ``kid``."""
    chosen = _kid(keys, kid)
    secret = keys.derive(_SOFT).keys[chosen]
    seed = hmac.new(secret, f"soft:{classes}:{dim}".encode(), hashlib.sha256).digest()
    rng = np.random.default_rng(np.frombuffer(seed, dtype="<u8"))
    target = int(rng.integers(classes))
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    if frequency <= 0.0:
        lo, hi = SOFT_FREQUENCY_BAND
        frequency = float(lo + (hi - lo) * rng.random())
    return SoftKey(target, direction, frequency, chosen)


def apply_soft_mark(
    p: npt.ArrayLike,
    inputs_vectors: npt.ArrayLike,
    keys: KeyRing,
    epsilon: float,
    *,
    frequency: float = 0.0,
    kid: str | None = None,
) -> FloatArray:
    """Add the keyed periodic bump to class ``c*`` of every row, keeping each row's top-1.

    Rows are renormalised to sum to 1 (the CosWM form alone sums to 1 only where the cosine is
    1), i.e. ``q_c* = (p_c* + s) / (1 + s)`` with ``s = eps (1 + cos(f<v,x>))``. Where the bump
    would make ``c*`` the top-1, :func:`restore_argmax` trades the entries back.
    """
    probs = np.asarray(p, dtype=np.float64)
    x = np.asarray(inputs_vectors, dtype=np.float64).reshape(probs.shape[0], -1)
    if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] == 0 or epsilon <= 0.0:
        return np.array(probs, dtype=np.float64)
    key = soft_key(keys, probs.shape[1], x.shape[1], frequency=frequency, kid=kid)
    signal = epsilon * (1.0 + np.cos(key.frequency * (x @ key.direction)))
    served = probs / (1.0 + 2.0 * epsilon)
    served[:, key.target_class] += signal / (1.0 + 2.0 * epsilon)
    # The recalled CosWM form sums to (1 + signal) / (1 + 2 eps), not 1: renormalise the row.
    served /= served.sum(axis=1, keepdims=True)
    return restore_argmax(probs, served)


def watermark_rows(inputs: npt.ArrayLike) -> list[bytes]:
    """The canonical bytes of each input row that mark selection and labels are keyed on."""
    return canonical_rows(np.asarray(inputs, dtype=np.float64), quantum=CANONICAL_QUANTUM)
