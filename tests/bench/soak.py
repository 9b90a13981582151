"""A bounded soak through the real Envoy, guard and demo model: many clients at a steady rate.

The stack is ``extauthz.demo.local.LocalStack`` (the reference ``envoy/envoy.yaml`` on free
ports, the demo model as upstream) with the soak policy below: detection on, keyed noise,
rounding and watermarks on the anonymous tier, request and instance limits. Clients are
anonymous, so the guard keys them by the address Envoy computed: each client connects from its
own loopback source address (127.1.0.0 upwards; Linux routes all of 127/8 to lo), which yields
as many distinct client ids as ``--clients``.

The load is open-loop: request ``i`` is due at ``i / rate`` seconds, whoever answered before
(at most ``--max-in-flight`` outstanding). Each request is one HTTP/1.1 connection
(``Connection: close``) from its client's address. One hot client (127.0.0.2) sends 10
predicts per second (5 % of 200/s), twice its request limit: the 429 path. The rest, from the
many clients:

- ``--predict-share`` (30 %) a KServe predict of 1 to 4 held-out digits with a little jitter
  (Check + Process + model + detection + rewrite + watermark);
- 5 % a malformed predict body (the guard's 400);
- the rest ``GET /v2/health/ready`` (Check only).

It reports the guard's RSS (``/proc/<pid>/status``) before and after a short warm-up and at
the end (and every progress tick), requests sent, status code counts, latency percentiles,
transport errors, the distinct client ids Envoy's access log names, and the ERROR or exception
lines in the guard's captured log.

Run as ``python -m tests.bench.soak [--duration 600] [--rate 200] [--clients 5000]
[--store memory|redis] [--json soak.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extauthz.demo import stack
from extauthz.demo.local import LocalStack
from tests.bench.run_bench import tree_cpu_s

KSERVE = "/v1/models/digits:predict"
HEALTH = "/v2/health/ready"
HOT_CLIENT = "127.0.0.2"
_FIRST_CLIENT = int(ipaddress.IPv4Address("127.1.0.0"))
_MAX_CLIENTS = 2**22  # 127.1.0.0 .. 127.64.255.255
# Share of the many clients' requests with a malformed body (predicts: SoakOptions).
MALFORMED_SHARE = 0.05
# The hot client sends this many requests per second (its limit is 5/s), at most a quarter.
HOT_RATE = 10.0
_BODY_POOL = 4096
_MALFORMED_BODY = b'{"instances": [[1.0, 2.0'
_WARMUP_REQUESTS = 100

SOAK_POLICY = """\
# The soak's policy: the whole pipeline runs for anonymous clients (keyed by address).
version: 1
mode: enforce
tiers:
  anonymous:
    max_instances: 16
    output:
      - {policy: keyed_noise, scale: 0.3}
      - {policy: round, decimals: 3}
    watermark: {label_rate: 0.02, soft: true, soft_epsilon: 0.05}
    limits:
      - {name: burst, unit: requests, rate: 5, per: second, burst: 20}
      - {name: daily, unit: instances, rate: 5000, per: day}
      - {name: network, unit: instances, rate: 10000000, per: day, scope: subnet}
levels: {normal: allow, elevated: allow, suspicious: challenge, abusive: block}
detection:
  enabled: true
  input_scale: 16
  margin_baseline: 0.011
  coverage_reference: coverage-reference.npy
"""


def rss_bytes(pid: int | str = "self") -> int:
    """Return the resident set size of process ``pid`` (``VmRSS`` in ``/proc``), in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"no VmRSS for process {pid}")
    return int(match.group(1)) * 1024


def client_address(index: int) -> str:
    """Return the loopback source address of soak client ``index``."""
    if not 0 <= index < _MAX_CLIENTS:
        raise ValueError(f"client index {index} out of range")
    return str(ipaddress.IPv4Address(_FIRST_CLIENT + index))


@dataclass(frozen=True, slots=True)
class LogCount:
    """Lines of a guard log by severity, and a few error lines to show."""

    errors: int
    warnings: int
    error_samples: tuple[str, ...]
    warning_events: dict[str, int]


def count_log_lines(text: str, *, samples: int = 5) -> LogCount:
    """Count ERROR / CRITICAL / exception lines (JSON events and stdlib lines) and warnings."""
    errors = warnings = 0
    shown: list[str] = []
    warning_events: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        level, event = "", ""
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                level = str(record.get("level", "")).lower()
                event = str(record.get("event", ""))
                if "exception" in record:
                    level = "error"
        else:
            first = line.split(" ", 1)[0]
            if first in ("ERROR", "CRITICAL", "WARNING"):
                level = first.lower()
            elif "Traceback (most recent call last)" in line:
                level = "error"
        if level in ("error", "critical", "exception"):
            errors += 1
            if len(shown) < samples:
                shown.append(line[:500])
        elif level in ("warning", "warn"):
            warnings += 1
            warning_events[event or line[:80]] += 1
    return LogCount(errors, warnings, tuple(shown), dict(warning_events))


def access_log_clients(text: str) -> set[str]:
    """Return the distinct client ids Check named in Envoy's JSON access log."""
    clients = set()
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        client = record.get("authz_client") if isinstance(record, dict) else None
        if isinstance(client, str) and client:
            clients.add(client)
    return clients


@dataclass(frozen=True, slots=True)
class SoakOptions:
    """What one soak run does."""

    duration_s: float = 600.0
    rate: float = 200.0
    clients: int = 5000
    predict_share: float = 0.3
    store: str = "memory"
    seed: int = 0
    max_in_flight: int = 128
    timeout_s: float = 10.0
    progress_s: float = 30.0


@dataclass
class SoakReport:
    """The figures of one soak run (times in seconds, sizes in bytes, latency in ms)."""

    options: dict[str, Any]
    requests_planned: int = 0
    requests_sent: int = 0
    load_duration_s: float = 0.0
    achieved_rate: float = 0.0
    status_counts: dict[str, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    planned_clients: int = 0
    distinct_clients: int = 0
    rss_before_warmup: int = 0
    rss_start: int = 0
    rss_end: int = 0
    rss_max: int = 0
    rss_timeline: list[tuple[float, int]] = field(default_factory=list)
    guard_cpu_s: float = 0.0
    """User + system CPU seconds of the guard during the load (from /proc)."""
    load_generator_cpu_s: float = 0.0
    loadavg_start: str = ""
    loadavg_end: str = ""
    """The host's /proc/loadavg: the guard shares the cores with whatever else runs."""
    guard_alive: bool = True
    errors_logged: int = 0
    warnings_logged: int = 0
    error_samples: list[str] = field(default_factory=list)
    warning_events: dict[str, int] = field(default_factory=dict)

    @property
    def server_errors(self) -> int:
        """Answers with a 5xx status."""
        return sum(n for code, n in self.status_counts.items() if code.startswith("5"))

    @property
    def rss_growth(self) -> int:
        return self.rss_end - self.rss_start

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["server_errors"] = self.server_errors
        out["rss_growth"] = self.rss_growth
        return out


@dataclass(frozen=True, slots=True)
class _Request:
    source: str
    method: str
    path: str
    body: bytes


class _Plan:
    """The requests of the soak, drawn from a seeded generator as they fall due."""

    def __init__(self, options: SoakOptions) -> None:
        from extauthz.demo.model import load_data

        self._rng = np.random.default_rng(options.seed)
        self._clients = options.clients
        self._predict_share = options.predict_share
        self._hot_share = min(HOT_RATE / options.rate, 0.25)
        held_out = load_data()[1]
        bodies = []
        for _ in range(_BODY_POOL):
            rows = held_out[self._rng.integers(0, held_out.shape[0], self._rng.integers(1, 5))]
            rows = np.clip(rows + self._rng.normal(0.0, 0.5, rows.shape), 0.0, 16.0).round(2)
            bodies.append(json.dumps({"instances": rows.tolist()}).encode())
        self._bodies = bodies
        self.used_clients: set[int] = set()

    def next(self) -> _Request:
        draw = self._rng.random()
        body = self._bodies[int(self._rng.integers(0, len(self._bodies)))]
        if draw < self._hot_share:
            return _Request(HOT_CLIENT, "POST", KSERVE, body)
        draw = self._rng.random()
        index = int(self._rng.integers(0, self._clients))
        self.used_clients.add(index)
        source = client_address(index)
        if draw < MALFORMED_SHARE:
            return _Request(source, "POST", KSERVE, _MALFORMED_BODY)
        if draw < MALFORMED_SHARE + self._predict_share:
            return _Request(source, "POST", KSERVE, body)
        return _Request(source, "GET", HEALTH, b"")


async def send(port: int, request: _Request, *, timeout_s: float) -> int:
    """Send one request on its own connection from the request's source address; return the
    status code (raises OSError or TimeoutError)."""
    head = (
        f"{request.method} {request.path} HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n"
        f"content-type: application/json\r\ncontent-length: {len(request.body)}\r\n\r\n"
    )
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(request.source, 0)
        )
        try:
            writer.write(head.encode() + request.body)
            await writer.drain()
            answer = await reader.read()
        finally:
            writer.close()
    status_line = answer.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"bad status line {answer[:80]!r}")
    return int(status_line[1])


class _Load:
    """Run the open-loop load and keep its counts."""

    def __init__(self, port: int, options: SoakOptions, plan: _Plan) -> None:
        self.port = port
        self.options = options
        self.plan = plan
        self.sent = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self._slots = asyncio.Semaphore(options.max_in_flight)

    async def _one(self, request: _Request) -> None:
        start = time.perf_counter()
        try:
            status = await send(self.port, request, timeout_s=self.options.timeout_s)
        except TimeoutError:
            self.errors["timeout"] += 1
        except OSError as exc:
            self.errors[type(exc).__name__] += 1
        else:
            self.statuses[str(status)] += 1
            self.latencies.append((time.perf_counter() - start) * 1000.0)
        finally:
            self._slots.release()

    async def run(self, count: int, rate: float, tick: Callable[[float], None] | None) -> float:
        """Send ``count`` requests at ``rate`` per second; return the seconds it took."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time()
        next_tick = self.options.progress_s
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._slots.acquire()
            task = asyncio.create_task(self._one(self.plan.next()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            self.sent += 1
            elapsed = loop.time() - start
            if tick is not None and elapsed >= next_tick:
                tick(elapsed)
                next_tick += self.options.progress_s
        if tasks:
            await asyncio.gather(*tasks)
        return loop.time() - start


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(array.max())}


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def start_redis_server(workdir: Path, port: int, *, timeout_s: float = 10.0) -> stack.Process:
    """Start a private redis-server without persistence and wait until it accepts."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise stack.StackError("redis-server not found: apt-get install redis-server")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    proc = stack.start_process(f"redis-{port}", [*argv, "no"], workdir=workdir)
    try:
        stack.wait_tcp(port, timeout_s=timeout_s, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def run_soak(
    options: SoakOptions,
    *,
    workdir: Path,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """Start the stack in ``workdir``, run the load, stop the stack and return the figures."""
    from extauthz.demo.workspace import write_coverage_reference

    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "soak-policy.yaml"
    policy.write_text(SOAK_POLICY, encoding="utf-8")
    write_coverage_reference(workdir / "coverage-reference.npy")
    report = SoakReport(options=dataclasses.asdict(options))
    plan = _Plan(options)
    redis_proc = None
    guard_args: list[str] = []
    if options.store == "redis":
        redis_port = stack.free_port()
        redis_proc = start_redis_server(workdir, redis_port)
        guard_args = ["--store", f"redis://127.0.0.1:{redis_port}/0"]
    local = LocalStack(policy=policy, workdir=workdir, guard_args=guard_args)
    try:
        local.start()
        assert local.guard is not None and local.envoy is not None
        guard = local.guard
        report.rss_before_warmup = rss_bytes(guard.pid)
        warmup = _Load(local.ports.listener, options, plan)
        asyncio.run(warmup.run(_WARMUP_REQUESTS, min(options.rate, 100.0), None))
        report.rss_start = rss_bytes(guard.pid)
        count = max(1, round(options.duration_s * options.rate))
        load = _Load(local.ports.listener, options, plan)
        report.rss_timeline.append((0.0, report.rss_start))

        def tick(elapsed: float) -> None:
            rss = rss_bytes(guard.pid) if guard.alive() else 0
            report.rss_timeline.append((round(elapsed, 1), rss))
            if progress is None:
                return
            five = sum(n for code, n in load.statuses.items() if code.startswith("5"))
            p99 = np.percentile(load.latencies[-5000:], 99) if load.latencies else 0.0
            progress(
                f"soak {elapsed:5.0f}/{options.duration_s:.0f} s: {load.sent:,} sent"
                f" ({load.sent / max(elapsed, 1e-9):.0f}/s), statuses {dict(load.statuses)},"
                f" 5xx {five}, transport errors {sum(load.errors.values())},"
                f" p99 {p99:.0f} ms, guard RSS {rss / 2**20:.0f} MiB"
            )

        cpu_start = tree_cpu_s(guard.pid)
        own_start = time.process_time()
        report.loadavg_start = _loadavg()
        report.load_duration_s = asyncio.run(load.run(count, options.rate, tick))
        report.load_generator_cpu_s = time.process_time() - own_start
        report.loadavg_end = _loadavg()
        report.guard_alive = guard.alive()
        if report.guard_alive:
            report.guard_cpu_s = tree_cpu_s(guard.pid) - cpu_start
            report.rss_end = rss_bytes(guard.pid)
            report.rss_timeline.append((round(report.load_duration_s, 1), report.rss_end))
        report.requests_planned = count
        report.requests_sent = load.sent
        report.achieved_rate = load.sent / max(report.load_duration_s, 1e-9)
        report.status_counts = dict(sorted(load.statuses.items()))
        report.transport_errors = dict(load.errors)
        report.latency_ms = _percentiles(load.latencies)
        report.rss_max = max(rss for _, rss in report.rss_timeline)
        # Let Envoy flush its access log (100 ms interval) before reading it.
        time.sleep(0.5)
        report.planned_clients = len(plan.used_clients) + 1  # + the hot client
        seen = access_log_clients(local.envoy.output())
        report.distinct_clients = sum(1 for c in seen if c.startswith("ip:127."))
        counted = count_log_lines(guard.output())
        report.errors_logged = counted.errors
        report.warnings_logged = counted.warnings
        report.error_samples = list(counted.error_samples)
        report.warning_events = counted.warning_events
    finally:
        local.stop()
        if redis_proc is not None:
            redis_proc.stop()
    return report


def format_report(report: SoakReport) -> str:
    """Render the figures as plain text."""
    mib = 2**20
    lat = report.latency_ms
    return "\n".join(
        [
            f"requests sent {report.requests_sent:,} of {report.requests_planned:,}"
            f" in {report.load_duration_s:.0f} s ({report.achieved_rate:.1f}/s)",
            f"status codes {report.status_counts}; 5xx {report.server_errors};"
            f" transport errors {report.transport_errors}",
            f"latency p50 {lat.get('p50', 0):.1f} ms, p90 {lat.get('p90', 0):.1f} ms,"
            f" p99 {lat.get('p99', 0):.1f} ms, max {lat.get('max', 0):.1f} ms",
            f"distinct client ids {report.distinct_clients:,} (planned {report.planned_clients:,})",
            f"guard RSS {report.rss_before_warmup / mib:.1f} MiB before warm-up,"
            f" {report.rss_start / mib:.1f} at start, {report.rss_end / mib:.1f} at end,"
            f" max {report.rss_max / mib:.1f} (growth {report.rss_growth / mib:+.1f} MiB)",
            f"guard CPU {report.guard_cpu_s:.1f} s"
            f" ({report.guard_cpu_s / max(report.load_duration_s, 1e-9):.0%} of a core);"
            f" load generator CPU {report.load_generator_cpu_s:.1f} s;"
            f" loadavg {report.loadavg_start} -> {report.loadavg_end}",
            f"guard alive {report.guard_alive}; errors logged {report.errors_logged};"
            f" warnings {report.warnings_logged} {report.warning_events}",
            *(f"  error: {line}" for line in report.error_samples),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak, print the figures, write JSON; return 1 on 5xx, errors or a dead guard."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--clients", type=int, default=5000, help="distinct anonymous clients")
    parser.add_argument(
        "--predict-share", type=float, default=0.3, help="share of predicts (the rest: Checks)"
    )
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-in-flight", type=int, default=128)
    parser.add_argument("--progress", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--json", type=Path, default=Path("soak.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or not 0 < args.clients < _MAX_CLIENTS:
        parser.error("--duration and --rate must be positive, --clients in 1 .. 2**22 - 1")
    if not 0 <= args.predict_share <= 1 - MALFORMED_SHARE:
        parser.error(f"--predict-share must be in 0 .. {1 - MALFORMED_SHARE}")
    options = SoakOptions(
        duration_s=args.duration,
        rate=args.rate,
        clients=args.clients,
        predict_share=args.predict_share,
        store=args.store,
        seed=args.seed,
        max_in_flight=args.max_in_flight,
        progress_s=args.progress,
    )
    with tempfile.TemporaryDirectory(prefix="extauthz-soak-") as tmp:
        workdir = args.workdir.resolve() if args.workdir else Path(tmp)

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        try:
            report = run_soak(options, workdir=workdir, progress=progress)
        except (stack.StackError, subprocess.SubprocessError, OSError) as exc:
            print(f"soak failed to run: {exc}", file=sys.stderr)
            return 1
    print(format_report(report))
    args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)
    failed = report.server_errors or report.errors_logged or not report.guard_alive
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
