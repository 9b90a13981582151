"""The Store seam: what the decision core needs from shared state.

Implementations: ``memory.MemoryStore`` (embedded default, one process) and
``redis.RedisStore`` (shared between replicas). Both keep every per-client record
bounded: a TTL refreshed on activity, and a cap on the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extauthz.core.limiter import LimitCharge, LimitState


class StoreError(Exception):
    """The store could not answer (down, timed out, bad reply). Code: ``store_unavailable``."""

    code = "store_unavailable"


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """What the store knows of one client.

    ``pinned_level`` is the risk level an operator pinned (a ``RiskLevel`` label such as
    ``"abusive"``), or ``None``; ``blocked`` is an operator block. Counters are totals
    since ``first_seen`` (seconds since the epoch) and expire with the record.
    ``limits`` holds the answers of the limits charged with the call that returned it, in
    the order they were given (empty elsewhere).
    """

    client_id: str
    tier: str = ""
    pinned_level: str | None = None
    blocked: bool = False
    reason: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    requests: int = 0
    instances: int = 0
    limits: tuple[LimitState, ...] = ()
    # What the detectors concluded (see ``DetectionState``): the level the decision acts on
    # when no operator pin says otherwise.
    risk: float = 0.0
    detected_level: str = ""
    risk_reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DetectionState:
    """A client's detector states (opaque bytes per detector) and the risk they add up to.

    ``timeline`` keeps the last level changes as (time, level, reasons) for operators.
    """

    detectors: Mapping[str, bytes] = field(default_factory=dict)
    risk: float = 0.0
    level: str = "normal"
    reasons: tuple[str, ...] = ()
    updated_at: float = 0.0
    timeline: tuple[tuple[float, str, str], ...] = ()


class Store(Protocol):
    """Shared per-client state. Every method may raise ``StoreError``.

    ``self_bounded`` is True when every call finishes within the store's own timeout (the
    decision budget) or never waits at all; the decision core then adds no timer of its own,
    which costs about 30 us per request under grpc.aio. Stores that cannot promise it say False.
    """

    self_bounded: bool

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
        """Add ``requests`` and ``instances`` to the client's counters, refresh its TTL, apply
        ``limits`` (GCRA, all-or-nothing: ``core.limiter.evaluate``) and return the updated
        record with the limits' answers, in one round trip.

        Counters count what was seen, so they grow even when a limit refuses. In a Redis
        Cluster, limits whose tags hash to other slots than the client's are applied in
        their own atomic step (all-or-nothing holds within a slot).
        """
        ...

    async def get_client(self, client_id: str) -> ClientRecord | None:
        """Return the client's record, or ``None`` when unknown or expired."""
        ...

    async def list_clients(self, *, limit: int, cursor: str = "") -> tuple[list[ClientRecord], str]:
        """Return up to ``limit`` records and the cursor of the next page (``""`` at the end)."""
        ...

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
        """Pin the client's risk level (``None`` unpins) and set its block flag.

        ``ttl_s`` bounds how long the pin lasts; ``None`` keeps it until reset.
        """
        ...

    async def load_detection(self, client_id: str) -> DetectionState | None:
        """Return the client's detection state, or None when it has none."""
        ...

    async def save_detection(self, client_id: str, state: DetectionState, *, ttl_s: float) -> None:
        """Store the client's detection state for ``ttl_s``; its risk, level and reasons also
        go on the client's record, so ``record`` returns them in the same round trip."""
        ...

    async def reset_client(self, client_id: str) -> bool:
        """Forget everything about the client; return whether it was known."""
        ...

    async def ping(self) -> bool:
        """Return True when the store answers."""
        ...

    async def warm(self) -> None:
        """Do before serving what a first request would pay inside its budget (connections,
        scripts); raise StoreError when the store is down."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
