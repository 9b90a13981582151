"""How much memory do a million distinct clients cost the store, and do its caps hold?

Drives ``--clients`` distinct anonymous identities (one IPv4 address each, from 10.0.0.0 up, so
256 clients per /24) through the decision core with the built-in default policy, as Envoy's
calls would: a Check (``DecisionCore.decide``: the client's record and its request limit), then
ext_proc's instance charge (``limits_for`` + ``charge``: the daily and the subnet instance
limits). Two stores, each with the guard's defaults (TTL one day):

- ``memory``: the embedded store (``memory_max_clients`` 100,000) in this process; memory is
  this process's RSS (``/proc/self/status``) at checkpoints, after a garbage collection;
- ``redis``: a private ``redis-server`` (no persistence); memory is ``INFO memory``
  ``used_memory`` at checkpoints, and at the end the keys by kind and their ``MEMORY USAGE``.

Then the detection state a client adds when detection is on (kept with its record): its size
after one query and at its caps (thousands of distinct queries).

Run as ``python -m tests.bench.million_clients [--clients 1000000] [--stores memory,redis]
[--json million-clients.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from extauthz.core.decision import Decision, DecisionCore
from extauthz.core.identity import Identity, RequestInfo
from extauthz.core.limiter import ChargeMode
from extauthz.policy.loader import Snapshot, load_default, load_policy
from extauthz.settings import Settings
from extauthz.store.base import Store
from extauthz.store.memory import MemoryStore
from extauthz.store.redis import RedisStore
from tests.bench.soak import rss_bytes

_FIRST_ADDRESS = int(ipaddress.IPv4Address("10.0.0.0"))
# What ext_proc charges on a model request body: the instances (service/extproc.py).
INSTANCE_PHASE = {"instances": ChargeMode.CHARGE}
_PIPELINE_POLICY = Path(__file__).with_name("bench-pipeline-policy.yaml")
_DEFAULTS = Settings()


def client_address(index: int) -> str:
    """Return the ``index``-th distinct client address (10.0.0.0 upwards, 2**24 of them)."""
    return str(ipaddress.IPv4Address(_FIRST_ADDRESS + index))


@dataclass
class Driver:
    """Send distinct clients through the decision core as Envoy's Check and ext_proc would."""

    core: DecisionCore
    snapshot: Snapshot
    refused: int = 0
    degraded: int = 0

    @classmethod
    def for_store(
        cls,
        store: Store,
        snapshot: Snapshot | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> Driver:
        """Build a decision core over ``store`` (built-in policy unless ``snapshot``) with the
        guard's default decision budget."""
        policy = snapshot or load_default()
        core = DecisionCore(
            lambda: policy, store, clock=clock, budget_s=_DEFAULTS.decision_budget_s
        )
        return cls(core, policy)

    async def one(self, index: int) -> Decision:
        """Check client ``index`` and, when allowed, charge one instance as ext_proc would."""
        request = RequestInfo(headers={}, source_address=client_address(index))
        decision = await self.core.decide(request, snapshot=self.snapshot)
        if "store_unavailable" in decision.reasons:
            self.degraded += 1
        if not decision.allowed:
            self.refused += 1
            return decision
        limits = self.core.limits_for(decision.identity, self.snapshot, INSTANCE_PHASE, cost=1)
        charged = await self.core.charge(
            decision.identity, requests=0, instances=1, limits=limits, snapshot=self.snapshot
        )
        self.degraded += charged.degraded
        return decision

    async def drive(self, start: int, stop: int, *, concurrency: int = 1) -> None:
        """Send clients ``start .. stop - 1``, ``concurrency`` at a time."""
        if concurrency <= 1:
            for index in range(start, stop):
                await self.one(index)
            return

        async def lane(offset: int) -> None:
            for index in range(start + offset, stop, concurrency):
                await self.one(index)

        await asyncio.gather(*(lane(k) for k in range(concurrency)))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Memory after ``clients`` distinct clients: bytes used and clients held by the store."""

    clients: int
    memory_bytes: int
    held: int
    elapsed_s: float


@dataclass
class StoreRun:
    """One store's figures for a million clients."""

    store: str
    clients: int
    max_clients: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    refused: int = 0
    degraded: int = 0
    bytes_per_held_client: float = 0.0
    total_bytes: int = 0
    keys: dict[str, Any] = field(default_factory=dict)


def checkpoints(clients: int, cap: int) -> list[int]:
    """The client counts to measure at: a few below the cap, the cap, and beyond it."""
    marks = {10_000, 50_000, cap, 2 * cap, 500_000, clients}
    return sorted(m for m in marks if 0 < m <= clients)


def _memory_checkpoint(store: MemoryStore, clients: int, start: float) -> Checkpoint:
    gc.collect()
    return Checkpoint(clients, rss_bytes(), len(store), time.monotonic() - start)


async def run_memory(clients: int, progress: Callable[[str], None]) -> StoreRun:
    """Drive ``clients`` through the memory store with the guard's default cap and TTL."""
    cap = _DEFAULTS.memory_max_clients
    store = MemoryStore(max_clients=cap, ttl_s=_DEFAULTS.client_ttl_s, clock=time.time)
    driver = Driver.for_store(store)
    # Warm imports and caches with clients outside the measured range, then forget them.
    await driver.drive(clients, clients + 100)
    for index in range(clients, clients + 100):
        await store.reset_client(f"ip:{client_address(index)}")
    run = StoreRun("memory", clients, cap)
    start = time.monotonic()
    run.checkpoints.append(_memory_checkpoint(store, 0, start))
    done = 0
    for mark in checkpoints(clients, cap):
        await driver.drive(done, mark)
        done = mark
        run.checkpoints.append(_memory_checkpoint(store, done, start))
        progress(
            f"memory: {done:,} clients, RSS {run.checkpoints[-1].memory_bytes / 2**20:.0f} MiB"
        )
    run.refused, run.degraded = driver.refused, driver.degraded
    # At the end the records and the limit keys (four per record) are at their caps.
    last = run.checkpoints[-1]
    run.total_bytes = last.memory_bytes - run.checkpoints[0].memory_bytes
    run.bytes_per_held_client = run.total_bytes / max(last.held, 1)
    return run


def start_redis_server(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """Start a private redis-server without persistence and wait until it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server (or make redis)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(workdir)]
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10.0
    with redis.Redis(port=port, socket_timeout=0.5) as probe:
        while True:
            try:
                if probe.ping():
                    return proc
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"redis-server on {port} did not start") from None
            time.sleep(0.05)


def used_memory(client: redis.Redis) -> int:
    """Return Redis' ``used_memory`` (bytes its allocator holds for data and overhead)."""
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def key_kind(key: str) -> str:
    """Name a store key's kind: a client's state, detection, a limit by scope, the registry."""
    if key.endswith(":clients"):
        return "registry"
    if "}:l:" in key:
        scope = key.split("{", 1)[1][:1]
        return {"c": "limit:client", "a": "limit:address", "n": "limit:subnet"}.get(scope, "limit")
    return key.rsplit(":", 1)[1]


def redis_keys(client: redis.Redis, *, sample: int = 200) -> dict[str, Any]:
    """Count the store's keys by kind and average ``MEMORY USAGE`` over a sample of each."""
    counts: dict[str, int] = {}
    samples: dict[str, list[int]] = {}
    for raw in client.scan_iter(count=10_000):
        key = raw.decode()
        kind = key_kind(key)
        counts[kind] = counts.get(kind, 0) + 1
        if len(samples.setdefault(kind, [])) < sample:
            samples[kind].append(int(client.memory_usage(key, samples=0) or 0))
    out: dict[str, Any] = {"counts": counts}
    out["avg_memory_usage"] = {k: statistics.fmean(v) for k, v in samples.items() if v}
    if "registry" in counts:
        members = int(client.zcard("extauthz:clients"))
        usage = int(client.memory_usage("extauthz:clients", samples=0) or 0)
        out["registry_members"] = members
        out["registry_bytes_per_member"] = usage / max(members, 1)
    return out


async def run_redis(
    clients: int, progress: Callable[[str], None], *, concurrency: int, workdir: Path
) -> StoreRun:
    """Drive ``clients`` through a private redis-server; measure ``used_memory``."""
    from extauthz.demo.stack import free_port

    port = free_port()
    server = start_redis_server(workdir, port)
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisStore.from_url(url, timeout_s=2.0, ttl_s=_DEFAULTS.client_ttl_s, clock=time.time)
    try:
        with redis.Redis(port=port) as admin:
            driver = Driver.for_store(store)
            await driver.drive(clients, clients + 100, concurrency=concurrency)
            admin.flushall()
            run = StoreRun("redis", clients, 1_000_000)
            start = time.monotonic()
            base = used_memory(admin)
            run.checkpoints.append(Checkpoint(0, base, 0, 0.0))
            done = 0
            for mark in checkpoints(clients, run.max_clients):
                await driver.drive(done, mark, concurrency=concurrency)
                done = mark
                held = int(admin.zcard("extauthz:clients"))
                point = Checkpoint(done, used_memory(admin), held, time.monotonic() - start)
                run.checkpoints.append(point)
                progress(
                    f"redis: {done:,} clients, used_memory {point.memory_bytes / 2**20:.0f} MiB,"
                    f" {admin.dbsize():,} keys"
                )
            run.refused, run.degraded = driver.refused, driver.degraded
            last = run.checkpoints[-1]
            run.total_bytes = last.memory_bytes - base
            run.bytes_per_held_client = run.total_bytes / max(last.held, 1)
            run.keys = redis_keys(admin)
            run.keys["dbsize"] = int(admin.dbsize())
    finally:
        await store.close()
        server.terminate()
        server.wait(timeout=10)
    return run


@dataclass(frozen=True, slots=True)
class DetectionSize:
    """Bytes of one client's detection state after ``queries`` instances, per detector."""

    queries: int
    total_bytes: int
    by_detector: dict[str, int]


async def detection_sizes(queries: Sequence[int], *, batch: int = 32) -> list[DetectionSize]:
    """Measure a client's detection state (bench pipeline policy) after each count of queries.

    Inputs are distinct held-out digits with a little jitter: natural traffic, which fills
    the growing sets and the fingerprint history up to their caps.
    """
    from extauthz.demo.model import LinearModel, load_data
    from extauthz.demo.workspace import write_coverage_reference
    from extauthz.detect.pipeline import DetectionPipeline
    from extauthz.dialects.base import ParsedRequest, ParsedResponse

    model = LinearModel.train(0)
    held_out = load_data()[1]
    rng = np.random.default_rng(0)
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        write_coverage_reference(Path(tmp) / "coverage-reference.npy")
        policy = Path(tmp) / _PIPELINE_POLICY.name
        shutil.copyfile(_PIPELINE_POLICY, policy)
        snapshot = load_policy(policy)
        for count in queries:
            store = MemoryStore(clock=time.time)
            pipeline = DetectionPipeline(store, key=b"million-clients-key", clock=time.time)
            identity = Identity("ip:198.51.100.7", "anonymous", "anonymous")
            sent = 0
            while sent < count:
                n = min(batch, count - sent)
                rows = held_out[rng.integers(0, held_out.shape[0], n)]
                rows = np.clip(rows + rng.normal(0.0, 0.5, rows.shape), 0.0, 16.0)
                request = ParsedRequest(n, {"instances": rows}, None)
                response = ParsedResponse({"predictions": model.predict_proba(rows)}, None)
                await pipeline.observe(identity, request, response, snapshot)
                sent += n
            state = await store.load_detection(identity.client_id)
            by_detector = {k: len(v) for k, v in (state.detectors if state else {}).items()}
            sizes.append(DetectionSize(count, sum(by_detector.values()), by_detector))
    return sizes


def summary(runs: Sequence[StoreRun], sizes: Sequence[DetectionSize]) -> str:
    """Render the figures as plain text."""
    lines = []
    for run in runs:
        lines.append(f"{run.store}: {run.clients:,} clients (cap {run.max_clients:,})")
        for point in run.checkpoints:
            lines.append(
                f"  {point.clients:>9,} clients  {point.memory_bytes / 2**20:>8.1f} MiB"
                f"  held {point.held:>9,}  {point.elapsed_s:>7.1f} s"
            )
        lines.append(
            f"  bytes per held client {run.bytes_per_held_client:,.0f};"
            f" growth over the run {run.total_bytes / 2**20:,.1f} MiB;"
            f" refused {run.refused}, store degraded {run.degraded}"
        )
        if run.keys:
            lines.append(f"  keys {run.keys['counts']}")
            usage = {k: round(v) for k, v in run.keys["avg_memory_usage"].items()}
            lines.append(f"  MEMORY USAGE per key (avg) {usage}")
            lines.append(
                f"  registry bytes per member {run.keys.get('registry_bytes_per_member', 0):.0f}"
            )
    for size in sizes:
        lines.append(
            f"detection state after {size.queries:,} queries: {size.total_bytes:,} bytes"
            f" {size.by_detector}"
        )
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="extauthz-million-") as tmp:
        for name in args.stores:
            if name == "memory":
                runs.append(await run_memory(args.clients, _progress))
            else:
                runs.append(
                    await run_redis(
                        args.clients, _progress, concurrency=args.concurrency, workdir=Path(tmp)
                    )
                )
    sizes = await detection_sizes((1, 1_000, 10_000)) if args.detection else []
    print(summary(runs, sizes))
    return {
        "clients": args.clients,
        "runs": [asdict(run) for run in runs],
        "detection_state": [asdict(size) for size in sizes],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print a summary, write JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.million_clients", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--stores", default="memory,redis", help="comma-separated: memory,redis")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (redis)")
    parser.add_argument("--no-detection", dest="detection", action="store_false")
    parser.add_argument("--json", type=Path, default=Path("million-clients.json"))
    args = parser.parse_args(argv)
    args.stores = [s for s in args.stores.split(",") if s]
    if not args.stores or set(args.stores) - {"memory", "redis"} or args.clients < 1:
        parser.error("--stores takes memory and/or redis; --clients must be positive")
    # Level changes and store warnings log at info/warning: keep them out of the figures.
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    report = asyncio.run(_main(args))
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
