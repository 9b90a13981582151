"""The decision core: identity, deny list, store within the budget, risk level and action."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from extauthz.core.decision import Decision, DecisionCore
from extauthz.core.identity import RequestInfo, identify, in_networks, normalize_address
from extauthz.core.limiter import LimitCharge
from extauthz.core.risk import Action, RiskLevel, strictest
from extauthz.policy.loader import Snapshot, load_default
from extauthz.store.base import ClientRecord
from extauthz.store.memory import MemoryStore
from extauthz.telemetry.metrics import REGISTRY
from tests.store_contract import FailingStore, FakeClock

PolicyFromText = Callable[[str], Snapshot]
KeyDigest = Callable[[str], str]

ALICE_KEY = "sk-alice-0123456789"
OPS_KEY = "sk-ops-9876543210"
BUDGET_S = 0.05


def _request(
    address: str = "203.0.113.9",
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    jwt: Mapping[str, Any] | None = None,
) -> RequestInfo:
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["x-api-key"] = key
    return RequestInfo(
        headers=all_headers,
        source_address=address,
        path="/v1/models/m:predict",
        method="POST",
        jwt_payload=jwt,
    )


def _store_errors() -> float:
    return (
        REGISTRY.get_sample_value("extauthz_errors_total", {"reason": "store_unavailable"}) or 0.0
    )


@pytest.fixture
def keyed_policy(
    policy_from_text: PolicyFromText, key_digest: KeyDigest
) -> Callable[[str], Snapshot]:
    """Return a builder of policies with keys alice (free) and ops (trusted) plus ``extra`` YAML."""

    def build(extra: str = "") -> Snapshot:
        return policy_from_text(
            f"""
identity:
  api_keys:
    - {{name: alice, sha256: '{key_digest(ALICE_KEY)}', tier: free}}
    - {{name: ops, sha256: '{key_digest(OPS_KEY)}', tier: trusted}}
{extra}
"""
        )

    return build


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(max_clients=1_000, ttl_s=3_600.0, clock=clock)


def _core(
    snapshot: Snapshot, store: Any, clock: FakeClock, budget_s: float = BUDGET_S
) -> DecisionCore:
    return DecisionCore(lambda: snapshot, store, clock=clock, budget_s=budget_s)


class _SlowStore(MemoryStore):
    """A store whose ``record`` answers long after any decision budget."""

    self_bounded = False  # it waits without a timeout of its own, so the core must bound it

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
        await asyncio.sleep(30.0)
        raise AssertionError("the budget should have cancelled this call")


class TestIdentityByKey:
    """An API key identifies a client by the key's name; the raw key never leaves identify()."""

    def test_known_key_gives_its_name_and_tier(
        self, keyed_policy: Callable[[str], Snapshot], key_digest: KeyDigest
    ) -> None:
        identity = identify(_request(key=OPS_KEY), keyed_policy(""))
        assert identity.client_id == "key:ops"
        assert identity.tier == "trusted"
        assert identity.kind == "api_key"
        assert identity.key_sha256 == key_digest(OPS_KEY)
        assert identity.error == ""

    def test_raw_key_never_appears_in_the_identity(
        self, keyed_policy: Callable[[str], Snapshot]
    ) -> None:
        for key in (ALICE_KEY, "sk-unknown-key-value"):
            identity = identify(_request(key=key), keyed_policy(""))
            assert all(key not in str(v) for v in dataclasses.astuple(identity))
            assert key not in repr(identity)

    def test_unknown_key_is_an_error_under_deny(
        self, keyed_policy: Callable[[str], Snapshot]
    ) -> None:
        raw = "sk-unknown-key-value"
        identity = identify(_request(key=raw), keyed_policy(""))
        assert identity.error == "invalid_api_key"
        assert identity.client_id != raw
        assert raw not in identity.client_id
        assert identity.client_id.startswith("key:")

    def test_unknown_key_is_anonymous_when_policy_says_so(
        self, policy_from_text: PolicyFromText
    ) -> None:
        snapshot = policy_from_text("identity: {unknown_key: anonymous}\n")
        identity = identify(_request("198.51.100.4", key="sk-unknown"), snapshot)
        assert identity.error == ""
        assert identity.client_id == "ip:198.51.100.4"
        assert identity.tier == "anonymous"
        assert identity.kind == "anonymous"

    def test_custom_key_header_is_matched_lower_case(
        self, policy_from_text: PolicyFromText, key_digest: KeyDigest
    ) -> None:
        snapshot = policy_from_text(
            f"""
            identity:
              api_key_header: X-Client-Key
              api_keys: [{{name: alice, sha256: '{key_digest(ALICE_KEY)}', tier: free}}]
            """
        )
        assert (
            identify(_request(headers={"x-client-key": ALICE_KEY}), snapshot).client_id
            == "key:alice"
        )
        assert identify(_request(key=ALICE_KEY), snapshot).kind == "anonymous"

    def test_key_wins_over_jwt(self, keyed_policy: Callable[[str], Snapshot]) -> None:
        identity = identify(
            _request(key=ALICE_KEY, jwt={"sub": "u1", "tier": "trusted"}), keyed_policy("")
        )
        assert identity.client_id == "key:alice"


class TestIdentityByAddress:
    """Without a key or JWT a client is its address, port stripped; garbage is ip:unknown."""

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("127.0.0.2:5555", "ip:127.0.0.2"),
            ("[::1]:80", "ip:::1"),
            ("::1", "ip:::1"),
            ("2001:db8::7", "ip:2001:db8::7"),
            ("2001:DB8:0:0::7", "ip:2001:db8::7"),
            ("10.1.2.3", "ip:10.1.2.3"),
            ("garbage", "ip:unknown"),
            ("", "ip:unknown"),
            ("1.2.3.4:80:90", "ip:unknown"),
        ],
    )
    def test_address_forms(self, raw: str, expected: str) -> None:
        identity = identify(_request(raw), load_default())
        assert identity.client_id == expected
        assert identity.tier == "anonymous"
        assert identity.kind == "anonymous"

    def test_different_addresses_are_different_clients(self) -> None:
        a = identify(_request("192.0.2.1"), load_default())
        b = identify(_request("192.0.2.2"), load_default())
        assert a.client_id != b.client_id

    def test_same_address_with_different_ports_is_one_client(self) -> None:
        a = identify(_request("192.0.2.1:1000"), load_default())
        b = identify(_request("192.0.2.1:2000"), load_default())
        assert a == b

    def test_ipv4_mapped_ipv6_is_the_ipv4_client(self) -> None:
        """A dual-stack listener reports ``::ffff:a.b.c.d``; it is the same client as ``a.b.c.d``."""
        assert normalize_address("::ffff:10.1.2.3") == "10.1.2.3"
        assert normalize_address("[::ffff:10.1.2.3]:443") == "10.1.2.3"


class TestIdentityByJwt:
    """Verified JWT claims identify a client by an opaque hash of issuer and subject."""

    def test_jwt_gives_an_opaque_id_and_the_claimed_tier(self) -> None:
        identity = identify(
            _request(jwt={"iss": "https://idp", "sub": "user-42", "tier": "trusted"}),
            load_default(),
        )
        assert re.fullmatch(r"jwt:[0-9a-f]{16}", identity.client_id)
        assert "user-42" not in identity.client_id
        assert identity.tier == "trusted"
        assert identity.kind == "jwt"

    def test_unknown_tier_claim_falls_back_to_the_default_tier(self) -> None:
        identity = identify(_request(jwt={"sub": "user-42", "tier": "platinum"}), load_default())
        assert identity.tier == "free"
        missing = identify(_request(jwt={"sub": "user-42"}), load_default())
        assert missing.tier == "free"
        assert missing.client_id == identity.client_id

    def test_same_subject_of_another_issuer_is_another_client(self) -> None:
        a = identify(_request(jwt={"iss": "https://a", "sub": "u"}), load_default())
        b = identify(_request(jwt={"iss": "https://b", "sub": "u"}), load_default())
        assert a.client_id != b.client_id

    def test_payload_without_subject_is_anonymous(self) -> None:
        identity = identify(_request("192.0.2.5", jwt={"tier": "trusted"}), load_default())
        assert identity.client_id == "ip:192.0.2.5"
        assert identity.tier == "anonymous"

    def test_jwt_disabled_ignores_the_payload(self, policy_from_text: PolicyFromText) -> None:
        snapshot = policy_from_text("identity: {jwt: null}\n")
        assert identify(_request(jwt={"sub": "u"}), snapshot).kind == "anonymous"


class TestAllow:
    """A normal client is allowed and its request is charged to its record."""

    async def test_normal_client_is_allowed_and_charged(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        core = _core(keyed_policy(""), store, clock)
        decision = await core.decide(_request(key=ALICE_KEY))
        assert decision.action is Action.ALLOW
        assert decision.allowed
        assert decision.status == 200
        assert decision.level is RiskLevel.NORMAL
        assert decision.reasons == ()
        assert decision.identity.client_id == "key:alice"
        record = await store.get_client("key:alice")
        assert record is not None
        assert (record.requests, record.instances, record.tier) == (1, 0, "free")
        assert record.last_seen == clock()
        clock.advance(5.0)
        await core.decide(_request(key=ALICE_KEY))
        record = await store.get_client("key:alice")
        assert record is not None
        assert record.requests == 2
        assert record.last_seen == clock()

    async def test_policy_is_read_per_request(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        """The core asks its policy source each time, so a hot reload applies to the next request."""
        current = [keyed_policy("")]
        core = DecisionCore(lambda: current[0], store, clock=clock, budget_s=BUDGET_S)
        assert (await core.decide(_request("192.0.2.1"))).action is Action.ALLOW
        current[0] = keyed_policy("deny: {networks: ['192.0.2.0/24']}")
        assert (await core.decide(_request("192.0.2.1"))).action is Action.BLOCK

    async def test_explicit_snapshot_overrides_the_source(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        core = _core(keyed_policy(""), store, clock)
        deny = keyed_policy("deny: {clients: ['ip:192.0.2.1']}")
        assert (await core.decide(_request("192.0.2.1"), snapshot=deny)).action is Action.BLOCK


class TestDenyList:
    """The deny list blocks with 403 deny_list before the store is touched."""

    @pytest.mark.parametrize(
        ("extra", "request_kwargs"),
        [
            ("deny: {clients: ['key:alice']}", {"key": ALICE_KEY}),
            ("deny: {clients: ['ip:198.51.100.7']}", {"address": "198.51.100.7:4000"}),
            ("deny: {networks: ['198.51.100.0/24']}", {"address": "198.51.100.7"}),
            ("deny: {networks: ['2001:db8::/32']}", {"address": "[2001:db8::9]:443"}),
            ("deny: {networks: ['198.51.100.0/24']}", {"address": "198.51.100.7", "key": OPS_KEY}),
        ],
    )
    async def test_deny_list_blocks(
        self,
        keyed_policy: Callable[[str], Snapshot],
        store: MemoryStore,
        clock: FakeClock,
        extra: str,
        request_kwargs: dict[str, Any],
    ) -> None:
        decision = await _core(keyed_policy(extra), store, clock).decide(_request(**request_kwargs))
        assert decision.action is Action.BLOCK
        assert decision.status == 403
        assert decision.reasons == ("deny_list",)
        assert decision.error == "deny_list"
        assert not decision.allowed
        assert len(store) == 0

    async def test_deny_by_key_digest(
        self,
        keyed_policy: Callable[[str], Snapshot],
        store: MemoryStore,
        clock: FakeClock,
        key_digest: KeyDigest,
    ) -> None:
        snapshot = keyed_policy(f"deny: {{key_sha256: ['{key_digest(OPS_KEY).upper()}']}}")
        core = _core(snapshot, store, clock)
        blocked = await core.decide(_request(key=OPS_KEY))
        assert (blocked.action, blocked.status, blocked.reasons) == (
            Action.BLOCK,
            403,
            ("deny_list",),
        )
        assert (await core.decide(_request(key=ALICE_KEY))).action is Action.ALLOW

    async def test_address_outside_the_networks_is_allowed(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        snapshot = keyed_policy("deny: {networks: ['198.51.100.0/24', '2001:db8::/32']}")
        for address in ("198.51.101.1", "::1", "garbage"):
            assert (
                await _core(snapshot, store, clock).decide(_request(address))
            ).action is Action.ALLOW

    async def test_ipv4_network_blocks_its_ipv4_mapped_form(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        """An IPv4 deny network also covers the ``::ffff:`` form a dual-stack listener reports."""
        snapshot = keyed_policy("deny: {networks: ['198.51.100.0/24']}")
        decision = await _core(snapshot, store, clock).decide(
            _request("[::ffff:198.51.100.7]:5000")
        )
        assert decision.action is Action.BLOCK

    def test_in_networks_edges(self) -> None:
        assert not in_networks("unknown", load_default().policy.deny.networks)
        assert not in_networks("192.0.2.1", ())


class TestInvalidKey:
    """An unknown key under unknown_key=deny is refused with 401 invalid_api_key."""

    async def test_unknown_key_gets_401(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        decision = await _core(keyed_policy(""), store, clock).decide(
            _request(key="sk-stolen-guess")
        )
        assert decision.action is Action.BLOCK
        assert decision.status == 401
        assert decision.reasons == ("invalid_api_key",)
        assert decision.error == "invalid_api_key"
        assert not decision.allowed
        assert len(store) == 0


class TestLevels:
    """A pinned risk level maps to an action through policy.levels."""

    @pytest.mark.parametrize(
        ("level", "action", "status"),
        [
            ("normal", Action.ALLOW, 200),
            ("elevated", Action.ALLOW, 200),
            ("suspicious", Action.CHALLENGE, 401),
            ("abusive", Action.BLOCK, 403),
        ],
    )
    async def test_default_levels(
        self,
        keyed_policy: Callable[[str], Snapshot],
        store: MemoryStore,
        clock: FakeClock,
        level: str,
        action: Action,
        status: int,
    ) -> None:
        await store.set_level(
            "key:alice", level=level, blocked=False, reason="test", now=clock(), ttl_s=None
        )
        decision = await _core(keyed_policy(""), store, clock).decide(_request(key=ALICE_KEY))
        assert decision.action is action
        assert decision.status == status
        assert decision.level is RiskLevel.parse(level)
        assert decision.reasons == (f"pinned_{level}",)
        assert decision.retry_after_s == 0

    async def test_custom_levels_throttle_with_retry_after(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        snapshot = keyed_policy("levels: {elevated: throttle}\nretry_after_s: 17")
        await store.set_level(
            "key:alice", level="elevated", blocked=False, reason="", now=clock(), ttl_s=None
        )
        decision = await _core(snapshot, store, clock).decide(_request(key=ALICE_KEY))
        assert decision.action is Action.THROTTLE
        assert decision.status == 429
        assert decision.retry_after_s == 17
        assert not decision.allowed

    async def test_operator_block(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        await store.set_level(
            "key:ops", level=None, blocked=True, reason="abuse", now=clock(), ttl_s=None
        )
        decision = await _core(keyed_policy(""), store, clock).decide(_request(key=OPS_KEY))
        assert decision.action is Action.BLOCK
        assert decision.status == 403
        assert decision.reasons[0] == "operator_block"
        assert decision.level is RiskLevel.ABUSIVE

    async def test_block_flag_wins_over_a_mild_pinned_level(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        await store.set_level(
            "key:ops", level="normal", blocked=True, reason="", now=clock(), ttl_s=None
        )
        decision = await _core(keyed_policy(""), store, clock).decide(_request(key=OPS_KEY))
        assert decision.action is Action.BLOCK
        assert decision.reasons == ("operator_block", "pinned_normal")

    async def test_unreadable_pinned_level_is_normal(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        await store.set_level(
            "key:ops", level="bogus", blocked=False, reason="", now=clock(), ttl_s=None
        )
        decision = await _core(keyed_policy(""), store, clock).decide(_request(key=OPS_KEY))
        assert decision.action is Action.ALLOW
        assert decision.level is RiskLevel.NORMAL

    async def test_lapsed_pin_no_longer_applies(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        await store.set_level(
            "key:ops", level="abusive", blocked=False, reason="", now=clock(), ttl_s=60.0
        )
        core = _core(keyed_policy(""), store, clock)
        assert (await core.decide(_request(key=OPS_KEY))).action is Action.BLOCK
        clock.advance(61.0)
        assert (await core.decide(_request(key=OPS_KEY))).action is Action.ALLOW


class TestStoreFailure:
    """A failing or slow store follows fail_modes.store and never holds the request past the budget."""

    async def test_store_error_allows_under_fail_mode_allow(
        self, keyed_policy: Callable[[str], Snapshot], clock: FakeClock
    ) -> None:
        before = _store_errors()
        store = FailingStore(clock=clock)
        decision = await _core(keyed_policy("fail_modes: {store: fail_open}"), store, clock).decide(
            _request(key=ALICE_KEY)
        )
        assert decision.action is Action.ALLOW
        assert decision.allowed
        assert decision.reasons == ("store_unavailable",)
        assert _store_errors() == before + 1

    async def test_store_error_blocks_with_503_under_fail_mode_deny(
        self, keyed_policy: Callable[[str], Snapshot], clock: FakeClock
    ) -> None:
        store = FailingStore(clock=clock)
        decision = await _core(
            keyed_policy("fail_modes: {store: fail_closed}"), store, clock
        ).decide(_request(key=ALICE_KEY))
        assert decision.action is Action.BLOCK
        assert decision.status == 503
        assert decision.error == "store_unavailable"
        assert not decision.allowed

    async def test_slow_store_is_unavailable_within_the_budget(
        self, keyed_policy: Callable[[str], Snapshot], clock: FakeClock
    ) -> None:
        before = _store_errors()
        store = _SlowStore(clock=clock)
        core = _core(keyed_policy("fail_modes: {store: fail_closed}"), store, clock)
        # Generous outer bound: the point is that decide() returns, not how fast.
        decision = await asyncio.wait_for(core.decide(_request(key=ALICE_KEY)), timeout=5.0)
        assert decision.status == 503
        assert decision.reasons == ("store_unavailable",)
        assert _store_errors() == before + 1

    async def test_charge_returns_none_when_the_store_fails(
        self, keyed_policy: Callable[[str], Snapshot], clock: FakeClock
    ) -> None:
        snapshot = keyed_policy("")
        identity = identify(_request(key=ALICE_KEY), snapshot)
        core = _core(snapshot, FailingStore(clock=clock), clock)
        charged = await core.charge(identity, requests=1, instances=8)
        assert charged.record is None
        assert charged.degraded

    async def test_charge_adds_instances(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        snapshot = keyed_policy("")
        identity = identify(_request(key=ALICE_KEY), snapshot)
        charged = await _core(snapshot, store, clock).charge(identity, requests=0, instances=64)
        record = charged.record
        assert record is not None
        assert not charged.degraded
        assert (record.requests, record.instances) == (0, 64)


class TestShadowMode:
    """In shadow mode every verdict is computed and reported but not enforced."""

    async def test_refusal_is_reported_but_allowed(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        snapshot = keyed_policy("mode: shadow\ndeny: {clients: ['key:alice']}")
        decision = await _core(snapshot, store, clock).decide(_request(key=ALICE_KEY))
        assert decision.action is Action.BLOCK
        assert decision.reasons == ("deny_list",)
        assert decision.enforced is False
        assert decision.allowed is True

    async def test_pinned_level_in_shadow(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        await store.set_level(
            "key:alice", level="suspicious", blocked=False, reason="", now=clock(), ttl_s=None
        )
        decision = await _core(keyed_policy("mode: shadow"), store, clock).decide(
            _request(key=ALICE_KEY)
        )
        assert decision.action is Action.CHALLENGE
        assert (decision.enforced, decision.allowed) == (False, True)

    async def test_invalid_key_in_shadow(
        self, keyed_policy: Callable[[str], Snapshot], store: MemoryStore, clock: FakeClock
    ) -> None:
        decision = await _core(keyed_policy("mode: shadow"), store, clock).decide(
            _request(key="sk-nope")
        )
        assert decision.error == "invalid_api_key"
        assert (decision.enforced, decision.allowed) == (False, True)

    def test_enforced_refusal_is_not_allowed(self) -> None:
        identity = identify(_request(), load_default())
        decision = Decision(Action.THROTTLE, identity, RiskLevel.ELEVATED, status=429)
        assert decision.enforced is True
        assert decision.allowed is False
        assert decision.error == "throttle"


class TestRisk:
    """Actions order by severity; parse errors list the valid names."""

    def test_strictest(self) -> None:
        assert strictest() is Action.ALLOW
        assert strictest(Action.ALLOW) is Action.ALLOW
        assert strictest(Action.THROTTLE, Action.ALLOW) is Action.THROTTLE
        assert strictest(Action.CHALLENGE, Action.THROTTLE) is Action.CHALLENGE
        assert strictest(Action.ALLOW, Action.BLOCK, Action.CHALLENGE) is Action.BLOCK

    def test_levels_are_ordered(self) -> None:
        assert RiskLevel.NORMAL < RiskLevel.ELEVATED < RiskLevel.SUSPICIOUS < RiskLevel.ABUSIVE
        assert RiskLevel.SUSPICIOUS.label == "suspicious"

    def test_parse_accepts_any_case_and_spaces(self) -> None:
        assert RiskLevel.parse(" Abusive ") is RiskLevel.ABUSIVE
        assert Action.parse("THROTTLE ") is Action.THROTTLE

    def test_risk_level_parse_error_lists_levels(self) -> None:
        with pytest.raises(ValueError, match="unknown risk level 'evil'") as caught:
            RiskLevel.parse("evil")
        assert "normal, elevated, suspicious, abusive" in str(caught.value)

    def test_action_parse_error_lists_actions(self) -> None:
        with pytest.raises(ValueError, match="unknown action 'smite'") as caught:
            Action.parse("smite")
        assert "allow, throttle, challenge, block" in str(caught.value)
