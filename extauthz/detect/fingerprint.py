"""Near-duplicate queries, per client and across clients: Blacklight's probabilistic fingerprints.

Blacklight (Li et al., USENIX Security 2022; defenses.md §1.4) reduces each input to a small set
of hashes that near-identical inputs share and unrelated inputs do not: scale to [0, 255], add a
secret per-deployment salt, take mod 255, quantize, hash every window of ``window`` consecutive
values and keep a fixed top-S of the distinct hashes. Two queries are near-duplicates when they
share more than ``match_threshold`` of their S hashes. An extraction or adversarial search that
probes around a seed input (small variations, line searches) produces long runs of them; natural
traffic almost never does.

Here the top-S are the S largest blake2b-64 values of a row (a bottom-k sketch, as Blacklight's
"reverse the hex digest, sort descending" is), so the selection is deterministic and, being a
function of the hash values only, the same windows are kept by every query that has them. Rows
with fewer than S distinct windows are padded with 0, which never counts as a match.

Two consumers:

- :class:`FingerprintDetector`: per client, the fingerprints of its last ``max_entries`` queries
  in one sorted ``(hash, slot)`` index kept in the state bytes, so a lookup is a binary search;
  the score is the share of its last 100 queries that were near-duplicates of an earlier one.
- :class:`FingerprintIndex` (:class:`MemoryFingerprintIndex` in one process) answers, for one
  query, the largest number of hashes it shares with an earlier query of *another* client, which
  :class:`CrossClientDetector` folds into per-client state (Sybil accounts splitting one search).

Across clients, exact duplicates (all of a query's hashes shared: the same canonical input) are
not probing, so many benign users sending the same popular input raise nothing; probing is many
near but not identical matches. Within one client, repeats count as Blacklight counts them: a
line search with steps below the quantum repeats its canonical input.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from extauthz.detect.base import Observation, Verdict

__all__ = [
    "BatchFingerprintIndex",
    "CrossClientDetector",
    "FingerprintDetector",
    "FingerprintIndex",
    "Fingerprinter",
    "MemoryFingerprintIndex",
    "fingerprints",
    "observe_all",
    "salt_for",
]

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: Queries the near-duplicate share is taken over (Blacklight flags per query; we score a run).
HISTORY: Final = 100
#: The share is over at least this many queries, so a client's second query cannot score 1/1.
MIN_HISTORY: Final = 20
#: Near-duplicate shares mapped to scores 0 and 1 (linear in between).
SHARE_LOW: Final = 0.1
SHARE_HIGH: Final = 0.4
# Quantized value of NaN and infinities: one no finite input reaches.
_NONFINITE_CODE: Final = -1
_EMPTY: Final = np.uint64(0)
# Up to this many evicted slots are found by comparisons, more by a table lookup.
_FEW_SLOTS: Final = 8
_STATE_MAGIC: Final = b"FP3"
_CROSS_MAGIC: Final = b"XC1"
# FingerprintDetector state header: magic, top, max_entries, entries stored, queries seen.
_FP_HEADER: Final = struct.Struct("<3sHIIQ")
# CrossClientDetector state header: magic, queries seen.
_XC_HEADER: Final = struct.Struct("<3sQ")


def salt_for(key: bytes, width: int) -> F64:
    """Return the per-deployment salt: ``width`` values in [0, 255) derived from ``key``.

    SHAKE-256 of the key gives the same salt on every replica and numpy version; without the key
    an attacker cannot tell which small changes move a value across a quantization boundary.
    """
    if width <= 0:
        raise ValueError("width must be positive")
    words = np.frombuffer(hashlib.shake_256(b"fingerprint-salt:" + key).digest(8 * width), "<u8")
    # The top 53 bits as a float in [0, 1), exactly.
    return (words >> np.uint64(11)).astype(np.float64) * (255.0 / float(1 << 53))


def fingerprints(
    raw: npt.ArrayLike,
    *,
    salt: npt.ArrayLike,
    quantum: float,
    window: int = 20,
    top: int = 50,
    scale: float,
) -> U64:
    """Return the (n, top) uint64 fingerprints of ``raw`` (n, D), largest hashes first.

    Each row is scaled by ``255 / scale`` (``scale`` is the inputs' full range), salted (``salt``
    has D values, or more and is cut), taken mod 255 and quantized to multiples of ``quantum``;
    every ``window`` consecutive values (the whole row when shorter) are hashed with blake2b-64,
    and the ``top`` largest distinct hashes kept, 0 padding the rest. Distinct windows of the
    whole batch are hashed once each.
    """
    rows = np.asarray(raw, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"expected a (n, D) matrix, got shape {rows.shape}")
    if quantum <= 0 or scale <= 0 or window <= 0 or top <= 0:
        raise ValueError("quantum, scale, window and top must be positive")
    n, width = rows.shape
    out = np.zeros((n, top), dtype=np.uint64)
    if n == 0 or width == 0:
        return out
    salts = np.asarray(salt, dtype=np.float64).ravel()
    if salts.size < width:
        raise ValueError(f"salt has {salts.size} values, inputs have {width}")
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = np.mod(rows * (255.0 / scale) + salts[:width], 255.0)
        finite = np.isfinite(shifted)
        codes = np.where(finite, np.rint(np.where(finite, shifted, 0.0) / quantum), 0.0)
    codes16 = np.where(finite, codes, _NONFINITE_CODE).astype(np.int16)
    span = min(window, width)
    windows = np.lib.stride_tricks.sliding_window_view(codes16, span, axis=1)
    per_row = windows.shape[1]
    flat = np.ascontiguousarray(windows.reshape(n * per_row, span))
    keys = flat.view(np.dtype((np.void, 2 * span))).ravel()
    distinct, inverse = np.unique(keys, return_inverse=True)
    buffer = memoryview(distinct.tobytes())
    size = 2 * span
    digests = b"".join(
        [
            hashlib.blake2b(buffer[at : at + size], digest_size=8).digest()
            for at in range(0, len(buffer), size)
        ]
    )
    hashed = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    hashed[hashed == _EMPTY] = np.uint64(1)  # 0 is the padding
    table = hashed[inverse.ravel()].reshape(n, per_row)
    # Sort descending per row, blank repeats, sort again: distinct hashes first, 0s last.
    ordered_u = np.sort(table, axis=1)[:, ::-1]
    repeat = np.zeros_like(ordered_u, dtype=bool)
    repeat[:, 1:] = ordered_u[:, 1:] == ordered_u[:, :-1]
    ordered_u = np.where(repeat, _EMPTY, ordered_u)
    ordered_u = np.sort(ordered_u, axis=1)[:, ::-1]
    keep = min(top, per_row)
    out[:, :keep] = ordered_u[:, :keep]
    return out


@dataclass(frozen=True, slots=True)
class Fingerprinter:
    """The deployment's fingerprint settings: :func:`fingerprints` with everything but the rows.

    ``key`` derives the salt (keep it secret and the same on every replica); ``scale`` is the
    inputs' full range (1 for [0, 1] pixels, 255 for bytes).
    """

    key: bytes
    scale: float
    quantum: float = 50.0
    window: int = 20
    top: int = 50

    def __call__(self, raw: npt.ArrayLike) -> U64:
        """Return the (n, top) fingerprints of ``raw`` (n, D)."""
        rows = np.asarray(raw, dtype=np.float64)
        width = rows.shape[1] if rows.ndim == 2 else 0
        return fingerprints(
            rows,
            salt=_salt_cached(self.key, max(width, 1)),
            quantum=self.quantum,
            window=self.window,
            top=self.top,
            scale=self.scale,
        )


_SALTS: dict[tuple[bytes, int], F64] = {}
_SALT_CACHE_SIZE: Final = 16


def _salt_cached(key: bytes, width: int) -> F64:
    """Return :func:`salt_for` through a small cache (a model has a handful of input widths)."""
    cached = _SALTS.get((key, width))
    if cached is None:
        if len(_SALTS) >= _SALT_CACHE_SIZE:
            del _SALTS[next(iter(_SALTS))]
        cached = _SALTS[(key, width)] = salt_for(key, width)
    return cached


def _expand(lo: I64, hi: I64) -> tuple[I64, I64]:
    """Return (owner, position) for every position in each half-open range ``[lo[i], hi[i])``."""
    lengths = hi - lo
    total = int(lengths.sum())
    owner = np.repeat(np.arange(lo.size, dtype=np.int64), lengths)
    if total == 0:
        return owner, np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(total, dtype=np.int64) - np.repeat(starts - lo, lengths)
    return owner, position


#: Up to this many (owner, other) cells, pairs are counted in a dense table, not sorted.
_DENSE_CELLS: Final = 1 << 20


def _max_per_owner(owner: I64, other: I64, rows: int, others: int) -> I64:
    """Return, per owner row, the largest number of pairs it has with any single ``other``."""
    best = np.zeros(rows, dtype=np.int64)
    if owner.size == 0:
        return best
    if rows * others <= _DENSE_CELLS:
        counts = np.bincount(owner * others + other, minlength=rows * others)
        return np.asarray(counts.reshape(rows, others).max(axis=1), dtype=np.int64)
    pairs, counts = np.unique(owner * others + other, return_counts=True)
    np.maximum.at(best, pairs // others, counts)
    return best


def _batch_matches(hashes: U64) -> I64:
    """Return, per row, the most hashes it shares with any single *earlier* row of the batch."""
    n, top = hashes.shape
    flat = hashes.ravel()
    row = np.repeat(np.arange(n, dtype=np.int64), top)
    valid = flat != _EMPTY
    flat, row = flat[valid], row[valid]
    order = np.lexsort((row, flat))
    flat, row = flat[order], row[order]
    # Each value's group start: every element pairs with the earlier rows of its group.
    new_group = np.ones(flat.size, dtype=bool)
    new_group[1:] = flat[1:] != flat[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(flat.size), 0))
    owner, position = _expand(group_start, np.arange(flat.size, dtype=np.int64))
    return _max_per_owner(row[owner], row[position], n, max(n, 1))


def _row_digests(hashes: U64) -> tuple[U64, I64]:
    """Return a 64-bit digest of each row's set of distinct non-zero hashes (0: an empty row)
    and the set's size: equal digests are the same canonical input."""
    ordered = np.sort(hashes, axis=1)
    keep = ordered != _EMPTY
    keep[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    sizes = keep.sum(axis=1).astype(np.int64)
    cleaned = np.where(keep, ordered, _EMPTY).astype("<u8")
    digests = np.frombuffer(
        b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in cleaned),
        dtype="<u8",
    ).astype(np.uint64)
    digests[digests == _EMPTY] = np.uint64(1)
    digests[sizes == 0] = _EMPTY
    return digests, sizes


def _stored_values(hashes: U64) -> U32:
    """Return the 32 low bits of each hash, as the per-client index keeps them (0 stays the
    padding; a hash whose low bits are 0 becomes 1). A false match of two different windows
    has odds 2^-32 per pair: far below the ``match_threshold`` shared hashes a flag needs."""
    low = (hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    low[(low == 0) & (hashes != _EMPTY)] = np.uint32(1)
    return low


def _push_history(history: npt.NDArray[np.uint8], seen: int, flags: npt.NDArray[np.bool_]) -> None:
    """Write ``flags`` into the ring of the last :data:`HISTORY` flags after ``seen`` queries."""
    tail = flags[-HISTORY:]
    start = seen + flags.size - tail.size
    history[(start + np.arange(tail.size)) % HISTORY] = tail


def _share_verdict(
    history: npt.NDArray[np.uint8], seen: int, reason: str, matches: I64 | None
) -> Verdict:
    """Score the share of near-duplicates among the last :data:`HISTORY` queries."""
    denominator = max(min(seen, HISTORY), MIN_HISTORY)
    share = float(history.sum()) / denominator
    score = float(np.clip((share - SHARE_LOW) / (SHARE_HIGH - SHARE_LOW), 0.0, 1.0))
    best = int(matches.max()) if matches is not None and matches.size else 0
    detail = f"near_duplicate_share={share:.2f} last_max_match={best}"
    return Verdict(score, reason if score > 0.0 else "", detail)


class FingerprintDetector:
    """Per-client near-duplicate detector over Blacklight fingerprints of ``Observation.raw``.

    The state holds the fingerprints of the client's last ``max_entries`` queries as one sorted
    ``(hash, slot)`` index (slot = query number mod ``max_entries``; the oldest slot is evicted
    when reused), a digest of each slot's hash set, and the flags of its last :data:`HISTORY`
    queries: 6 bytes per stored hash (its low 32 bits and its slot) and 8 per filled slot, so about
    ``(6 * top + 8) * max_entries`` bytes at most (1.2 MB at the defaults, 79 KB at the
    pipeline's 256). A query is a
    near-duplicate when it shares more than ``match_threshold`` hashes with one earlier query of
    the client (an exact repeat included). Queries of one batch are compared with the stored ones
    and with the batch's earlier rows; slots reused by the batch are evicted after the batch. An
    exact repeat (its digest equals a live slot's or an earlier row's) matches all its hashes
    and is found by its digest, so a client repeating one input costs no posting scans.
    """

    name = "fingerprint"

    def __init__(
        self,
        fingerprinter: Fingerprinter,
        match_threshold: int = 25,
        max_entries: int = 4096,
    ) -> None:
        if not 0 < max_entries <= 0xFFFF:
            raise ValueError("max_entries must be in 1..65535")
        if not 0 <= match_threshold < fingerprinter.top:
            raise ValueError("match_threshold must be below the fingerprint size")
        self.fingerprinter = fingerprinter
        self.match_threshold = match_threshold
        self.max_entries = max_entries

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Fingerprint the observation's raw inputs and fold them in (no raw: unchanged)."""
        if observation.raw is None or observation.raw.size == 0:
            return self._unchanged(state)
        return self.update_hashes(state, self.fingerprinter(observation.raw))

    def update_hashes(self, state: bytes | None, hashes: U64) -> tuple[bytes, Verdict]:
        """Fold precomputed (n, top) fingerprints in (the pipeline also sends them to the index)."""
        top = self.fingerprinter.top
        hashes = np.asarray(hashes, dtype=np.uint64)
        if hashes.ndim != 2 or hashes.shape[1] != top:
            raise ValueError(f"expected (n, {top}) fingerprints, got shape {hashes.shape}")
        values, slots, digests, history, seen = self._load(state)
        n = hashes.shape[0]
        if n == 0:
            return self._dump(values, slots, digests, history, seen), _share_verdict(
                history, seen, "near_duplicates", None
            )
        row_digests, sizes = _row_digests(hashes)
        kept = _stored_values(hashes)
        first = np.ones(n, dtype=bool)
        if n > 1:
            first[:] = False
            first[np.unique(row_digests, return_index=True)[1]] = True
        if n * digests.size <= _DENSE_CELLS:
            stored_copy = (row_digests[:, None] == digests[None, :]).any(axis=1)
        else:
            stored_copy = np.isin(row_digests, digests)
        # An exact repeat (of a live stored query or of an earlier row) shares all its hashes:
        # its best match is its size, without reading the postings of every copy.
        repeat = (row_digests != _EMPTY) & (~first | stored_copy)
        matches = np.where(repeat, sizes, 0)
        rest = np.flatnonzero(~repeat)
        if rest.size:
            # Against the stored queries: a binary search per hash, then pairs per slot.
            query_values = kept[rest].ravel()
            lo = np.searchsorted(values, query_values, side="left").astype(np.int64)
            hi = np.searchsorted(values, query_values, side="right").astype(np.int64)
            hi = np.where(query_values == _EMPTY, lo, hi)
            owner, position = _expand(lo, hi)
            stored = _max_per_owner(
                owner // top, slots[position].astype(np.int64), rest.size, self.max_entries
            )
            # Against the batch's earlier rows: one copy of each canonical input is enough.
            firsts = np.flatnonzero(first)
            if firsts.size > 1:
                earlier = _batch_matches(hashes[firsts])[np.searchsorted(firsts, rest)]
                stored = np.maximum(stored, earlier)
            matches[rest] = stored
        flags = matches > self.match_threshold
        _push_history(history, seen, flags)
        values, slots, digests = self._insert(values, slots, digests, kept, row_digests, seen)
        seen += n
        verdict = _share_verdict(history, seen, "near_duplicates", matches)
        return self._dump(values, slots, digests, history, seen), verdict

    def _insert(
        self,
        values: U32,
        slots: npt.NDArray[np.uint16],
        digests: U64,
        hashes: U32,
        row_digests: U64,
        seen: int,
    ) -> tuple[U32, npt.NDArray[np.uint16], U64]:
        """Evict the slots the new queries reuse, then merge their hashes into the index."""
        n, top = hashes.shape
        kept_rows = hashes[-self.max_entries :]
        first = seen + n - kept_rows.shape[0]
        new_slots = ((first + np.arange(kept_rows.shape[0])) % self.max_entries).astype(np.uint16)
        if seen + n > self.max_entries:
            if new_slots.size <= _FEW_SLOTS:
                evicted = np.zeros(slots.size, dtype=bool)
                for slot in new_slots:
                    evicted |= slots == slot
            else:
                reused = np.zeros(self.max_entries, dtype=bool)
                reused[new_slots] = True
                evicted = reused[slots]
            kept = ~evicted
            values, slots = values[kept], slots[kept]
        digests = digests.copy()
        digests[new_slots] = row_digests[-self.max_entries :]
        flat = kept_rows.ravel()
        flat_slots = np.repeat(new_slots, top)
        keep = flat != _EMPTY
        flat, flat_slots = flat[keep], flat_slots[keep]
        order = np.argsort(flat, kind="stable")
        flat, flat_slots = flat[order], flat_slots[order]
        at = np.searchsorted(values, flat, side="right")  # after equal ones: arrival order
        return np.insert(values, at, flat), np.insert(slots, at, flat_slots), digests

    def _unchanged(self, state: bytes | None) -> tuple[bytes, Verdict]:
        values, slots, digests, history, seen = self._load(state)
        return self._dump(values, slots, digests, history, seen), _share_verdict(
            history, seen, "near_duplicates", None
        )

    def _load(
        self, state: bytes | None
    ) -> tuple[U32, npt.NDArray[np.uint16], U64, npt.NDArray[np.uint8], int]:
        """Parse state bytes; a missing or foreign state (other settings) starts afresh."""
        fresh = (
            np.zeros(0, dtype=np.uint32),
            np.zeros(0, dtype=np.uint16),
            np.zeros(self.max_entries, dtype=np.uint64),
            np.zeros(HISTORY, dtype=np.uint8),
            0,
        )
        if not state or len(state) < _FP_HEADER.size + HISTORY:
            return fresh
        magic, top, max_entries, entries, seen = _FP_HEADER.unpack_from(state)
        used = min(int(seen), self.max_entries)  # slots ever filled: only their digests are kept
        if (
            magic != _STATE_MAGIC
            or top != self.fingerprinter.top
            or max_entries != self.max_entries
            or len(state) != _FP_HEADER.size + HISTORY + 8 * used + entries * 6
        ):
            return fresh
        offset = _FP_HEADER.size
        history = np.frombuffer(state, np.uint8, HISTORY, offset).copy()
        offset += HISTORY
        digests = np.zeros(self.max_entries, dtype=np.uint64)
        digests[:used] = np.frombuffer(state, "<u8", used, offset)
        offset += 8 * used
        values = np.frombuffer(state, "<u4", entries, offset).astype(np.uint32, copy=False)
        offset += 4 * entries
        slots = np.frombuffer(state, "<u2", entries, offset).astype(np.uint16, copy=False)
        return values, slots, digests, history, int(seen)

    def _dump(
        self,
        values: U32,
        slots: npt.NDArray[np.uint16],
        digests: U64,
        history: npt.NDArray[np.uint8],
        seen: int,
    ) -> bytes:
        header = _FP_HEADER.pack(
            _STATE_MAGIC, self.fingerprinter.top, self.max_entries, values.size, seen
        )
        return b"".join(
            (
                header,
                history.tobytes(),
                digests[: min(seen, self.max_entries)].astype("<u8", copy=False).tobytes(),
                values.astype("<u4", copy=False).tobytes(),
                slots.astype("<u2", copy=False).tobytes(),
            )
        )


class FingerprintIndex(Protocol):
    """Fingerprints of recent queries of every client, shared by the replicas."""

    async def observe(self, client_id: str, hashes: np.ndarray, now: float) -> int:
        """Record one query's (top,) fingerprint; return the most hashes it shares with one
        earlier, not identical, query of another client (identical: the same canonical input)."""
        ...


class BatchFingerprintIndex(FingerprintIndex, Protocol):
    """A :class:`FingerprintIndex` that also takes one request's rows in one call."""

    async def observe_batch(self, client_id: str, hashes: U64, now: float) -> I64:
        """Do :meth:`observe` for each row of (n, top) ``hashes`` in order; return n answers."""
        ...


async def observe_all(index: FingerprintIndex, client_id: str, hashes: U64, now: float) -> I64:
    """Observe each row of (n, top) ``hashes`` in order; return the n answers.

    An index with ``observe_batch`` takes the whole request at once (one lookup, one insert).
    """
    batch = getattr(index, "observe_batch", None)
    if batch is not None:
        answers: I64 = await batch(client_id, hashes, now)
        return answers
    rows = [await index.observe(client_id, row, now) for row in hashes]
    return np.asarray(rows, dtype=np.int64)


def _client_tag(client_id: str) -> int:
    """Return a 64-bit tag of a client id (no id strings kept in the index)."""
    return int.from_bytes(hashlib.blake2b(client_id.encode(), digest_size=8).digest(), "little")


def _distinct_rows(hashes: npt.ArrayLike) -> tuple[U64, I64, I64]:
    """Return each row's distinct non-zero hashes, flat and row by row ascending, with their
    row numbers and each row's count."""
    table = np.asarray(hashes, dtype=np.uint64)
    table = table.reshape(1, -1) if table.ndim == 1 else table.reshape(table.shape[0], -1)
    ordered = np.sort(table, axis=1)
    keep = ordered != _EMPTY
    keep[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    rows = np.repeat(np.arange(table.shape[0], dtype=np.int64), table.shape[1])
    flat_keep = keep.ravel()
    return ordered.ravel()[flat_keep], rows[flat_keep], keep.sum(axis=1).astype(np.int64)


#: The most postings of one hash a lookup reads per segment of the cross-client index.
MAX_POSTINGS: Final = 64
#: Queries the cross-client index gathers in its small sorted tail before merging them into the
#: newest segment: a query's insertion copies the tail, not the whole segment.
TAIL_QUERIES: Final = 128


class MemoryFingerprintIndex:
    """:class:`FingerprintIndex` in one process: sorted segments of ``(hash, query number)``.

    Queries are numbered in arrival order; their client tag and time sit in rings of
    ``max_queries``. Fingerprints go to a small sorted tail (at most :data:`TAIL_QUERIES`
    queries, merged by binary-search insertion), which is merged into the newest sorted segment
    (``segment_queries`` queries each) when it fills or the segment is complete: so a query's
    insertion copies the tail, and a segment is copied once per tail. The tail is part of the
    newest segment for lookups, a binary search per hash per segment reading the newest
    :data:`MAX_POSTINGS` postings of each hash per segment. Hits older than ``ttl_s`` or more
    than ``max_queries`` queries back are ignored, and whole segments are dropped once all their
    queries are (oldest first), so memory stays within ``max_queries + segment_queries``
    fingerprints.
    """

    def __init__(
        self, max_queries: int = 100_000, ttl_s: float = 3600.0, segment_queries: int = 4096
    ) -> None:
        if max_queries <= 0 or ttl_s <= 0 or segment_queries <= 0:
            raise ValueError("max_queries, ttl_s and segment_queries must be positive")
        self.max_queries = max_queries
        self.ttl_s = ttl_s
        self.segment_queries = segment_queries
        self._clients = np.zeros(max_queries, dtype=np.uint64)
        self._times = np.full(max_queries, -np.inf, dtype=np.float64)
        self._next = 0  # the next query number
        # Each segment: (first query number, sorted hashes, their query numbers); equal hashes
        # sit newest first.
        self._segments: list[tuple[int, U64, I64]] = []
        # The newest segment's latest queries, not merged yet: sorted the same way.
        self._tail_values: U64 = np.zeros(0, dtype=np.uint64)
        self._tail_numbers: I64 = np.zeros(0, dtype=np.int64)
        self._tail_queries = 0

    def __len__(self) -> int:
        """Return the number of fingerprint hashes held (for tests and metrics)."""
        return self._tail_values.size + sum(values.size for _, values, _ in self._segments)

    async def observe(self, client_id: str, hashes: np.ndarray, now: float) -> int:
        """Return the best non-identical match with another client, then record the query."""
        return self.observe_sync(client_id, hashes, now)

    async def observe_batch(self, client_id: str, hashes: U64, now: float) -> I64:
        """Do :meth:`observe` for each row of (n, top) ``hashes``; return the n answers."""
        return self.observe_rows(client_id, hashes, now)

    def observe_sync(self, client_id: str, hashes: np.ndarray, now: float) -> int:
        """Do :meth:`observe` without the event loop."""
        return int(self.observe_rows(client_id, np.asarray(hashes).reshape(1, -1), now)[0])

    def observe_rows(self, client_id: str, hashes: npt.ArrayLike, now: float) -> I64:
        """Look every row up, then record them in order: the same answers as one row at a
        time, since a client's rows never match each other (only other clients count)."""
        flat, rows, sizes = _distinct_rows(hashes)
        tag = np.uint64(_client_tag(client_id))
        best = self._best_matches(flat, rows, sizes, tag, now)
        self._record(flat, rows, sizes.size, tag, now)
        return best

    def _best_matches(self, flat: U64, rows: I64, sizes: I64, tag: np.uint64, now: float) -> I64:
        n = sizes.size
        best = np.zeros(n, dtype=np.int64)
        if flat.size == 0 or not self._segments:
            return best
        hits: list[I64] = []
        owners: list[I64] = []
        # Newest first: the tail, then the segment it belongs to (sharing one budget), then
        # older ones. A hash that many queries share says little, and one client repeating an
        # input must not make every lookup scan all its repeats.
        budget = np.full(flat.size, MAX_POSTINGS, dtype=np.int64)
        parts = [(self._tail_values, self._tail_numbers)]
        parts.extend((values, numbers) for _, values, numbers in reversed(self._segments))
        for at, (values, numbers) in enumerate(parts):
            read = np.zeros(flat.size, dtype=np.int64)
            if values.size:
                lo = np.searchsorted(values, flat, side="left").astype(np.int64)
                hi = np.minimum(np.searchsorted(values, flat, side="right"), lo + budget)
                read = hi - lo
                owner, position = _expand(lo, hi)
                hits.append(numbers[position])
                owners.append(rows[owner])
            budget = MAX_POSTINGS - read if at == 0 else np.full(flat.size, MAX_POSTINGS)
        if not hits:
            return best
        found = np.concatenate(hits)
        ring = found % self.max_queries
        live = (
            (found >= self._next - self.max_queries)
            & (self._times[ring] >= now - self.ttl_s)
            & (self._clients[ring] != tag)
        )
        if not live.any():
            return best
        # Shared hashes per (row, earlier query): query numbers live span < max_queries.
        keys = np.concatenate(owners)[live] * self.max_queries + (
            found[live] - (self._next - self.max_queries)
        )
        pairs, counts = np.unique(keys, return_counts=True)
        owner_rows = pairs // self.max_queries
        near = counts < sizes[owner_rows]  # all shared: the same canonical input
        np.maximum.at(best, owner_rows[near], counts[near])
        return best

    def _record(self, flat: U64, rows: I64, n: int, tag: np.uint64, now: float) -> None:
        """Number the n queries, then insert their hashes a run at a time: each run stays in
        one segment and fills the tail at most."""
        first_row = 0
        while first_row < n:
            number = self._next
            if not self._segments or number - self._segments[-1][0] >= self.segment_queries:
                self._flush_tail()
                self._segments.append(
                    (number, np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))
                )
            room = min(
                self.segment_queries - (number - self._segments[-1][0]),
                TAIL_QUERIES - self._tail_queries,
            )
            run = min(room, n - first_row)
            numbers = number + np.arange(run, dtype=np.int64)
            self._clients[numbers % self.max_queries] = tag
            self._times[numbers % self.max_queries] = now
            lo, hi = np.searchsorted(rows, [first_row, first_row + run])
            values = flat[lo:hi]
            query_numbers = rows[lo:hi] - first_row + number
            # Equal hashes newest first, within the run and before the tail's older ones.
            order = np.lexsort((-query_numbers, values))
            values, query_numbers = values[order], query_numbers[order]
            at = np.searchsorted(self._tail_values, values, side="left")
            self._tail_values = np.insert(self._tail_values, at, values)
            self._tail_numbers = np.insert(self._tail_numbers, at, query_numbers)
            self._tail_queries += run
            self._next += run
            first_row += run
            if self._tail_queries >= TAIL_QUERIES:
                self._flush_tail()
        self._evict(now)

    def _flush_tail(self) -> None:
        """Merge the tail into the newest segment (its hashes go before equal older ones)."""
        if self._tail_queries == 0:
            return
        first, values, numbers = self._segments[-1]
        at = np.searchsorted(values, self._tail_values, side="left")
        self._segments[-1] = (
            first,
            np.insert(values, at, self._tail_values),
            np.insert(numbers, at, self._tail_numbers),
        )
        self._tail_values = np.zeros(0, dtype=np.uint64)
        self._tail_numbers = np.zeros(0, dtype=np.int64)
        self._tail_queries = 0

    def _evict(self, now: float) -> None:
        """Drop the oldest segments whose every query is evicted or past its TTL."""
        while len(self._segments) > 1:
            last_number = self._segments[1][0] - 1  # the oldest segment's newest query
            too_old = last_number < self._next - self.max_queries
            expired = self._times[last_number % self.max_queries] < now - self.ttl_s
            if not (too_old or expired):
                break
            self._segments.pop(0)


class CrossClientDetector:
    """Per-client share of queries that near-duplicate another client's recent queries.

    The pipeline asks the :class:`FingerprintIndex` for each instance's best match and passes
    the answers to :meth:`verdict`; the state is the flags of the client's last
    :data:`HISTORY` queries. Index answers already skip identical queries, so a popular input
    shared by many benign clients never counts.
    """

    name = "cross_client"

    def __init__(self, match_threshold: int = 25) -> None:
        if match_threshold < 0:
            raise ValueError("match_threshold must not be negative")
        self.match_threshold = match_threshold

    def verdict(
        self, state: bytes | None, matches: npt.ArrayLike, now: float
    ) -> tuple[bytes, Verdict]:
        """Fold one request's index answers (one per instance) in; ``now`` is kept for symmetry
        with the other detectors and future decay."""
        del now
        history, seen = self._load(state)
        answers = np.asarray(matches, dtype=np.int64).ravel()
        flags = answers > self.match_threshold
        _push_history(history, seen, flags)
        seen += answers.size
        verdict = _share_verdict(history, seen, "cross_client_probing", answers)
        return _XC_HEADER.pack(_CROSS_MAGIC, seen) + history.tobytes(), verdict

    @staticmethod
    def _load(state: bytes | None) -> tuple[npt.NDArray[np.uint8], int]:
        if not state or len(state) != _XC_HEADER.size + HISTORY:
            return np.zeros(HISTORY, dtype=np.uint8), 0
        magic, seen = _XC_HEADER.unpack_from(state)
        if magic != _CROSS_MAGIC:
            return np.zeros(HISTORY, dtype=np.uint8), 0
        return np.frombuffer(state, np.uint8, HISTORY, _XC_HEADER.size).copy(), int(seen)
