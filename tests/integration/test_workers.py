"""``extauthz serve --workers N``: N processes on one port pair, metrics summed, crashes restarted.

Each test runs the real command line against a real redis-server and looks at the supervisor's
children through ``/proc``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from prometheus_client.parser import text_string_to_metric_families

from extauthz import workers
from extauthz.settings import Settings
from tests.integration.conftest import free_port

_REPO = Path(__file__).resolve().parents[2]
_DRAIN_S = 1.0
_START_TIMEOUT_S = 30.0


@dataclass
class WorkersGuard:
    """A running ``serve --workers 2``: the supervisor process, its ports, log and temp dir."""

    popen: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path
    tmpdir: Path

    def events(self, name: str) -> list[dict[str, object]]:
        """Return the JSON log events called ``name`` written so far (supervisor and workers)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def serving_pids(self) -> set[int]:
        return {int(str(e["pid"])) for e in self.events("serving")}


def _children(pid: int) -> set[int]:
    """Return the pids whose parent is ``pid``, read from /proc/<pid>/stat."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(tmp_path: Path, *args: str, wait_workers: int = 2) -> WorkersGuard:
    """Run ``extauthz serve --workers 2 ARGS`` on free ports; wait until every worker serves."""
    grpc_port, http_port = free_port(), free_port()
    log_path = tmp_path / "guard.log"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(_REPO)}
    argv = [
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        "--workers",
        "2",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--drain-s",
        str(_DRAIN_S),
        *args,
    ]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_REPO)
    guard = WorkersGuard(popen, grpc_port, http_port, log_path, tmpdir)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while len(guard.serving_pids()) < wait_workers:
        if popen.poll() is not None or time.monotonic() > deadline:
            _stop(guard)
            pytest.fail(f"the workers did not all serve:\n{log_path.read_text()}")
        time.sleep(0.1)
    return guard


def _stop(guard: WorkersGuard) -> None:
    """SIGTERM the supervisor and reap it; kill it and any worker left if that takes too long."""
    children = _children(guard.popen.pid)
    if guard.popen.poll() is None:
        guard.popen.send_signal(signal.SIGTERM)
        try:
            guard.popen.wait(timeout=_DRAIN_S + 20)
        except subprocess.TimeoutExpired:
            guard.popen.kill()
            guard.popen.wait()
    for pid in children:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def guard(redis_url: str, tmp_path: Path) -> Iterator[WorkersGuard]:
    running = _start(tmp_path, "--store", redis_url)
    try:
        yield running
    finally:
        _stop(running)


def _check(address: str) -> auth_pb2.CheckRequest:
    request = auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = address
    request.attributes.request.http.path = "/v1/models/m:predict"
    request.attributes.request.http.method = "POST"
    return request


def _send_checks(port: int, channels: int, per_channel: int) -> int:
    """Send Check calls over ``channels`` fresh channels (fresh TCP connections, which the
    kernel spreads over the workers); return how many were answered."""
    answered = 0
    for c in range(channels):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_grpc.AuthorizationStub(channel)
            for r in range(per_channel):
                response = stub.Check(_check(f"10.1.{c}.{r}"), timeout=5)
                assert response.HasField("status")
                answered += 1
    return answered


def _check_decisions(http_port: int) -> float:
    """Return the sum of ``extauthz_decisions_total{path="check"}`` from one /metrics scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "extauthz_decisions_total" and sample.labels["path"] == "check":
                total += sample.value
    return total


class TestSharedPorts:
    """Two workers serve one port pair, and any worker's /metrics sums both."""

    def test_two_workers_answer_and_metrics_sum_over_them(self, guard: WorkersGuard) -> None:
        children = _children(guard.popen.pid)
        assert len(children) == 2
        assert guard.serving_pids() == children

        sent = _send_checks(guard.grpc_port, channels=16, per_channel=4)

        deciders: dict[int, int] = {}
        for event in guard.events("decision"):
            pid = int(str(event["pid"]))
            deciders[pid] = deciders.get(pid, 0) + 1
        # Both workers decided some of the calls (16 connections all hashed to one: p = 2**-15).
        assert set(deciders) == children
        assert sum(deciders.values()) == sent
        # Each scrape is a fresh connection, landing on either worker: all see the sum.
        for _ in range(6):
            assert _check_decisions(guard.http_port) == sent

    def test_metrics_keep_names_types_and_help(self, guard: WorkersGuard) -> None:
        _send_checks(guard.grpc_port, channels=1, per_channel=1)
        with urllib.request.urlopen(f"http://127.0.0.1:{guard.http_port}/metrics") as response:
            text = response.read().decode()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        assert families["extauthz_decisions"].type == "counter"
        assert families["extauthz_decisions"].documentation.startswith("Verdicts by path")
        ready = families["extauthz_ready"]
        # One series without a pid label (livemin over the live workers), 1 while all serve.
        assert [(s.labels, s.value) for s in ready.samples] == [({}, 1.0)]


class TestRestart:
    """A worker killed with SIGKILL is replaced; the other keeps answering meanwhile."""

    def test_killed_worker_is_restarted(self, guard: WorkersGuard) -> None:
        _send_checks(guard.grpc_port, channels=8, per_channel=2)
        before = _check_decisions(guard.http_port)
        victim, survivor = sorted(_children(guard.popen.pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 5
        # Until the supervisor reaps it (all its threads gone, its sockets closed), a connection
        # hashed to its listener would be reset.
        while Path(f"/proc/{victim}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)

        # The survivor answers while the victim is down (its listening socket closed with it).
        assert _send_checks(guard.grpc_port, channels=4, per_channel=1) == 4

        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            children = _children(guard.popen.pid)
            fresh = children - {victim, survivor}
            if len(children) == 2 and fresh and fresh <= guard.serving_pids():
                break
            assert time.monotonic() < deadline, guard.log_path.read_text()
            time.sleep(0.1)
        assert survivor in children
        assert victim not in children
        exited = guard.events("worker_exited")
        assert [(e["pid"], e["code"]) for e in exited] == [(victim, -signal.SIGKILL)]

        assert _send_checks(guard.grpc_port, channels=8, per_channel=1) == 8
        # The dead worker's counts stay in the sum: totals never go backwards.
        assert _check_decisions(guard.http_port) == before + 4 + 8


class TestStop:
    """SIGTERM to the supervisor drains every worker and exits 0, leaving no process behind."""

    def test_sigterm_drains_workers_and_exits_0(self, guard: WorkersGuard) -> None:
        children = _children(guard.popen.pid)
        assert len(children) == 2
        started = time.monotonic()
        guard.popen.send_signal(signal.SIGTERM)
        assert guard.popen.wait(timeout=_DRAIN_S + 15) == 0
        assert time.monotonic() - started >= _DRAIN_S  # the workers drained first
        assert not any(_alive(pid) for pid in children)
        assert {int(str(e["pid"])) for e in guard.events("draining")} == children
        assert {int(str(e["pid"])) for e in guard.events("stopped")} == children
        # The private metrics directory is gone with the supervisor.
        assert list(guard.tmpdir.iterdir()) == []


class TestRefusals:
    """What cannot work is refused before any worker starts, or stops the supervisor at once."""

    def test_memory_store_is_refused_with_exit_2(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "extauthz", "serve", "--workers", "2", "--store", "memory"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=_REPO,
        )
        assert result.returncode == 2
        assert (
            "--workers needs a shared store (redis://...): each worker would keep its own limits"
            in result.stderr
        )
        assert "worker_started" not in result.stderr

    def test_taken_port_stops_the_supervisor_with_exit_2(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        """A worker that cannot bind exits 2; restarting it would fail the same way."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the workers cannot share it
            taken.listen()
            port = taken.getsockname()[1]
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "extauthz",
                    "serve",
                    "--workers",
                    "2",
                    "--store",
                    redis_url,
                    "--grpc-port",
                    str(free_port()),
                    "--http-port",
                    str(port),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=_REPO,
            )
        assert result.returncode == 2
        assert "could not start (exit 2)" in result.stderr
        assert "worker_restarting" not in result.stderr


class TestRestartLimits:
    """Restarts back off per worker and are capped over all workers, so a crash loop ends."""

    def test_backoff_doubles_and_the_cap_stops_a_crash_loop(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        now = [0.0]
        supervisor = workers._Supervisor(
            Settings(workers=2, store_url="redis://x"),
            workers.RestartLimits(backoff_s=0.5, max_backoff_s=0.8, max_restarts=3, window_s=60),
            tmp_path,
            lambda index: pytest.fail("no worker is started here"),
            clock=lambda: now[0],
        )
        assert supervisor._schedule_restart(0)
        assert supervisor._due == {0: 0.5}
        now[0] = 1.0
        assert supervisor._schedule_restart(0)
        assert supervisor._due[0] == pytest.approx(1.8)  # doubled 1.0, capped at 0.8
        assert supervisor._schedule_restart(1)
        assert supervisor._due[1] == pytest.approx(1.5)  # another worker's first crash
        now[0] = 2.0
        assert not supervisor._schedule_restart(1)  # the fourth crash within 60 s
        assert "crashed 4 times within 60 s" in capsys.readouterr().err
        now[0] = 70.0  # the window has passed: restarts are allowed again, backoff reset
        assert supervisor._schedule_restart(0)
        assert supervisor._due[0] == pytest.approx(70.5)
