"""Hostile input: random ext_proc streams and random CheckRequests never break the servicers.

One guard serves the whole module on its own event loop (an ``asyncio.Runner``), so that
hypothesis can drive it from plain synchronous tests without a fixture per example.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.service_fixtures import (
    ALICE_KEY,
    BOB_KEY,
    MALLORY_KEY,
    UNKNOWN_KEY,
    RunningGuard,
    check_request,
    counter,
    ends_stream,
    exchange,
    gzip_bytes,
    header_map,
    kserve_body,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
    running_guard,
)

_T = TypeVar("_T")

HOSTILE = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


class GuardOnLoop:
    """A guard running on a private event loop; ``run`` drives one coroutine on that loop."""

    def __init__(self, runner: asyncio.Runner, running: RunningGuard) -> None:
        self.runner = runner
        self.running = running

    def run(self, make: Callable[[RunningGuard], Awaitable[_T]]) -> _T:
        async def drive() -> _T:
            return await make(self.running)

        return self.runner.run(drive())


@pytest.fixture(scope="module")
def hostile_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardOnLoop]:
    """Start one guard for the module on its own loop; stop it after the last test."""
    tmp_path: Path = tmp_path_factory.mktemp("hostile")
    with asyncio.Runner() as runner:
        context = running_guard(tmp_path)
        running = runner.run(context.__aenter__())
        try:
            yield GuardOnLoop(runner, running)
        finally:
            runner.run(context.__aexit__(None, None, None))


# --- strategies -----------------------------------------------------------------------------------

_PATHS = st.one_of(
    st.sampled_from(
        [
            "/v1/models/m:predict",
            "/v2/models/m/infer",
            "/V1/MODELS/x:predict",
            "/v1/models/",
            "/other",
            "/",
            "",
        ]
    ),
    st.text(max_size=40).map(lambda text: "/v1/models/" + text),
    st.text(max_size=40),
)
_HEADER_VALUES = st.one_of(
    st.binary(max_size=64),  # invalid UTF-8 included
    st.sampled_from(
        [b"gzip", b"br", b"deflate", b"identity", b"application/json", b"text/plain", b""]
    ),
    st.sampled_from([ALICE_KEY, BOB_KEY, MALLORY_KEY, UNKNOWN_KEY]).map(str.encode),
)
_HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "x-api-key",
            "content-encoding",
            "content-type",
            "x-request-id",
            ":method",
            "content-length",
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-:", min_size=1, max_size=20),
)
_SOURCES = st.one_of(
    st.sampled_from(
        ["127.0.0.2:5555", "[::1]:80", "::1", "10.0.0.1", "", "not-an-ip", "1.2.3.4:5:6"]
    ),
    st.text(max_size=30),
)


@st.composite
def _check_verdicts(draw: st.DrawFn) -> struct_pb2.Struct | None:
    if not draw(st.booleans()):
        return None
    verdict = struct_pb2.Struct()
    verdict.update(
        {
            "client": draw(st.sampled_from(["key:alice", "ip:127.0.0.2", "", "x" * 300])),
            "tier": draw(st.sampled_from(["free", "anonymous", "no-such-tier", ""])),
            "risk": draw(st.sampled_from(["normal", "abusive", "bogus", ""])),
            "action": draw(st.sampled_from(["allow", "block", "throttle", "nonsense", ""])),
            "reasons": draw(st.text(max_size=20)),
            "enforced": draw(st.sampled_from(["true", "false", ""])),
        }
    )
    return verdict


@st.composite
def _request_headers(draw: st.DrawFn) -> proc_pb2.ProcessingRequest:
    extra = draw(st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=6))
    return proc_request_headers(
        draw(_PATHS),
        headers=extra,
        source=draw(_SOURCES),
        check_metadata=draw(_check_verdicts()),
        end_of_stream=draw(st.booleans()),
    )


_BODIES = st.one_of(
    st.binary(max_size=2048),
    st.integers(0, 3000).map(kserve_body),  # batches far over every tier's max
    st.integers(0, 1 << 20).map(lambda n: b"x" * n),  # up to 1 MB of junk
    st.integers(0, 120_000).map(
        lambda n: b'{"instances":[' + b"0.25," * n + b"1]}"
    ),  # large and valid
    st.sampled_from(
        [
            b'{"instances":[[NaN]]}',
            b'{"instances":[[1,2],[3]]}',
            b'{"instances":[]}',
            b'{"inputs":{"a":[1,2],"b":[1]}}',
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1e39]}]}',
            b"[" * 5000,
            b"\xef\xbb\xbf{}",
        ]
    ),
    st.binary(max_size=512).map(gzip_bytes),
    st.integers(0, 40).map(lambda n: gzip_bytes(kserve_body(n))),
)
_RESPONSE_BODIES = st.one_of(
    _BODIES,
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20).map(
        lambda xs: ('{"predictions":[' + ",".join(repr(x) for x in xs) + "]}").encode()
    ),
    st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=10).map(
        lambda xs: ('{"predictions":[' + ",".join(str(x) for x in xs) + "]}").encode()
    ),
    st.sampled_from(
        [b'{"outputs":[{"name":"y","shape":[2],"datatype":"FP32","data":[0.123,0.877]}]}']
    ),
)


@st.composite
def _response_headers(draw: st.DrawFn) -> proc_pb2.ProcessingRequest:
    status = draw(st.sampled_from([200, 201, 204, 404, 500, 503]))
    content_type = draw(
        st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""])
    )
    encoding = draw(st.sampled_from([{}, {"content-encoding": "gzip"}, {"content-encoding": "br"}]))
    return proc_response_headers(
        status, content_type=content_type, extra=encoding, end_of_stream=draw(st.booleans())
    )


_TRAILERS = st.sampled_from(
    [
        proc_pb2.ProcessingRequest(
            request_trailers=proc_pb2.HttpTrailers(trailers=header_map({"x-t": "1"}))
        ),
        proc_pb2.ProcessingRequest(response_trailers=proc_pb2.HttpTrailers()),
    ]
)

_MESSAGES = st.one_of(
    _request_headers(),
    _BODIES.map(proc_request_body),
    _response_headers(),
    _RESPONSE_BODIES.map(proc_response_body),
    _TRAILERS,
    st.just(proc_pb2.ProcessingRequest()),  # an empty message
)


@st.composite
def _streams(draw: st.DrawFn) -> list[proc_pb2.ProcessingRequest]:
    """Mostly Envoy-like phase order with phases dropped or repeated; sometimes any order at all."""
    if draw(st.booleans()):
        return draw(st.lists(_MESSAGES, max_size=8))
    plan: list[proc_pb2.ProcessingRequest] = []
    for phase in (
        _request_headers(),
        _BODIES.map(proc_request_body),
        _response_headers(),
        _RESPONSE_BODIES.map(proc_response_body),
    ):
        plan.extend(draw(st.lists(phase, max_size=2)))
    return plan


# --- the properties --------------------------------------------------------------------------------


def _expected_phases(messages: list[proc_pb2.ProcessingRequest]) -> list[str]:
    return [phase for phase in (m.WhichOneof("request") for m in messages) if phase is not None]


class TestHostileStreams:
    """Random ext_proc streams end OK, with at most one answer per message, in phase order."""

    @HOSTILE
    @given(messages=_streams())
    def test_random_streams_end_ok(
        self, hostile_guard: GuardOnLoop, messages: list[proc_pb2.ProcessingRequest]
    ) -> None:
        internal_before = counter("extauthz_errors_total", reason="internal_error")
        result = hostile_guard.run(lambda g: exchange(g.extproc, messages))
        assert result.code == grpc.StatusCode.OK
        expected = _expected_phases(messages[: result.sent])
        assert len(result.responses) <= len(expected)
        for index, response in enumerate(result.responses):
            kind = response.WhichOneof("response")
            if kind == "immediate_response":
                assert index == len(result.responses) - 1, (
                    "an immediate_response must end the stream"
                )
                assert 400 <= response.immediate_response.status.code < 600
            else:
                assert kind == expected[index], (kind, expected)
        if len(result.responses) < len(expected) or result.sent < len(messages):
            # The guard may end a stream early: after a refusal, or after telling Envoy to skip the rest.
            assert result.responses and ends_stream(result.responses[-1])
        assert counter("extauthz_errors_total", reason="internal_error") == internal_before

    def test_duplicate_request_headers_counted_out_of_order(
        self, hostile_guard: GuardOnLoop
    ) -> None:
        before = counter("extauthz_errors_total", reason="out_of_order")
        messages = [
            proc_request_headers(),
            proc_request_headers(),
            proc_request_body(kserve_body(1)),
        ]
        result = hostile_guard.run(lambda g: exchange(g.extproc, messages))
        responses, code = result.responses, result.code
        assert code == grpc.StatusCode.OK
        assert [r.WhichOneof("response") for r in responses] == [
            "request_headers",
            "request_headers",
            "request_body",
        ]
        assert counter("extauthz_errors_total", reason="out_of_order") == before + 1

    def test_duplicate_request_body_counted_once(self, hostile_guard: GuardOnLoop) -> None:
        source = "192.0.2.77:1"
        messages = [
            proc_request_headers(source=source),
            proc_request_body(kserve_body(2)),
            proc_request_body(kserve_body(3)),
        ]
        result = hostile_guard.run(lambda g: exchange(g.extproc, messages))
        responses, code = result.responses, result.code
        record = hostile_guard.run(lambda g: g.guard.store.get_client("ip:192.0.2.77"))
        assert code == grpc.StatusCode.OK
        assert len(responses) == 3
        assert record is not None and record.instances == 2

    def test_empty_message_gets_no_answer(self, hostile_guard: GuardOnLoop) -> None:
        before = counter("extauthz_errors_total", reason="empty_message")
        messages = [proc_pb2.ProcessingRequest(), proc_request_headers("/other")]
        result = hostile_guard.run(lambda g: exchange(g.extproc, messages))
        responses, code = result.responses, result.code
        assert code == grpc.StatusCode.OK
        assert [r.WhichOneof("response") for r in responses] == ["request_headers"]
        assert counter("extauthz_errors_total", reason="empty_message") == before + 1


_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


@st.composite
def _check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    if draw(st.integers(0, 9)) == 0:
        return external_auth_pb2.CheckRequest()
    headers = draw(st.dictionaries(_TEXT.map(str.lower), _TEXT, max_size=6))
    if draw(st.booleans()):
        headers["x-api-key"] = draw(
            st.one_of(st.sampled_from([ALICE_KEY, BOB_KEY, MALLORY_KEY, UNKNOWN_KEY]), _TEXT)
        )
    request = check_request(
        headers,
        address=draw(
            st.one_of(_TEXT, st.sampled_from(["::1", "2001:db8::1", "10.0.0.1", "256.1.1.1", ""]))
        ),
        port=draw(st.integers(0, 65535)),
        path=draw(_TEXT),
        method=draw(st.sampled_from(["GET", "POST", "", "BREW"])),
        request_id=draw(_TEXT),
    )
    if draw(st.booleans()):
        payload = struct_pb2.Struct()
        payload.update(
            {
                "sub": draw(st.one_of(_TEXT, st.just(7))),
                "iss": draw(_TEXT),
                "tier": draw(st.sampled_from(["free", "trusted", "bogus", ""])),
            }
        )
        jwt = struct_pb2.Struct()
        jwt.fields["jwt_payload"].struct_value.CopyFrom(payload)
        request.attributes.metadata_context.filter_metadata[
            "envoy.filters.http.jwt_authn"
        ].CopyFrom(jwt)
    return request


class TestHostileChecks:
    """Random CheckRequests always get a CheckResponse with an HTTP answer, never an internal error."""

    @HOSTILE
    @given(request=_check_requests())
    def test_random_checks_answered(
        self, hostile_guard: GuardOnLoop, request: external_auth_pb2.CheckRequest
    ) -> None:
        internal_before = counter("extauthz_errors_total", reason="internal_error")
        response = hostile_guard.run(lambda g: g.authz.Check(request, timeout=10))
        assert isinstance(response, external_auth_pb2.CheckResponse)
        assert response.HasField("ok_response") or response.HasField("denied_response")
        if response.HasField("denied_response"):
            assert response.denied_response.status.code in (401, 403, 429)
        assert counter("extauthz_errors_total", reason="internal_error") == internal_before
        for key in (ALICE_KEY, BOB_KEY, MALLORY_KEY, UNKNOWN_KEY):
            if request.attributes.request.http.headers.get("x-api-key") == key:
                assert key.encode() not in response.SerializeToString()


class TestStillServing:
    """After the hostile runs the same guard still answers a normal request end to end."""

    def test_normal_stream_after_hostile_runs(self, hostile_guard: GuardOnLoop) -> None:
        messages = [
            proc_request_headers(headers={"x-api-key": ALICE_KEY}),
            proc_request_body(kserve_body(2)),
            proc_response_headers(),
            proc_response_body(b'{"predictions":[0.123456,0.5]}'),
        ]
        result = hostile_guard.run(lambda g: exchange(g.extproc, messages))
        responses, code = result.responses, result.code
        assert code == grpc.StatusCode.OK
        assert [r.WhichOneof("response") for r in responses] == [
            "request_headers",
            "request_body",
            "response_headers",
            "response_body",
        ]
        assert (
            responses[-1].response_body.response.body_mutation.body == b'{"predictions":[0.12,0.5]}'
        )

    def test_normal_check_after_hostile_runs(self, hostile_guard: GuardOnLoop) -> None:
        response = hostile_guard.run(
            lambda g: g.authz.Check(check_request({"x-api-key": BOB_KEY}), timeout=10)
        )
        assert response.HasField("ok_response")
