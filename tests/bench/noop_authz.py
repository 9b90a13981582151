"""A no-op ext_authz server on grpc.aio: every Check is allowed.

The bench runs it behind Envoy to measure the floor of a Python ext_authz hop (gRPC framing,
protobuf parsing, the asyncio loop) with no decision work, so extauthz's Check can be judged
against what any Python server would cost.

Run as ``python tests/bench/noop_authz.py PORT``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

_OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=external_auth_pb2.OkHttpResponse(),
)


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allow every request without looking at it."""

    async def Check(  # noqa: N802 (gRPC method name)
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse
        ],
    ) -> external_auth_pb2.CheckResponse:
        return _OK


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
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
    """Parse the port from ``argv`` and serve."""
    if len(argv) != 1 or not argv[0].isdigit():
        raise SystemExit("usage: noop_authz.py PORT")
    asyncio.run(serve(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
