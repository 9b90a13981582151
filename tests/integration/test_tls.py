"""The gRPC port over TLS and mTLS: the admin API (and Envoy's APIs) refuse clients without a certificate."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from extauthz import app
from extauthz.admin_client import AdminClient
from extauthz.settings import Settings


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and openssl is missing")
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


class TestMutualTls:
    """With a client CA set, only clients presenting a certificate it signed get an answer."""

    async def test_admin_over_mtls(self, pki: Path, tmp_path: Path) -> None:
        token = tmp_path / "token"
        token.write_text("tls-token\n")
        settings = Settings(
            grpc_port=0,
            http_port=0,
            drain_s=0,
            admin_token_file=token,
            tls_cert_file=pki / "server.pem",
            tls_key_file=pki / "server.key",
            tls_client_ca_file=pki / "ca.pem",
        )
        guard = await app.start(settings)
        target = f"127.0.0.1:{guard.grpc_port}"
        try:
            with AdminClient(
                target, "tls-token", tls=(pki / "ca.pem", pki / "client.pem", pki / "client.key")
            ) as admin:
                listed = await asyncio.to_thread(admin.list_clients)
            assert listed["clients"] == []
            with AdminClient(
                target, "tls-token", tls=(pki / "ca.pem", None, None), timeout_s=2
            ) as admin:
                with pytest.raises(grpc.RpcError) as no_cert:
                    await asyncio.to_thread(admin.list_clients)
            assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
            with AdminClient(target, "tls-token", timeout_s=2) as plaintext:
                with pytest.raises(grpc.RpcError):
                    await asyncio.to_thread(plaintext.list_clients)
        finally:
            await guard.stop()

    def test_half_a_tls_configuration_is_refused(self, pki: Path) -> None:
        with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
            Settings(tls_cert_file=pki / "server.pem").validate()
