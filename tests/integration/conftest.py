"""Real redis-server processes for integration tests, on free ports, torn down after."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cluster_port() -> int:
    """Return a free port P with P + 10000 free too: a cluster node also listens on its bus port,
    and Redis refuses ports above 55535 for that reason."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def redis_server_binary() -> str:
    """Return the redis-server path; a missing binary fails under CI=true, else skips."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass(frozen=True, slots=True)
class RedisProcess:
    """A running redis-server: its process, TCP port and URL."""

    process: subprocess.Popen[bytes]
    port: int
    url: str


def start_redis(workdir: Path, *extra: str, port: int | None = None) -> RedisProcess:
    """Start redis-server on a free port without persistence and wait until it answers PING."""
    binary = redis_server_binary()
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 - kept open for the child
    process = subprocess.Popen(
        [
            binary,
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = RedisProcess(process=process, port=port, url=f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + _START_TIMEOUT_S
    probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        while True:
            if process.poll() is not None:
                text = (workdir / f"redis-{port}.log").read_text(errors="replace")
                pytest.fail(f"redis-server exited with {process.returncode}:\n{text}")
            try:
                if probe.ping():
                    return server
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                stop_redis(server)
                pytest.fail(
                    f"redis-server on port {port} did not answer within {_START_TIMEOUT_S}s"
                )
            time.sleep(0.02)
    finally:
        probe.close()


def stop_redis(server: RedisProcess) -> None:
    """Terminate the server (resuming it first if stopped) and reap it."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the URL of a redis-server shared by the session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        stop_redis(server)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """Return the shared server's URL after emptying it, so each test starts clean."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the ``redis+cluster://`` URL of a one-node Redis Cluster owning every slot.

    One node is enough to run the cluster code paths and to have Redis refuse any command
    or script whose keys span slots (CROSSSLOT), which is what cluster mode must avoid.
    """
    workdir = tmp_path_factory.mktemp("redis-cluster")
    server = start_redis(
        workdir,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(workdir / "nodes.conf"),
        port=cluster_port(),
    )
    try:
        with redis.Redis(host="127.0.0.1", port=server.port) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + _START_TIMEOUT_S
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    pytest.fail("one-node cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        yield f"redis+cluster://127.0.0.1:{server.port}"
    finally:
        stop_redis(server)


@pytest.fixture
def redis_cluster_url(redis_cluster_server: str) -> str:
    """Return the cluster URL after emptying the node."""
    port = int(redis_cluster_server.rsplit(":", 1)[1])
    with redis.Redis(host="127.0.0.1", port=port) as client:
        client.flushall()
    return redis_cluster_server


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Yield a starter of private redis-servers (extra args allowed), all stopped after the test."""
    started: list[RedisProcess] = []

    def start(*extra: str) -> RedisProcess:
        server = start_redis(tmp_path / f"private-{len(started)}", *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_redis(server)
