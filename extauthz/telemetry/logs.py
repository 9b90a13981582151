"""structlog set-up: one JSON event per line, secrets redacted, request id bound via contextvars.

The audit log is the ``decision`` event (logger ``extauthz.audit``): one line per Check and
one per ext_proc stream that reached a verdict, refusals and allows alike, at info level.
``envoy/README.md`` lists its fields.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

if TYPE_CHECKING:
    from extauthz.core.decision import Decision

AUDIT_EVENT: Final = "decision"
# Paths are logged without their query and cut here: the query may carry data, and a
# pathological path must not make a pathological line.
_MAX_PATH: Final = 256

_audit = structlog.get_logger("extauthz.audit")

REDACTED_KEYS = frozenset(
    {"authorization", "cookie", "x-api-key", "api_key", "token", "password", "key"}
)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any secret-named field (at the top level or in a headers dict)."""
    for name in list(event):
        if name.lower() in REDACTED_KEYS:
            event[name] = "[redacted]"
        elif isinstance(event[name], dict):
            event[name] = {
                k: ("[redacted]" if str(k).lower() in REDACTED_KEYS else v)
                for k, v in event[name].items()
            }
    return event


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the stdlib root logger (grpc, aiohttp) to write to stderr."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=max(numeric, logging.WARNING),
        stream=sys.stderr,
        format="%(levelname)s %(name)s %(message)s",
    )


def log_decision(
    mode: Literal["check", "process"],
    decision: Decision,
    *,
    request_id: str,
    path: str,
    route: str,
    status: int,
    duration_s: float,
    instances: int = 0,
    action: str | None = None,
    reasons: Sequence[str] | None = None,
) -> None:
    """Write the canonical ``decision`` line of one request: the audit log.

    ``client`` is the opaque id (``key:<name>``, ``jwt:<hash>``, ``ip:<address>``), never the
    raw key. ``status`` is what the guard answered (200: passed on; for ext_proc, the
    upstream's status once its answer came back). ``action`` and ``reasons`` override the
    decision's when a later phase refused the request (ext_proc's body checks).
    ``duration_ms`` is the guard's own time (for ext_proc, summed over the stream's messages).
    """
    identity = decision.identity
    _audit.info(
        AUDIT_EVENT,
        mode=mode,
        request_id=request_id,
        path=path.split("?", 1)[0][:_MAX_PATH],
        route=route,
        client=identity.client_id,
        tier=identity.tier,
        action=action or decision.action.value,
        risk=decision.level.label,
        risk_level=int(decision.level),  # `level` is the log level (add_log_level)
        reasons=list(decision.reasons if reasons is None else reasons),
        instances=instances,
        status=status,
        enforced=decision.enforced,
        duration_ms=round(duration_s * 1000.0, 3),
    )
