"""Policy reload from a Kubernetes ConfigMap volume, as the kubelet updates it.

The kubelet mounts a ConfigMap as a directory where each key is a symlink through ``..data``:
``policy.yaml -> ..data/policy.yaml`` and ``..data -> ..<timestamp>/``. An update writes a new
timestamped directory, points a ``..data_tmp`` symlink at it, renames that onto ``..data`` (one
atomic step) and removes the old directory. The file the guard was given never changes: only
where it resolves to does. A real ``extauthz serve`` must pick up the new policy, and refuse
(and count) an invalid one while the old policy keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc

from extauthz.demo import stack

CLIENT = "10.20.30.40"
OPEN_POLICY = "version: 1\ntiers:\n  anonymous: {max_instances: 8}\n"
DENYING_POLICY = OPEN_POLICY + "deny:\n  networks: [10.20.0.0/16]\n"
INVALID_POLICY = "version: 1\ntiers:\n  anonymous: {max_instances: 0}\n"  # must be >= 1
RELOAD_INTERVAL_S = 0.2
WAIT_S = 10.0


class ConfigMapVolume:
    """A directory laid out and updated the way the kubelet projects a ConfigMap."""

    def __init__(self, root: Path, key: str = "policy.yaml") -> None:
        self.root = root
        self.key = key
        self._generation = 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """The path a pod mounts: ``<root>/<key>``, a symlink through ``..data``."""
        return self.root / self.key

    def project(self, text: str) -> Path:
        """Write ``text`` as a new version and swap ``..data`` onto it atomically; return the
        new timestamped directory. The previous one is removed, as the kubelet does."""
        self._generation += 1
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        stamp = f"..2026_11_28_10_00_{self._generation:02d}.{os.getpid() % 1000:03d}"
        version = self.root / stamp
        version.mkdir()
        (version / self.key).write_text(text, "utf-8")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)  # relative, as the kubelet writes it
        os.replace(tmp, data)
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.key}")
        if old is not None:
            shutil.rmtree(old)
        return version


class Guard:
    """A running ``extauthz serve`` process and the two ports it answers on."""

    def __init__(self, proc: stack.Process, grpc_port: int, http_port: int) -> None:
        self.proc = proc
        self.http_port = http_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.authz = auth_grpc.AuthorizationStub(self.channel)

    def check_status(self, address: str = CLIENT) -> int:
        """Return the HTTP status Check gives an anonymous request from ``address``."""
        request = auth_pb2.CheckRequest()
        request.attributes.source.address.socket_address.address = address
        request.attributes.request.http.path = "/v1/models/m:predict"
        request.attributes.request.http.method = "POST"
        response = self.authz.Check(request, timeout=5)
        if response.HasField("denied_response"):
            return int(response.denied_response.status.code)
        return 200

    def metric(self, name: str) -> float:
        """Read one unlabelled sample from /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def log_events(self, event: str) -> list[dict[str, object]]:
        """The guard's JSON log events named ``event``."""
        found = []
        for line in self.proc.output().splitlines():
            if line.startswith("{"):
                try:
                    parsed = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if parsed.get("event") == event:
                    found.append(parsed)
        return found


def _wait_for(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def volume(tmp_path: Path) -> ConfigMapVolume:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.project(OPEN_POLICY)
    return volume


@pytest.fixture
def guard(tmp_path: Path, volume: ConfigMapVolume) -> Iterator[Guard]:
    grpc_port, http_port = stack.free_port(), stack.free_port()
    proc = stack.start_guard(
        policy=volume.path,
        grpc_port=grpc_port,
        http_port=http_port,
        workdir=tmp_path / "guard",
        extra_args=["--reload-interval-s", str(RELOAD_INTERVAL_S), "--drain-s", "0"],
    )
    running = Guard(proc, grpc_port, http_port)
    try:
        yield running
    finally:
        running.channel.close()
        proc.stop()


class TestConfigMapSwap:
    """The guard follows the kubelet's ..data swap; a bad version is refused and counted."""

    def test_the_layout_is_the_kubelets(self, volume: ConfigMapVolume) -> None:
        assert volume.path.is_symlink() and os.readlink(volume.path) == "..data/policy.yaml"
        assert os.readlink(volume.root / "..data").startswith("..2026_11_28_10_00_")
        first = volume.path.resolve()
        volume.project(DENYING_POLICY)
        assert volume.path.resolve() != first and not first.exists()
        assert not (volume.root / "..data_tmp").exists()

    def test_swap_applies_the_new_policy(self, guard: Guard, volume: ConfigMapVolume) -> None:
        assert guard.check_status() == 200
        reloads = guard.metric("extauthz_policy_reloads_total")
        volume.project(DENYING_POLICY)
        assert _wait_for(lambda: guard.metric("extauthz_policy_reloads_total") == reloads + 1)
        assert guard.check_status() == 403  # the deny list of the new version is in force
        assert guard.check_status("192.0.2.1") == 200
        assert _wait_for(lambda: bool(guard.log_events("policy_reloaded")))
        (event,) = guard.log_events("policy_reloaded")
        assert str(event["source"]).endswith("policy.yaml")

    def test_invalid_swap_is_refused_counted_and_the_old_policy_serves(
        self, guard: Guard, volume: ConfigMapVolume
    ) -> None:
        volume.project(DENYING_POLICY)
        assert _wait_for(lambda: guard.metric("extauthz_policy_reloads_total") >= 1)
        loaded_at = guard.metric("extauthz_policy_loaded_timestamp_seconds")
        volume.project(INVALID_POLICY)
        assert _wait_for(lambda: guard.metric("extauthz_policy_reload_errors_total") == 1)
        assert guard.check_status() == 403  # still the denying version
        assert guard.metric("extauthz_policy_loaded_timestamp_seconds") == loaded_at
        (failure,) = guard.log_events("policy_reload_failed")
        assert any("max_instances" in str(problem) for problem in failure["problems"])  # type: ignore[union-attr]
        # One refusal per bad version: the watcher does not retry the same file every poll.
        time.sleep(RELOAD_INTERVAL_S * 5)
        assert guard.metric("extauthz_policy_reload_errors_total") == 1
        # A fixed version is taken up again.
        volume.project(OPEN_POLICY)
        assert _wait_for(lambda: guard.check_status() == 200)
        assert guard.metric("extauthz_policy_reloads_total") == 2

    def test_reprojecting_the_same_content_is_not_a_reload(
        self, guard: Guard, volume: ConfigMapVolume
    ) -> None:
        volume.project(DENYING_POLICY)
        assert _wait_for(lambda: guard.metric("extauthz_policy_reloads_total") == 1)
        volume.project(DENYING_POLICY)  # a new directory, the same policy
        time.sleep(RELOAD_INTERVAL_S * 5)
        assert guard.metric("extauthz_policy_reloads_total") == 1
        assert guard.metric("extauthz_policy_reload_errors_total") == 0
