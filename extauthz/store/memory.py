"""The embedded store: per-client records in this process, bounded by a cap and a TTL.

The default when no Redis is configured. Nothing is shared between replicas, so use it
for one replica, tests and the demo.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from extauthz.core.limiter import LimitCharge, LimitState, evaluate
from extauthz.store.base import ClientRecord, DetectionState, StoreError
from extauthz.telemetry import metrics

# Every call is timed by op (extauthz_store_seconds); the embedded store never fails.
_timed = functools.partial(metrics.timed_store, "memory", failure=StoreError)


@dataclass(slots=True)
class _Entry:
    """One client's mutable state; ``pin_until`` matters only while pinned (inf: no end)."""

    first_seen: float
    last_seen: float
    expires_at: float
    tier: str = ""
    level: str | None = None
    blocked: bool = False
    reason: str = ""
    pin_until: float = math.inf
    requests: int = 0
    instances: int = 0
    detection: DetectionState | None = None

    @property
    def pinned(self) -> bool:
        return self.level is not None or self.blocked

    def snapshot(self, client_id: str, limits: tuple[LimitState, ...] = ()) -> ClientRecord:
        return ClientRecord(
            client_id=client_id,
            tier=self.tier,
            pinned_level=self.level,
            blocked=self.blocked,
            reason=self.reason,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            requests=self.requests,
            instances=self.instances,
            limits=limits,
            risk=self.detection.risk if self.detection else 0.0,
            detected_level=self.detection.level if self.detection else "",
            risk_reasons=self.detection.reasons if self.detection else (),
        )


class MemoryStore:
    """Keep client records in a bounded LRU inside this process.

    At most ``max_clients`` records are held; a new client evicts the least recently
    active one. Unpinned clients are evicted before pinned ones (two LRU lists, O(1) per
    operation); a pinned client is evicted only when every slot holds a pinned client.
    A record expires ``ttl_s`` after its last activity (``record`` or ``set_level``), or
    at the end of its pin if later; a pin without a TTL keeps it until reset. Expiry is
    lazy: checked on access, and expired records at the old end of the LRU are dropped
    when a new client arrives. Limit states (one TAT per limit and subject) are capped at
    ``max_limit_keys`` (four per client by default) and dropped once their TAT has passed.
    Detection states together are capped at ``max_detection_bytes``: past it the least
    recently observed clients lose theirs (counted as ``detection_state_evicted``).

    ``clock`` (seconds since the epoch) judges expiry in the methods that take no
    ``now``. Every method is a coroutine only to satisfy the ``Store`` Protocol: none
    blocks or awaits.
    """

    self_bounded = True  # never waits: every method runs to completion at once

    def __init__(
        self,
        *,
        max_clients: int = 100_000,
        ttl_s: float = 86_400.0,
        clock: Callable[[], float],
        max_limit_keys: int | None = None,
        max_detection_bytes: int = 256 * 2**20,
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_detection_bytes < 1:
            raise ValueError(f"max_detection_bytes must be positive, got {max_detection_bytes}")
        self._max_clients = max_clients
        # Detection states by size, least recently saved first: over the budget the oldest
        # clients lose theirs (their records stay). Ids of records dropped otherwise still
        # count until they reach the front, so the budget errs on the side of less memory.
        self._max_detection_bytes = max_detection_bytes
        self._detection_sizes: OrderedDict[str, int] = OrderedDict()
        self._detection_bytes = 0
        self._max_limit_keys = max_limit_keys or 4 * max_clients
        # (tag, limit name) -> TAT, least recently charged first.
        self._tats: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._ttl_s = ttl_s
        self._clock = clock
        # Oldest activity first. Unpinned records are evicted first.
        self._plain: OrderedDict[str, _Entry] = OrderedDict()
        self._pinned: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        """Return how many records are held (expired ones not yet dropped included)."""
        return len(self._plain) + len(self._pinned)

    @_timed("record")
    async def record(
        self,
        client_id: str,
        *,
        tier: str,
        requests: int,
        instances: int,
        now: float,
        limits: Sequence[LimitCharge] = (),
    ) -> ClientRecord:
        """Add to the client's counters, refresh its TTL, apply ``limits`` and return the record."""
        entry = self._live(client_id, now)
        if entry is None:
            entry = self._admit(client_id, now)
        entry.tier = tier
        entry.last_seen = now
        entry.requests += requests
        entry.instances += instances
        self._touch(client_id, entry, now)
        states = tuple(self.apply_limits(limits, now)) if limits else ()
        return entry.snapshot(client_id, states)

    def apply_limits(self, limits: Sequence[LimitCharge], now: float) -> list[LimitState]:
        """Apply ``limits`` atomically (this process runs one step at a time)."""
        keys = [(charge.tag, charge.name) for charge in limits]
        tats = [self._tats.get(key, now) for key in keys]
        states, new_tats = evaluate(tats, limits, now)
        for key, old, new in zip(keys, tats, new_tats, strict=True):
            if new == old:
                continue
            self._tats[key] = new
            self._tats.move_to_end(key)
        # A TAT at or before now is the same as no state: drop lapsed ones from the old end,
        # so limits expire as records do (Redis expires the key at its TAT).
        while self._tats:
            oldest = next(iter(self._tats))
            if self._tats[oldest] > now:
                break
            del self._tats[oldest]
        # Bounded: the least recently charged go first.
        while len(self._tats) > self._max_limit_keys:
            self._tats.popitem(last=False)
        return states

    @_timed("get_client")
    async def get_client(self, client_id: str) -> ClientRecord | None:
        """Return the client's record, or ``None`` when unknown or expired."""
        entry = self._live(client_id, self._clock())
        return None if entry is None else entry.snapshot(client_id)

    @_timed("list_clients")
    async def list_clients(self, *, limit: int, cursor: str = "") -> tuple[list[ClientRecord], str]:
        """Return up to ``limit`` records in client-id order, and the next page's cursor.

        Paging by client id is stable under concurrent changes: a client held for the
        whole walk is listed exactly once. Raise ``ValueError`` on a malformed cursor.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        after = _decode_cursor(cursor)
        ids = [*self._plain, *self._pinned]
        # O(n log limit): fine for an admin listing, and needs no sorted index to maintain.
        page_ids = heapq.nsmallest(limit + 1, (cid for cid in ids if cid > after))
        now = self._clock()
        records = []
        for cid in page_ids[:limit]:
            entry = self._live(cid, now)
            if entry is not None:
                records.append(entry.snapshot(cid))
        more = len(page_ids) > limit
        return records, _encode_cursor(page_ids[limit - 1]) if more else ""

    @_timed("set_level")
    async def set_level(
        self,
        client_id: str,
        *,
        level: str | None,
        blocked: bool,
        reason: str,
        now: float,
        ttl_s: float | None,
    ) -> ClientRecord:
        """Pin (or unpin) the client's level and block flag; create the record if unknown."""
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")
        entry = self._live(client_id, now)
        if entry is None:
            entry = self._admit(client_id, now)
        entry.level = level
        entry.blocked = blocked
        entry.reason = reason
        entry.pin_until = math.inf if ttl_s is None else now + ttl_s
        self._touch(client_id, entry, now)
        return entry.snapshot(client_id)

    @_timed("load_detection")
    async def load_detection(self, client_id: str) -> DetectionState | None:
        """Return the client's detection state, or None."""
        entry = self._live(client_id, self._clock())
        return None if entry is None else entry.detection

    @_timed("save_detection")
    async def save_detection(self, client_id: str, state: DetectionState, *, ttl_s: float) -> None:
        """Keep the detection state with the client's record (which bounds and expires both)."""
        now = self._clock()
        entry = self._live(client_id, now)
        if entry is None:
            entry = self._admit(client_id, now)
        entry.detection = state
        self._touch(client_id, entry, now)
        size = sum(len(blob) for blob in state.detectors.values())
        self._detection_bytes += size - self._detection_sizes.pop(client_id, 0)
        self._detection_sizes[client_id] = size
        while self._detection_bytes > self._max_detection_bytes and len(self._detection_sizes) > 1:
            oldest, freed = self._detection_sizes.popitem(last=False)
            self._detection_bytes -= freed
            dropped = self._plain.get(oldest) or self._pinned.get(oldest)
            if dropped is not None:
                dropped.detection = None
                metrics.ERRORS.labels("detection_state_evicted").inc()

    @_timed("reset_client")
    async def reset_client(self, client_id: str) -> bool:
        """Forget the client; return whether it was known (and not expired)."""
        known = self._live(client_id, self._clock()) is not None
        self._plain.pop(client_id, None)
        self._pinned.pop(client_id, None)
        return known

    @_timed("ping")
    async def ping(self) -> bool:
        """Return True: the store lives in this process."""
        return True

    async def warm(self) -> None:
        """Do nothing: there is nothing to connect to."""

    @_timed("close")
    async def close(self) -> None:
        """Do nothing: there are no connections to release."""

    def _live(self, client_id: str, now: float) -> _Entry | None:
        """Return the client's entry, dropping it when expired and ending a lapsed pin."""
        entry = self._plain.get(client_id)
        if entry is None:
            entry = self._pinned.get(client_id)
        if entry is None:
            return None
        if now >= entry.expires_at:
            self._plain.pop(client_id, None)
            self._pinned.pop(client_id, None)
            return None
        if entry.pinned and now >= entry.pin_until:
            entry.level, entry.blocked, entry.reason = None, False, ""
            del self._pinned[client_id]
            self._plain[client_id] = entry
        return entry

    def _admit(self, client_id: str, now: float) -> _Entry:
        """Make room for a new client and return its empty entry (not yet placed)."""
        while self._plain:
            oldest = next(iter(self._plain.values()))
            if now < oldest.expires_at:
                break
            self._plain.popitem(last=False)
        while len(self) >= self._max_clients:
            (self._plain or self._pinned).popitem(last=False)
        return _Entry(first_seen=now, last_seen=now, expires_at=now + self._ttl_s)

    def _touch(self, client_id: str, entry: _Entry, now: float) -> None:
        """Refresh the entry's expiry and move it to the recent end of its LRU list."""
        if entry.pinned:
            entry.expires_at = max(now + self._ttl_s, entry.pin_until)
            held, other = self._pinned, self._plain
        else:
            entry.expires_at = now + self._ttl_s
            held, other = self._plain, self._pinned
        if held.get(client_id) is entry:
            held.move_to_end(client_id)  # the common case: an active client stays in its list
            return
        held.pop(client_id, None)
        other.pop(client_id, None)
        held[client_id] = entry


def _encode_cursor(client_id: str) -> str:
    return base64.urlsafe_b64encode(client_id.encode()).decode("ascii")


def _decode_cursor(cursor: str) -> str:
    if not cursor:
        return ""
    try:
        return base64.urlsafe_b64decode(cursor.encode("ascii")).decode()
    except (binascii.Error, UnicodeError) as exc:
        raise ValueError(f"malformed cursor {cursor!r}") from exc
