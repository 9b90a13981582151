"""Hot reload: keep the policy in force and swap it when its files change.

Polling ``stat`` of the resolved path catches in-place edits, renames and the
``..data`` symlink swap of a Kubernetes ConfigMap mount, where inotify on the
mounted path is known to miss updates. A bad file keeps the old snapshot.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from extauthz.policy.loader import PolicyError, Snapshot, load_default, load_policy
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.policy")

_Stamp = tuple[tuple[str, int, int, int], ...]


class PolicyHolder:
    """The policy snapshot in force; ``current`` is read once per request."""

    def __init__(self, path: Path | None, *, clock: Callable[[], float]) -> None:
        self._path = path
        self._clock = clock
        self.current: Snapshot = load_policy(path) if path is not None else load_default()
        self._stamp = self._stamp_of(self.current)
        metrics.POLICY_INFO.set(clock())

    @property
    def path(self) -> Path | None:
        return self._path

    def reload_if_changed(self) -> bool:
        """Load the policy again if a watched file changed; return True when a new one applies."""
        if self._path is None:
            return False
        stamp = self._stamp_of(self.current)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            snapshot = load_policy(self._path)
        except PolicyError as exc:
            metrics.POLICY_RELOAD_ERRORS.inc()
            log.error(
                "policy_reload_failed",
                source=exc.source,
                problems=exc.problems,
                kept=self.current.digest[:12],
            )
            return False
        self._stamp = self._stamp_of(snapshot)
        if snapshot.digest == self.current.digest:
            return False
        self.current = snapshot
        metrics.POLICY_RELOADS.inc()
        metrics.POLICY_INFO.set(self._clock())
        log.info("policy_reloaded", source=snapshot.source, digest=snapshot.digest[:12])
        return True

    async def watch(self, interval_s: float) -> None:
        """Poll for changes every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.reload_if_changed()
            except Exception:  # the watcher must outlive any surprise
                log.exception("policy_watch_error")

    def _stamp_of(self, snapshot: Snapshot) -> _Stamp:
        files = snapshot.watched_files or ((self._path,) if self._path else ())
        return tuple(_file_stamp(p) for p in files)


def _file_stamp(path: Path) -> tuple[str, int, int, int]:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return (str(path), -1, -1, -1)
    return (real, st.st_ino, st.st_mtime_ns, st.st_size)
