"""The local stack: demo model + guard + real Envoy on free loopback ports, started and stopped together."""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from extauthz.demo import stack

_BASE_IDS = itertools.count(int.from_bytes(os.urandom(2), "big") % 20_000 + 1_000)


class LocalStack:
    """Start the model, the guard (with ``policy`` and an admin token) and Envoy; stop them all.

    Ports are picked free unless ``fixed_ports`` (the contract's 8080/9901/9191/8081, 9192).
    """

    def __init__(
        self,
        *,
        policy: Path | None,
        workdir: Path | None = None,
        fixed_ports: bool = False,
        guard_args: Sequence[str] = (),
        upstream: Sequence[str] | None = None,
        single_hop: bool = False,
    ) -> None:
        """``upstream`` replaces the demo model: an argv whose ``{port}`` is the model port and
        that serves ``GET /v2/health/ready`` once up (tests use a fake upstream).
        ``single_hop`` runs ``envoy/envoy-single-hop.yaml`` (ext_proc alone) instead of the
        reference two-hop config."""
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="extauthz-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if fixed_ports:
            self.ports = stack.Ports(listener=8080, admin=9901, guard=9191, model=8081)
            self.guard_http_port = 9192
        else:
            self.ports = stack.Ports.free()
            self.guard_http_port = stack.free_port()
        self.policy = policy
        self.admin_token_file = self.workdir / "admin-token"
        self.admin_token_file.write_text(secrets.token_urlsafe(32) + "\n")
        self.admin_token_file.chmod(0o600)
        self._guard_args = list(guard_args)
        self._upstream = list(upstream) if upstream else None
        self.envoy_source = stack.ENVOY_SINGLE_HOP_YAML if single_hop else stack.ENVOY_YAML
        self.base_id = next(_BASE_IDS)
        self.model: stack.Process | None = None
        self.guard: stack.Process | None = None
        self.envoy: stack.Process | None = None

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.ports.guard}"

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def start(self) -> LocalStack:
        try:
            if self._upstream is None:
                self.model = stack.start_model(port=self.ports.model, workdir=self.workdir)
            else:
                self.model = self._start_upstream(self._upstream)
            self.start_guard()
            config = stack.render_envoy_config(self.ports, source=self.envoy_source)
            self.envoy = stack.start_envoy(
                config, workdir=self.workdir, base_id=self.base_id, admin_port=self.ports.admin
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start_upstream(self, argv: Sequence[str]) -> stack.Process:
        port = self.ports.model
        proc = stack.start_process(
            f"upstream-{port}",
            [a.format(port=port) for a in argv],
            workdir=self.workdir,
            env=stack.python_env(),
        )
        try:
            stack.wait_http(f"http://127.0.0.1:{port}/v2/health/ready", timeout_s=30.0, proc=proc)
        except BaseException:
            proc.stop()
            raise
        return proc

    def add_guard_args(self, args: Sequence[str]) -> None:
        """Pass more flags to the guard from its next start on."""
        self._guard_args.extend(args)

    def start_guard(self) -> stack.Process:
        """(Re)start the guard alone, e.g. after a test stopped it."""
        args = [
            "--admin-token-file",
            str(self.admin_token_file),
            "--drain-s",
            "0",
            "--reload-interval-s",
            "0.2",
            *self._guard_args,
        ]
        self.guard = stack.start_guard(
            policy=self.policy,
            grpc_port=self.ports.guard,
            http_port=self.guard_http_port,
            workdir=self.workdir,
            extra_args=args,
        )
        return self.guard

    def stop(self) -> None:
        for proc in (self.envoy, self.guard, self.model):
            if proc is not None:
                proc.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
