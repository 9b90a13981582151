"""Input coverage: how far a client's queries spread beyond where normal traffic lives.

Synthetic extraction queries (uniform noise over the input box, random perturbations, JbDA-style
augmentation) cover regions of the input space that natural inputs never visit (Kesarwani et
al.'s extraction monitor, defenses.md §1.2). Each projected vector is hashed into one of
``buckets`` cells by ``log2(buckets)`` seeded random directions of the reference traffic's
whitened space (mean removed, covariance made the identity): bit *i* is set when the vector's
coordinate along direction *i* exceeds the reference's 95th percentile there. Natural inputs
mostly set no bit or one; inputs off the natural manifold are far out in its low-variance
directions and set many. Cells the reference visits less than once per ``buckets`` queries
are *rare*; a client's score grows with the share of its queries landing in rare cells, beyond
what the reference itself puts there. A client asking only about one kind of natural input
stays in common cells, so narrow benign use does not score.

Per-client state: one uint16 count per cell, all halved when the client's total passes
:data:`HALVE_AT`, so recent queries weigh more and the state stays ``2 * buckets`` bytes.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np
import numpy.typing as npt

from extauthz.detect.base import Observation, Verdict

__all__ = ["CoverageDetector", "reference_from"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: The reference quantile a direction's coordinate must pass to set its bit.
QUANTILE: Final = 0.95
#: Counts are halved when the client's total reaches this, keeping the recent past.
HALVE_AT: Final = 8192
#: Rare-cell share above the reference's own mapped to scores 0 and 1 (linear between). Measured
#: on the digits: natural clients stay at or under the reference (excess <= 0), uniform noise
#: sits 0.28 above it.
EXCESS_LOW: Final = 0.05
EXCESS_HIGH: Final = 0.3
#: The most reference rows kept by :func:`reference_from`.
MAX_REFERENCE: Final = 4096
_MAGIC: Final = b"CV1"
_HEADER: Final = struct.Struct("<3sI")  # magic, buckets


def reference_from(vectors: npt.ArrayLike, max_rows: int = MAX_REFERENCE) -> F32:
    """Return a reference sample of normal traffic: finite rows, at most ``max_rows`` of them
    (an even stride through the input, so the result is deterministic), as float32."""
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"expected (R, d) vectors, got shape {rows.shape}")
    rows = rows[np.isfinite(rows).all(axis=1)]
    if rows.shape[0] > max_rows:
        rows = rows[np.linspace(0, rows.shape[0] - 1, max_rows).astype(np.intp)]
    return np.ascontiguousarray(rows)


class CoverageDetector:
    """Score the share of a client's queries in cells that normal traffic almost never visits."""

    name = "coverage"

    def __init__(
        self, reference: npt.ArrayLike, buckets: int = 256, seed: int = 0, min_queries: int = 50
    ) -> None:
        ref = reference_from(reference)
        bits = buckets.bit_length() - 1
        if buckets < 2 or buckets != 1 << bits or buckets > 1 << 16:
            raise ValueError("buckets must be a power of two in 2..65536")
        rows, dim = ref.shape
        if rows < 2 * dim:
            raise ValueError(f"the reference needs at least {2 * dim} rows, has {rows}")
        if min_queries <= 0:
            raise ValueError("min_queries must be positive")
        self.buckets = buckets
        self.min_queries = min_queries
        self.dim = dim
        data = ref.astype(np.float64)
        self._center = data.mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data - self._center, rowvar=False))
        # Whiten, with a floor so a direction the reference never varies in stays finite.
        floor = max(float(eigenvalues.max()), 1e-12) * 1e-6
        whiten = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))
        directions = np.random.default_rng(seed).standard_normal((dim, bits))
        directions /= np.linalg.norm(directions, axis=0)
        self._transform: F64 = whiten @ directions
        coords = (data - self._center) @ self._transform
        self._thresholds: F64 = np.quantile(coords, QUANTILE, axis=0)
        self._weights = (1 << np.arange(bits)).astype(np.int64)
        frequency = np.bincount(self.cells(ref), minlength=buckets) / rows
        self.rare: npt.NDArray[np.bool_] = frequency < 1.0 / buckets
        #: The share of the reference itself in rare cells: what a natural client scores.
        self.reference_rare = float(frequency[self.rare].sum())

    def cells(self, vectors: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Return each (n, d) vector's cell in ``0..buckets-1`` (non-finite rows: the last)."""
        rows = np.asarray(vectors, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got shape {rows.shape}")
        finite = np.all(np.isfinite(rows), axis=1, keepdims=True)[:, 0]
        coords = (np.where(finite[:, None], rows, 0.0) - self._center) @ self._transform
        cells = (coords > self._thresholds) @ self._weights
        return np.where(finite, cells, self.buckets - 1)

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Count the observation's vectors by cell (no vectors: unchanged) and score the client."""
        counts = self._load(state)
        if observation.vectors is not None and observation.vectors.size:
            added = np.bincount(self.cells(observation.vectors), minlength=self.buckets)
            merged = counts.astype(np.int64) + added
            while merged.sum() >= HALVE_AT or merged.max() > 0xFFFF:
                merged //= 2
            counts = merged.astype(np.uint16)
        return _HEADER.pack(_MAGIC, self.buckets) + counts.astype("<u2").tobytes(), self._verdict(
            counts
        )

    def _verdict(self, counts: npt.NDArray[np.uint16]) -> Verdict:
        total = int(counts.sum(dtype=np.int64))
        if total == 0:
            return Verdict(0.0)
        share = float(counts[self.rare].sum(dtype=np.int64)) / total
        p = counts[counts > 0] / total
        entropy = float(-(p * np.log2(p)).sum())
        detail = f"rare_share={share:.2f} entropy_bits={entropy:.2f} queries={total}"
        if total < self.min_queries:
            return Verdict(0.0, "", detail)
        excess = share - self.reference_rare
        score = float(np.clip((excess - EXCESS_LOW) / (EXCESS_HIGH - EXCESS_LOW), 0.0, 1.0))
        return Verdict(score, "input_coverage" if score > 0.0 else "", detail)

    def _load(self, state: bytes | None) -> npt.NDArray[np.uint16]:
        """Parse state bytes; a missing or foreign one (other bucket count) starts afresh."""
        if state and len(state) == _HEADER.size + 2 * self.buckets:
            magic, buckets = _HEADER.unpack_from(state)
            if magic == _MAGIC and buckets == self.buckets:
                return np.frombuffer(state, "<u2", self.buckets, _HEADER.size).astype(np.uint16)
        return np.zeros(self.buckets, dtype=np.uint16)
