"""The guard as a process: draining on SIGTERM, and replicas sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz import app
from extauthz.admin_client import AdminClient
from extauthz.demo import stack
from extauthz.settings import Settings


def _check(address: str) -> auth_pb2.CheckRequest:
    request = auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = address
    request.attributes.request.http.path = "/v1/models/m:predict"
    request.attributes.request.http.method = "POST"
    return request


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class TestDrain:
    """On SIGTERM, health turns NOT_SERVING and /readyz 503 first; then the process exits 0."""

    def test_sigterm_flips_health_before_stopping(self, tmp_path: Path) -> None:
        grpc_port, http_port = stack.free_port(), stack.free_port()
        proc = stack.start_guard(
            policy=None,
            grpc_port=grpc_port,
            http_port=http_port,
            workdir=tmp_path,
            extra_args=["--drain-s", "1.5"],
        )
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            proc.popen.send_signal(signal.SIGTERM)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            deadline = time.monotonic() + 1.0  # well inside the 1.5 s drain
            status = None
            while time.monotonic() < deadline and status != not_serving:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                time.sleep(0.05)
            assert status == not_serving
            assert _http_status(f"http://127.0.0.1:{http_port}/readyz") == 503
            # Still answering Check while draining: in-flight and late requests are not dropped.
            authz = auth_grpc.AuthorizationStub(channel)
            assert authz.Check(_check("127.0.0.2"), timeout=2).status.code == 0
            channel.close()
            assert proc.popen.wait(timeout=15) == 0
            assert '"event": "stopped"' in proc.output()
        finally:
            proc.stop()


class TestSharedRedis:
    """Two guard replicas on one Redis: an operator's pin on one blocks the client on the other."""

    async def test_pin_on_one_replica_blocks_on_the_other(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        token = tmp_path / "token"
        token.write_text("replica-token\n")
        settings = Settings(
            grpc_port=0, http_port=0, drain_s=0, store_url=redis_url, admin_token_file=token
        )
        first = await app.start(settings)
        second = await app.start(settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{second.grpc_port}") as channel:
                authz = auth_grpc.AuthorizationStub(channel)
                assert (await authz.Check(_check("127.0.0.7"), timeout=2)).status.code == 0
                admin = AdminClient(f"127.0.0.1:{first.grpc_port}", "replica-token")
                try:
                    seen = await asyncio.to_thread(admin.get_client, "ip:127.0.0.7")
                    await asyncio.to_thread(admin.set_level, "ip:127.0.0.7", "abusive")
                finally:
                    admin.close()
                denied = await authz.Check(_check("127.0.0.7"), timeout=2)
                other = await authz.Check(_check("127.0.0.8"), timeout=2)
            assert seen["requests"] in (1, "1")  # counted by the second replica, read on the first
            assert denied.denied_response.status.code == 403
            assert json.loads(denied.denied_response.body)["error"] == "pinned_abusive"
            assert other.status.code == 0
        finally:
            await first.stop()
            await second.stop()


class TestStartupErrors:
    """A guard that cannot start says why and exits non-zero."""

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--policy", "/nonexistent/policy.yaml"], "no such file"),
            (["--store", "mongodb://x"], "store_url"),
            (["--budget-ms", "0"], "decision_budget_ms"),
        ],
    )
    def test_bad_settings_exit_2_with_a_reason(self, args: list[str], message: str) -> None:
        result = _serve(*args)
        assert result.returncode == 2
        assert message in result.stderr

    def test_invalid_policy_names_the_yaml_path(self, tmp_path: Path) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text("tiers: {anonymous: {max_instances: 0}}\n")
        result = _serve("--policy", str(policy))
        assert result.returncode == 2
        assert "tiers.anonymous.max_instances" in result.stderr


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``extauthz serve`` on free ports with ``args``; it is expected to exit at once."""
    argv = [
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=stack.python_env())
