"""Guard faults under load through the real Envoy with ``envoy/envoy.yaml``.

A steady load of model calls (Check, then ext_proc through both bodies) runs through Envoy
from many client addresses while the guard is hurt: a worker of ``serve --workers 2`` killed
with SIGKILL, the guard drained with SIGTERM and started again, the policy file replaced by
invalid ones. Envoy's failure mode for a missing guard is ``failure_mode_allow: false`` (fail
closed) with the ``status_on_error`` of its filters; every request must end (none hangs past the
timeouts Envoy is configured with), every refusal must be that failure mode and only while the
guard is really gone, and traffic must recover. Each test prints its figures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from envoy.type.v3 import http_status_pb2

from extauthz.demo import stack
from tests.e2e.conftest import json_lines, require_envoy
from tests.integration.conftest import RedisProcess, start_redis, stop_redis
from tests.integration.test_faults_redis import (
    CHECK_TIMEOUT_S,
    INSTANCES,
    MESSAGE_TIMEOUT_S,
    envoy_filters,
    predictions,
    scrape,
)

pytestmark = pytest.mark.envoy

LOAD_CLIENTS = 8
PACE_S = 0.01
# Envoy waits at most this long for the guard on one request: Check, then the four ext_proc
# messages (request and response headers and bodies), each with its own timeout.
GUARD_WAIT_S = CHECK_TIMEOUT_S + 4 * MESSAGE_TIMEOUT_S
# The client gives up here: far past anything Envoy should let a request wait.
HANG_S = 15.0
# Share of requests that must succeed once the guard is back (the rest: CPU starvation on a
# shared machine can push a Check past Envoy's 250 ms, which Envoy answers 503).
RECOVERED_SHARE = 0.95
MODEL = "/v1/models/m:predict"

POLICY = f"""\
version: 1
tiers:
  anonymous:
    max_instances: {INSTANCES * 2}
    limits: [{{name: requests, unit: requests, rate: 1000000, per: minute}}]
    output: {{policy: round, decimals: 3}}
# The load is many fast clients: detectors would rightly flag them; not what is tested here.
detection: {{enabled: false}}
"""


# --- the stack: an in-process model, the guard, Envoy --------------------------------------------


@asynccontextmanager
async def _model(port: int, delay_s: float) -> AsyncIterator[None]:
    """A KServe v1 model on ``port`` that answers after ``delay_s`` (requests stay in flight)."""

    async def predict(request: web.Request) -> web.Response:
        payload = await request.json()
        await asyncio.sleep(delay_s)
        rows = len(payload["instances"])
        return web.json_response(
            {"predictions": predictions(rows, int(payload["instances"][0][0]))}
        )

    app = web.Application()
    app.router.add_post("/v1/models/{name}:predict", predict)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@dataclass
class Stack:
    """The guard and Envoy on free ports; the model runs in the test's event loop."""

    workdir: Path
    guard_args: list[str]
    policy: Path
    ports: stack.Ports = field(default_factory=stack.Ports.free)
    http_port: int = field(default_factory=stack.free_port)
    guard: stack.Process | None = None
    envoy: stack.Process | None = None

    def start_guard(self) -> stack.Process:
        self.guard = stack.start_guard(
            policy=self.policy,
            grpc_port=self.ports.guard,
            http_port=self.http_port,
            workdir=self.workdir,
            extra_args=self.guard_args,
        )
        return self.guard

    def start_envoy(self) -> None:
        base_id = int.from_bytes(os.urandom(2), "big") % 20_000 + 40_000
        config = stack.render_envoy_config(self.ports)
        self.envoy = stack.start_envoy(
            config, workdir=self.workdir, base_id=base_id, admin_port=self.ports.admin
        )

    def stop(self) -> None:
        for proc in (self.envoy, self.guard):
            if proc is not None:
                proc.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listener}{MODEL}"

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's JSON access log lines."""
        assert self.envoy is not None
        return json_lines(self.envoy.output())

    def guard_events(self, name: str) -> list[dict[str, Any]]:
        """The guard's JSON log events called ``name`` (workers log to the same file)."""
        assert self.guard is not None
        return [event for event in json_lines(self.guard.output()) if event.get("event") == name]

    def readyz(self) -> int:
        """The guard's /readyz status; 0 when nothing answers."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/readyz", timeout=1
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def metric(self, name: str) -> float:
        """One unlabelled sample of the guard's /metrics."""
        return scrape(self.http_port).get((name, ()), 0.0)


@asynccontextmanager
async def _stack(
    tmp_path: Path, guard_args: Sequence[str], *, model_delay_s: float = 0.0
) -> AsyncIterator[Stack]:
    require_envoy()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    # As LocalStack: no drain unless asked, policy polled every 0.2 s.
    args = ["--drain-s", "0", "--reload-interval-s", "0.2", *guard_args]
    running = Stack(tmp_path / "stack", args, policy)
    async with _model(running.ports.model, model_delay_s):
        try:
            await asyncio.to_thread(running.start_guard)
            await asyncio.to_thread(running.start_envoy)
            yield running
        finally:
            await asyncio.to_thread(running.stop)


# --- the load ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One request through Envoy: when it started, how long it took, its status (0: no answer)."""

    started: float
    elapsed_s: float
    status: int
    error: str = ""


@dataclass
class HttpLoad:
    """``clients`` loops of model calls through Envoy, each from its own loopback address (so
    each is its own anonymous client), every reply kept."""

    url: str
    clients: int = LOAD_CLIENTS
    replies: list[Reply] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def window(self, start: float, end: float = float("inf")) -> list[Reply]:
        """Replies to requests started in [start, end)."""
        return [r for r in self.replies if start <= r.started < end]

    async def wait_for_success(self, after: float, timeout_s: float) -> float:
        """Return when the first request started after ``after`` succeeded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hits = [r.started for r in self.window(after) if r.status == 200]
            if hits:
                return min(hits)
            await asyncio.sleep(0.02)
        raise AssertionError(f"no request succeeded within {timeout_s}s")

    async def _loop(self, index: int) -> None:
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.2.{index + 1}", 0))
        timeout = aiohttp.ClientTimeout(total=HANG_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for serial in range(100_000):  # bounded: the test stops it long before
                if self._stop.is_set():
                    return
                body = {"instances": [[float(serial), float(i), 0.5] for i in range(INSTANCES)]}
                started = time.monotonic()
                try:
                    async with session.post(self.url, json=body) as response:
                        await response.read()
                        reply = Reply(started, time.monotonic() - started, response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    reply = Reply(started, time.monotonic() - started, 0, type(exc).__name__)
                self.replies.append(reply)
                await asyncio.sleep(PACE_S)


def _envoy_failure_statuses() -> set[int]:
    """The statuses Envoy answers when the guard cannot be reached, as ``envoy/envoy.yaml`` sets
    them: ext_authz's and ext_proc's ``status_on_error`` (Envoy's default for either: 500).

    ext_proc's counts too: once the guard is gone, Envoy's ext_proc filter also fails on the
    answer that ext_authz's refusal produces, and its status is the one clients see.
    """
    statuses = set()
    for name in ("envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc"):
        code = envoy_filters()[name].get("status_on_error", {}).get("code")
        statuses.add(http_status_pb2.StatusCode.Value(code) if code else 500)
    return statuses


FAILURE_STATUSES = _envoy_failure_statuses()


def _statuses(replies: Sequence[Reply]) -> dict[int, int]:
    return dict(Counter(r.status for r in replies))


def _assert_no_hang(load: HttpLoad) -> None:
    """Every request got an HTTP answer, within what Envoy waits for the guard (plus slack for
    the model and a loaded machine)."""
    unanswered = [r for r in load.replies if r.status == 0]
    assert not unanswered, unanswered[:5]
    slowest = max(r.elapsed_s for r in load.replies)
    assert slowest < GUARD_WAIT_S + 1.0, slowest


def _failures(stack_: Stack) -> Counter[tuple[int, str]]:
    """Envoy's non-200 answers by (status, response_code_details)."""
    return Counter(
        (int(line["response_code"]), str(line["response_code_details"]))
        for line in stack_.access_log()
        if line["response_code"] != 200
    )


def _assert_guard_failures(stack_: Stack) -> None:
    """Every refusal Envoy logged is its failure mode for a guard it cannot reach: ext_authz
    could not get an answer, or an ext_proc stream broke, with a configured status."""
    failures = _failures(stack_)
    assert all(
        status in FAILURE_STATUSES
        and (details == "ext_authz_error" or details.startswith("ext_proc_error_gRPC_error"))
        for status, details in failures
    ), failures


# --- the tests -----------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """Live children of ``pid``, from /proc/<pid>/task/<pid>/children."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(child) for child in text.split()}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        stop_redis(server)


class TestWorkerKilled:
    """A worker of ``serve --workers 2`` killed under load: the requests it held fail with Envoy's
    configured failure mode, none hangs, the other worker takes over, the supervisor starts a
    new one and traffic recovers."""

    async def test_sigkill_one_worker_through_envoy(
        self, tmp_path: Path, private_redis: RedisProcess
    ) -> None:
        args = ["--workers", "2", "--store", private_redis.url, "--drain-s", "0.5"]
        async with _stack(tmp_path, args, model_delay_s=0.02) as running:
            assert running.guard is not None
            workers = _children(running.guard.pid)
            assert len(workers) == 2
            load = HttpLoad(running.url)
            load.start()
            try:
                await asyncio.sleep(1.0)
                # The worker holding Envoy's connection is the one deciding.
                deciders = Counter(int(e["pid"]) for e in running.guard_events("decision"))
                victim = deciders.most_common(1)[0][0]
                assert victim in workers
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                recovered_at = await load.wait_for_success(killed_at + 0.05, timeout_s=10.0)
                # The supervisor replaces the worker; wait for the new one to serve.
                deadline = time.monotonic() + 20.0
                while True:
                    fresh = _children(running.guard.pid) - workers
                    serving = {int(e["pid"]) for e in running.guard_events("serving")}
                    if fresh and fresh <= serving:
                        break
                    assert time.monotonic() < deadline, running.guard.tail()
                    await asyncio.sleep(0.1)
                replaced_at = time.monotonic()
                await asyncio.sleep(1.0)
            finally:
                await load.stop()

            before = [r for r in load.replies if r.started + r.elapsed_s < killed_at]
            failed = [r for r in load.replies if r.status != 200]
            after = load.window(recovered_at + 0.5)
            failures = _failures(running)
            print(
                f"\nworker killed: {len(load.window(killed_at, recovered_at))} requests until"
                f" the first success {(recovered_at - killed_at) * 1000:.0f} ms after the kill,"
                f" {len(failed)} failed {_statuses(failed)}, Envoy's details {dict(failures)};"
                f" new worker serving {replaced_at - killed_at:.1f} s after the kill;"
                f" afterwards {_statuses(after)}; slowest request"
                f" {max(r.elapsed_s for r in load.replies) * 1000:.0f} ms"
            )
            _assert_no_hang(load)
            assert _statuses(before) == {200: len(before)}
            # Only requests the dead worker held can fail, and only as the configured failure.
            assert len(failed) <= 2 * LOAD_CLIENTS
            assert all(r.started + r.elapsed_s >= killed_at for r in failed)
            _assert_guard_failures(running)
            assert sum(s == 200 for s in (r.status for r in after)) >= RECOVERED_SHARE * len(after)
            exited = running.guard_events("worker_exited")
            assert [(e["pid"], e["code"]) for e in exited] == [(victim, -signal.SIGKILL)]
            assert running.guard.alive()


class TestDrain:
    """SIGTERM under load through Envoy: /readyz flips first, requests in flight and during the
    drain finish, refusals start only once the guard is gone and are Envoy's 503; a new guard
    on the same port brings traffic back."""

    async def test_sigterm_drains_then_envoy_fails_closed(self, tmp_path: Path) -> None:
        drain_s = 1.0
        args = ["--drain-s", str(drain_s)]
        # A slow model keeps requests in flight through the SIGTERM.
        async with _stack(tmp_path, args, model_delay_s=0.2) as running:
            assert running.guard is not None
            load = HttpLoad(running.url)
            load.start()
            try:
                await asyncio.sleep(1.0)
                guard = running.guard
                term_at = time.monotonic()
                guard.popen.send_signal(signal.SIGTERM)
                not_ready_at = None
                while guard.alive() and time.monotonic() - term_at < 20:
                    if not_ready_at is None and running.readyz() != 200:
                        not_ready_at = time.monotonic()
                    await asyncio.sleep(0.02)
                exited_at = time.monotonic()
                assert guard.popen.wait(timeout=5) == 0
                await asyncio.sleep(0.5)  # Envoy without a guard
                restart_at = time.monotonic()
                await asyncio.to_thread(running.start_guard)
                started_at = time.monotonic()
                recovered_at = await load.wait_for_success(started_at, timeout_s=10.0)
                await asyncio.sleep(1.0)
            finally:
                await load.stop()

            assert not_ready_at is not None
            drained_at = term_at + drain_s
            before = load.window(0.0, term_at)
            in_flight = [r for r in before if r.started + r.elapsed_s > term_at]
            # Started and answered while the guard drained (it takes new calls until drain_s).
            draining = [r for r in load.window(term_at) if r.started + r.elapsed_s < drained_at]
            # Sent once the guard had exited, answered before the new one started.
            gone = [r for r in load.window(exited_at) if r.started + r.elapsed_s < restart_at]
            failed = [r for r in load.replies if r.status != 200]
            after = load.window(recovered_at + 0.5)
            print(
                f"\nSIGTERM: /readyz 503 after {(not_ready_at - term_at) * 1000:.0f} ms; "
                f"{len(in_flight)} requests in flight {_statuses(in_flight)}, {len(draining)} started during the {drain_s} s"
                f" drain {_statuses(draining)}; guard exited {exited_at - term_at:.1f} s after"
                f" SIGTERM; {len(gone)} requests while it was gone {_statuses(gone)}; all"
                f" refusals {_statuses(failed)}, Envoy's details {dict(_failures(running))};"
                f" traffic back {(recovered_at - started_at) * 1000:.0f} ms after the new guard"
                f" was ready ({started_at - restart_at:.1f} s to start); afterwards"
                f" {_statuses(after)}"
            )
            _assert_no_hang(load)
            assert not_ready_at - term_at < drain_s
            # Requests in flight at SIGTERM, and those started during the drain, all succeed.
            assert in_flight and _statuses(before) == {200: len(before)}
            assert draining and _statuses(draining) == {200: len(draining)}
            # With the guard gone, Envoy fails closed with its configured 503.
            assert gone and set(_statuses(gone)) <= FAILURE_STATUSES
            _assert_guard_failures(running)
            # Refusals only once the drain was over, long after health flipped.
            assert all(r.started + r.elapsed_s >= drained_at for r in failed)
            assert sum(r.status == 200 for r in after) >= RECOVERED_SHARE * len(after)


INVALID_POLICIES = {
    "bad value": "version: 1\ntiers:\n  anonymous: {max_instances: 0}\n",
    "broken yaml": "version: 1\ntiers: {anonymous: [\n",
    "unknown field": "version: 1\ntiers:\n  anonymous: {max_instances: 4, surprise: 1}\n",
    "not a mapping": "- just\n- a list\n",
}


class TestInvalidReload:
    """Invalid policy files written under load: the old policy keeps serving (no request fails),
    each bad version is logged and counted once; a valid file afterwards applies."""

    async def test_invalid_policies_under_load(self, tmp_path: Path) -> None:
        async with _stack(tmp_path, []) as running:
            load = HttpLoad(running.url)
            load.start()
            try:
                await asyncio.sleep(0.5)
                loaded_at = running.metric("extauthz_policy_loaded_timestamp_seconds")
                errors = running.metric("extauthz_policy_reload_errors_total")
                bad_from = time.monotonic()
                for seen, text in enumerate(INVALID_POLICIES.values(), start=1):
                    running.policy.write_text(text, encoding="utf-8")
                    deadline = time.monotonic() + 10
                    while running.metric("extauthz_policy_reload_errors_total") < errors + seen:
                        assert time.monotonic() < deadline, f"bad version {seen} not refused"
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.4)  # two more polls: refused once, not every poll
                valid_at = time.monotonic()
                counted = running.metric("extauthz_policy_reload_errors_total") - errors
                still_loaded = running.metric("extauthz_policy_loaded_timestamp_seconds")
                # A valid version that denies every loopback client: it must take over.
                running.policy.write_text(POLICY + "deny: {networks: [127.0.0.0/8]}\n")
                deadline = time.monotonic() + 10
                while not any(r.status == 403 for r in load.window(valid_at)):
                    assert time.monotonic() < deadline, "the valid policy was not applied"
                    await asyncio.sleep(0.05)
            finally:
                await load.stop()
            # Answered before the valid file was written: served under the bad ones.
            during = [r for r in load.window(bad_from) if r.started + r.elapsed_s < valid_at]
            failed_events = running.guard_events("policy_reload_failed")
            print(
                f"\ninvalid reloads: {len(INVALID_POLICIES)} bad versions over"
                f" {valid_at - bad_from:.1f} s, {len(during)} requests meanwhile"
                f" {_statuses(during)}; reload errors counted {counted:.0f}, logged"
                f" {len(failed_events)}"
            )
            _assert_no_hang(load)
            assert during and _statuses(during) == {200: len(during)}
            assert counted == len(INVALID_POLICIES)
            assert len(failed_events) == len(INVALID_POLICIES)
            assert still_loaded == loaded_at
            assert running.metric("extauthz_policy_reloads_total") == 1
