"""structlog set-up: one JSON event per line, secrets redacted, request id bound via contextvars.

The audit log is the ``decision`` event (logger ``extauthz.audit``): one line per Check and
one per ext_proc stream that reached a verdict, refusals and allows alike, at info level.
``envoy/README.md`` lists its fields.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
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
    for name, value in list(event.items()):
        if _secret(name):
            event[name] = "[redacted]"
        elif isinstance(value, dict):
            event[name] = {k: ("[redacted]" if _secret(k) else v) for k, v in value.items()}
    return event


_SECRET_NAMES: dict[object, bool] = {}


def _secret(name: object) -> bool:
    """Whether a field named ``name`` holds a secret, remembered per name (names are few)."""
    secret = _SECRET_NAMES.get(name)
    if secret is None:
        secret = str(name).lower() in REDACTED_KEYS
        if len(_SECRET_NAMES) < 4096:  # bounded: header names come from clients
            _SECRET_NAMES[name] = secret
    return secret


def _json_fallback(obj: Any) -> Any:
    """Serialize what json cannot as structlog's JSONRenderer does: ``__structlog__`` or repr."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


@dataclass(frozen=True, slots=True)
class _AuditWriter:
    """The audit line's direct path: the same fields, order, redaction and JSON text as the
    configured structlog chain, without its per-call machinery (a bound-logger proxy, an event
    dict copy, six processor calls), which cost more than the decision it records.

    Used only while structlog runs the chain ``configure`` installed (``capture_logs`` and any
    other configuration take the ordinary path).
    """

    processors: list[Any]
    renderer: Any
    enabled: bool
    write: Callable[[str], None]
    encode: Callable[[Any], str]

    def active(self) -> bool:
        processors = self.processors
        return (
            structlog.get_config()["processors"] is processors
            and bool(processors)
            and processors[-1] is self.renderer
        )

    def emit(self, event: dict[str, Any]) -> None:
        event["event"] = AUDIT_EVENT
        structlog.contextvars.merge_contextvars(None, "info", event)
        event["level"] = "info"
        event["timestamp"] = (
            datetime.datetime.now(tz=datetime.UTC).isoformat().replace("+00:00", "Z")
        )
        if len(event) > _AUDIT_FIELDS:  # context variables were merged: they may be secrets
            redact(None, "info", event)
        self.write(self.encode(event))


# The audit event's own fields (those log_decision passes, plus event, level, timestamp).
_AUDIT_FIELDS: Final = 18
_writer: _AuditWriter | None = None


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the stdlib root logger (grpc, aiohttp) to write to stderr."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    global _writer
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        structlog.processors.format_exc_info,
        renderer,
    ]
    # One write per line (message and newline together): workers share stderr, and print()'s
    # two writes let their lines interleave.
    factory = structlog.WriteLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _writer = None
    if fmt == "json":
        # The same json.dumps text JSONRenderer writes, from one encoder built once.
        encoder = json.JSONEncoder(default=_json_fallback)
        _writer = _AuditWriter(
            processors, renderer, numeric <= logging.INFO, factory().msg, encoder.encode
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
    level = decision.level
    fields: dict[str, Any] = {
        "mode": mode,
        "request_id": request_id,
        "path": path.split("?", 1)[0][:_MAX_PATH],
        "route": route,
        "client": identity.client_id,
        "tier": identity.tier,
        "action": action or decision.action.value,
        "risk": level.label,
        "risk_level": int(level),  # `level` is the log level (add_log_level)
        "reasons": list(decision.reasons if reasons is None else reasons),
        "instances": instances,
        "status": status,
        "enforced": decision.enforced,
        "duration_ms": round(duration_s * 1000.0, 3),
        # The terms of use version the client had accepted ("" when none or no terms).
        "terms": identity.terms_accepted,
    }
    writer = _writer
    if writer is not None and writer.active():
        if writer.enabled:
            writer.emit(fields)
        return
    _audit.info(AUDIT_EVENT, **fields)
