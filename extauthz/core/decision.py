"""The one decision core shared by Check and ext_proc's request_headers.

identity -> deny list -> terms of use -> store + limits (one round trip, bounded by the decision budget)
-> risk level -> action. Pure of grpc and redis: the store is a Protocol, the clock injected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from extauthz.core.identity import Identity, RequestInfo, identify, in_networks
from extauthz.core.limiter import (
    AppliedLimit,
    ChargeMode,
    LimitCharge,
    scaled,
    subject_tag,
)
from extauthz.core.risk import Action, RiskLevel
from extauthz.policy.loader import Snapshot
from extauthz.policy.model import Limit, Terms
from extauthz.store.base import ClientRecord, Store, StoreError
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.decision")

# What each path charges of each unit: Check and request_headers take one request and only
# look at the instance and token budgets; request_body takes the instances; the answer's
# usage takes the tokens, whatever is left.
REQUEST_PHASE = {
    "requests": ChargeMode.CHARGE,
    "instances": ChargeMode.PROBE,
    "tokens": ChargeMode.PROBE,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict with its reasons. ``enforced`` is False in shadow mode, where the
    service allows whatever ``action`` says and only logs it. ``limits`` are the limits
    applied with it (for RateLimit fields); ``refused_by`` the one that refused."""

    action: Action
    identity: Identity
    level: RiskLevel
    reasons: tuple[str, ...] = ()
    status: int = 200
    retry_after_s: int = 0
    enforced: bool = True
    limits: tuple[AppliedLimit, ...] = ()
    refused_by: AppliedLimit | None = None
    # Challenges: the one issued with a 401, the pass granted now (sent back to the client),
    # and the id of the pass this request is admitted with (its instance budget is charged).
    challenge: IssuedChallenge | None = None
    granted_pass: str = ""
    pass_id: str = ""
    # The terms of use in force when it was made (None: the policy declares none).
    terms: Terms | None = None

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW or not self.enforced

    @property
    def error(self) -> str:
        """The stable code shown to the client in a refusal body."""
        return self.reasons[0] if self.reasons else self.action.value


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    """A proof-of-work challenge sent with a 401."""

    token: str
    difficulty: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Charged:
    """What the store said about a charge: the record (None when the store failed and the
    policy has no local fallback) and whether the store failed."""

    record: ClientRecord | None
    degraded: bool = False


_ChargesKey = tuple[str, str, str, int, int]
_Charges = tuple[tuple[Limit, LimitCharge], ...]
# Bounded: one entry per active client and cost; cleared when full.
_MAX_CACHED_CHARGES = 16_384
# Bounded: the terms version last seen per client, for operators; cleared when full.
_MAX_TERMS_SEEN = 65_536

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
        local_store: Store | None = None,
        replicas: int = 1,
    ) -> None:
        """``local_store`` holds the per-replica limits of ``fail_modes.store: local``, whose
        budgets are divided by ``replicas``."""
        self._policy = policy
        self._store = store
        self._clock = clock
        self._budget_s = budget_s
        self._local = local_store
        self._replicas = max(1, replicas)
        # limits_for's answers for the current snapshot: a client's charges are the same
        # on every request but for their cost.
        self._charges_of: Snapshot | None = None
        self._charges: dict[_ChargesKey, tuple[dict[str, ChargeMode], _Charges]] = {}
        self._terms_seen: dict[str, str] = {}

    @property
    def store(self) -> Store:
        return self._store

    def snapshot(self) -> Snapshot:
        return self._policy()

    async def decide(self, request: RequestInfo, *, snapshot: Snapshot | None = None) -> Decision:
        """Return the verdict for ``request``, charging it to the client's record and limits."""
        snapshot = snapshot or self._policy()
        policy = snapshot.policy
        identity = identify(request, snapshot)
        if identity.terms_accepted:
            self._see_terms(identity)
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
        if self.owes_terms(identity, snapshot):
            # Refused before any charge, as the deny list: no limit or challenge can fix it.
            return self.verdict(
                Action.BLOCK, identity, RiskLevel.NORMAL, ("terms_not_accepted",), snapshot
            )
        limits = self.limits_for(identity, snapshot, REQUEST_PHASE, cost=1)
        charged = await self.charge(
            identity, requests=1, instances=0, limits=limits, snapshot=snapshot
        )
        record = charged.record
        if record is None:
            reasons = ("store_unavailable",)
            if policy.fail_modes.store == "fail_closed":
                return self.verdict(
                    Action.BLOCK, identity, RiskLevel.NORMAL, reasons, snapshot, status=503
                )
            return self.verdict(Action.ALLOW, identity, RiskLevel.NORMAL, reasons, snapshot)
        decision = self.judge(identity, record, snapshot)
        if charged.degraded:
            decision = _with(decision, reasons=(*decision.reasons, "store_unavailable"))
        return self.apply_limits(decision, limits, record, snapshot)

    def _see_terms(self, identity: Identity) -> None:
        seen = self._terms_seen
        if seen.get(identity.client_id) == identity.terms_accepted:
            return
        if len(seen) >= _MAX_TERMS_SEEN:
            seen.clear()
        seen[identity.client_id] = identity.terms_accepted

    def terms_on_record(self, client_id: str, snapshot: Snapshot) -> str:
        """The terms version ``client_id`` accepted, as far as this replica knows: its API
        key's ``terms_version`` (the policy, shared by every replica), else the version its
        last request here carried (a JWT claim or the signup flow's header)."""
        terms = snapshot.policy.terms
        if terms is None:
            return ""
        if terms.accepted_from.api_key and client_id.startswith("key:"):
            name = client_id.removeprefix("key:")
            for key in snapshot.keys_by_sha256.values():
                if key.name == name and key.terms_version:
                    return key.terms_version
        return self._terms_seen.get(client_id, "")

    def owes_terms(self, identity: Identity, snapshot: Snapshot) -> bool:
        """Whether the client's tier requires terms of use it has not accepted (the current
        version, or the previous one before the grace ends)."""
        terms = snapshot.policy.terms
        if terms is None:
            return False
        tier = snapshot.policy.tiers.get(identity.tier)
        if tier is None or not tier.require_terms:
            return False
        return not terms.admits(identity.terms_accepted, self._clock())

    def judge(self, identity: Identity, record: ClientRecord, snapshot: Snapshot) -> Decision:
        """Turn a client's record into a verdict (no I/O)."""
        level = RiskLevel.NORMAL
        reasons: list[str] = []
        if record.pinned_level:
            # An operator's pin wins over the detectors, in both directions.
            try:
                level = RiskLevel.parse(record.pinned_level)
                reasons.append(f"pinned_{level.label}")
            except ValueError:
                log.warning(
                    "bad_pinned_level", client=identity.client_id, level=record.pinned_level
                )
        elif record.detected_level and snapshot.policy.detection.enabled:
            try:
                level = RiskLevel.parse(record.detected_level)
                reasons.extend(record.risk_reasons)
            except ValueError:
                log.warning(
                    "bad_detected_level", client=identity.client_id, level=record.detected_level
                )
        if record.blocked:
            return self.verdict(
                Action.BLOCK, identity, RiskLevel.ABUSIVE, ("operator_block", *reasons), snapshot
            )
        action = snapshot.policy.levels.action_for(level)
        return self.verdict(action, identity, level, tuple(reasons), snapshot)

    def apply_limits(
        self,
        decision: Decision,
        limits: Sequence[tuple[Limit, LimitCharge]],
        record: ClientRecord,
        snapshot: Snapshot,
    ) -> Decision:
        """Attach the limits' answers; an allowed decision a limit refused becomes THROTTLE."""
        if not limits or len(record.limits) != len(limits):
            return decision
        applied = tuple(
            AppliedLimit(charge.name, limit.unit, limit.scope, limit.quota, limit.window_s, state)
            for (limit, charge), state in zip(limits, record.limits, strict=True)
        )
        refused = [a for a in applied if not a.state.allowed]
        if not refused or decision.action is not Action.ALLOW:
            return _with(decision, limits=applied)
        worst = max(refused, key=lambda a: a.state.retry_after_s)
        metrics.LIMITED.labels(worst.unit, worst.scope).inc()
        throttled = self.verdict(
            Action.THROTTLE,
            decision.identity,
            decision.level,
            ("rate_limited", *decision.reasons),
            snapshot,
        )
        retry = max(1, math.ceil(worst.state.retry_after_s))
        return _with(throttled, limits=applied, refused_by=worst, retry_after_s=retry)

    def limits_for(
        self,
        identity: Identity,
        snapshot: Snapshot,
        modes: dict[str, ChargeMode],
        *,
        cost: int,
    ) -> list[tuple[Limit, LimitCharge]]:
        """The tier's limits on the units in ``modes``, as charges of ``cost`` (1 for probes)."""
        if snapshot is not self._charges_of:
            self._charges_of = snapshot
            self._charges = {}
        key = (identity.client_id, identity.tier, identity.address, id(modes), cost)
        cached = self._charges.get(key)
        if cached is not None and cached[0] is modes:
            return list(cached[1])
        charges = self._limits_for(identity, snapshot, modes, cost=cost)
        if len(self._charges) >= _MAX_CACHED_CHARGES:
            self._charges.clear()
        self._charges[key] = (modes, tuple(charges))
        return charges

    def _limits_for(
        self,
        identity: Identity,
        snapshot: Snapshot,
        modes: dict[str, ChargeMode],
        *,
        cost: int,
    ) -> list[tuple[Limit, LimitCharge]]:
        tier = snapshot.policy.tiers.get(identity.tier)
        if tier is None or not tier.limits:
            return []
        subnets = snapshot.policy.subnets
        charges = []
        for limit in tier.limits:
            mode = modes.get(limit.unit)
            if mode is None:
                continue
            tag = subject_tag(
                limit.scope,
                identity.client_id,
                identity.address,
                ipv4_prefix=subnets.ipv4_prefix,
                ipv6_prefix=subnets.ipv6_prefix,
            )
            units = 1 if mode is ChargeMode.PROBE or limit.unit == "requests" else cost
            charge = LimitCharge(
                tag, f"{identity.tier}:{limit.id}", limit.interval_s, limit.capacity, units, mode
            )
            charges.append((limit, charge))
        return charges

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
            terms=policy.terms,
        )

    async def charge(
        self,
        identity: Identity,
        *,
        requests: int,
        instances: int,
        limits: Sequence[tuple[Limit, LimitCharge]] = (),
        snapshot: Snapshot | None = None,
    ) -> Charged:
        """Add to the client's counters and apply ``limits`` within the decision budget.

        When the store fails, ``fail_modes.store: local`` decides the limits with this
        replica's own memory, each budget divided by the replica count.
        """
        charges = [charge for _, charge in limits]
        now = self._clock()
        call = self._store.record(
            identity.client_id,
            tier=identity.tier,
            requests=requests,
            instances=instances,
            now=now,
            limits=charges,
        )
        try:
            if getattr(self._store, "self_bounded", False):
                return Charged(await call)
            async with asyncio.timeout(self._budget_s):
                return Charged(await call)
        except (StoreError, TimeoutError) as exc:
            metrics.ERRORS.labels("store_unavailable").inc()
            log.warning("store_unavailable", error=type(exc).__name__, detail=str(exc)[:200])
        snapshot = snapshot or self._policy()
        if snapshot.policy.fail_modes.store != "local" or self._local is None:
            return Charged(None, degraded=True)
        local = await self._local.record(
            identity.client_id,
            tier=identity.tier,
            requests=requests,
            instances=instances,
            now=now,
            limits=[scaled(charge, self._replicas) for charge in charges],
        )
        # The local record knows no operator pins: only its limits are used.
        return Charged(
            ClientRecord(identity.client_id, identity.tier, limits=local.limits), degraded=True
        )


_FIELDS = tuple(f.name for f in dataclasses.fields(Decision))


def _with(decision: Decision, **changes: object) -> Decision:
    """``dataclasses.replace`` without its per-call field checks (half its cost)."""
    values = {name: getattr(decision, name) for name in _FIELDS}
    values.update(changes)
    return Decision(**values)
