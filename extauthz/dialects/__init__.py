"""Model API dialects: read a body's instances and numeric inputs/outputs, write outputs back.

Every defense goes through a :class:`Dialect`: limits charge ``ParsedRequest.instances``,
detectors read ``ParsedRequest.inputs``, output protection rewrites ``ParsedResponse.outputs``
and hands them to ``serialize_response``. A route picks its dialect with
:func:`dialect_for_route`: a named one, pointers for any JSON API, or detection by path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from extauthz.dialects.base import (
    Dialect,
    DialectError,
    ParsedRequest,
    ParsedResponse,
    ensure_json_media,
)
from extauthz.dialects.jsonpointer import JsonPointerDialect
from extauthz.dialects.kserve_v1 import KServeV1Dialect
from extauthz.dialects.oip_v2 import OipV2Dialect, is_binary_response
from extauthz.dialects.openai import OpenAIDialect

if TYPE_CHECKING:
    from extauthz.policy.model import Route

__all__ = [
    "DIALECTS",
    "Dialect",
    "DialectError",
    "JsonPointerDialect",
    "ParsedRequest",
    "ParsedResponse",
    "detect_dialect",
    "dialect_for_route",
    "ensure_json_media",
    "get_dialect",
    "is_binary_response",
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


def dialect_for_route(route: Route) -> Dialect | None:
    """Return the dialect a route names, or None for ``auto`` (then use :func:`detect_dialect`).

    A ``jsonpointer`` route gets a :class:`JsonPointerDialect` for its pointers, built once per
    distinct pair of pointer tuples; bad pointers raise ValueError.
    """
    if route.dialect == "auto":
        return None
    if route.dialect == "jsonpointer":
        if route.pointers is None:
            raise ValueError(f"route {route.prefix!r}: the jsonpointer dialect needs pointers")
        return _pointer_dialect(route.pointers.inputs, route.pointers.outputs)
    return get_dialect(route.dialect)


@functools.lru_cache(maxsize=256)
def _pointer_dialect(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> JsonPointerDialect:
    return JsonPointerDialect(inputs, outputs)
