"""Sign-step augmentation: flag a client whose queries are sign steps of its earlier queries.

Jacobian-based augmentation (Papernot et al. 2017) and its variants grow a query set by
``x' = x + lambda * sign(g)``: every coordinate of the new query moves by the same amount
``lambda``, up or down, from an earlier query (children of one parent differ by ``2 lambda``
the same way). Natural inputs never stand in that relation: two scans of one digit differ by
varied amounts, a brightness change moves every coordinate the same way, an exact repeat moves
none. So a query is a *step* of an earlier one when, over the coordinates that changed (at least
``min_changed`` of them and a quarter of all):

- at least ``uniform_share`` of the changes are within ``tolerance`` of their common size, and
- at least ``sign_share`` of the changes go each way.

The detector keeps the client's last ``ring`` queries (at most ``max_dims`` coordinates each: a
fixed keyed subset of wider inputs) and the step bits of its last ``window`` checked queries;
the score rises from 0 at one step to 1 at ``full_at`` steps in the window. Each query is
compared with the nearest ``nearest`` of the ``ring`` queries before it, its own batch
included; a batch larger than
``max_checks`` has its first ``max_checks`` rows checked. The state is at most
``ring * max_dims * 4 + window / 8`` bytes plus a header (16 KiB for 64 x 64).

One step of this kind per few thousand natural queries is already rare; the measured figures
are in the tests. An attacker who varies the step size per coordinate is not seen here (PRADA's
distance test still applies).
"""

from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt

from extauthz.detect.base import Observation, Verdict

REASON: Final = "augmentation_steps"

_MAGIC: Final = b"AUG1"
# magic, queries ever checked, dims kept, input width, rows in the ring, bits in the window
_HEADER: Final = struct.Struct("<4sQHIHH")
_FIRST_STEP_FREE: Final = 1
"""One step scores 0: the score starts at the second."""

F32 = npt.NDArray[np.float32]
Bits = npt.NDArray[np.bool_]


@lru_cache(maxsize=64)
def _columns(width: int, keep: int, key: bytes) -> npt.NDArray[np.intp] | None:
    """Return the keyed subset of ``keep`` coordinates of inputs ``width`` wide (None: all)."""
    if width <= keep:
        return None
    seed = int.from_bytes(hashlib.sha256(key + width.to_bytes(8, "little")).digest()[:8], "little")
    picked = np.random.default_rng(seed).choice(width, size=keep, replace=False)
    return np.sort(picked)


class AugmentationDetector:
    """Sign steps between a client's queries; see the module docstring."""

    name = "augmentation"

    def __init__(
        self,
        *,
        key: bytes = b"",
        ring: int = 64,
        window: int = 128,
        max_dims: int = 64,
        max_checks: int = 128,
        min_changed: int = 8,
        tolerance: float = 0.1,
        uniform_share: float = 0.8,
        sign_share: float = 0.2,
        full_at: int = 6,
        nearest: int = 4,
    ) -> None:
        if not 1 <= ring <= 65_535 or not 1 <= window <= 65_535:
            raise ValueError("ring and window must be in [1, 65535]")
        if not 1 <= max_dims <= 65_535 or max_checks < 1 or min_changed < 1:
            raise ValueError("max_dims must be in [1, 65535]; max_checks, min_changed >= 1")
        if not 0.0 < tolerance < 0.5 or not 0.5 <= uniform_share <= 1.0:
            raise ValueError("tolerance must be in (0, 0.5) and uniform_share in [0.5, 1]")
        if nearest < 1:
            raise ValueError("nearest must be >= 1")
        if not 0.0 < sign_share <= 0.5 or full_at <= _FIRST_STEP_FREE:
            raise ValueError(f"sign_share must be in (0, 0.5] and full_at > {_FIRST_STEP_FREE}")
        self.key = key
        self.ring = ring
        self.window = window
        self.max_dims = max_dims
        self.max_checks = max_checks
        self.min_changed = min_changed
        self.tolerance = tolerance
        self.uniform_share = uniform_share
        self.sign_share = sign_share
        self.full_at = full_at
        self.nearest = nearest

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Check the observation's raw rows against the client's recent ones; fold them in."""
        seen, width, rows, bits = self._decode(state)
        raw = observation.raw
        if raw is None or np.ndim(raw) != 2 or np.shape(raw)[0] == 0:
            return (state or b""), self._verdict(bits)
        x = np.asarray(raw, dtype=np.float32)
        if x.shape[1] != width:  # a new client, or a new input shape: start over
            seen, width, bits = 0, x.shape[1], np.zeros(0, dtype=np.bool_)
            rows = np.zeros((0, min(width, self.max_dims)), dtype=np.float32)
        columns = _columns(width, self.max_dims, self.key)
        if columns is not None:
            x = x[:, columns]
        x = np.where(np.isfinite(x), x, np.float32(0.0))
        checked = x[: self.max_checks]
        steps = self.steps(rows, checked)
        bits = np.concatenate((bits, steps))[-self.window :]
        seen += int(steps.size)
        rows = np.concatenate((rows, x))[-self.ring :]
        return self._encode(seen, width, rows, bits), self._verdict(bits)

    def steps(self, history: F32, x: F32) -> Bits:
        """Return, per row of ``x``, whether it is a sign step of one of the ``ring`` rows before
        it (the end of ``history``, then the earlier rows of ``x``).

        Only the ``nearest`` of those rows (by L2, exact repeats left out) are tested: a step's
        parent or sibling is far nearer than any natural neighbour.
        """
        m = x.shape[0]
        if m == 0:
            return np.zeros(0, dtype=np.bool_)
        candidates = np.concatenate((history[-self.ring :], x))
        pool = candidates.astype(np.float64)  # distances in float64: float32 cancels here
        n = pool.shape[0] - m
        rows = pool[n:]
        squares = np.einsum("ij,ij->i", pool, pool)
        distance = squares[n:, None] + squares[None, :] - 2.0 * (rows @ pool.T)
        index = np.arange(n + m)
        own = n + np.arange(m)
        allowed = (index[None, :] < own[:, None]) & (index[None, :] >= own[:, None] - self.ring)
        repeat = distance <= 1e-9 * (1.0 + squares[n:, None])
        distance = np.where(allowed & ~repeat, distance, np.inf)
        k = min(self.nearest, n + m)
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
        usable = np.isfinite(np.take_along_axis(distance, nearest, axis=1))
        delta = x[:, None, :] - candidates[nearest]
        found: Bits = (self._match(delta, x) & usable).any(axis=1)
        return found

    def _match(self, delta: F32, x: F32) -> Bits:
        """Return ``(rows, candidates)``: whether each difference is a sign step."""
        size = np.abs(delta)
        scale = np.float32(1e-5) * (np.float32(1.0) + np.abs(x).max(axis=1))
        changed = size > scale[:, None, None]
        count = changed.sum(axis=2)
        up = (changed & (delta > 0)).sum(axis=2)
        enough = count >= max(self.min_changed, -(-x.shape[1] // 4))
        balanced = np.minimum(up, count - up) >= self.sign_share * count
        candidate: Bits = enough & balanced
        if not candidate.any():
            return candidate
        safe = np.maximum(count, 1)
        mean = size.sum(axis=2) / safe  # unchanged coordinates add 0
        # the common size: the mean of the changes near the mean (clipped coordinates fall out)
        near = changed & (np.abs(size - mean[..., None]) <= 0.25 * mean[..., None])
        common = (size * near).sum(axis=2) / np.maximum(near.sum(axis=2), 1)
        close = changed & (np.abs(size - common[..., None]) <= self.tolerance * common[..., None])
        uniform = close.sum(axis=2) >= self.uniform_share * count
        found: Bits = candidate & uniform & (common > 0)
        return found

    def _verdict(self, bits: Bits) -> Verdict:
        found = int(np.count_nonzero(bits))
        span = self.full_at - _FIRST_STEP_FREE
        score = min(max((found - _FIRST_STEP_FREE) / span, 0.0), 1.0)
        detail = f"sign_steps={found}/{bits.size}"
        return Verdict(score, REASON if score > 0.0 else "", detail)

    # -- state ------------------------------------------------------------------------------

    @staticmethod
    def _encode(seen: int, width: int, rows: F32, bits: Bits) -> bytes:
        header = _HEADER.pack(_MAGIC, seen, rows.shape[1], width, rows.shape[0], bits.size)
        return header + rows.astype("<f4").tobytes() + np.packbits(bits).tobytes()

    def _decode(self, state: bytes | None) -> tuple[int, int, F32, Bits]:
        """Parse state bytes; a new client when absent, not ours, or malformed."""
        empty = (0, 0, np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.bool_))
        if not state or len(state) < _HEADER.size or state[:4] != _MAGIC:
            return empty
        _, seen, dims, width, count, kept = _HEADER.unpack_from(state)
        body = _HEADER.size + count * dims * 4
        if len(state) != body + (kept + 7) // 8 or dims > self.max_dims or dims > width:
            return empty
        rows = np.frombuffer(state, dtype="<f4", count=count * dims, offset=_HEADER.size)
        packed = np.frombuffer(state, dtype=np.uint8, offset=body)
        bits = np.unpackbits(packed, count=kept).astype(np.bool_)
        matrix = rows.reshape(count, dims).astype(np.float32)
        return int(seen), int(width), matrix[-self.ring :], bits[-self.window :]
