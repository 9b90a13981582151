"""Any JSON model API, located by RFC 6901 JSON pointers from the policy.

A route with ``dialect: jsonpointer`` names where its requests keep their inputs and its answers
their outputs (``/instances``, ``/data/0/scores``). The list at the first input pointer is the
batch: its length is the instance count (any other value is one instance). Numeric values at the
input pointers are the request's inputs; numeric, rectangular values at the output pointers are
the outputs output protection may rewrite, written back where they were found.

Pointers use RFC 6901's escapes: ``~1`` is ``/`` and ``~0`` is ``~`` inside a name; ``""`` is
the whole document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from extauthz.dialects.base import (
    DialectError,
    NumericArray,
    ParsedRequest,
    ParsedResponse,
    as_numeric,
    check_batch,
    check_replacements,
    dump_json,
    encode_output,
    load_json,
    upstream_error,
)

__all__ = ["JsonPointerDialect", "parse_pointer", "resolve"]

_MISSING: Final = object()


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """Split an RFC 6901 pointer into its unescaped reference tokens; raise ValueError if bad.

    ``""`` is the whole document (no tokens); otherwise the pointer starts with ``/`` and every
    ``~`` is followed by ``0`` or ``1``.
    """
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON pointer (it must start with '/')")
    tokens = pointer[1:].split("/")
    for token in tokens:
        if "~" in token.replace("~0", "").replace("~1", ""):
            raise ValueError(f"{pointer!r}: '~' must be followed by 0 or 1")
    # Unescape ~1 before ~0, so that "~01" becomes "~1" and not "/".
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in tokens)


def resolve(doc: object, tokens: Sequence[str]) -> object:
    """Return the value ``tokens`` point at in ``doc``, or raise KeyError when there is none.

    Array indexes are decimal without leading zeros; ``-`` (past the end) never exists.
    """
    value = doc
    for token in tokens:
        if isinstance(value, dict):
            if token not in value:
                raise KeyError(token)
            value = value[token]
        elif isinstance(value, list):
            value = value[_index(token, len(value))]
        else:
            raise KeyError(token)
    return value


def _index(token: str, length: int) -> int:
    if not (token.isascii() and token.isdigit()) or (token != "0" and token.startswith("0")):
        raise KeyError(token)
    index = int(token)
    if index >= length:
        raise KeyError(token)
    return index


def _replace(doc: object, tokens: Sequence[str], value: object) -> object:
    """Return ``doc`` with ``value`` at ``tokens``, copying only the containers on the way."""
    if not tokens:
        return value
    head, rest = tokens[0], tokens[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace(doc[head], rest, value)}
    assert isinstance(doc, list)  # resolve() found the path when the response was parsed
    index = _index(head, len(doc))
    return [*doc[:index], _replace(doc[index], rest, value), *doc[index + 1 :]]


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


class JsonPointerDialect:
    """Parse and re-serialize a JSON API whose inputs and outputs sit at given pointers."""

    __slots__ = ("inputs", "outputs", "_inputs", "_outputs")
    name: str = "jsonpointer"

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        """Check the pointers; outputs may not contain one another (each is written whole)."""
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._inputs = tuple((p, parse_pointer(p)) for p in self.inputs)
        self._outputs = tuple((p, parse_pointer(p)) for p in self.outputs)
        for n, (a, tokens_a) in enumerate(self._outputs):
            for b, tokens_b in self._outputs[n + 1 :]:
                if _overlap(tokens_a, tokens_b):
                    raise ValueError(f"output pointers {a!r} and {b!r} overlap")

    def __repr__(self) -> str:
        return f"JsonPointerDialect(inputs={self.inputs!r}, outputs={self.outputs!r})"

    def matches(self, path: str) -> bool:
        """Return False: a pointer dialect is named by a route, never guessed from a path."""
        return False

    def parse_request(
        self, body: bytes, *, max_instances: int, headers: Mapping[str, str] | None = None
    ) -> ParsedRequest:
        """Count the batch at the first input pointer and read the numeric inputs.

        Every input pointer must exist (``invalid_input`` otherwise). Numeric inputs must have
        the batch's length on axis 0; a value that is not a list is one instance. Without input
        pointers a request is one instance. ``headers`` is ignored.
        """
        doc = load_json(body)
        values: list[tuple[str, object]] = []
        for pointer, tokens in self._inputs:
            try:
                values.append((pointer, resolve(doc, tokens)))
            except KeyError:
                raise DialectError("invalid_input", f"input {pointer!r} is missing") from None
        first = values[0][1] if values else None
        count = len(first) if isinstance(first, list) else 1
        check_batch(count, max_instances)
        inputs: dict[str, npt.NDArray[np.float64]] = {}
        for pointer, value in values:
            numeric = as_numeric(value, pointer)
            if numeric is None:
                continue
            array = numeric.values if isinstance(value, list) else numeric.values[np.newaxis]
            if array.shape[0] != count:
                raise DialectError(
                    "invalid_input",
                    f"input {pointer!r} holds {array.shape[0]} instances, the batch {count}",
                )
            inputs[pointer] = array
        return ParsedRequest(count, inputs, doc)

    def parse_response(self, body: bytes) -> ParsedResponse:
        """Read the numeric, rectangular values at the output pointers; others are left out.

        A body that is not JSON, or holds non-finite numbers, is the upstream's error (502).
        """
        try:
            doc = load_json(body)
        except DialectError as exc:
            raise upstream_error(exc) from None
        numeric: dict[str, NumericArray] = {}
        for pointer, tokens in self._outputs:
            try:
                read = as_numeric(resolve(doc, tokens), pointer, integer_range=True)
            except (KeyError, DialectError):
                continue
            if read is not None:
                # A lone number is one instance; its layout () writes it back as a number.
                values = read.values if read.values.ndim else read.values[np.newaxis]
                numeric[pointer] = NumericArray(values, read.datatype, read.layout)
        return ParsedResponse(
            outputs={k: v.values for k, v in numeric.items()},
            doc=doc,
            dtypes={k: v.datatype for k, v in numeric.items()},
            layouts={k: v.layout for k, v in numeric.items()},
        )

    def serialize_response(
        self, parsed: ParsedResponse, outputs: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        """Write the replaced outputs at their pointers in their wire type; keep all else."""
        check_replacements(parsed, outputs)
        doc = parsed.doc
        tokens_of = dict(self._outputs)
        for pointer, values in outputs.items():
            data = encode_output(values, parsed.dtypes.get(pointer, "FP64"), pointer)
            data = data.reshape(parsed.layouts.get(pointer, data.shape))
            # orjson writes numpy arrays of one or more dimensions; a lone number goes as itself.
            value: object = data if data.ndim else data.item()
            doc = _replace(doc, tokens_of[pointer], value)
        return dump_json(doc)
