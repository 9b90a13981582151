"""One set of RateLimit fields per answer: the merge of Check's and ext_proc's, and where Check
puts its own on a model route (Check and ext_proc in-process, no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2

from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import DecisionCore
from extauthz.core.limiter import (
    AppliedLimit,
    LimitState,
    merge_rate_limit_fields,
    rate_limit_fields,
)
from extauthz.keys import KeyRing
from extauthz.policy.loader import Snapshot
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

KEYS = KeyRing.single(b"ratelimit-test-secret-0123456789")
MODEL = "/v1/models/m:predict"
GRPC = "/inference.GRPCInferenceService/ModelInfer"
ADDRESS = "10.9.8.7"
POLICY_ITEMS = '"anonymous:req";q=100;w=60;qu="requests", "anonymous:inst";q=4;w=60;qu="instances"'
POLICY = """
    tiers:
      anonymous:
        max_instances: 4
        limits:
          - {name: req, unit: requests, rate: 100, per: minute}
          - {name: inst, unit: instances, rate: 4, per: minute}
    routes:
      - {prefix: /v1/models/, dialect: kserve_v1}
      - {prefix: /inference.GRPCInferenceService/, dialect: auto, binary: pass}
"""


def _applied(name: str, remaining: int, reset_s: float, unit: str = "instances") -> AppliedLimit:
    return AppliedLimit(name, unit, "client", 10, 60.0, LimitState(True, remaining, reset_s))


class TestMerge:
    """merge_rate_limit_fields: one field each, the later step's members winning by name."""

    def test_later_member_replaces_the_earlier_in_place(self) -> None:
        earlier = rate_limit_fields(
            [_applied("req", 9, 6.0, "requests"), _applied("inst", 10, 0.0), _applied("tok", 10, 0)]
        )
        later = rate_limit_fields([_applied("inst", 7, 18.0)])
        merged = merge_rate_limit_fields(earlier, later)
        assert [name for name, _ in merged] == ["ratelimit-policy", "ratelimit"]
        assert merged[1][1] == '"req";r=9;t=6, "inst";r=7;t=18, "tok";r=10;t=0'
        assert merged[0][1] == earlier[0][1]  # the same limits: the same policy items

    def test_members_of_either_side_alone_are_kept(self) -> None:
        earlier = rate_limit_fields([_applied("req", 9, 6.0, "requests")])
        later = rate_limit_fields([_applied("inst", 7, 18.0)])
        merged = dict(merge_rate_limit_fields(earlier, later))
        assert merged["ratelimit"] == '"req";r=9;t=6, "inst";r=7;t=18'
        assert merged["ratelimit-policy"] == (
            '"req";q=10;w=60;qu="requests", "inst";q=10;w=60;qu="instances"'
        )

    def test_an_empty_side_leaves_the_other(self) -> None:
        fields = rate_limit_fields([_applied("inst", 7, 18.0)])
        assert merge_rate_limit_fields([], fields) == fields
        assert merge_rate_limit_fields(fields, []) == fields
        assert merge_rate_limit_fields([], []) == []

    @pytest.mark.parametrize("name", ['a,"b";c', "x\\y", "t:with space"])
    def test_quoted_names_are_read_whole(self, name: str) -> None:
        """Commas, quotes, semicolons and backslashes inside a name do not split it."""
        earlier = rate_limit_fields([_applied(name, 3, 1.0), _applied("other", 5, 0.0)])
        later = rate_limit_fields([_applied(name, 1, 9.0)])
        merged = dict(merge_rate_limit_fields(earlier, later))
        assert merged == dict(rate_limit_fields([_applied(name, 1, 9.0), _applied("other", 5, 0)]))


async def _stream(
    items: Iterable[proc_pb2.ProcessingRequest],
) -> AsyncIterator[proc_pb2.ProcessingRequest]:
    for item in items:
        yield item


def _fields(options: Iterable[Any]) -> list[tuple[str, str]]:
    """The RateLimit fields among header options, every occurrence kept, in order."""
    pairs = [(o.header.key.lower(), option_value(o)) for o in options]
    return [(k, v) for k, v in pairs if k in ("ratelimit", "ratelimit-policy")]


class Guard:
    """Check and ext_proc of one guard on one memory store, driven as Envoy drives them."""

    def __init__(self, snapshot: Snapshot, clock: FakeClock) -> None:
        store = MemoryStore(clock=clock)
        core = DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05)
        gate = ChallengeGate(core, KEYS, clock=clock)
        self.check = AuthorizationService(core, gate)
        self.process = ExternalProcessorService(
            core, gate, max_body_bytes=1 << 20, noise_key=b"n" * 32, clock=clock
        )

    async def checked(self, path: str = MODEL) -> auth_pb2.CheckResponse:
        return await self.check.Check(check_request(address=ADDRESS, path=path), None)  # type: ignore[arg-type]

    async def processed(
        self,
        body: bytes | None,
        *,
        check: auth_pb2.CheckResponse | None,
        path: str = MODEL,
        content_type: str = "application/json",
    ) -> list[proc_pb2.ProcessingResponse]:
        """One ext_proc stream: after ``check`` (two hops) or alone (single hop); without a
        ``body`` when Envoy sends none."""
        headers = proc_request_headers(
            path,
            headers={"content-type": content_type},
            source=f"{ADDRESS}:5555",
            check_metadata=check.dynamic_metadata if check is not None else None,
        )
        bodies = [proc_request_body(body)] if body is not None else []
        messages = [headers, *bodies, proc_response_headers()]
        return [a async for a in self.process.Process(_stream(messages), None)]  # type: ignore[arg-type]


@pytest.fixture
def guard(policy_from_text: PolicyFromText, clock: FakeClock) -> Guard:
    return Guard(policy_from_text(POLICY), clock)


def _answer_fields(answers: list[proc_pb2.ProcessingResponse]) -> tuple[int, list[Any]]:
    """(status, RateLimit fields) of what ext_proc made the client's answer carry."""
    last = answers[-1]
    if last.HasField("immediate_response"):
        immediate = last.immediate_response
        return immediate.status.code, _fields(immediate.headers.set_headers)
    mutation = last.response_headers.response.header_mutation
    return 200, _fields(mutation.set_headers)


class TestCheck:
    """Check puts its RateLimit fields in the metadata on a model route, on the answer elsewhere."""

    async def test_model_route_fields_go_to_metadata(self, guard: Guard) -> None:
        for left, full_in in ((99, 1), (98, 2)):  # the second comes from the allow cache
            allowed = await guard.checked()
            assert _fields(allowed.ok_response.response_headers_to_add) == []
            metadata = allowed.dynamic_metadata
            assert envoy.rate_limit_from_metadata(metadata) == [
                ("ratelimit-policy", POLICY_ITEMS),
                ("ratelimit", f'"anonymous:req";r={left};t={full_in}, "anonymous:inst";r=4;t=0'),
            ]

    async def test_other_routes_keep_them_on_the_answer(self, guard: Guard) -> None:
        allowed = await guard.checked("/healthz")
        assert _fields(allowed.ok_response.response_headers_to_add) == [
            ("ratelimit-policy", POLICY_ITEMS),
            ("ratelimit", '"anonymous:req";r=99;t=1, "anonymous:inst";r=4;t=0'),
        ]
        assert envoy.rate_limit_from_metadata(allowed.dynamic_metadata) == []

    async def test_checks_own_refusal_keeps_its_fields(self, guard: Guard) -> None:
        """Instances spent: Check refuses on the model route (charging no request), with one
        set of fields."""
        await guard.processed(kserve_body(4), check=await guard.checked())
        refused = await guard.checked()
        assert refused.denied_response.status.code == 429
        assert _fields(refused.denied_response.headers) == [
            ("ratelimit-policy", POLICY_ITEMS),
            ("ratelimit", '"anonymous:req";r=99;t=1, "anonymous:inst";r=0;t=60'),
        ]


class TestOneSetPerAnswer:
    """ext_proc's answers carry one set: Check's request limits and its own instance limits."""

    async def _sequence(self, guard: Guard, *, two_hops: bool) -> list[tuple[int, list[Any]]]:
        """A batch of 3 (allowed), of 3 (over the instance limit) and an unreadable body."""
        results = []
        for body in (kserve_body(3), kserve_body(3), b"{not json"):
            check = await guard.checked() if two_hops else None
            results.append(_answer_fields(await guard.processed(body, check=check)))
        return results

    @pytest.mark.parametrize("two_hops", [True, False], ids=["two-hop", "single-hop"])
    async def test_merged_fields(self, guard: Guard, two_hops: bool) -> None:
        allowed, throttled, unreadable = await self._sequence(guard, two_hops=two_hops)
        assert allowed == (
            200,
            [
                ("ratelimit-policy", POLICY_ITEMS),
                ("ratelimit", '"anonymous:req";r=99;t=1, "anonymous:inst";r=1;t=45'),
            ],
        )
        assert throttled == (
            429,
            [
                ("ratelimit-policy", POLICY_ITEMS),
                ("ratelimit", '"anonymous:req";r=98;t=2, "anonymous:inst";r=1;t=45'),
            ],
        )
        # Refused (fail_modes.body: deny) before any instance charge: this request's request
        # limit, and the instance limit as the refused batch left it.
        assert unreadable == (
            400,
            [
                ("ratelimit-policy", POLICY_ITEMS),
                ("ratelimit", '"anonymous:req";r=97;t=2, "anonymous:inst";r=1;t=45'),
            ],
        )

    async def test_grpc_pass_carries_the_fields(self, guard: Guard) -> None:
        """gRPC inference passed unread: the answer's headers are still seen, for the fields."""
        check = await guard.checked(GRPC)
        answers = await guard.processed(
            None, check=check, path=GRPC, content_type="application/grpc"
        )
        first = answers[0]
        assert first.mode_override.response_header_mode == first.mode_override.SEND
        assert _answer_fields(answers) == (
            200,
            [
                ("ratelimit-policy", POLICY_ITEMS),
                ("ratelimit", '"anonymous:req";r=99;t=1, "anonymous:inst";r=0;t=60'),
            ],
        )
