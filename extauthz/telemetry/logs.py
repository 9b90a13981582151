"""structlog set-up: one JSON event per line, secrets redacted, request id bound via contextvars."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

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
