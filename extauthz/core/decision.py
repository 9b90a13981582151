"""The one decision core shared by Check and ext_proc's request_headers.

identity -> deny list -> store (bounded by the decision budget) -> risk level -> action.
Pure of grpc and redis: the store is a Protocol and the clock is injected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from extauthz.core.identity import Identity, RequestInfo, identify, in_networks
from extauthz.core.risk import Action, RiskLevel
from extauthz.policy.loader import Snapshot
from extauthz.store.base import ClientRecord, Store, StoreError
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.decision")


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict with its reasons. ``enforced`` is False in shadow mode, where the
    service allows whatever ``action`` says and only logs it."""

    action: Action
    identity: Identity
    level: RiskLevel
    reasons: tuple[str, ...] = ()
    status: int = 200
    retry_after_s: int = 0
    enforced: bool = True

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW or not self.enforced

    @property
    def error(self) -> str:
        """The stable code shown to the client in a refusal body."""
        return self.reasons[0] if self.reasons else self.action.value


_STATUS = {Action.ALLOW: 200, Action.THROTTLE: 429, Action.CHALLENGE: 401, Action.BLOCK: 403}


class DecisionCore:
    """Decide allow / throttle / challenge / block for one request."""

    def __init__(
        self,
        policy: Callable[[], Snapshot],
        store: Store,
        *,
        clock: Callable[[], float],
        budget_s: float,
    ) -> None:
        self._policy = policy
        self._store = store
        self._clock = clock
        self._budget_s = budget_s

    @property
    def store(self) -> Store:
        return self._store

    def snapshot(self) -> Snapshot:
        return self._policy()

    async def decide(self, request: RequestInfo, *, snapshot: Snapshot | None = None) -> Decision:
        """Return the verdict for ``request`` and charge it to the client's record."""
        snapshot = snapshot or self._policy()
        policy = snapshot.policy
        identity = identify(request, snapshot)
        if identity.error:
            # A key the policy does not know: no challenge can fix it, so refuse with 401.
            return self.verdict(
                Action.BLOCK, identity, RiskLevel.NORMAL, (identity.error,), snapshot, status=401
            )
        deny = policy.deny
        if (
            identity.client_id in deny.clients
            or (identity.key_sha256 and identity.key_sha256 in deny.key_sha256)
            or in_networks(identity.address, deny.networks)
        ):
            return self.verdict(Action.BLOCK, identity, RiskLevel.ABUSIVE, ("deny_list",), snapshot)
        record = await self.charge(identity, requests=1, instances=0)
        if record is None:
            reasons = ("store_unavailable",)
            if policy.fail_modes.store == "deny":
                return self.verdict(
                    Action.BLOCK, identity, RiskLevel.NORMAL, reasons, snapshot, status=503
                )
            return self.verdict(Action.ALLOW, identity, RiskLevel.NORMAL, reasons, snapshot)
        return self.judge(identity, record, snapshot)

    def judge(self, identity: Identity, record: ClientRecord, snapshot: Snapshot) -> Decision:
        """Turn a client's record into a verdict (no I/O)."""
        level = RiskLevel.NORMAL
        reasons: list[str] = []
        if record.pinned_level:
            try:
                level = RiskLevel.parse(record.pinned_level)
                reasons.append(f"pinned_{level.label}")
            except ValueError:
                log.warning(
                    "bad_pinned_level", client=identity.client_id, level=record.pinned_level
                )
        if record.blocked:
            return self.verdict(
                Action.BLOCK, identity, RiskLevel.ABUSIVE, ("operator_block", *reasons), snapshot
            )
        action = snapshot.policy.levels.action_for(level)
        return self.verdict(action, identity, level, tuple(reasons), snapshot)

    def verdict(
        self,
        action: Action,
        identity: Identity,
        level: RiskLevel,
        reasons: tuple[str, ...],
        snapshot: Snapshot,
        *,
        status: int | None = None,
    ) -> Decision:
        """Build a decision with the status, ``Retry-After`` and enforcement the policy gives it."""
        policy = snapshot.policy
        retry = policy.retry_after_s if action is Action.THROTTLE else 0
        return Decision(
            action,
            identity,
            level,
            reasons,
            status or _STATUS[action],
            retry,
            policy.mode == "enforce",
        )

    async def charge(
        self, identity: Identity, *, requests: int, instances: int
    ) -> ClientRecord | None:
        """Add to the client's counters within the decision budget; ``None`` when the store failed."""
        record = self._store.record(
            identity.client_id,
            tier=identity.tier,
            requests=requests,
            instances=instances,
            now=self._clock(),
        )
        try:
            if getattr(self._store, "self_bounded", False):
                return await record
            async with asyncio.timeout(self._budget_s):
                return await record
        except (StoreError, TimeoutError) as exc:
            metrics.ERRORS.labels("store_unavailable").inc()
            log.warning("store_unavailable", error=type(exc).__name__, detail=str(exc)[:200])
            return None
