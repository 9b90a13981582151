"""Boundary probing: flag a client whose answers sit on the decision boundary too often.

Extraction by line search (Tramer et al. 2016) and active learning near the boundary (margin
sampling, ActiveThief) ask for points the model can barely decide, so an unusual share of the
client's answers have a small top-1 minus top-2 margin. The detector keeps the last ``window``
answers as bits (margin < threshold), compares their share with ``baseline_share``, the share in
the model's normal traffic, through a one-sided binomial z-score, and maps the excess to a score.
"""

from __future__ import annotations

import math
import struct
from typing import Final

import numpy as np
import numpy.typing as npt

from extauthz.detect.base import Observation, Verdict

REASON: Final = "boundary_probing"
_Z_START: Final = 2.0
"""Below two standard deviations of excess the score stays 0: chance in normal traffic."""
_Z_SPAN: Final = 4.0
"""The score reaches 1 at z = 6."""
_MIN_BASELINE: Final = 1e-3
"""A baseline share of 0 would make any low margin infinitely surprising."""

_MAGIC: Final = b"MRG1"
# magic, answers ever seen, bits kept (chronological, oldest first)
_HEADER: Final = struct.Struct("<4sQH")


def baseline_share(margins: npt.ArrayLike, threshold: float) -> float:
    """Return the share of finite ``margins`` below ``threshold`` (0.0 when there are none).

    Compute it once from the model's normal traffic (or a held-out set) and give it to
    :class:`MarginDetector`.
    """
    values = np.asarray(margins, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    return float(np.mean(values < threshold))


class MarginDetector:
    """The share of a client's recent answers with a top-2 margin below ``threshold``.

    State is the answers ever seen and the last ``window`` low-margin bits, packed (32 bytes for
    256 answers). No score before ``min_queries`` answers are kept.
    """

    name = "margin"

    def __init__(
        self,
        baseline_share: float,
        *,
        threshold: float = 0.1,
        window: int = 256,
        min_queries: int = 30,
    ) -> None:
        if not 0.0 <= baseline_share <= 1.0:
            raise ValueError("baseline_share must be in [0, 1]")
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if not 1 <= window <= 65_535 or not 1 <= min_queries <= window:
            raise ValueError("window must be in [1, 65535] and min_queries in [1, window]")
        self.baseline_share = baseline_share
        self.threshold = threshold
        self.window = window
        self.min_queries = min_queries
        self._p0 = min(max(baseline_share, _MIN_BASELINE), 1.0 - _MIN_BASELINE)

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Append the observation's low-margin bits; return the new state and the verdict."""
        seen, bits = self._decode(state)
        if observation.margin is not None:
            margins = np.asarray(observation.margin, dtype=np.float32).reshape(-1)
            margins = margins[np.isfinite(margins)]
            low = margins < self.threshold
            bits = np.concatenate((bits, low))[-self.window :]
            seen += int(low.size)
        return self._encode(seen, bits), self._verdict(bits)

    def _verdict(self, bits: npt.NDArray[np.bool_]) -> Verdict:
        """Map the one-sided binomial z-score of the low-margin count to a score in [0, 1]."""
        kept = int(bits.size)
        if kept < self.min_queries:
            return Verdict(0.0)
        low = int(np.count_nonzero(bits))
        p0 = self._p0
        z = (low - kept * p0) / math.sqrt(kept * p0 * (1.0 - p0))
        score = min(max((z - _Z_START) / _Z_SPAN, 0.0), 1.0)
        detail = f"low_margin={low}/{kept} baseline={self.baseline_share:.3f} z={z:.1f}"
        return Verdict(score, REASON if score > 0.0 else "", detail)

    @staticmethod
    def _encode(seen: int, bits: npt.NDArray[np.bool_]) -> bytes:
        """Serialize: header, then the bits packed eight to a byte."""
        return _HEADER.pack(_MAGIC, seen, bits.size) + np.packbits(bits).tobytes()

    def _decode(self, state: bytes | None) -> tuple[int, npt.NDArray[np.bool_]]:
        """Parse state bytes (a new client when absent or not ours); keep the last ``window``."""
        empty = np.zeros(0, dtype=np.bool_)
        if not state or len(state) < _HEADER.size or state[:4] != _MAGIC:
            return 0, empty
        _, seen, kept = _HEADER.unpack_from(state)
        packed = np.frombuffer(state, dtype=np.uint8, offset=_HEADER.size)
        if packed.size != (kept + 7) // 8:
            return 0, empty
        bits = np.unpackbits(packed, count=kept).astype(np.bool_)
        return int(seen), bits[-self.window :]
