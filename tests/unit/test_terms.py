"""Terms of use: the policy section, where acceptance is read, the decision, the answers'
notice (Check and ext_proc in-process, no sockets), the ledger field and ``verify``'s summary."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2

from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import DecisionCore
from extauthz.core.identity import RequestInfo, identify
from extauthz.core.risk import Action
from extauthz.evidence.cli import terms_summary
from extauthz.evidence.ledger import (
    EvidenceRecord,
    MemoryLedger,
    RedisLedger,
    export_jsonl,
    import_jsonl,
)
from extauthz.keys import KeyRing
from extauthz.policy.loader import PolicyError, Snapshot, load_policy
from extauthz.service import envoy
from extauthz.service.authz import AuthorizationService
from extauthz.service.extproc import ExternalProcessorService
from extauthz.store.memory import MemoryStore
from tests.integration.service_fixtures import (
    check_request,
    kserve_body,
    option_value,
    proc_request_body,
    proc_request_headers,
    proc_response_headers,
)
from tests.store_contract import FakeClock

PolicyFromText = Callable[[str], Snapshot]
KeyDigest = Callable[[str], str]

SIGNED = "sk-terms-signed-01"
OLD = "sk-terms-old-02"
UNSIGNED = "sk-terms-unsigned-03"
FREE = "sk-terms-free-04"
URL = "https://example.test/terms"
START = 1_700_000_000.0  # FakeClock's epoch
GRACE_S = 3600.0
KEYS = KeyRing.single(b"terms-test-secret-0123456789")


def _until(seconds_after_start: float) -> str:
    return datetime.fromtimestamp(START + seconds_after_start, UTC).isoformat()


def _policy(digest: KeyDigest, *, extra: str = "", sources: str = "") -> str:
    return f"""
terms:
  url: {URL}
  version: '2024-06'
  grace: {{previous: '2024-01', until: '{_until(GRACE_S)}'}}
  {sources}
identity:
  api_keys:
    - {{name: signed, tier: pro, sha256: {digest(SIGNED)}, terms_version: '2024-06'}}
    - {{name: old, tier: pro, sha256: {digest(OLD)}, terms_version: '2024-01'}}
    - {{name: unsigned, tier: pro, sha256: {digest(UNSIGNED)}}}
    - {{name: free, tier: free, sha256: {digest(FREE)}}}
tiers:
  anonymous: {{max_instances: 4}}
  free: {{max_instances: 8}}
  pro: {{max_instances: 8, require_terms: true}}
{extra}
"""


@pytest.fixture
def snapshot(policy_from_text: PolicyFromText, key_digest: KeyDigest) -> Snapshot:
    return policy_from_text(_policy(key_digest))


def _request(
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    jwt: Mapping[str, Any] | None = None,
) -> RequestInfo:
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["x-api-key"] = key
    return RequestInfo(headers=all_headers, source_address="198.51.100.7", jwt_payload=jwt)


class TestPolicy:
    """The terms section validates, and every mistake names its YAML path."""

    def test_terms_section_is_read(self, snapshot: Snapshot) -> None:
        terms = snapshot.policy.terms
        assert terms is not None
        assert (terms.url, terms.version) == (URL, "2024-06")
        assert terms.grace is not None and terms.grace.previous == "2024-01"
        assert terms.grace.until_s == START + GRACE_S
        # Defaults: the JWT claim and the API key attribute are read, no header.
        assert terms.accepted_from.jwt_claim == "terms_version"
        assert terms.accepted_from.api_key is True
        assert terms.accepted_from.header is None
        assert snapshot.policy.tiers["pro"].require_terms
        assert not snapshot.policy.tiers["free"].require_terms

    def test_no_terms_is_the_default(self, policy_from_text: PolicyFromText) -> None:
        policy = policy_from_text("tiers: {anonymous: {}}").policy
        assert policy.terms is None
        assert not policy.tiers["anonymous"].require_terms

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            (
                "tiers: {anonymous: {require_terms: true}}",
                "tiers.anonymous.require_terms: needs a top-level terms section",
            ),
            ("terms: {url: 'ftp://x/terms', version: '1'}", "terms.url: must be an http(s) URL"),
            ("terms: {url: 'https://x/t', version: 'a b'}", "terms.version: must be 1-64"),
            ("terms: {url: 'https://x/t', version: '1, 2'}", "terms.version: must be 1-64"),
            (
                "terms: {url: 'https://x/t', version: '2', grace: {previous: '2', "
                "until: '2030-01-01T00:00:00Z'}}",
                "terms: grace.previous: must differ from version",
            ),
            (
                "terms: {url: 'https://x/t', version: '2', grace: {previous: '1', "
                "until: '2030-01-01T00:00:00'}}",
                "terms.grace.until:",
            ),
            (
                "terms: {url: 'https://x/t', version: '2', accepted_from: {header: 'bad header'}}",
                "terms.accepted_from.header: must be an HTTP header name",
            ),
            (
                "identity: {api_keys: [{name: a, tier: anonymous, sha256: '"
                + "0" * 64
                + "', terms_version: 'x y'}]}",
                "identity.api_keys[0].terms_version: must be 1-64",
            ),
        ],
    )
    def test_mistakes_name_their_path(
        self, policy_from_text: PolicyFromText, text: str, problem: str
    ) -> None:
        with pytest.raises(PolicyError) as caught:
            policy_from_text(text)
        assert any(p.startswith(problem) or problem in p for p in caught.value.problems), (
            caught.value.problems
        )

    def test_keys_file_carries_terms_versions(self, tmp_path: Path, key_digest: KeyDigest) -> None:
        (tmp_path / "keys.yaml").write_text(
            f"api_keys: [{{name: late, tier: pro, sha256: {key_digest(UNSIGNED)}, "
            "terms_version: '2024-06'}]\n"
        )
        (tmp_path / "policy.yaml").write_text(
            f"terms: {{url: '{URL}', version: '2024-06'}}\n"
            "identity: {keys_file: keys.yaml}\n"
            "tiers: {anonymous: {}, pro: {require_terms: true}}\n"
        )
        snapshot = load_policy(tmp_path / "policy.yaml")
        assert identify(_request(key=UNSIGNED), snapshot).terms_accepted == "2024-06"


class TestAdmits:
    """The current version admits; the previous one only before the grace ends."""

    def test_versions_and_the_grace_boundary(self, snapshot: Snapshot) -> None:
        terms = snapshot.policy.terms
        assert terms is not None
        end = START + GRACE_S
        assert terms.admits("2024-06", end + 1e6)
        assert terms.admits("2024-01", end - 0.001)
        assert not terms.admits("2024-01", end)
        assert not terms.admits("2023-01", START)
        assert not terms.admits("", START)


class TestAcceptanceSources:
    """Acceptance comes from the key, a JWT claim or the signup flow's header, as configured."""

    def test_api_key_attribute(self, snapshot: Snapshot) -> None:
        assert identify(_request(key=SIGNED), snapshot).terms_accepted == "2024-06"
        assert identify(_request(key=OLD), snapshot).terms_accepted == "2024-01"
        assert identify(_request(key=UNSIGNED), snapshot).terms_accepted == ""

    def test_jwt_claim(self, snapshot: Snapshot) -> None:
        claims = {"sub": "u1", "iss": "idp", "tier": "pro", "terms_version": "2024-06"}
        identity = identify(_request(jwt=claims), snapshot)
        assert (identity.kind, identity.tier, identity.terms_accepted) == ("jwt", "pro", "2024-06")
        numeric = identify(_request(jwt={**claims, "terms_version": 3}), snapshot)
        assert numeric.terms_accepted == "3"
        junk = identify(_request(jwt={**claims, "terms_version": {"v": 1}}), snapshot)
        assert junk.terms_accepted == ""

    def test_header_only_when_configured(
        self, policy_from_text: PolicyFromText, key_digest: KeyDigest, snapshot: Snapshot
    ) -> None:
        headers = {"x-terms-accepted": "2024-06"}
        assert identify(_request(key=UNSIGNED, headers=headers), snapshot).terms_accepted == ""
        with_header = policy_from_text(
            _policy(key_digest, sources="accepted_from: {header: X-Terms-Accepted, api_key: false}")
        )
        assert (
            identify(_request(key=UNSIGNED, headers=headers), with_header).terms_accepted
            == "2024-06"
        )
        # api_key: false ignores the key's attribute.
        assert identify(_request(key=OLD), with_header).terms_accepted == ""
        # A joined duplicate or junk is no acceptance.
        joined = {"x-terms-accepted": "2024-01,2024-06"}
        assert identify(_request(key=UNSIGNED, headers=joined), with_header).terms_accepted == ""

    def test_best_source_wins(
        self, policy_from_text: PolicyFromText, key_digest: KeyDigest
    ) -> None:
        snapshot = policy_from_text(
            _policy(key_digest, sources="accepted_from: {header: x-terms-accepted}")
        )
        # The key says the old version, the signup flow says the current one: current counts.
        request = _request(key=OLD, headers={"x-terms-accepted": "2024-06"})
        assert identify(request, snapshot).terms_accepted == "2024-06"

    def test_no_terms_section_reads_nothing(self, policy_from_text: PolicyFromText) -> None:
        snapshot = policy_from_text("tiers: {anonymous: {}}")
        request = _request(jwt={"sub": "u1", "terms_version": "1"})
        assert identify(request, snapshot).terms_accepted == ""


class TestDecision:
    """A tier requiring the terms refuses 403 terms_not_accepted before any charge."""

    @staticmethod
    def _core(snapshot: Snapshot, clock: FakeClock) -> tuple[DecisionCore, MemoryStore]:
        store = MemoryStore(clock=clock)
        core = DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05)
        return core, store

    async def test_refused_without_acceptance_and_not_charged(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        core, store = self._core(snapshot, clock)
        decision = await core.decide(_request(key=UNSIGNED), snapshot=snapshot)
        assert (decision.action, decision.status) == (Action.BLOCK, 403)
        assert decision.reasons == ("terms_not_accepted",)
        assert not decision.allowed
        assert decision.terms is snapshot.policy.terms
        assert await store.get_client("key:unsigned") is None

    async def test_accepted_and_not_required_are_admitted(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        core, _ = self._core(snapshot, clock)
        for key in (SIGNED, OLD, FREE):
            decision = await core.decide(_request(key=key), snapshot=snapshot)
            assert decision.allowed, key
            assert decision.terms is snapshot.policy.terms

    async def test_previous_version_is_refused_once_the_grace_ends(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        core, _ = self._core(snapshot, clock)
        clock.advance(GRACE_S - 1)
        assert (await core.decide(_request(key=OLD), snapshot=snapshot)).allowed
        clock.advance(1)
        late = await core.decide(_request(key=OLD), snapshot=snapshot)
        assert late.reasons == ("terms_not_accepted",)
        assert (await core.decide(_request(key=SIGNED), snapshot=snapshot)).allowed

    async def test_shadow_mode_only_logs(
        self, policy_from_text: PolicyFromText, key_digest: KeyDigest, clock: FakeClock
    ) -> None:
        snapshot = policy_from_text(_policy(key_digest, extra="mode: shadow"))
        core, _ = self._core(snapshot, clock)
        decision = await core.decide(_request(key=UNSIGNED), snapshot=snapshot)
        assert decision.reasons == ("terms_not_accepted",)
        assert decision.allowed and not decision.enforced

    async def test_terms_on_record(self, snapshot: Snapshot, clock: FakeClock) -> None:
        core, _ = self._core(snapshot, clock)
        assert core.terms_on_record("key:old", snapshot) == "2024-01"
        assert core.terms_on_record("key:unsigned", snapshot) == ""
        claims = {"sub": "u9", "iss": "idp", "tier": "pro", "terms_version": "2024-06"}
        decision = await core.decide(_request(jwt=claims), snapshot=snapshot)
        assert core.terms_on_record(decision.identity.client_id, snapshot) == "2024-06"


def _options(options: Iterable[Any]) -> list[tuple[str, str]]:
    return [(o.header.key.lower(), option_value(o)) for o in options]


def _notice(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if k in ("link", envoy.TERMS_VERSION_HEADER)]


NOTICE = [("link", f'<{URL}>; rel="terms-of-service"'), ("x-extauthz-terms-version", "2024-06")]


async def _messages(
    items: Iterable[proc_pb2.ProcessingRequest],
) -> AsyncIterator[proc_pb2.ProcessingRequest]:
    for item in items:
        yield item


class TestAnswers:
    """Check and ext_proc put the notice on every answer, once, and refusals name the terms."""

    @pytest.fixture
    def services(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> tuple[AuthorizationService, ExternalProcessorService]:
        store = MemoryStore(clock=clock)
        core = DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05)
        gate = ChallengeGate(core, KEYS, clock=clock)
        process = ExternalProcessorService(
            core, gate, max_body_bytes=1 << 20, noise_key=b"n" * 32, clock=clock
        )
        return AuthorizationService(core, gate), process

    async def test_check_allow_and_refusal(
        self, services: tuple[AuthorizationService, ExternalProcessorService]
    ) -> None:
        check, _ = services
        allowed = await check.Check(check_request({"x-api-key": SIGNED}), None)  # type: ignore[arg-type]
        assert _notice(_options(allowed.ok_response.response_headers_to_add)) == NOTICE
        # The allow cache serves the same notice on the next request.
        again = await check.Check(check_request({"x-api-key": SIGNED}), None)  # type: ignore[arg-type]
        assert _notice(_options(again.ok_response.response_headers_to_add)) == NOTICE
        refused = await check.Check(check_request({"x-api-key": UNSIGNED}), None)  # type: ignore[arg-type]
        assert refused.denied_response.status.code == 403
        assert _notice(_options(refused.denied_response.headers)) == NOTICE
        body = json.loads(refused.denied_response.body)
        assert body["error"] == "terms_not_accepted"
        assert body["terms"] == {
            "url": URL,
            "version": "2024-06",
            "accepted": None,
            "previous": "2024-01",
            "previous_until": _until(GRACE_S),
        }
        assert URL in body["message"] and "2024-06" in body["message"]
        metadata = refused.dynamic_metadata.fields
        assert metadata["reasons"].string_value == "terms_not_accepted"

    async def test_reload_changes_the_cached_notice(
        self, policy_from_text: PolicyFromText, key_digest: KeyDigest, clock: FakeClock
    ) -> None:
        current = {"snapshot": policy_from_text(_policy(key_digest))}
        store = MemoryStore(clock=clock)
        core = DecisionCore(lambda: current["snapshot"], store, clock=clock, budget_s=0.05)
        check = AuthorizationService(core, ChallengeGate(core, KEYS, clock=clock))
        await check.Check(check_request({"x-api-key": FREE}), None)  # type: ignore[arg-type]
        bumped = _policy(key_digest).replace("version: '2024-06'", "version: '2024-09'")
        current["snapshot"] = policy_from_text(bumped)
        answer = await check.Check(check_request({"x-api-key": FREE}), None)  # type: ignore[arg-type]
        headers = dict(_options(answer.ok_response.response_headers_to_add))
        assert headers[envoy.TERMS_VERSION_HEADER] == "2024-09"

    async def test_single_hop_adds_the_notice_on_response_headers(
        self, services: tuple[AuthorizationService, ExternalProcessorService]
    ) -> None:
        _, process = services
        messages = [
            proc_request_headers(headers={"x-api-key": SIGNED}),
            proc_request_body(kserve_body(1)),
            proc_response_headers(),
        ]
        answers = [a async for a in process.Process(_messages(messages), None)]  # type: ignore[arg-type]
        first = answers[0]
        # No tier needs the response, but the notice does: the response headers are kept.
        assert first.mode_override.response_header_mode == first.mode_override.SEND
        mutation = answers[2].response_headers.response.header_mutation
        assert _notice(_options(mutation.set_headers)) == NOTICE

    async def test_two_hops_leave_the_notice_to_check(
        self, services: tuple[AuthorizationService, ExternalProcessorService]
    ) -> None:
        check, process = services
        allowed = await check.Check(check_request({"x-api-key": SIGNED}), None)  # type: ignore[arg-type]
        messages = [
            proc_request_headers(
                headers={"x-api-key": SIGNED}, check_metadata=allowed.dynamic_metadata
            ),
            proc_request_body(b"{not json"),
        ]
        answers = [a async for a in process.Process(_messages(messages), None)]  # type: ignore[arg-type]
        refused = answers[-1].immediate_response
        assert refused.status.code == 400
        assert _notice(_options(refused.headers.set_headers)) == []
        assert json.loads(refused.body)["terms"] == {"url": URL, "version": "2024-06"}

    async def test_single_hop_refusal_carries_the_notice(
        self, services: tuple[AuthorizationService, ExternalProcessorService]
    ) -> None:
        _, process = services
        messages = [proc_request_headers(headers={"x-api-key": UNSIGNED})]
        (answer,) = [a async for a in process.Process(_messages(messages), None)]  # type: ignore[arg-type]
        refused = answer.immediate_response
        assert refused.status.code == 403
        assert _notice(_options(refused.headers.set_headers)) == NOTICE
        assert json.loads(refused.body)["error"] == "terms_not_accepted"

    def test_no_terms_no_notice(self, policy_from_text: PolicyFromText) -> None:
        snapshot = policy_from_text("tiers: {anonymous: {}}")
        assert envoy.terms_headers(snapshot.policy.terms) == []
        body = json.loads(envoy.error_body("x", "y"))
        assert "terms" not in body


class TestEvidence:
    """Records carry the terms version; records written before it existed still read."""

    async def test_memory_ledger_keeps_the_version(self, clock: FakeClock) -> None:
        ledger = MemoryLedger(clock=clock)
        await ledger.append(
            [EvidenceRecord("key:a", "k1", clock(), b"[1]", 3, terms_version="2024-06")]
        )
        (record,) = await ledger.read()
        assert record.terms_version == "2024-06"

    def test_jsonl_round_trip_and_old_lines(self) -> None:
        out = io.StringIO()
        export_jsonl([EvidenceRecord("key:a", "k1", 1.0, b"[1]", 3, terms_version="7")], out)
        assert json.loads(out.getvalue())["terms_version"] == "7"
        (back,) = import_jsonl(out.getvalue().splitlines())
        assert back.terms_version == "7"
        old = '{"client_id":"key:a","kid":"k1","time":1.0,"input":"WzFd","served_label":3,"mark":"label"}'
        (legacy,) = import_jsonl([old])
        assert legacy.terms_version == ""

    def test_redis_fields_round_trip_and_old_entries(self, clock: FakeClock) -> None:
        ledger = RedisLedger(None, clock=clock)
        record = EvidenceRecord("key:a", "k1", 1.0, b"[1]", 3, terms_version="2024-06")
        fields = ledger._fields(record)
        assert ledger._record(fields).terms_version == "2024-06"
        encoded = {k.encode(): v.encode() for k, v in fields.items() if k != "v"}
        assert ledger._record(encoded).terms_version == ""

    def test_verify_summary(self) -> None:
        records = [
            EvidenceRecord("key:a", "k1", 1.0, b"[1]", 3, terms_version=v)
            for v in ("2", "2", "1", "")
        ]
        assert terms_summary(records) == "2 (2), 1 (1), none (1)"
