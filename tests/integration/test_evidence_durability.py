"""Evidence and limits survive restarts: the guard's, and Redis's with AOF on.

A real guard process serves watermarked answers (Check, then ext_proc through the response
body) from a real redis-server started with ``--appendonly yes --appendfsync always``. The test
counts the evidence ledger's records (through the admin API, decrypted with the keys file) and
reads the client counters and limit state before and after: a guard restart (SIGTERM, a new
process on the same Redis), then a Redis crash (SIGKILL) and restart from its AOF. Nothing may
be lost: the same records, the same counters, the same Redis keys, a spent limit still spent,
and the ledger still taking new records. A control shows the same crash without AOF loses the
stream, so the counts are not vacuous.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc

from extauthz.admin_client import AdminClient
from extauthz.demo import stack
from extauthz.evidence.ledger import EvidenceRecord, RedisLedger
from tests.integration.conftest import RedisProcess, start_redis, stop_redis
from tests.integration.service_fixtures import (
    check_request,
    exchange,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
)
from tests.integration.test_faults_redis import INSTANCES, model_bodies, scrape

pytestmark = pytest.mark.redis

AOF = ("--appendonly", "yes", "--appendfsync", "always")
TOKEN = "durability-admin-token"
TIGHT_KEY = "durability-tight-key"
TIGHT_RATE = 6  # requests per hour

POLICY = f"""\
version: 1
identity:
  api_keys:
    - {{name: tight, tier: tight, sha256: {hashlib.sha256(TIGHT_KEY.encode()).hexdigest()}}}
tiers:
  anonymous:
    max_instances: {INSTANCES * 2}
    # Slow enough that no limit key expires (its debt repaid) during the test.
    limits: [{{name: instances-hourly, unit: instances, rate: 100, per: hour}}]
    output: {{policy: round, decimals: 3}}
    watermark: {{label_rate: 0.5}}
  tight:
    max_instances: {INSTANCES * 2}
    limits: [{{name: per-hour, unit: requests, rate: {TIGHT_RATE}, per: hour}}]
# Detectors write in the background; off, Redis is quiet between two readings.
detection: {{enabled: false}}
"""


@dataclass
class Guard:
    """A running ``extauthz serve`` on the test's Redis, and how to reach it."""

    proc: stack.Process
    grpc_port: int
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def export(self) -> list[str]:
        """The ledger as JSONL, decrypted by this guard (retried while it reconnects to Redis)."""
        deadline = time.monotonic() + 10
        with AdminClient(self.target, TOKEN) as admin:
            while True:
                try:
                    return admin.export_evidence()
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def errors(self, reason: str) -> float:
        """``extauthz_errors_total{reason=...}`` from /metrics."""
        return scrape(self.http_port).get(("extauthz_errors_total", (("reason", reason),)), 0.0)

    def counters(self, client_id: str) -> tuple[int, int]:
        """The client's (requests, instances) as the store keeps them."""
        with AdminClient(self.target, TOKEN) as admin:
            record = admin.get_client(client_id)
        return int(record.get("requests", 0)), int(record.get("instances", 0))


@pytest.fixture
def guards(tmp_path: Path) -> Iterator[Any]:
    """Start guards on a Redis (with the keys file, unless told not to); stop them after."""
    (tmp_path / "keys.yaml").write_text(
        "current: d1\nkeys: {d1: durability-key-0123456789abcdef}\n"
    )
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "policy.yaml").write_text(POLICY)
    started: list[stack.Process] = []

    def start(server: RedisProcess, *, keys_file: bool = True) -> Guard:
        grpc_port, http_port = stack.free_port(), stack.free_port()
        args = ["--store", server.url, "--admin-token-file", str(tmp_path / "token")]
        # A roomy budget: this test is about what is kept, not how fast; a decision that
        # overran 50 ms on a busy machine would be a degraded one, not counted in Redis.
        args += ["--drain-s", "0", "--budget-ms", "500"]
        if keys_file:
            args += ["--keys-file", str(tmp_path / "keys.yaml")]
        proc = stack.start_guard(
            policy=tmp_path / "policy.yaml",
            grpc_port=grpc_port,
            http_port=http_port,
            workdir=tmp_path / f"guard-{len(started)}",
            extra_args=args,
        )
        started.append(proc)
        return Guard(proc, grpc_port, http_port)

    yield start
    for proc in started:
        proc.stop()


async def _serve(guard: Guard, clients: range, requests: int) -> None:
    """Play Envoy for ``requests`` model calls of each client: Check, then one ext_proc stream
    through the response body (where the watermark is applied and recorded)."""
    async with grpc.aio.insecure_channel(guard.target) as channel:
        authz = auth_grpc.AuthorizationStub(channel)
        extproc = proc_grpc.ExternalProcessorStub(channel)
        for client in clients:
            address = f"127.3.0.{client}"
            for n in range(requests):
                checked = await authz.Check(check_request(address=address), timeout=5)
                assert checked.status.code == 0, checked
                request, answer = model_bodies(client * 1000 + n)
                done = await exchange(
                    extproc,
                    [
                        proc_request_headers(
                            source=f"{address}:4000", check_metadata=checked.dynamic_metadata
                        ),
                        proc_request_body(request),
                        proc_response_headers(),
                        proc_response_body(answer),
                    ],
                )
                assert done.code == grpc.StatusCode.OK
                assert len(done.responses) == 4


def _tight_status(guard: Guard) -> int:
    """The status Check gives the tight client (6 requests per hour) now."""
    with grpc.insecure_channel(guard.target) as channel:
        response = auth_grpc.AuthorizationStub(channel).Check(
            check_request({"x-api-key": TIGHT_KEY}), timeout=5
        )
    return (
        int(response.denied_response.status.code) if response.HasField("denied_response") else 200
    )


def _redis_state(port: int) -> dict[bytes, object]:
    """Every ``extauthz:*`` key and its value, read by type (TTLs aside)."""
    state: dict[bytes, object] = {}
    with redis.Redis(host="127.0.0.1", port=port) as client:
        for key in client.scan_iter(match="extauthz:*"):
            kind = client.type(key)
            if kind == b"hash":
                state[key] = client.hgetall(key)
            elif kind == b"string":
                state[key] = client.get(key)
            elif kind == b"zset":
                state[key] = client.zrange(key, 0, -1, withscores=True)
            elif kind == b"stream":
                state[key] = client.xrange(key)
            else:
                state[key] = kind
    return state


def _crash_and_restart(
    server: RedisProcess, workdir: Path, *extra: str
) -> tuple[RedisProcess, float]:
    """SIGKILL Redis (no shutdown save) and start it again on its port and directory; return
    the new process and how long it took to answer again."""
    server.process.kill()
    server.process.wait(timeout=5)
    started = time.monotonic()
    again = start_redis(workdir, *extra, port=server.port)
    return again, time.monotonic() - started


CLIENTS = ("ip:127.3.0.1", "ip:127.3.0.2", "ip:127.3.0.3")


class TestDurability:
    """The ledger, the counters and the limits survive a guard restart and a Redis crash."""

    async def test_guard_restart_and_redis_crash_lose_nothing(
        self, tmp_path: Path, guards: Any
    ) -> None:
        workdir = tmp_path / "redis"
        server = start_redis(workdir, *AOF)
        try:
            with redis.Redis(host="127.0.0.1", port=server.port) as client:
                assert client.config_get("appendonly") == {"appendonly": "yes"}
                assert client.config_get("appendfsync") == {"appendfsync": "always"}
            first: Guard = guards(server)
            await _serve(first, range(1, 4), requests=4)
            for _ in range(TIGHT_RATE):
                assert _tight_status(first) == 200
            assert _tight_status(first) == 429
            ledger = first.export()
            counters = {c: first.counters(c) for c in CLIENTS}
            state = _redis_state(server.port)
            assert len(ledger) >= 5  # a quarter of 48 answers at least, at rate 0.5
            assert counters == {c: (4, 4 * INSTANCES) for c in CLIENTS}

            # 1. The guard restarts (SIGTERM, a new process): everything is read back.
            assert first.proc.stop() == 0
            second: Guard = guards(server)
            assert second.export() == ledger
            assert {c: second.counters(c) for c in CLIENTS} == counters
            assert _redis_state(server.port) == state
            assert _tight_status(second) == 429  # the spent limit is still spent
            await _serve(second, range(1, 3), requests=2)
            grown = second.export()
            assert grown[: len(ledger)] == ledger and len(grown) > len(ledger)
            state = _redis_state(server.port)
            counters = {c: second.counters(c) for c in CLIENTS}

            # 2. Redis crashes and comes back from its AOF, under the running guard.
            server, reload_s = _crash_and_restart(server, workdir, *AOF)
            reconnect_started = time.monotonic()
            after_crash = second.export()
            reconnect_s = time.monotonic() - reconnect_started
            assert _redis_state(server.port) == state
            assert after_crash == grown
            assert {c: second.counters(c) for c in CLIENTS} == counters
            # The first decision after the crash, on a pooled connection the crash closed, to a
            # Redis that lost its scripts: still the store's (a spent limit), not a degraded one.
            assert _tight_status(second) == 429
            # And the ledger still takes new records.
            await _serve(second, range(4, 5), requests=2)
            final = second.export()
            assert final[: len(grown)] == grown and len(final) > len(grown)
            assert second.proc.alive()
            print(
                f"\ndurability: ledger {len(ledger)} records before the guard restart, "
                f"{len(ledger)} after; {len(grown)} before the Redis crash, "
                f"{len(after_crash)} after (AOF reload {reload_s * 1000:.0f} ms, guard read it "
                f"{reconnect_s * 1000:.0f} ms later), {len(final)} with new traffic; "
                f"counters {counters}; {len(state)} Redis keys identical; spent limit still 429"
            )
        finally:
            stop_redis(server)

    async def test_without_aof_a_crash_loses_the_stream(self, tmp_path: Path) -> None:
        """The control: the same crash with persistence off leaves an empty ledger."""
        workdir = tmp_path / "redis"
        server = start_redis(workdir)
        try:
            client = aioredis.from_url(server.url)
            ledger = RedisLedger(client, clock=time.time)
            now = time.time()
            await ledger.append([EvidenceRecord("ip:x", "k", now, b"[1]", 3) for _ in range(5)])
            assert len(await ledger.read()) == 5
            await client.aclose()
            server, _ = _crash_and_restart(server, workdir)
            client = aioredis.from_url(server.url)
            assert await RedisLedger(client, clock=time.time).read() == []
            await client.aclose()
        finally:
            stop_redis(server)


class TestRandomKeys:
    """Without a keys file each guard draws its own ledger key: a restarted guard cannot open
    what its predecessor sealed, but it still exports what it can, and says what it skipped."""

    async def test_restart_with_a_new_random_key(self, tmp_path: Path, guards: Any) -> None:
        server = start_redis(tmp_path / "redis", *AOF)
        try:
            first: Guard = guards(server, keys_file=False)
            await _serve(first, range(1, 3), requests=3)
            sealed_before = len(first.export())
            assert sealed_before
            first.proc.stop()
            second: Guard = guards(server, keys_file=False)
            await _serve(second, range(5, 6), requests=3)
            with redis.Redis(host="127.0.0.1", port=server.port) as client:
                stored = client.xlen("extauthz:evidence")
            readable = second.export()
            print(
                f"\nrandom keys: {stored} records stored, {sealed_before} sealed before the "
                f"restart, {len(readable)} readable after it"
            )
            assert readable and all(
                json.loads(line)["client_id"] == "ip:127.3.0.5" for line in readable
            )
            assert len(readable) + sealed_before == stored
            assert second.errors("ledger_unreadable") == sealed_before
            assert "ledger_records_unreadable" in second.proc.output()
        finally:
            stop_redis(server)
