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


def redis_cli_binary() -> str:
    """Return the redis-cli path (Debian: redis-tools, pulled in by redis-server); a missing
    binary fails under CI=true, else skips."""
    path = shutil.which("redis-cli")
    if path is None:
        message = "redis-cli is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass(frozen=True, slots=True)
class RedisCluster3:
    """A running three-master Redis Cluster: its nodes and ``redis+cluster://`` URL."""

    nodes: tuple[RedisProcess, ...]
    url: str


@pytest.fixture(scope="session")
def redis_cluster3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    """Yield a real Redis Cluster of three masters on loopback, slots split by redis-cli.

    Unlike the one-node cluster, keys of different slots live on different servers, so
    the store must route each script to the node owning its slot (MOVED otherwise).
    """
    cli = redis_cli_binary()
    workdir = tmp_path_factory.mktemp("redis-cluster3")
    nodes: list[RedisProcess] = []
    try:
        for n in range(3):
            node_dir = workdir / f"node{n}"
            nodes.append(
                start_redis(
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    port=cluster_port(),
                )
            )
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        deadline = time.monotonic() + 30.0
        for node in nodes:
            with redis.Redis(host="127.0.0.1", port=node.port) as client:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        pytest.fail(f"cluster node {node.port} did not reach cluster_state:ok")
                    time.sleep(0.05)
        yield RedisCluster3(nodes=tuple(nodes), url=f"redis+cluster://127.0.0.1:{nodes[0].port}")
    finally:
        for node in nodes:
            stop_redis(node)


@pytest.fixture
def redis_cluster3(redis_cluster3_server: RedisCluster3) -> RedisCluster3:
    """Return the three-node cluster after emptying every node."""
    for node in redis_cluster3_server.nodes:
        with redis.Redis(host="127.0.0.1", port=node.port) as client:
            client.flushall()
    return redis_cluster3_server


@dataclass(frozen=True, slots=True)
class RedisSentinelSetup:
    """A master redis-server watched by one Sentinel, and the ``redis+sentinel://`` URL."""

    master: RedisProcess
    sentinel: subprocess.Popen[bytes]
    sentinel_port: int
    service: str
    url: str


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelSetup]:
    """Yield a master and a Sentinel (quorum 1) that names it ``mymaster``, stopped after.

    Sentinel rewrites its config file, so it is written fresh in the test's tmp dir.
    """
    binary = redis_server_binary()
    master = start_redis(tmp_path / "master")
    port, service = free_port(), "mymaster"
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
    )
    log_path = tmp_path / "sentinel.log"
    with open(log_path, "wb") as log:
        sentinel = subprocess.Popen(
            [binary, str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
    handle = RedisProcess(process=sentinel, port=port, url="")
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        with redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5
        ) as probe:
            while True:
                if sentinel.poll() is not None:
                    text = log_path.read_text(errors="replace")
                    pytest.fail(f"redis sentinel exited with {sentinel.returncode}:\n{text}")
                try:
                    address = probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
                    if address:
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"sentinel on port {port} did not name {service}")
                time.sleep(0.02)
        yield RedisSentinelSetup(
            master=master,
            sentinel=sentinel,
            sentinel_port=port,
            service=service,
            url=f"redis+sentinel://127.0.0.1:{port}/{service}",
        )
    finally:
        stop_redis(handle)
        stop_redis(master)
