"""Shared helpers for the in-process gRPC tests: a running guard, Envoy-shaped messages, metrics.

The guard is started with ``extauthz.app.start`` on ports 0 and a pinned clock; messages are
built the way Envoy builds them (``reference/envoy.md``): Check's ``attributes.source.address``
and lower-case header map, ext_proc's ``HeaderMap`` of ``raw_value`` bytes and the
``envoy.filters.http.ext_proc`` attributes Struct.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from google.protobuf import struct_pb2

from extauthz import app
from extauthz._proto.v1 import admin_pb2_grpc
from extauthz.settings import Settings
from extauthz.telemetry import metrics

START_TIME = 1_700_000_000.0
ADMIN_TOKEN = "admin-token-for-tests"
EXT_PROC_SOURCE = "127.0.0.2:5555"

# Raw API keys; the policy lists only their SHA-256 digests.
ALICE_KEY = "alice-raw-secret-key-0001"  # tier free
BOB_KEY = "bob-raw-secret-key-0002"  # tier trusted (passthrough output)
MALLORY_KEY = "mallory-raw-secret-key-0003"  # tier free, on the deny list
UNKNOWN_KEY = "nobody-knows-this-key-0004"

FREE_MAX_INSTANCES = 8
ANONYMOUS_MAX_INSTANCES = 4


def sha256_hex(text: str) -> str:
    """Return the hex SHA-256 of ``text``, as the policy stores API keys."""
    return hashlib.sha256(text.encode()).hexdigest()


def policy_yaml(
    *,
    mode: str = "enforce",
    body_fail_mode: str = "deny",
    levels: Mapping[str, str] | None = None,
    retry_after_s: int = 60,
) -> str:
    """Return the test policy: three keyed clients, rounding tiers and one passthrough tier."""
    level_map = {
        "normal": "allow",
        "elevated": "allow",
        "suspicious": "challenge",
        "abusive": "block",
    }
    level_map.update(levels or {})
    levels_text = "\n".join(f"  {name}: {action}" for name, action in level_map.items())
    return f"""\
version: 1
mode: {mode}
identity:
  api_key_header: x-api-key
  api_keys:
    - {{name: alice, sha256: {sha256_hex(ALICE_KEY)}, tier: free}}
    - {{name: bob, sha256: {sha256_hex(BOB_KEY)}, tier: trusted}}
    - {{name: mallory, sha256: {sha256_hex(MALLORY_KEY)}, tier: free}}
  unknown_key: deny
  anonymous_tier: anonymous
tiers:
  anonymous:
    max_instances: {ANONYMOUS_MAX_INSTANCES}
    output: {{policy: round, decimals: 2}}
  free:
    max_instances: {FREE_MAX_INSTANCES}
    output: {{policy: round, decimals: 2}}
  trusted:
    max_instances: 1024
    output: {{policy: passthrough}}
levels:
{levels_text}
deny:
  clients: [key:mallory]
routes:
  - {{prefix: /v1/models/, dialect: kserve_v1}}
  - {{prefix: /v2/models/, dialect: oip_v2}}
fail_modes:
  store: fail_open
  body: {body_fail_mode}
retry_after_s: {retry_after_s}
"""


class FakeClock:
    """A settable clock for the guard; starts at ``START_TIME``."""

    def __init__(self, now: float = START_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(slots=True)
class RunningGuard:
    """A started guard with an open channel and the stubs the tests use."""

    guard: app.Guard
    channel: grpc.aio.Channel
    clock: FakeClock
    token_file: Path | None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.guard.grpc_port}"

    @property
    def authz(self) -> external_auth_pb2_grpc.AuthorizationStub:
        return external_auth_pb2_grpc.AuthorizationStub(self.channel)

    @property
    def extproc(self) -> proc_grpc.ExternalProcessorStub:
        return proc_grpc.ExternalProcessorStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel)

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.guard.http_port}{path}"


@contextlib.asynccontextmanager
async def running_guard(
    tmp_path: Path,
    policy_text: str | None = None,
    *,
    token: str | None = ADMIN_TOKEN,
    drain_s: float = 0.0,
) -> AsyncIterator[RunningGuard]:
    """Start a guard on free ports with ``policy_text`` (default: ``policy_yaml()``), stop it after."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy_text if policy_text is not None else policy_yaml(), "utf-8")
    token_file: Path | None = None
    if token is not None:
        token_file = tmp_path / "admin-token"
        token_file.write_text(token + "\n", "utf-8")
    clock = FakeClock()
    settings = Settings(
        policy_path=policy_path,
        grpc_port=0,
        http_port=0,
        drain_s=drain_s,
        admin_token_file=token_file,
        reload_interval_s=3600.0,
    )
    guard = await app.start(settings, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{guard.grpc_port}")
    try:
        yield RunningGuard(guard, channel, clock, token_file)
    finally:
        await channel.close()
        if not guard.readiness.draining:
            await guard.stop(grace_s=1.0)


async def http_get(url: str) -> tuple[int, str]:
    """GET ``url`` and return (status, body text)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def counter(name: str, **labels: str) -> float:
    """Return the current value of a Prometheus sample (0 when never incremented)."""
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- Check --------------------------------------------------------------------------------------


def check_request(
    headers: Mapping[str, str] | None = None,
    *,
    address: str = "10.1.2.3",
    port: int = 43210,
    path: str = "/v1/models/m:predict",
    method: str = "POST",
    request_id: str = "",
) -> external_auth_pb2.CheckRequest:
    """Build a CheckRequest as Envoy sends it (lower-case header names, source socket address)."""
    all_headers = {
        ":path": path,
        ":method": method,
        **{k.lower(): v for k, v in (headers or {}).items()},
    }
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=address, port_value=port)
                )
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id=request_id, method=method, path=path, headers=all_headers
                )
            ),
        )
    )


def header_options(response_headers: object) -> dict[str, base_pb2.HeaderValueOption]:
    """Index a repeated HeaderValueOption by lower-case header name."""
    return {option.header.key.lower(): option for option in response_headers}  # type: ignore[attr-defined]


def option_value(option: base_pb2.HeaderValueOption) -> str:
    """Return a header option's value, whichever of ``value``/``raw_value`` carries it."""
    header = option.header
    value: str = header.raw_value.decode() if header.raw_value else header.value
    return value


# --- ext_proc -----------------------------------------------------------------------------------


def header_map(headers: Mapping[str, str | bytes]) -> base_pb2.HeaderMap:
    """Build an ext_proc HeaderMap the way Envoy does: values in ``raw_value`` bytes."""
    return base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=k, raw_value=v if isinstance(v, bytes) else v.encode())
            for k, v in headers.items()
        ]
    )


def proc_request_headers(
    path: str = "/v1/models/m:predict",
    *,
    headers: Mapping[str, str | bytes] | None = None,
    source: str = EXT_PROC_SOURCE,
    check_metadata: struct_pb2.Struct | None = None,
    end_of_stream: bool = False,
) -> proc_pb2.ProcessingRequest:
    """A request_headers message with ``source.address`` and, optionally, Check's verdict."""
    all_headers: dict[str, str | bytes] = {
        ":method": "POST",
        ":path": path,
        ":authority": "models.example",
        "content-type": "application/json",
        "accept-encoding": "gzip, br",
        **(headers or {}),
    }
    message = proc_pb2.ProcessingRequest(
        request_headers=proc_pb2.HttpHeaders(
            headers=header_map(all_headers), end_of_stream=end_of_stream
        )
    )
    if source:
        attributes = struct_pb2.Struct()
        attributes.update({"source.address": source})
        message.attributes["envoy.filters.http.ext_proc"].CopyFrom(attributes)
    if check_metadata is not None:
        message.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(
            check_metadata
        )
    return message


def proc_request_body(body: bytes, *, end_of_stream: bool = True) -> proc_pb2.ProcessingRequest:
    return proc_pb2.ProcessingRequest(
        request_body=proc_pb2.HttpBody(body=body, end_of_stream=end_of_stream)
    )


def proc_response_headers(
    status: int = 200,
    *,
    content_type: str = "application/json",
    end_of_stream: bool = False,
    extra: Mapping[str, str] | None = None,
) -> proc_pb2.ProcessingRequest:
    headers = {":status": str(status), "content-type": content_type, **(extra or {})}
    return proc_pb2.ProcessingRequest(
        response_headers=proc_pb2.HttpHeaders(
            headers=header_map(headers), end_of_stream=end_of_stream
        )
    )


def proc_response_body(body: bytes, *, end_of_stream: bool = True) -> proc_pb2.ProcessingRequest:
    return proc_pb2.ProcessingRequest(
        response_body=proc_pb2.HttpBody(body=body, end_of_stream=end_of_stream)
    )


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


class ProcStream:
    """One ext_proc bidi stream: messages go in through an async generator, answers come out one by one."""

    def __init__(self, stub: proc_grpc.ExternalProcessorStub, *, timeout_s: float = 10.0) -> None:
        self._queue: asyncio.Queue[proc_pb2.ProcessingRequest | None] = asyncio.Queue()
        self._timeout_s = timeout_s
        self.call = stub.Process(self._requests(), timeout=timeout_s)

    async def _requests(self) -> AsyncIterator[proc_pb2.ProcessingRequest]:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            yield message

    async def send(self, message: proc_pb2.ProcessingRequest) -> proc_pb2.ProcessingResponse:
        """Send one message and return the answer to it (fails if the stream ended instead)."""
        await self._queue.put(message)
        response = await asyncio.wait_for(self.call.read(), self._timeout_s)
        assert response is not grpc.aio.EOF, "the stream ended without answering"
        assert isinstance(response, proc_pb2.ProcessingResponse)
        return response

    async def finish(self) -> grpc.StatusCode:
        """Close the sending side, drain any answers left and return the call's status code."""
        await self._queue.put(None)
        while await asyncio.wait_for(self.call.read(), self._timeout_s) is not grpc.aio.EOF:
            pass
        code: grpc.StatusCode = await self.call.code()
        return code


def ends_stream(response: proc_pb2.ProcessingResponse) -> bool:
    """Tell whether Envoy sends nothing more after ``response``: a refusal, or a skip of every later phase."""
    mode = response.mode_override
    skips_rest = (
        response.HasField("mode_override")
        and mode.request_body_mode == mode.NONE
        and mode.response_header_mode == mode.SKIP
    )
    return bool(response.HasField("immediate_response") or skips_rest)


@dataclass(frozen=True, slots=True)
class Exchange:
    """What one ext_proc stream gave back: the answers, the call's status, how many messages went out."""

    responses: list[proc_pb2.ProcessingResponse]
    code: grpc.StatusCode
    sent: int


async def exchange(
    stub: proc_grpc.ExternalProcessorStub,
    messages: list[proc_pb2.ProcessingRequest],
    *,
    timeout_s: float = 20.0,
) -> Exchange:
    """Play ``messages`` on one stream in lock step, as Envoy does in BUFFERED mode.

    Each message with a phase waits for its answer (an empty message gets none); sending stops
    once an answer ends the stream (``ends_stream``) or the server closes it. Writing after the
    server closed would hit grpc/grpc#36066 (the Python aio client reports INTERNAL for a write
    racing the server's OK), which no C++ client such as Envoy sees.
    """
    queue: asyncio.Queue[proc_pb2.ProcessingRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[proc_pb2.ProcessingRequest]:
        while (message := await queue.get()) is not None:
            yield message

    call = stub.Process(requests(), timeout=timeout_s)
    responses: list[proc_pb2.ProcessingResponse] = []
    sent = 0
    try:
        for message in messages:
            await queue.put(message)
            sent += 1
            if message.WhichOneof("request") is None:
                continue
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            assert isinstance(response, proc_pb2.ProcessingResponse)
            responses.append(response)
            if ends_stream(response):
                break
        await queue.put(None)
        while (extra := await call.read()) is not grpc.aio.EOF:
            assert isinstance(extra, proc_pb2.ProcessingResponse)
            responses.append(extra)
        code: grpc.StatusCode = await call.code()
    except grpc.aio.AioRpcError as exc:
        return Exchange(responses, exc.code(), sent)
    return Exchange(responses, code, sent)


def kserve_body(instances: int, width: int = 3) -> bytes:
    """A KServe v1 request body carrying ``instances`` rows of ``width`` numbers."""
    rows = ",".join(
        "[" + ",".join(str(0.5 + i + j) for j in range(width)) + "]" for i in range(instances)
    )
    return f'{{"instances":[{rows}]}}'.encode()
