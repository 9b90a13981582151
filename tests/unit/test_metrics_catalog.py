"""The metric catalogue: every metric declared once, named and documented, with bounded labels.

The exercise drives the real Check and ext_proc servicers in-process (no sockets) over the
memory store, and reads back which label values the decision paths wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2

from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import DecisionCore
from extauthz.core.risk import Action
from extauthz.keys import KeyRing
from extauthz.policy.loader import Snapshot
from extauthz.service.authz import AuthorizationService
from extauthz.service.extproc import ExternalProcessorService
from extauthz.store.base import DetectionState, StoreError
from extauthz.store.memory import MemoryStore
from extauthz.telemetry import metrics
from tests.integration.service_fixtures import (
    check_request,
    kserve_body,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
)
from tests.store_contract import FakeClock
from tests.unit.conftest import PolicyFromText

# Every metric family and the exact label names it may carry (histograms' `le` aside).
# A new metric must be added here, which is the moment to review its labels.
ALLOWED_LABELS: dict[str, frozenset[str]] = {
    "extauthz_decisions": frozenset({"path", "action", "tier", "reason"}),
    "extauthz_decision_seconds": frozenset({"path"}),
    "extauthz_errors": frozenset({"reason"}),
    "extauthz_instances": frozenset({"tier"}),
    "extauthz_tokens": frozenset({"tier"}),
    "extauthz_rate_limited": frozenset({"unit", "scope"}),
    "extauthz_challenges": frozenset({"outcome"}),
    "extauthz_detections": frozenset({"detector", "reason"}),
    "extauthz_risk_level_changes": frozenset({"level"}),
    "extauthz_evidence_records": frozenset(),
    "extauthz_body_rewrites": frozenset({"dialect", "policy"}),
    "extauthz_rewrite_l1": frozenset(),
    "extauthz_rewrite_top1_changed": frozenset(),
    "extauthz_request_rules": frozenset({"rule"}),
    "extauthz_extproc_streams": frozenset({"outcome"}),
    "extauthz_policy_reloads": frozenset(),
    "extauthz_policy_reload_errors": frozenset(),
    "extauthz_policy_loaded_timestamp_seconds": frozenset(),
    "extauthz_admin_calls": frozenset({"method", "result"}),
    "extauthz_ready": frozenset(),
    "extauthz_store_seconds": frozenset({"backend", "op"}),
    "extauthz_store_errors": frozenset({"backend", "op", "kind"}),
}

ALICE_KEY = "sk-catalog-alice-7f3a9c"
MALLORY_KEY = "sk-catalog-mallory-41be02"
UNKNOWN_KEY = "sk-catalog-unknown-99d1aa"
KEYS = KeyRing.single(b"catalog-test-secret-0123456789")
POLICY = f"""
identity:
  api_keys:
    - {{name: alice, sha256: '{hashlib.sha256(ALICE_KEY.encode()).hexdigest()}', tier: free}}
    - {{name: mallory, sha256: '{hashlib.sha256(MALLORY_KEY.encode()).hexdigest()}', tier: free}}
  unknown_key: deny
tiers:
  anonymous: {{max_instances: 4, output: {{policy: round, decimals: 2}}}}
  free:
    max_instances: 8
    limits: [{{name: per-minute, unit: requests, rate: 3, per: minute}}]
deny:
  clients: [key:mallory]
routes:
  - {{prefix: /v1/models/, dialect: kserve_v1}}
detection: {{enabled: true}}
"""
TIERS = {"anonymous", "free"}


def _families() -> list[Any]:
    return list(metrics.REGISTRY.collect())


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample now, keyed by sample name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in _families()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def _changed(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[str, list[dict[str, str]]]:
    """Label sets whose sample moved since ``before``, by sample name."""
    moved: dict[str, list[dict[str, str]]] = {}
    for (name, labels), value in _samples().items():
        if value != before.get((name, labels), 0.0):
            moved.setdefault(name, []).append(dict(labels))
    return moved


async def _messages(
    items: Iterable[proc_pb2.ProcessingRequest],
) -> AsyncIterator[proc_pb2.ProcessingRequest]:
    for item in items:
        yield item


class TestCatalogue:
    """Every metric is named extauthz_*, documented, and carries only its reviewed labels."""

    def test_names_have_the_prefix_and_a_help_text(self) -> None:
        for family in _families():
            assert family.name.startswith("extauthz_"), family.name
            assert family.documentation.strip(), f"{family.name} has no help text"

    def test_every_metric_is_in_the_label_table(self) -> None:
        assert {family.name for family in _families()} == set(ALLOWED_LABELS)

    def test_written_samples_carry_only_the_reviewed_labels(self) -> None:
        for family in _families():
            names = {label for sample in family.samples for label in sample.labels} - {"le"}
            assert names <= ALLOWED_LABELS[family.name], (family.name, names)

    def test_metric_objects_declare_the_table_labels(self) -> None:
        declared = {
            metric._name: frozenset(metric._labelnames)
            for metric in vars(metrics).values()
            if hasattr(metric, "_labelnames") and hasattr(metric, "_name")
        }
        assert declared == ALLOWED_LABELS


class TestReasonLabel:
    """A decision's reasons become one value of a closed vocabulary, never a free string."""

    @pytest.mark.parametrize(
        "code",
        [
            "invalid_api_key",
            "deny_list",
            "terms_not_accepted",
            "operator_block",
            "store_unavailable",
            "rate_limited",
            "challenge_required",
            "challenge_passed",
            "prada_non_normal",
            "near_duplicates",
            "cross_client_probing",
            "boundary_probing",
            "volume_spike",
            "sustained_volume",
            "input_coverage",
            "augmentation_steps",
        ],
    )
    def test_known_codes_keep_their_name(self, code: str) -> None:
        assert metrics.reason_label((code, "volume_spike")) == code

    def test_primary_reason_is_the_first(self) -> None:
        assert metrics.reason_label(("rate_limited", "near_duplicates")) == "rate_limited"

    def test_pins_fold_into_pinned_and_no_reason_is_none(self) -> None:
        assert metrics.reason_label(("pinned_abusive",)) == "pinned"
        assert metrics.reason_label(()) == "none"

    @pytest.mark.parametrize("junk", ["key:alice", "ip:10.0.0.1", ALICE_KEY, "x" * 500, ""])
    def test_anything_else_is_other(self, junk: str) -> None:
        label = metrics.reason_label((junk,))
        assert label == "other"
        assert label in metrics.DECISION_REASONS


class TestTimedStore:
    """Store calls are timed by op; failures are counted as timeout or error."""

    @staticmethod
    def _count(op: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "extauthz_store_seconds_count", {"backend": "memory", "op": op}
        )
        return value or 0.0

    @staticmethod
    def _errors(op: str, kind: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "extauthz_store_errors_total", {"backend": "redis", "op": op, "kind": kind}
        )
        return value or 0.0

    async def test_memory_store_calls_are_timed_by_op(self) -> None:
        store = MemoryStore(clock=FakeClock())
        before = {op: self._count(op) for op in ("record", "get_client", "ping")}
        await store.record("c1", tier="free", requests=1, instances=0, now=1.0)
        await store.record("c1", tier="free", requests=1, instances=0, now=2.0)
        await store.get_client("c1")
        assert self._count("record") == before["record"] + 2
        assert self._count("get_client") == before["get_client"] + 1
        assert self._count("ping") == before["ping"]

    async def test_failures_are_counted_by_kind(self) -> None:
        @metrics.timed_store("redis", "ping", failure=StoreError)
        async def timing_out() -> bool:
            raise StoreError("redis ping timed out") from TimeoutError()

        @metrics.timed_store("redis", "get_client", failure=StoreError)
        async def refused() -> bool:
            raise StoreError("redis get_client failed") from ConnectionRefusedError()

        @metrics.timed_store("redis", "list_clients", failure=StoreError)
        async def bad_argument() -> bool:
            raise ValueError("malformed cursor")  # the caller's mistake, not the store's

        before = (
            self._errors("ping", "timeout"),
            self._errors("get_client", "error"),
            self._errors("list_clients", "error"),
        )
        for call in (timing_out, refused):
            with pytest.raises(StoreError):
                await call()
        with pytest.raises(ValueError):
            await bad_argument()
        assert self._errors("ping", "timeout") == before[0] + 1
        assert self._errors("get_client", "error") == before[1] + 1
        assert self._errors("list_clients", "error") == before[2]

    def test_unknown_ops_are_refused_at_declaration(self) -> None:
        with pytest.raises(ValueError):
            metrics.timed_store("redis", "key:alice", failure=StoreError)
        with pytest.raises(ValueError):
            metrics.timed_store("sqlite", "record", failure=StoreError)


class TestExercisedLabels:
    """Through Check and ext_proc, every label value written comes from a closed set, and no
    label ever holds a client id, an address or a raw key."""

    @pytest.fixture
    def snapshot(self, policy_from_text: PolicyFromText) -> Snapshot:
        return policy_from_text(POLICY)

    async def test_decision_paths_write_only_closed_vocabularies(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        store = MemoryStore(clock=clock)
        core = DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05)
        gate = ChallengeGate(core, KEYS, clock=clock)
        check = AuthorizationService(core, gate)
        process = ExternalProcessorService(
            core, gate, max_body_bytes=1 << 20, noise_key=b"n" * 32, clock=clock
        )
        # A pinned client, a suspicious one (challenged) and one whose stored reasons are junk.
        await store.set_level(
            "ip:10.9.0.1", level="abusive", blocked=False, reason="ops", now=clock(), ttl_s=None
        )
        await store.save_detection(
            "ip:10.9.0.2",
            DetectionState(level="suspicious", reasons=("near_duplicates",)),
            ttl_s=60.0,
        )
        await store.save_detection(
            "ip:10.9.0.3", DetectionState(level="elevated", reasons=("key:alice",)), ttl_s=60.0
        )
        before = _samples()

        requests = [
            check_request({"x-api-key": ALICE_KEY}, address="10.9.0.9") for _ in range(4)
        ]  # the fourth is over the limit
        requests += [
            check_request({"x-api-key": MALLORY_KEY}),
            check_request({"x-api-key": UNKNOWN_KEY}),
            check_request(address="10.9.0.1"),
            check_request(address="10.9.0.2"),
            check_request(address="10.9.0.3"),
            check_request(address="10.9.0.4", path="/healthz"),
        ]
        for request in requests:
            await check.Check(request, None)  # type: ignore[arg-type]
        exchanges = [
            [
                proc_request_headers(source="10.9.0.5:4000"),
                proc_request_body(kserve_body(2)),
                proc_response_headers(),
                proc_response_body(b'{"predictions": [[0.1234, 0.8766], [0.5, 0.5]]}'),
            ],
            [proc_request_headers(headers={"x-api-key": MALLORY_KEY})],
            [proc_request_headers(source="10.9.0.6:4000"), proc_request_body(b"{not json")],
        ]
        for messages in exchanges:
            async for _ in process.Process(_messages(messages), None):  # type: ignore[arg-type]
                pass

        moved = _changed(before)
        decisions = moved["extauthz_decisions_total"]
        assert {d["path"] for d in decisions} == {"check", "ext_proc"}
        assert {d["action"] for d in decisions} <= {a.value for a in Action}
        assert {d["tier"] for d in decisions} <= TIERS
        reasons = {d["reason"] for d in decisions}
        assert reasons <= metrics.DECISION_REASONS
        # The exercise reached the codes it meant to, the junk one included.
        assert {
            "none",
            "rate_limited",
            "deny_list",
            "invalid_api_key",
            "pinned",
            "challenge_required",
            "other",
        } <= reasons
        ops = moved["extauthz_store_seconds_count"]
        assert {d["op"] for d in ops} <= metrics.STORE_OPS
        assert {d["backend"] for d in ops} == {"memory"}
        assert "record" in {d["op"] for d in ops}
        assert {d["path"] for d in moved["extauthz_decision_seconds_count"]} <= {
            "check",
            "ext_proc_request_headers",
            "ext_proc_request_body",
            "ext_proc_response_headers",
            "ext_proc_response_body",
        }

        secrets = (ALICE_KEY, MALLORY_KEY, UNKNOWN_KEY, "key:", "ip:", "10.9.0.")
        for name, label_sets in moved.items():
            for labels in label_sets:
                for value in labels.values():
                    assert not any(secret in value for secret in secrets), (name, labels)
                    assert len(value) <= 64, (name, labels)
