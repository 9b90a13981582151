"""Model API dialects: read a body's instances and numeric inputs/outputs, write outputs back.

Every defense goes through a :class:`Dialect`: limits charge ``ParsedRequest.instances``,
detectors read ``ParsedRequest.inputs``, output protection rewrites ``ParsedResponse.outputs``
and hands them to ``serialize_response``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from extauthz.dialects.base import (
    Dialect,
    DialectError,
    ParsedRequest,
    ParsedResponse,
    ensure_json_media,
)
from extauthz.dialects.kserve_v1 import KServeV1Dialect
from extauthz.dialects.oip_v2 import OipV2Dialect
from extauthz.dialects.openai import OpenAIDialect

__all__ = [
    "DIALECTS",
    "Dialect",
    "DialectError",
    "ParsedRequest",
    "ParsedResponse",
    "detect_dialect",
    "ensure_json_media",
    "get_dialect",
]

#: Every dialect by name, in the order auto-detection tries them.
DIALECTS: Mapping[str, Dialect] = MappingProxyType(
    {d.name: d for d in (KServeV1Dialect(), OipV2Dialect(), OpenAIDialect())}
)


def get_dialect(name: str) -> Dialect:
    """Return the dialect called ``name``; raise KeyError naming the known ones otherwise."""
    try:
        return DIALECTS[name]
    except KeyError:
        known = ", ".join(DIALECTS)
        raise KeyError(f"unknown dialect {name!r} (expected one of: {known})") from None


def detect_dialect(path: str) -> Dialect | None:
    """Return the first dialect whose URL paths look like ``path``, or None."""
    return next((d for d in DIALECTS.values() if d.matches(path)), None)
