"""A no-op ext_authz and ext_proc server on grpc.aio: every Check is allowed, every ext_proc
message is answered with an empty response of its own phase.

The bench runs it behind Envoy to measure the floor of a Python hop (gRPC framing, protobuf
parsing, the asyncio loop) with no decision work, so extauthz's Check and Process can be judged
against what any Python server would cost.

Run as ``python tests/bench/noop_authz.py PORT [--guard-answer]``: with the flag every Check is
answered with the allow answer extauthz gives (headers, RateLimit fields, metadata), so the
floor includes what the contract asks Envoy to apply.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.rpc import code_pb2, status_pb2

_OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=external_auth_pb2.OkHttpResponse(),
)


def guard_answer() -> external_auth_pb2.CheckResponse:
    """The allow answer extauthz gives a bench client (upstream headers, RateLimit fields,
    dynamic metadata), built once: the floor of a Check hop that answers what the guard does."""
    from extauthz.core.decision import Decision
    from extauthz.core.identity import Identity
    from extauthz.core.limiter import AppliedLimit, LimitState
    from extauthz.core.risk import Action, RiskLevel
    from extauthz.service import envoy

    identity = Identity("ip:127.0.0.1", "anonymous", "anonymous", address="127.0.0.1")
    limit = AppliedLimit(
        "bench", "requests", "client", 1_000_000, 1.0, LimitState(True, 999_999, 0.0)
    )
    return envoy.check_ok(Decision(Action.ALLOW, identity, RiskLevel.NORMAL, limits=(limit,)))


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allow every request without looking at it, with ``answer``."""

    def __init__(self, answer: external_auth_pb2.CheckResponse = _OK) -> None:
        self._answer = answer

    async def Check(  # noqa: N802 (gRPC method name)
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse
        ],
    ) -> external_auth_pb2.CheckResponse:
        return self._answer


# One prebuilt answer per phase: the request's oneof name maps to the response's.
_ANSWERS = {
    "request_headers": ext_proc_pb2.ProcessingResponse(
        request_headers=ext_proc_pb2.HeadersResponse()
    ),
    "response_headers": ext_proc_pb2.ProcessingResponse(
        response_headers=ext_proc_pb2.HeadersResponse()
    ),
    "request_body": ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse()),
    "response_body": ext_proc_pb2.ProcessingResponse(response_body=ext_proc_pb2.BodyResponse()),
    "request_trailers": ext_proc_pb2.ProcessingResponse(
        request_trailers=ext_proc_pb2.TrailersResponse()
    ),
    "response_trailers": ext_proc_pb2.ProcessingResponse(
        response_trailers=ext_proc_pb2.TrailersResponse()
    ),
}


class NoopProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answer every ext_proc message with an empty response of its phase: change nothing."""

    async def Process(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext[
            ext_proc_pb2.ProcessingRequest, ext_proc_pb2.ProcessingResponse
        ],
    ) -> AsyncIterator[ext_proc_pb2.ProcessingResponse]:
        async for message in request_iterator:
            phase = message.WhichOneof("request")
            if phase in _ANSWERS:
                yield _ANSWERS[phase]


async def serve(port: int, *, answer: external_auth_pb2.CheckResponse = _OK) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(answer), server)
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    print(f"noop_authz listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str]) -> None:
    """Parse the port (and ``--guard-answer``) from ``argv`` and serve."""
    full = "--guard-answer" in argv
    rest = [a for a in argv if a != "--guard-answer"]
    if len(rest) != 1 or not rest[0].isdigit():
        raise SystemExit("usage: noop_authz.py PORT [--guard-answer]")
    asyncio.run(serve(int(rest[0]), answer=guard_answer() if full else _OK))


if __name__ == "__main__":
    main(sys.argv[1:])
