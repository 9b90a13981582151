"""Redis faults under load: each fail mode does what it says, no decision waits past the
budget, the guard keeps serving, and limits hold again once Redis is back."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc

from extauthz.demo import stack
from tests.integration.conftest import RedisProcess, start_redis, stop_redis

BUDGET_MS = 50
# Envoy's ext_authz timeout in envoy/envoy.yaml: no answer may take longer.
ENVOY_TIMEOUT_S = 0.25


def _check(address: str) -> auth_pb2.CheckRequest:
    request = auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = address
    request.attributes.request.http.path = "/v1/models/m:predict"
    request.attributes.request.http.method = "POST"
    return request


@dataclass
class Tally:
    """Answers seen in one phase of the test, and the slowest one."""

    outcomes: dict[str, int] = field(default_factory=dict)
    slowest_s: float = 0.0

    def add(self, outcome: str, elapsed_s: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.slowest_s = max(self.slowest_s, elapsed_s)


def _outcome(response: auth_pb2.CheckResponse) -> str:
    if response.HasField("denied_response"):
        return str(response.denied_response.status.code)
    reasons = response.dynamic_metadata.fields["reasons"].string_value
    return "allowed_degraded" if "store_unavailable" in reasons else "allowed"


async def _load(
    stub: auth_grpc.AuthorizationStub,
    tally: Tally,
    *,
    clients: int,
    rounds: int,
    network: str = "127.0.1",
) -> None:
    async def one(address: str) -> None:
        for _ in range(rounds):
            started = time.perf_counter()
            response = await stub.Check(_check(address), timeout=5)
            tally.add(_outcome(response), time.perf_counter() - started)

    await asyncio.gather(*(one(f"{network}.{i}") for i in range(1, clients + 1)))


def _guard(tmp_path: Path, redis: RedisProcess, mode: str) -> tuple[stack.Process, int]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""
tiers:
  anonymous:
    max_instances: 4
    limits: [{{name: per-minute, unit: requests, rate: 6, per: minute}}]
fail_modes: {{store: {mode}}}
"""
    )
    port = stack.free_port()
    proc = stack.start_guard(
        policy=policy,
        grpc_port=port,
        http_port=stack.free_port(),
        workdir=tmp_path / "guard",
        extra_args=[
            "--store",
            redis.url,
            "--budget-ms",
            str(BUDGET_MS),
            "--replicas",
            "2",
            "--drain-s",
            "0",
        ],
    )
    return proc, port


async def _recovery_s(
    stub: auth_grpc.AuthorizationStub, address: str, *, timeout_s: float = 10.0
) -> float:
    """Seconds from Redis's return until a decision is made with the store again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if _outcome(await stub.Check(_check(address), timeout=5)) != "allowed_degraded":
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"still degraded {timeout_s}s after Redis came back")


@pytest.mark.parametrize("fault", ["kill", "sigstop"])
@pytest.mark.parametrize("mode", ["fail_open", "fail_closed", "local"])
async def test_fail_modes_under_fault(tmp_path: Path, mode: str, fault: str) -> None:
    redis = start_redis(tmp_path / "redis")
    proc, port = _guard(tmp_path, redis, mode)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_grpc.AuthorizationStub(channel)
            healthy = Tally()
            await _load(stub, healthy, clients=4, rounds=8)
            # 6 per minute per client, with Redis: 6 allowed, 2 throttled each.
            assert healthy.outcomes == {"allowed": 24, "429": 8}

            if fault == "kill":
                redis.process.kill()
                redis.process.wait(timeout=5)
            else:
                redis.process.send_signal(signal.SIGSTOP)
            broken = Tally()
            await _load(stub, broken, clients=4, rounds=8)

            if fault == "kill":
                redis = start_redis(tmp_path / "redis", port=redis.port)
            else:
                redis.process.send_signal(signal.SIGCONT)
            recovery_s = await _recovery_s(stub, "127.0.2.1")
            after = Tally()
            await _load(stub, after, clients=1, rounds=8, network="127.0.3")
        assert proc.alive(), proc.tail()
        print(
            f"\n{mode}/{fault}: outage {broken.outcomes}, slowest {broken.slowest_s * 1000:.0f} ms, "
            f"limits back {recovery_s * 1000:.0f} ms after Redis"
        )
        assert broken.slowest_s < ENVOY_TIMEOUT_S
        if mode == "fail_open":
            assert broken.outcomes == {"allowed_degraded": 32}
        elif mode == "fail_closed":
            assert broken.outcomes == {"503": 32}
        else:
            # Each replica enforces 6 / 2 replicas = 3 per minute on its own.
            assert broken.outcomes == {"allowed_degraded": 12, "429": 20}
        # Limits are decided by Redis again: a fresh client gets its 6, then 429s.
        assert after.outcomes == {"allowed": 6, "429": 2}
    finally:
        proc.stop()
        stop_redis(redis)
