"""Run the guard as N worker processes under one supervisor: ``extauthz serve --workers N``.

The supervisor checks what today's ``serve`` checks (settings, the policy, the store URL and
the key files), then starts N workers and watches them. Each worker is a fresh interpreter
(``python -c``, see ``worker_main``) that runs the ordinary ``app.serve`` with one event loop on
the same two ports, bound with SO_REUSEPORT so the kernel spreads connections over them.

Why fresh interpreters rather than ``os.fork``: grpc's core (its threads and pollers) must not
be copied into a child, and prometheus-client picks its value store (memory, or files in
``PROMETHEUS_MULTIPROC_DIR``) when it is first imported. A new process gets both right by
construction; the supervisor creates no grpc object and no event loop. ``subprocess`` rather
than ``multiprocessing``'s spawn context: the child's environment is set per child (the
supervisor's own stays untouched), no helper resource-tracker process appears, and the
children are exactly the workers.

Metrics: every worker writes its values to files in a private directory (mode 0700) made by
the supervisor; any worker's ``/metrics`` sums them (``metrics.exposition_registry``). When a
worker dies the supervisor removes its live-gauge files (``mark_process_dead``); its counters
stay, so totals never go backwards.

Secrets drawn at random (no ``--keys-file``, no ``--noise-key-file``) are drawn once, here, and
handed to every worker on its stdin, so a pass issued by one worker is accepted by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

import structlog

from extauthz.settings import Settings

log = structlog.get_logger("extauthz.workers")

# Beyond drain_s, how long a worker may take to stop: Guard.stop gives in-flight RPCs 10 s,
# then closes the HTTP site and the store. A worker still alive after that is killed.
STOP_GRACE_S: Final = 15.0
# The exit code of a worker that could not start (a port taken, a file unreadable), as the
# CLI's: restarting it would fail the same way, so the supervisor stops instead.
EXIT_CANNOT_START: Final = 2
_PR_SET_PDEATHSIG: Final = 1
# ``-c`` rather than ``-m extauthz.workers``: this module is imported once, under its own name,
# so the pickled spec's class is the one the worker uses.
_WORKER_ENTRY: Final = "from extauthz.workers import worker_main; raise SystemExit(worker_main())"


@dataclass(frozen=True, slots=True)
class RestartLimits:
    """How crashed workers are restarted: after ``backoff_s`` (doubling for a worker that keeps
    crashing, up to ``max_backoff_s``), and at most ``max_restarts`` times per ``window_s``
    over all workers, beyond which the supervisor gives up (a crash loop is not serving)."""

    backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    max_restarts: int = 5
    window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class _Spec:
    """What one worker needs, sent pickled on its stdin (secrets never go through argv or env)."""

    index: int
    parent: int
    settings: Settings
    keys_current: str
    keys: dict[str, bytes]
    noise: bytes


def supervise(settings: Settings, *, limits: RestartLimits = RestartLimits()) -> int:
    """Validate like ``serve``, run ``settings.workers`` workers until SIGTERM/SIGINT; return the
    exit code: 0 after a requested stop, 2 when a worker cannot start, 1 after a crash loop.

    Raise ``PolicyError`` or ``ValueError`` (the CLI prints them and exits 2) before any
    worker starts.
    """
    from extauthz import app
    from extauthz.policy.loader import load_default, load_policy

    settings.validate()
    app.check_store_url(settings.store_url)
    if settings.policy_path is None:
        load_default()
    else:
        load_policy(settings.policy_path)
    keys = app.key_ring(settings)
    noise = app.noise_key(settings)
    metrics_dir = Path(tempfile.mkdtemp(prefix="extauthz-metrics-"))  # mode 0700
    try:
        supervisor = _Supervisor(
            settings,
            limits,
            metrics_dir,
            lambda index: _Spec(
                index, os.getpid(), settings, keys.current_id, dict(keys.keys), noise
            ),
        )
        return supervisor.run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _Supervisor:
    """Start, watch, restart and stop the workers; all waiting happens on one selector that
    signals (SIGTERM, SIGINT, SIGCHLD) wake through ``signal.set_wakeup_fd``."""

    def __init__(
        self,
        settings: Settings,
        limits: RestartLimits,
        metrics_dir: Path,
        spec: Callable[[int], _Spec],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._limits = limits
        self._metrics_dir = metrics_dir
        self._spec = spec
        self._clock = clock
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._due: dict[int, float] = {}  # worker index -> when to restart it
        self._crashes: dict[int, deque[float]] = {}
        self._restarts: deque[float] = deque()
        self._stop_signal: int | None = None
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}

    def run(self) -> int:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        selector = selectors.DefaultSelector()
        selector.register(read_fd, selectors.EVENT_READ)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        try:
            return self._loop(selector, read_fd)
        finally:
            self._stop_all(selector, read_fd)
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            selector.close()
            os.close(read_fd)
            os.close(write_fd)

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        if signum != signal.SIGCHLD and self._stop_signal is None:
            self._stop_signal = signum

    def _loop(self, selector: selectors.BaseSelector, read_fd: int) -> int:
        log.info("workers_starting", workers=self._settings.workers)
        for index in range(self._settings.workers):
            self._start(index)
        while True:
            now = self._clock()
            timeout = max(0.0, min(self._due.values()) - now) if self._due else None
            _wait(selector, read_fd, timeout)
            if self._stop_signal is not None:
                log.info("workers_stopping", signal=signal.Signals(self._stop_signal).name)
                return 0
            for index, process in list(self._workers.items()):
                code = process.poll()
                if code is None:
                    continue
                del self._workers[index]
                self._mark_dead(process.pid)
                log.warning("worker_exited", worker=index, pid=process.pid, code=code)
                if code == EXIT_CANNOT_START:
                    print(
                        f"extauthz: worker {index} could not start (exit {code}); stopping",
                        file=sys.stderr,
                    )
                    return EXIT_CANNOT_START
                if not self._schedule_restart(index):
                    return 1
            now = self._clock()
            for index, due in list(self._due.items()):
                if due <= now:
                    del self._due[index]
                    self._start(index)

    def _schedule_restart(self, index: int) -> bool:
        """Plan a restart of worker ``index`` after its backoff; False when over the limit."""
        now = self._clock()
        window_start = now - self._limits.window_s
        while self._restarts and self._restarts[0] < window_start:
            self._restarts.popleft()
        if len(self._restarts) >= self._limits.max_restarts:
            log.error(
                "worker_restart_limit",
                restarts=len(self._restarts),
                window_s=self._limits.window_s,
            )
            print(
                f"extauthz: workers crashed {len(self._restarts) + 1} times within "
                f"{self._limits.window_s:g} s; stopping (see the worker_exited events)",
                file=sys.stderr,
            )
            return False
        self._restarts.append(now)
        crashes = self._crashes.setdefault(index, deque())
        while crashes and crashes[0] < window_start:
            crashes.popleft()
        crashes.append(now)
        delay = min(self._limits.max_backoff_s, self._limits.backoff_s * 2 ** (len(crashes) - 1))
        self._due[index] = now + delay
        log.info("worker_restarting", worker=index, delay_s=delay)
        return True

    def _start(self, index: int) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_ENTRY],
            stdin=subprocess.PIPE,
            env=self._env,
            close_fds=True,
        )
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died at once: the loop will see it
            pickle.dump(self._spec(index), process.stdin)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        self._workers[index] = process
        log.info("worker_started", worker=index, pid=process.pid)

    def _stop_all(self, selector: selectors.BaseSelector, read_fd: int) -> None:
        """SIGTERM every worker (each drains: NOT_SERVING first), wait drain_s + grace, kill the rest."""
        self._due.clear()
        for process in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = self._clock() + self._settings.drain_s + STOP_GRACE_S
        while self._workers:
            for index, process in list(self._workers.items()):
                if process.poll() is not None:
                    del self._workers[index]
                    self._mark_dead(process.pid)
                    log.info(
                        "worker_stopped", worker=index, pid=process.pid, code=process.returncode
                    )
            remaining = deadline - self._clock()
            if not self._workers or remaining <= 0:
                break
            _wait(selector, read_fd, min(remaining, 1.0))
        for index, process in self._workers.items():
            log.warning("worker_killed", worker=index, pid=process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            self._mark_dead(process.pid)
        self._workers.clear()
        log.info("workers_stopped")

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]


def _wait(selector: selectors.BaseSelector, read_fd: int, timeout: float | None) -> None:
    """Sleep until a signal arrives or ``timeout`` passes, then empty the wakeup pipe."""
    if selector.select(timeout):
        with contextlib.suppress(BlockingIOError):
            while os.read(read_fd, 512):
                pass


# --- The worker side ------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGTERM this worker (it drains) if the supervisor dies without stopping it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        raise SystemExit(1)


def _tag_logs(index: int) -> None:
    """Add ``worker`` and ``pid`` to every log event of this worker."""
    pid = os.getpid()

    def add_worker(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["worker"] = index
        event["pid"] = pid
        return event

    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[add_worker, *processors])


def worker_main() -> int:
    """Run one worker: read its spec from stdin, then ``app.serve`` until SIGTERM."""
    spec: _Spec = pickle.load(sys.stdin.buffer)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _die_with_parent(spec.parent)

    from extauthz import app
    from extauthz.keys import KeyRing
    from extauthz.policy.loader import PolicyError
    from extauthz.telemetry import logs

    logs.configure(spec.settings.log_level, spec.settings.log_format)
    _tag_logs(spec.index)
    keys = KeyRing(current_id=spec.keys_current, keys=spec.keys)
    try:
        asyncio.run(app.serve(spec.settings, keys=keys, noise=spec.noise))
    except PolicyError as exc:
        print(f"extauthz: worker {spec.index}: invalid policy {exc.source}", file=sys.stderr)
        return EXIT_CANNOT_START
    except (ValueError, OSError) as exc:
        print(f"extauthz: worker {spec.index}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except KeyboardInterrupt:  # Ctrl-C before the loop's handlers were installed
        return 130
    return 0
