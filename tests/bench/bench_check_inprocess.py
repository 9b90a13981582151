"""What does extauthz's Check cost without gRPC? The servicer called in process, in a loop.

The guard's own work per Check (identity, deny list, the memory store's limit, the verdict,
metrics, the audit line, the cached answer) on ``bench-policy.yaml``, as CPU microseconds per
call (``time.process_time``), with the audit line written (to /dev/null) and with it off (log
level warning). Set against ``make bench`` set-ups b/j and c, it says how much of a Check hop is
the guard's logic and how much the gRPC and asyncio machinery around it.

Run as ``python -m tests.bench.bench_check_inprocess [--calls 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2

from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import DecisionCore
from extauthz.keys import KeyRing
from extauthz.policy.watch import PolicyHolder
from extauthz.service.authz import AuthorizationService
from extauthz.store.memory import MemoryStore
from extauthz.telemetry import logs

POLICY = Path(__file__).with_name("bench-policy.yaml")


def check_request(i: int) -> auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends wrk's GET /: one anonymous client, its own request id."""
    request = auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.address.socket_address.port_value = 40_000 + i % 1_000
    http = attributes.request.http
    http.method, http.path, http.host, http.id = "GET", "/", "127.0.0.1:8080", str(i)
    http.headers.update(
        {
            ":method": "GET",
            ":path": "/",
            ":authority": "127.0.0.1:8080",
            "user-agent": "wrk",
            "x-request-id": f"req-{i}",
            "x-forwarded-proto": "http",
        }
    )
    return request


async def measure(level: str, calls: int) -> float:
    """CPU microseconds per Check at log ``level`` (audit lines go to /dev/null)."""
    logs.configure(level, "json")
    policy = PolicyHolder(POLICY, clock=time.time)
    store = MemoryStore(clock=time.time)
    core = DecisionCore(
        lambda: policy.current,
        store,
        clock=time.time,
        budget_s=0.05,
        local_store=MemoryStore(clock=time.time),
    )
    gate = ChallengeGate(core, KeyRing.single(os.urandom(32), kid="bench"), clock=time.time)
    service = AuthorizationService(core, gate)
    requests = [check_request(i) for i in range(2_000)]
    context: Any = None
    for request in requests[:500]:  # warm the caches
        await service.Check(request, context)
    started = time.process_time()
    for i in range(calls):
        await service.Check(requests[i % len(requests)], context)
    return (time.process_time() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_check_inprocess")
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args(argv)
    stderr = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink  # the audit lines: written, not shown
        try:
            with_audit = asyncio.run(measure("info", args.calls))
            without = asyncio.run(measure("warning", args.calls))
        finally:
            sys.stderr = stderr
    print(
        f"Check in process, {args.calls} calls: {with_audit:.1f} us CPU per call with the audit line"
    )
    print(f"Check in process, {args.calls} calls: {without:.1f} us CPU per call without it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
