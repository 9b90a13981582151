"""Request and answer features the detectors compare: projected input vectors, text signatures,
and the predicted class with its top-2 margin.

Everything here is deterministic across processes and replicas: the random projection comes from
``(seed, width)``, and text hashes are keyed through blake2b, never Python's salted ``hash``, so
two replicas reduce the same request to the same features and can continue each other's state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_CACHED_WIDTHS: Final = 16
"""Projection matrices kept per projector; a model has a handful of input widths."""

# splitmix64 constants (Steele, Lea, Flood 2014): a fast, well-mixing 64-bit finalizer.
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)
# FNV-1a's 64-bit prime: the polynomial base that folds n code points into one integer.
_GRAM_BASE: Final = np.uint64(0x100000001B3)


class Projector:
    """Reduce input vectors of any width ``D`` to ``dim`` with a fixed Gaussian projection.

    The matrix for width ``D`` is drawn from ``numpy.random.default_rng((seed, D))`` and scaled
    by ``1/sqrt(dim)``, so pairwise distances are kept within a small factor
    (Johnson-Lindenstrauss) and every replica draws the same one. Inputs no wider than ``dim``
    are kept exactly and padded with zeros.
    """

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        self.seed = seed
        self._matrices: dict[int, F32] = {}

    def matrix(self, width: int) -> F32:
        """Return the ``(width, dim)`` projection for inputs of ``width`` (cached)."""
        cached = self._matrices.get(width)
        if cached is not None:
            return cached
        rng = np.random.default_rng((self.seed, width))
        gaussian = rng.standard_normal((width, self.dim)) / math.sqrt(self.dim)
        matrix = np.asarray(gaussian, dtype=np.float32)
        if len(self._matrices) >= _CACHED_WIDTHS:
            # Bound the cache: drop the oldest width (dicts keep insertion order).
            del self._matrices[next(iter(self._matrices))]
        self._matrices[width] = matrix
        return matrix

    def project(self, x: npt.ArrayLike) -> F32:
        """Return ``x`` (n, D) reduced to (n, dim) float32."""
        rows = np.asarray(x, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"expected a (n, D) matrix, got shape {rows.shape}")
        n, width = rows.shape
        if width <= self.dim:
            out = np.zeros((n, self.dim), dtype=np.float32)
            out[:, :width] = rows
            return out
        return np.asarray(rows @ self.matrix(width), dtype=np.float32)


def numeric_matrix(inputs: Mapping[str, np.ndarray], instances: int) -> F32 | None:
    """Return one float32 row per instance: the numeric inputs flattened, in name order.

    Non-numeric arrays (text, objects) are left out; None when nothing numeric remains or an
    input's first axis is not ``instances``. NaN and infinities become 0 so distances stay finite.
    """
    if instances <= 0:
        return None
    parts: list[np.ndarray] = []
    for name in sorted(inputs):
        array = np.asarray(inputs[name])
        if array.dtype.kind not in "biuf":
            continue
        if array.ndim == 0 or array.shape[0] != instances:
            return None
        parts.append(array.reshape(instances, -1).astype(np.float32, copy=False))
    if not parts:
        return None
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if matrix.shape[1] == 0:
        return None
    return np.asarray(np.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0), dtype=np.float32)


def _key(purpose: str, seed: int) -> np.uint64:
    """Derive a 64-bit hashing key from ``(purpose, seed)`` with blake2b: stable everywhere."""
    digest = hashlib.blake2b(f"{purpose}:{seed}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _mix(x: U64) -> U64:
    """Apply the splitmix64 finalizer elementwise (uint64 arithmetic wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _gram_codes(text: str, n: int) -> U64:
    """Return one integer per character n-gram of ``text`` (the whole text when shorter).

    Code points are folded polynomially modulo 2**64 in one vector pass per position, so a long
    prompt costs a few numpy operations rather than one hash call per gram.
    """
    if n <= 0:
        raise ValueError("n must be positive")
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if points.size == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(n, points.size)
    count = points.size - width + 1
    codes = np.zeros(count, dtype=np.uint64)
    for j in range(width):
        codes = codes * _GRAM_BASE + points[j : j + count]
    return codes


def ngram_vector(text: str, dim: int = 256, n: int = 3) -> F32:
    """Return the L2-normalised (dim,) histogram of ``text``'s hashed character n-grams.

    Each gram lands in one of ``dim`` buckets with a hashed sign (feature hashing), so collisions
    cancel rather than pile up; an empty text gives the zero vector.
    """
    codes = _gram_codes(text, n)
    out = np.zeros(dim, dtype=np.float32)
    if codes.size == 0:
        return out
    hashed = _mix(codes ^ _key("ngram", n))
    buckets = (hashed % np.uint64(dim)).astype(np.intp)
    signs = np.where((hashed >> np.uint64(63)) == 1, -1.0, 1.0)
    out += np.bincount(buckets, weights=signs, minlength=dim).astype(np.float32)
    norm = float(np.linalg.norm(out))
    return out / norm if norm > 0.0 else out


def minhash(text: str, m: int = 64, n: int = 3, seed: int = 0) -> U64:
    """Return the (m,) MinHash signature of ``text``'s character n-gram set.

    The share of equal positions between two signatures estimates the Jaccard similarity of the
    two gram sets. An empty text gives all-ones signatures (the maximum), equal to each other.
    """
    codes = np.unique(_gram_codes(text, n))
    if codes.size == 0:
        return np.full(m, np.iinfo(np.uint64).max, dtype=np.uint64)
    keys = _mix(np.arange(m, dtype=np.uint64) ^ _key("minhash", seed))
    hashed = _mix(codes[None, :] ^ keys[:, None])
    return np.asarray(hashed.min(axis=1), dtype=np.uint64)


def top1_margin(probabilities: npt.ArrayLike) -> tuple[I64, F32]:
    """Return each row's predicted class and its top-1 minus top-2 probability.

    ``probabilities`` is (n, K); K == 1 is a binary model's P(class 1), so the class is
    ``p >= 0.5`` and the margin ``|p - (1 - p)|``. A 1-D array is read as (n, 1).
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"expected (n, K) probabilities, got shape {probs.shape}")
    if probs.shape[1] == 1:
        p = probs[:, 0]
        return (p >= 0.5).astype(np.int64), np.abs(2.0 * p - 1.0).astype(np.float32)
    top1 = np.argmax(probs, axis=1).astype(np.int64)
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).astype(np.float32)
    return top1, margin
