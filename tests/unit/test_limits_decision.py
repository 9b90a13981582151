"""Limits in the decision core: which limits a request meets, and the verdict they give."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from extauthz.core.decision import REQUEST_PHASE, DecisionCore
from extauthz.core.identity import RequestInfo, identify
from extauthz.core.limiter import (
    AppliedLimit,
    ChargeMode,
    LimitState,
    rate_limit_fields,
)
from extauthz.core.risk import Action
from extauthz.policy.loader import PolicyError, Snapshot
from extauthz.store.memory import MemoryStore
from tests.store_contract import FailingStore, FakeClock
from tests.unit.conftest import PolicyFromText

ALICE = "alice-key"
BOB = "bob-key"


def _policy(
    policy_from_text: PolicyFromText,
    key_digest: Callable[[str], str],
    limits: str,
    *,
    extra: str = "",
) -> Snapshot:
    return policy_from_text(
        f"""
        identity:
          api_keys:
            - {{name: alice, tier: free, sha256: {key_digest(ALICE)}}}
            - {{name: bob, tier: free, sha256: {key_digest(BOB)}}}
        tiers:
          anonymous: {{max_instances: 4}}
          free:
            max_instances: 8
            limits: {limits}
        {extra}
        """
    )


def _request(address: str = "203.0.113.5", key: str | None = ALICE) -> RequestInfo:
    headers = {"x-api-key": key} if key else {}
    return RequestInfo(headers=headers, source_address=address)


def _core(
    snapshot: Snapshot, store: MemoryStore, clock: FakeClock, **kwargs: object
) -> DecisionCore:
    return DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05, **kwargs)  # type: ignore[arg-type]


class TestRequestLimits:
    """Check charges one request to every request limit; a spent one throttles with 429."""

    async def test_burst_then_throttle_with_retry_after(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(
            policy_from_text,
            key_digest,
            "[{name: rps, unit: requests, rate: 2, per: second, burst: 3}]",
        )
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        verdicts = [await core.decide(_request()) for _ in range(4)]
        assert [d.action for d in verdicts] == [Action.ALLOW] * 3 + [Action.THROTTLE]
        refused = verdicts[-1]
        assert refused.status == 429
        assert refused.reasons[0] == "rate_limited"
        assert refused.refused_by is not None and refused.refused_by.name == "free:rps"
        assert refused.retry_after_s == 1  # 0.5 s to the next unit, rounded up
        assert [d.limits[0].state.remaining for d in verdicts[:3]] == [2, 1, 0]
        clock.advance(0.5)
        assert (await core.decide(_request())).action is Action.ALLOW

    async def test_a_refused_request_takes_nothing(
        self, policy_from_text, key_digest, clock
    ) -> None:
        limits = "[{name: rps, unit: requests, rate: 1, per: minute, burst: 5}, {name: tight, unit: requests, rate: 1, per: minute}]"
        snapshot = _policy(policy_from_text, key_digest, limits)
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        first, second = await core.decide(_request()), await core.decide(_request())
        assert first.action is Action.ALLOW and second.action is Action.THROTTLE
        assert second.refused_by is not None and second.refused_by.name == "free:tight"
        rps = next(a for a in second.limits if a.name == "free:rps")
        assert rps.state.remaining == 4  # the refused request did not spend the other limit

    async def test_clients_have_their_own_budgets(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(policy_from_text, key_digest, "[{unit: requests, rate: 1, per: minute}]")
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        assert (await core.decide(_request(key=ALICE))).action is Action.ALLOW
        assert (await core.decide(_request(key=ALICE))).action is Action.THROTTLE
        assert (await core.decide(_request(key=BOB))).action is Action.ALLOW


class TestScopes:
    """Address and subnet scopes add up every key coming from one network."""

    async def test_address_scope_is_shared_by_keys(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(
            policy_from_text, key_digest, "[{unit: requests, rate: 2, per: minute, scope: address}]"
        )
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        same = [await core.decide(_request("203.0.113.5", key)) for key in (ALICE, BOB, BOB)]
        other = await core.decide(_request("198.51.100.1", BOB))
        assert [d.action for d in same] == [Action.ALLOW, Action.ALLOW, Action.THROTTLE]
        assert other.action is Action.ALLOW

    async def test_subnet_scope_groups_a_slash_24(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(
            policy_from_text, key_digest, "[{unit: requests, rate: 2, per: minute, scope: subnet}]"
        )
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        verdicts = [await core.decide(_request(f"203.0.113.{i}", BOB)) for i in (1, 2, 3)]
        assert [d.action for d in verdicts] == [Action.ALLOW, Action.ALLOW, Action.THROTTLE]
        assert (await core.decide(_request("203.0.114.1", BOB))).action is Action.ALLOW

    async def test_subnet_prefix_is_configurable(self, policy_from_text, key_digest, clock) -> None:
        snapshot = _policy(
            policy_from_text,
            key_digest,
            "[{unit: requests, rate: 1, per: minute, scope: subnet}]",
            extra="subnets: {ipv4_prefix: 16}",
        )
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        assert (await core.decide(_request("203.0.1.1", BOB))).action is Action.ALLOW
        assert (await core.decide(_request("203.0.200.1", BOB))).action is Action.THROTTLE


class TestInstanceAndTokenBudgets:
    """Instances and tokens are charged later; Check refuses once their budget is spent."""

    async def test_spent_instance_quota_refuses_the_next_request(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(
            policy_from_text, key_digest, "[{name: daily, unit: instances, rate: 10, per: day}]"
        )
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        identity = identify(_request(), snapshot)
        limits = core.limits_for(identity, snapshot, {"instances": ChargeMode.CHARGE}, cost=8)
        assert limits[0][1].cost == 8
        charged = await core.charge(identity, requests=0, instances=8, limits=limits)
        assert charged.record is not None and charged.record.limits[0].remaining == 2
        assert (await core.decide(_request())).action is Action.ALLOW  # 2 left: the probe passes
        again = await core.charge(identity, requests=0, instances=8, limits=limits)
        assert again.record is not None and not again.record.limits[0].allowed  # 8 > 2 left
        charged = await core.charge(
            identity,
            requests=0,
            instances=2,
            limits=core.limits_for(identity, snapshot, {"instances": ChargeMode.CHARGE}, cost=2),
        )
        assert (await core.decide(_request())).action is Action.THROTTLE

    async def test_tokens_go_into_debt_and_refuse_after(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(
            policy_from_text, key_digest, "[{name: tokens, unit: tokens, rate: 100, per: day}]"
        )
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        identity = identify(_request(), snapshot)
        assert (await core.decide(_request())).action is Action.ALLOW
        limits = core.limits_for(identity, snapshot, {"tokens": ChargeMode.FORCE}, cost=150)
        forced = await core.charge(identity, requests=0, instances=0, limits=limits)
        assert forced.record is not None and forced.record.limits[0].allowed  # served, then charged
        refused = await core.decide(_request())
        assert refused.action is Action.THROTTLE
        assert refused.refused_by is not None and refused.refused_by.unit == "tokens"

    def test_request_phase_probes_instances_and_tokens(self) -> None:
        assert REQUEST_PHASE == {
            "requests": ChargeMode.CHARGE,
            "instances": ChargeMode.PROBE,
            "tokens": ChargeMode.PROBE,
        }


class TestStoreFailure:
    """fail_modes.store decides limits when the store is down."""

    async def test_local_mode_divides_budgets_by_replicas(
        self, policy_from_text, key_digest, clock
    ) -> None:
        snapshot = _policy(
            policy_from_text,
            key_digest,
            "[{unit: requests, rate: 6, per: minute}]",
            extra="fail_modes: {store: local}",
        )
        core = _core(
            snapshot,
            FailingStore(clock=clock),
            clock,
            local_store=MemoryStore(clock=clock),
            replicas=3,
        )
        verdicts = [await core.decide(_request()) for _ in range(4)]
        assert [d.action for d in verdicts] == [
            Action.ALLOW,
            Action.ALLOW,
            Action.THROTTLE,
            Action.THROTTLE,
        ]
        assert all("store_unavailable" in d.reasons for d in verdicts)

    @pytest.mark.parametrize(
        ("mode", "action", "status"),
        [("fail_open", Action.ALLOW, 200), ("fail_closed", Action.BLOCK, 503)],
    )
    async def test_open_and_closed(
        self, policy_from_text, key_digest, clock, mode: str, action: Action, status: int
    ) -> None:
        snapshot = _policy(
            policy_from_text,
            key_digest,
            "[{unit: requests, rate: 1, per: minute}]",
            extra=f"fail_modes: {{store: {mode}}}",
        )
        core = _core(
            snapshot, FailingStore(clock=clock), clock, local_store=MemoryStore(clock=clock)
        )
        decisions = [await core.decide(_request()) for _ in range(3)]
        assert {(d.action, d.status) for d in decisions} == {(action, status)}


class TestPolicyValidation:
    """Limit declarations are checked where they are written."""

    def test_instance_burst_below_the_batch_cap_is_refused(
        self, policy_from_text, key_digest
    ) -> None:
        with pytest.raises(PolicyError) as info:
            _policy(
                policy_from_text, key_digest, "[{unit: instances, rate: 100, per: day, burst: 4}]"
            )
        assert any(
            p.startswith("tiers.free") and "limits[0].burst" in p for p in info.value.problems
        )

    def test_duplicate_limit_names_are_refused(self, policy_from_text, key_digest) -> None:
        with pytest.raises(PolicyError) as info:
            _policy(
                policy_from_text,
                key_digest,
                "[{unit: requests, rate: 1}, {unit: requests, rate: 2}]",
            )
        assert any("duplicate limit 'requests-per-second'" in p for p in info.value.problems)

    def test_rate_must_be_positive(self, policy_from_text, key_digest) -> None:
        with pytest.raises(PolicyError) as info:
            _policy(policy_from_text, key_digest, "[{unit: requests, rate: 0}]")
        assert any("limits[0].rate" in p for p in info.value.problems)


class TestRateLimitFields:
    """RateLimit-Policy and RateLimit follow draft-ietf-httpapi-ratelimit-headers-10."""

    def test_fields(self) -> None:
        applied = [
            AppliedLimit("free:rps", "requests", "client", 10, 1.0, LimitState(True, 9, 0.1)),
            AppliedLimit(
                "free:daily", "instances", "client", 1000, 86_400.0, LimitState(True, 0, 3600.2)
            ),
        ]
        assert rate_limit_fields(applied) == [
            (
                "ratelimit-policy",
                '"free:rps";q=10;w=1;qu="requests", "free:daily";q=1000;w=86400;qu="instances"',
            ),
            ("ratelimit", '"free:rps";r=9;t=1, "free:daily";r=0;t=3601'),
        ]
        assert rate_limit_fields([]) == []


class TestBuiltInPolicy:
    """The built-in policy limits anonymous clients as the README says."""

    async def test_anonymous_burst_and_daily_quota(self, clock: FakeClock) -> None:
        from extauthz.policy.loader import load_default

        snapshot = load_default()
        core = _core(snapshot, MemoryStore(clock=clock), clock)
        burst = [await core.decide(_request("198.51.100.7", key=None)) for _ in range(21)]
        assert [d.action for d in burst].count(Action.ALLOW) == 20
        assert burst[-1].refused_by is not None and burst[-1].refused_by.name == "anonymous:burst"
        daily = next(a for a in burst[0].limits if a.name == "anonymous:daily")
        assert (daily.quota, daily.window_s, daily.unit) == (1000, 86_400.0, "instances")


class TestDetectedLevel:
    """The detectors' level drives the verdict; an operator's pin wins over it."""

    async def test_detected_level_and_pin_precedence(
        self, policy_from_text, key_digest, clock
    ) -> None:
        from extauthz.store.base import DetectionState

        snapshot = _policy(
            policy_from_text,
            key_digest,
            "[]",
            extra="levels: {suspicious: throttle}\n        detection: {enabled: true}",
        )
        store = MemoryStore(clock=clock)
        core = _core(snapshot, store, clock)
        state = DetectionState(risk=0.7, level="suspicious", reasons=("prada_non_normal",))
        await store.save_detection("key:alice", state, ttl_s=60)
        detected = await core.decide(_request())
        assert detected.action is Action.THROTTLE
        assert "prada_non_normal" in detected.reasons
        await store.set_level(
            "key:alice", level="normal", blocked=False, reason="", now=clock(), ttl_s=None
        )
        pinned = await core.decide(_request())
        assert pinned.action is Action.ALLOW and "pinned_normal" in pinned.reasons
