"""Redis faults under continuous load, on a real guard process and a real redis-server.

test_limits_faults.py breaks Redis between two bursts of Check calls. Here the load never
stops: Envoy-shaped requests (Check, then one ext_proc stream through request and response
bodies, with a watermark written to the evidence ledger) run from many clients while Redis is
killed and restarted, frozen with SIGSTOP, or blocked by ``DEBUG SLEEP``. Every call must be
answered (no RPC error, no hang) within Envoy's timeouts from ``envoy/envoy.yaml``, the store
decisions within the decision budget plus a small slack, the policy's store fail mode must
apply during the fault, and the store must decide again once Redis is back. Each test prints
its figures: requests during the fault, their outcomes, the slowest answers, recovery time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from extauthz.core.limiter import ChargeMode, LimitCharge
from extauthz.demo import stack
from extauthz.store.redis import RedisStore
from tests.integration.conftest import RedisProcess, start_redis, stop_redis
from tests.integration.service_fixtures import (
    ProcStream,
    check_request,
    ends_stream,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
    sha256_hex,
)

pytestmark = pytest.mark.redis

BUDGET_MS = 50
# A decision may overrun the budget by the time the event loop takes to notice the timeout:
# the histogram bucket at budget + slack must hold the store-bound decisions (see OVERRUN_SHARE).
SLACK_MS = 50
# A call that takes this long has hung: far past any timeout Envoy would wait.
HANG_S = 5.0
CLASSES = 10
INSTANCES = 4
PROBES = 8
PROBE_RATE = 6  # per minute, tier `tight`
REPLICAS = 2
LOAD_CLIENTS = 6
# Each client's pause between requests: a steady load that leaves the two cores some air.
PACE_S = 0.01
# Decisions allowed over budget + slack, or over Envoy's timeout: a host stall (CPU starvation
# on a shared machine, not Redis) delays at most one in-flight decision per load client, plus
# a sliver of the rest. A guard waiting on a stopped Redis overruns on every request instead.
OVERRUN_SHARE = 0.01
# Share of store decisions required once Redis is back (the rest: budget overruns from starvation).
RECOVERED_SHARE = 0.9


def _seconds(text: str) -> float:
    """Turn an Envoy duration (``0.25s``, ``1s``) into seconds."""
    return float(text.removesuffix("s"))


def envoy_filters() -> dict[str, dict[str, Any]]:
    """The HTTP filters of the reference Envoy config (``envoy/envoy.yaml``), by name."""
    config = yaml.safe_load(stack.ENVOY_YAML.read_text(encoding="utf-8"))
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in manager["http_filters"]}


_FILTERS = envoy_filters()
CHECK_TIMEOUT_S = _seconds(_FILTERS["envoy.filters.http.ext_authz"]["grpc_service"]["timeout"])
MESSAGE_TIMEOUT_S = _seconds(_FILTERS["envoy.filters.http.ext_proc"]["message_timeout"])
PROBE_KEYS = {phase: f"probe-{phase}-key" for phase in ("before", "during", "after")}


def _policy(mode: str) -> str:
    keys = "\n".join(
        f"    - {{name: probe-{phase}, tier: tight, sha256: {sha256_hex(key)}}}"
        for phase, key in PROBE_KEYS.items()
    )
    return f"""\
version: 1
identity:
  api_keys:
{keys}
tiers:
  anonymous:
    max_instances: {INSTANCES * 2}
    limits:
      - {{name: requests, unit: requests, rate: 1000000, per: minute}}
      - {{name: instances, unit: instances, rate: 1000000, per: minute}}
    output: {{policy: round, decimals: 3}}
    watermark: {{label_rate: 0.5}}
  tight:
    max_instances: {INSTANCES * 2}
    limits: [{{name: per-minute, unit: requests, rate: {PROBE_RATE}, per: minute}}]
fail_modes: {{store: {mode}}}
"""


# --- the load ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One call the load made: Check, or one message of an ext_proc stream."""

    kind: str  # "check" or "process"
    started: float  # time.monotonic()
    elapsed_s: float
    outcome: str  # allowed, allowed_degraded, 429, 503, continue, rpc_<CODE>, ...


def _check_outcome(response: auth_pb2.CheckResponse) -> str:
    if response.HasField("denied_response"):
        return str(response.denied_response.status.code)
    reasons = response.dynamic_metadata.fields["reasons"].string_value
    return "allowed_degraded" if "store_unavailable" in reasons else "allowed"


def _process_outcome(response: proc_pb2.ProcessingResponse) -> str:
    if response.HasField("immediate_response"):
        return str(response.immediate_response.status.code)
    return "continue"


def predictions(rows: int, seed: int) -> list[list[float]]:
    """A model's answer: ``rows`` probability rows over ``CLASSES``, top class set by ``seed``."""
    out = []
    for i in range(rows):
        row = [0.5 / (CLASSES - 1)] * CLASSES
        row[(seed + i) % CLASSES] = 0.5
        out.append(row)
    return out


def model_bodies(serial: int) -> tuple[bytes, bytes]:
    """A KServe v1 request of ``INSTANCES`` rows unique to ``serial``, and the model's answer."""
    rows = [[float(serial), float(i), 0.5] for i in range(INSTANCES)]
    return (
        json.dumps({"instances": rows}).encode(),
        json.dumps({"predictions": predictions(INSTANCES, serial)}).encode(),
    )


def scrape(http_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape of the guard's /metrics, keyed by name and sorted labels."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass
class Load:
    """Envoy-shaped requests from ``clients`` concurrent loops, each call kept with its timing.

    One request is what Envoy sends for a model call: Check, then (if allowed) an ext_proc
    stream of request_headers (with Check's metadata), request_body, response_headers and
    response_body, each message answered before the next, as in BUFFERED mode.
    """

    channel: grpc.aio.Channel
    clients: int = LOAD_CLIENTS
    calls: list[Call] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        authz = auth_grpc.AuthorizationStub(self.channel)
        extproc = proc_grpc.ExternalProcessorStub(self.channel)
        self._tasks = [
            asyncio.create_task(self._loop(authz, extproc, worker))
            for worker in range(self.clients)
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def window(self, kind: str, start: float, end: float = float("inf")) -> list[Call]:
        """Calls of ``kind`` that started at or after ``start`` and ended before ``end``."""
        return [
            c
            for c in self.calls
            if c.kind == kind and c.started >= start and c.started + c.elapsed_s < end
        ]

    async def wait_for(self, kind: str, outcome: str, after: float, timeout_s: float) -> float:
        """Return the start time of the first ``kind`` call after ``after`` answered ``outcome``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hits = [c.started for c in self.window(kind, after) if c.outcome == outcome]
            if hits:
                return min(hits)
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind} call answered {outcome} within {timeout_s}s")

    async def _loop(
        self,
        authz: auth_grpc.AuthorizationStub,
        extproc: proc_grpc.ExternalProcessorStub,
        worker: int,
    ) -> None:
        for serial in range(100_000):  # bounded: the test stops it long before
            if self._stop.is_set():
                return
            address = f"127.1.{worker}.{serial % 200 + 1}"
            started = time.monotonic()
            try:
                response = await authz.Check(check_request(address=address), timeout=HANG_S)
                outcome = _check_outcome(response)
            except grpc.aio.AioRpcError as exc:
                response, outcome = None, f"rpc_{exc.code().name}"
            self.calls.append(Call("check", started, time.monotonic() - started, outcome))
            if response is not None and outcome.startswith("allowed"):
                await self._process(extproc, address, response, worker * 100_000 + serial)
            await asyncio.sleep(PACE_S)

    async def _process(
        self,
        extproc: proc_grpc.ExternalProcessorStub,
        address: str,
        check: auth_pb2.CheckResponse,
        serial: int,
    ) -> None:
        request, answer = model_bodies(serial)
        messages = [
            proc_request_headers(source=f"{address}:5555", check_metadata=check.dynamic_metadata),
            proc_request_body(request),
            proc_response_headers(),
            proc_response_body(answer),
        ]
        stream = ProcStream(extproc, timeout_s=HANG_S)
        for message in messages:
            started = time.monotonic()
            try:
                response = await stream.send(message)
            except (grpc.aio.AioRpcError, AssertionError, TimeoutError) as exc:
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "NO_ANSWER"
                self.calls.append(
                    Call("process", started, time.monotonic() - started, f"rpc_{code}")
                )
                stream.call.cancel()
                return
            self.calls.append(
                Call("process", started, time.monotonic() - started, _process_outcome(response))
            )
            if ends_stream(response):
                break
        try:
            code = await stream.finish()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        if code != grpc.StatusCode.OK:
            self.calls.append(Call("process", time.monotonic(), 0.0, f"rpc_{code.name}"))


# --- the guard and its metrics -------------------------------------------------------------------


@dataclass
class Guard:
    """A running ``extauthz serve`` on Redis."""

    proc: stack.Process
    grpc_port: int
    http_port: int

    def errors(self, reason: str) -> float:
        return scrape(self.http_port).get(("extauthz_errors_total", (("reason", reason),)), 0.0)

    def evidence(self) -> float:
        """Marked answers handed to the evidence ledger so far."""
        return scrape(self.http_port).get(("extauthz_evidence_records_total", ()), 0.0)

    def decisions_over(self, path: str, bound_s: float) -> tuple[int, int]:
        """Return (decisions on ``path`` slower than ``bound_s``, all of them), from the histogram."""
        samples = scrape(self.http_port)
        total = samples.get(("extauthz_decision_seconds_count", (("path", path),)), 0.0)
        within = samples.get(
            ("extauthz_decision_seconds_bucket", (("le", repr(bound_s)), ("path", path))), 0.0
        )
        return int(total - within), int(total)

    def assert_healthy(self) -> None:
        """Alive, and no handler failed: nothing crashed."""
        assert self.proc.alive(), self.proc.tail()
        assert self.errors("internal_error") == 0, self.proc.tail()
        streams = scrape(self.http_port).get(
            ("extauthz_streams_total", (("outcome", "aborted"),)), 0.0
        )
        assert streams == 0, self.proc.tail()
        assert "Traceback" not in self.proc.output(), self.proc.tail()


@pytest.fixture
def guard_for(tmp_path: Path) -> Iterator[Any]:
    """Start guards on a Redis with a given store fail mode; stop them after the test."""
    started: list[stack.Process] = []

    def start(redis_server: RedisProcess, mode: str) -> Guard:
        policy = tmp_path / "policy.yaml"
        policy.write_text(_policy(mode), encoding="utf-8")
        grpc_port, http_port = stack.free_port(), stack.free_port()
        proc = stack.start_guard(
            policy=policy,
            grpc_port=grpc_port,
            http_port=http_port,
            workdir=tmp_path / "guard",
            extra_args=[
                "--store",
                redis_server.url,
                "--budget-ms",
                str(BUDGET_MS),
                "--replicas",
                str(REPLICAS),
                "--drain-s",
                "0",
            ],
        )
        started.append(proc)
        return Guard(proc, grpc_port, http_port)

    yield start
    for proc in started:
        proc.stop()


def _stream_length(server: RedisProcess, *, until: float, timeout_s: float = 10.0) -> int:
    """The evidence stream's length once it reaches ``until`` (the write-behind retries with
    backoff) or ``timeout_s`` passes."""
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            length = int(client.xlen("extauthz:evidence"))
            if length >= until or time.monotonic() > deadline:
                return length
            time.sleep(0.1)
    finally:
        client.close()


async def _probe(channel: grpc.aio.Channel, phase: str) -> dict[str, int]:
    """Send ``PROBES`` Checks as the tight-tier client of ``phase`` (6 per minute); count answers."""
    authz = auth_grpc.AuthorizationStub(channel)
    seen: Counter[str] = Counter()
    for _ in range(PROBES):
        request = check_request({"x-api-key": PROBE_KEYS[phase]}, address="127.9.9.9")
        seen[_check_outcome(await authz.Check(request, timeout=HANG_S))] += 1
    return dict(seen)


def _outage_probe(mode: str) -> dict[str, int]:
    """What the tight client gets with Redis down, by fail mode."""
    if mode == "fail_open":
        return {"allowed_degraded": PROBES}
    if mode == "fail_closed":
        return {"503": PROBES}
    # local: each replica enforces rate / replicas on its own.
    local = PROBE_RATE // REPLICAS
    return {"allowed_degraded": local, "429": PROBES - local}


# Outcomes a call that started and ended inside the fault may have, by fail mode.
_DURING: dict[str, dict[str, set[str]]] = {
    "fail_open": {"check": {"allowed_degraded"}, "process": {"continue"}},
    "fail_closed": {"check": {"503"}, "process": {"continue", "503"}},
    "local": {"check": {"allowed_degraded"}, "process": {"continue"}},
}


@dataclass
class Fault:
    """What one fault did to the load: the calls in each window, timings and counters."""

    name: str
    during_check: list[Call]
    during_process: list[Call]
    all_calls: list[Call]
    recovery_s: float
    store_errors: float
    ledger_errors: float
    probe: dict[str, int]

    def report(self, mode: str) -> str:
        checks = Counter(c.outcome for c in self.during_check)
        bodies = Counter(c.outcome for c in self.during_process)
        slowest_check = max(c.elapsed_s for c in self.all_calls if c.kind == "check")
        slowest_message = max(
            (c.elapsed_s for c in self.all_calls if c.kind == "process"), default=0.0
        )
        return (
            f"{mode}/{self.name}: {len(self.during_check)} requests during the fault "
            f"{dict(checks)}, ext_proc messages {dict(bodies)}; slowest Check "
            f"{slowest_check * 1000:.0f} ms, slowest ext_proc message "
            f"{slowest_message * 1000:.0f} ms; store errors {self.store_errors:.0f}, "
            f"ledger errors {self.ledger_errors:.0f}; store decides again "
            f"{self.recovery_s * 1000:.0f} ms after Redis is back"
        )


def _assert_answered(calls: list[Call]) -> None:
    """Every call was answered: no RPC error, no stream cut, nothing past ``HANG_S``."""
    failed = Counter(c.outcome for c in calls if c.outcome.startswith("rpc_"))
    assert not failed, failed


# Decision paths and Envoy's timeout for each (a histogram bucket bound, too).
DECIDING_PATHS = {
    "check": CHECK_TIMEOUT_S,
    "ext_proc_request_body": MESSAGE_TIMEOUT_S,
    "ext_proc_response_body": MESSAGE_TIMEOUT_S,
}


def _assert_within_budget(guard: Guard, mode: str) -> None:
    """No decision made Envoy wait past its timeout, and all but a sliver stayed within the
    budget plus slack (the sliver: CPU starvation on a shared machine, not Redis)."""
    for path, envoy_timeout_s in DECIDING_PATHS.items():
        over_slack, total = guard.decisions_over(path, (BUDGET_MS + SLACK_MS) / 1000)
        over_envoy, _ = guard.decisions_over(path, envoy_timeout_s)
        print(
            f"{mode}: {path} decisions over {BUDGET_MS} + {SLACK_MS} ms: {over_slack}/{total},"
            f" over Envoy's {envoy_timeout_s * 1000:.0f} ms: {over_envoy}"
        )
        assert total > 0
        assert over_envoy <= LOAD_CLIENTS
        assert over_slack <= LOAD_CLIENTS + OVERRUN_SHARE * total


async def _under_fault(
    guard: Guard,
    load: Load,
    mode: str,
    name: str,
    *,
    begin: Callable[[], object],
    end: Callable[[], object],
    during: Callable[[], Awaitable[dict[str, int]]] | None = None,
    hold_s: float = 1.0,
) -> Fault:
    """Run ``begin`` (the fault) under load for ``hold_s``, with ``during`` (a probe) meanwhile,
    then ``end`` (the repair); measure how long the store takes to decide again."""
    store_errors = guard.errors("store_unavailable")
    ledger_errors = guard.errors("ledger_unavailable")
    await asyncio.sleep(0.3)  # the load runs with a healthy Redis first
    await asyncio.to_thread(begin)
    fault_at = time.monotonic()
    probe = await during() if during is not None else {}
    await asyncio.sleep(max(0.0, hold_s - (time.monotonic() - fault_at)))
    repaired_at = time.monotonic()
    await asyncio.to_thread(end)
    back_at = time.monotonic()
    recovered_at = await load.wait_for("check", "allowed", back_at, timeout_s=10.0)
    return Fault(
        name=name,
        during_check=load.window("check", fault_at, repaired_at),
        during_process=load.window("process", fault_at, repaired_at),
        all_calls=load.window("check", fault_at) + load.window("process", fault_at),
        recovery_s=max(0.0, recovered_at - back_at),
        store_errors=guard.errors("store_unavailable") - store_errors,
        ledger_errors=guard.errors("ledger_unavailable") - ledger_errors,
        probe=probe,
    )


def _assert_fail_mode(fault: Fault, mode: str) -> None:
    """During the fault, Check and ext_proc answered as the store fail mode says, and the
    errors were counted."""
    assert fault.during_check, "no request ran during the fault"
    checks = Counter(c.outcome for c in fault.during_check)
    assert set(checks) <= _DURING[mode]["check"], (fault.name, checks)
    bodies = Counter(c.outcome for c in fault.during_process)
    assert set(bodies) <= _DURING[mode]["process"], (fault.name, bodies)
    assert fault.store_errors >= len(fault.during_check)


def _assert_store_back(load: Load, since: float) -> None:
    """After recovery, decisions are the store's again (all but budget overruns)."""
    checks = Counter(c.outcome for c in load.window("check", since))
    assert checks["allowed"] >= RECOVERED_SHARE * checks.total(), checks
    bodies = Counter(c.outcome for c in load.window("process", since))
    assert bodies["continue"] >= RECOVERED_SHARE * bodies.total(), bodies


class TestRedisKilled:
    """Redis killed with SIGKILL and restarted on its port, under load, in each store fail mode."""

    @pytest.mark.parametrize("mode", ["fail_open", "fail_closed", "local"])
    async def test_killed_and_restarted(self, tmp_path: Path, guard_for: Any, mode: str) -> None:
        server = start_redis(tmp_path / "redis")
        guard: Guard = guard_for(server, mode)
        holder = {"redis": server}
        handed_at_kill: list[float] = []

        def kill() -> None:
            holder["redis"].process.kill()
            holder["redis"].process.wait(timeout=5)
            # Counted once Redis is gone: a mark written just before the kill died with it
            # (no persistence here; the durability tests run with AOF).
            handed_at_kill.append(guard.evidence())

        def restart() -> None:
            holder["redis"] = start_redis(tmp_path / "redis", port=server.port)

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{guard.grpc_port}") as channel:
                assert await _probe(channel, "before") == {"allowed": 6, "429": 2}
                load = Load(channel)
                load.start()
                try:
                    fault = await _under_fault(
                        guard,
                        load,
                        mode,
                        "kill",
                        begin=kill,
                        end=restart,
                        during=lambda: _probe(channel, "during"),
                    )
                    await asyncio.sleep(0.3)
                    after = time.monotonic()
                    await asyncio.sleep(0.7)
                finally:
                    await load.stop()
                probe_after = await _probe(channel, "after")
            print("\n" + fault.report(mode))
            _assert_answered(load.calls)
            _assert_fail_mode(fault, mode)
            _assert_within_budget(guard, mode)
            assert fault.probe == _outage_probe(mode)
            _assert_store_back(load, after)
            # The restarted Redis (no persistence) decides limits again from scratch.
            assert probe_after == {"allowed": 6, "429": 2}
            if mode != "fail_closed":
                # Answers were served while Redis was gone: their marks waited, and every one
                # handed to the ledger since the kill is in the new Redis's stream.
                assert fault.ledger_errors > 0
                handed = guard.evidence() - handed_at_kill[0]
                assert handed > 0
                stored = _stream_length(holder["redis"], until=handed)
                print(f"evidence handed since the kill {handed:.0f}, in the new stream {stored}")
                assert stored >= handed
            guard.assert_healthy()
        finally:
            stop_redis(holder["redis"])


class TestRedisSlow:
    """Redis frozen (SIGSTOP) then blocked (DEBUG SLEEP) under load: no decision waits past the
    budget, the fail mode applies, and the store decides again once Redis answers."""

    @pytest.mark.parametrize("mode", ["fail_open", "fail_closed", "local"])
    async def test_stopped_and_sleeping(self, tmp_path: Path, guard_for: Any, mode: str) -> None:
        server = start_redis(tmp_path / "redis", "--enable-debug-command", "local")
        guard: Guard = guard_for(server, mode)
        # Redis blocks this long; the test watches the first 0.8 s of it, leaving a margin
        # for noticing that the block began.
        sleep_s = 1.5
        sleeper: list[threading.Thread] = []

        def debug_sleep() -> None:
            def block() -> None:
                with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=10) as client:
                    client.execute_command("DEBUG", "SLEEP", str(sleep_s))

            thread = threading.Thread(target=block)
            thread.start()
            sleeper.append(thread)
            # The fault begins once Redis stops answering, not when the command is sent.
            with redis.Redis(
                host="127.0.0.1", port=server.port, socket_timeout=0.02, retry=Retry(NoBackoff(), 0)
            ) as probe:
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    try:
                        probe.ping()
                    except redis.TimeoutError:
                        return
                    time.sleep(0.005)
            raise AssertionError("DEBUG SLEEP did not block Redis")

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{guard.grpc_port}") as channel:
                load = Load(channel)
                load.start()
                try:
                    stopped = await _under_fault(
                        guard,
                        load,
                        mode,
                        "sigstop",
                        begin=lambda: server.process.send_signal(signal.SIGSTOP),
                        end=lambda: server.process.send_signal(signal.SIGCONT),
                    )
                    slept = await _under_fault(
                        guard,
                        load,
                        mode,
                        "debug_sleep",
                        begin=debug_sleep,
                        # DEBUG SLEEP ends by itself: the repair is waiting for it.
                        end=lambda: sleeper[0].join(timeout=10),
                        hold_s=0.8,
                    )
                    await asyncio.sleep(0.3)
                    after = time.monotonic()
                    await asyncio.sleep(0.7)
                finally:
                    await load.stop()
            print("\n" + stopped.report(mode) + "\n" + slept.report(mode))
            _assert_answered(load.calls)
            for fault in (stopped, slept):
                _assert_fail_mode(fault, mode)
            _assert_within_budget(guard, mode)
            _assert_store_back(load, after)
            guard.assert_healthy()
        finally:
            stop_redis(server)


class TestRestartWithoutTraffic:
    """Redis restarts while the guard is idle: its pooled connections are dead and the new
    server has no scripts loaded; the first decision after must still be the store's."""

    async def test_first_record_after_a_quiet_restart(self, tmp_path: Path) -> None:
        server = start_redis(tmp_path / "redis")
        store = RedisStore.from_url(server.url, timeout_s=2.0, clock=time.time)
        try:
            charge = [LimitCharge("c:quiet", "tier:per-hour", 600.0, 6, 1, ChargeMode.CHARGE)]
            first = await store.record(
                "quiet", tier="t", requests=1, instances=0, now=time.time(), limits=charge
            )
            server.process.kill()
            server.process.wait(timeout=5)
            server = start_redis(tmp_path / "redis", port=server.port)
            # A fresh Redis: the client is new to it, its limit untouched.
            again = await store.record(
                "quiet", tier="t", requests=1, instances=0, now=time.time(), limits=charge
            )
            assert (first.requests, again.requests) == (1, 1)
            assert again.limits[0].allowed and again.limits[0].remaining == 5
        finally:
            await store.close()
            stop_redis(server)
