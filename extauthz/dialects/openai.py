"""OpenAI-compatible LLM APIs: chat completions, completions and embeddings.

Paths: ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``. The
:class:`~extauthz.dialects.base.Dialect` protocol hands ``parse_request`` the body alone, so the
API is read from the body's one required field: ``messages`` (chat), ``prompt`` (completions) or
``input`` (embeddings). A body with none of them, or more than one, is ``invalid_input``.

Instances are the answers a request asks for, the count extraction budgets charge:

- chat: ``n`` (default 1, an int in 1..128);
- completions: the number of prompts times ``n`` (a string or a list of token ids is one prompt,
  a list of strings or of token-id lists is one prompt each);
- embeddings: the number of inputs, counted the same way.

Text stays out of ``ParsedRequest.inputs`` (later issues add features); ``doc`` keeps the JSON.
Responses expose their token usage through :func:`token_usage` for token quotas, and an
embeddings response its vectors as the ``embedding`` output, an ``(n, d)`` float array that
:meth:`OpenAIDialect.serialize_response` writes back in place.

Streaming (``"stream": true``) is not protected yet: such a request is counted like any other,
but its answer is a server-sent event stream that ``parse_response`` cannot read. A later issue
protects SSE; until then callers can tell such requests apart with :func:`is_streaming`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

import numpy as np
import numpy.typing as npt

from extauthz.dialects.base import (
    DialectError,
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

__all__ = ["EMBEDDING", "MAX_N", "OpenAIDialect", "is_streaming", "token_usage"]

_PATH: Final = re.compile(r"/v1/(?:chat/completions|completions|embeddings)")
#: The largest ``n`` accepted, OpenAI's own bound.
MAX_N: Final = 128
#: The output name of an embeddings response's vectors.
EMBEDDING: Final = "embedding"
# The field that names each API, in the order the error message lists them.
_API_FIELDS: Final = ("messages", "prompt", "input")


class OpenAIDialect:
    """Count the answers of OpenAI-compatible requests; read usage and embeddings of responses."""

    __slots__ = ()
    name: str = "openai"

    def matches(self, path: str) -> bool:
        """Tell whether ``path`` is a chat, completions or embeddings path (query ignored)."""
        return _PATH.fullmatch(path.partition("?")[0]) is not None

    def parse_request(self, body: bytes, *, max_instances: int) -> ParsedRequest:
        """Count the answers the request asks for; refuse bad fields and oversized requests."""
        doc = _object(load_json(body))
        present = [key for key in _API_FIELDS if key in doc]
        if len(present) != 1:
            fields = ", ".join(repr(key) for key in _API_FIELDS)
            found = "none" if not present else ", ".join(repr(key) for key in present)
            raise DialectError(
                "invalid_input", f"body must have exactly one of {fields}; found {found}"
            )
        _check_stream(doc)
        key = present[0]
        if key == "messages":
            _check_messages(doc["messages"])
            count = _n(doc)
        elif key == "prompt":
            count = _prompt_count(doc["prompt"], "prompt") * _n(doc)
        else:
            count = _prompt_count(doc["input"], "input")
        check_batch(count, max_instances)
        return ParsedRequest(count, {}, doc)

    def parse_response(self, body: bytes) -> ParsedResponse:
        """Read a response: the vectors of an embeddings list, nothing numeric otherwise (502s)."""
        try:
            doc = _object(load_json(body))
        except DialectError as exc:
            raise upstream_error(exc) from None
        vectors = _embeddings(doc)
        if vectors is None:
            return ParsedResponse(outputs={}, doc=doc)
        return ParsedResponse(outputs={EMBEDDING: vectors}, doc=doc, dtypes={EMBEDDING: "FP64"})

    def serialize_response(
        self, parsed: ParsedResponse, outputs: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        """Write replaced embeddings back into ``data[i].embedding``; keep every other field."""
        check_replacements(parsed, outputs)
        doc = _object(parsed.doc)
        if EMBEDDING not in outputs:
            return dump_json(doc)
        vectors = encode_output(outputs[EMBEDDING], "FP64", EMBEDDING)
        data = [{**item, EMBEDDING: row} for item, row in zip(doc["data"], vectors, strict=True)]
        return dump_json({**doc, "data": data})


def is_streaming(doc: object) -> bool:
    """Tell whether a parsed request asks for a server-sent event stream (``"stream": true``)."""
    return isinstance(doc, dict) and doc.get("stream") is True


def token_usage(doc: object) -> int | None:
    """Return the tokens a response says it used, or None when it does not say so validly.

    ``usage.total_tokens`` when it is a non-negative int, else ``prompt_tokens +
    completion_tokens`` when both are; strings, floats, booleans and negatives count as absent.
    """
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if _is_count(total):
        return total
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if _is_count(prompt) and _is_count(completion):
        return prompt + completion
    return None


def _is_count(value: object) -> TypeGuard[int]:
    # type() rather than isinstance(): JSON true is a bool, and bool is an int subclass.
    return type(value) is int and value >= 0


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DialectError("invalid_input", "body must be a JSON object")
    return doc


def _check_stream(doc: Mapping[str, Any]) -> None:
    """Refuse a non-boolean ``stream``: a server reading it as truthy would stream unprotected."""
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise DialectError("invalid_input", "stream must be true or false")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise DialectError("invalid_input", "messages must be a non-empty list")
    if not all(isinstance(message, dict) for message in messages):
        raise DialectError("invalid_input", "messages must hold objects")


def _n(doc: Mapping[str, Any]) -> int:
    """Return ``n``: 1 when absent or null, else an int in 1..MAX_N."""
    n = doc.get("n")
    if n is None:
        return 1
    if type(n) is not int or not 1 <= n <= MAX_N:
        raise DialectError("invalid_input", f"n must be an integer from 1 to {MAX_N}")
    return n


def _prompt_count(value: object, where: str) -> int:
    """Count the prompts (or embedding inputs) of a string, token ids, or a list of either."""
    if isinstance(value, str):
        return 1
    if not isinstance(value, list):
        raise DialectError("invalid_input", f"{where} must be a string or a list")
    kinds = set(map(type, value))
    if kinds <= {str} or kinds == {int}:
        # A list of strings holds one prompt each; a list of token ids is one prompt.
        return len(value) if kinds != {int} else 1
    if kinds == {list}:
        if not all(item and set(map(type, item)) == {int} for item in value):
            raise DialectError("invalid_input", f"{where}: token lists must be non-empty ints")
        return len(value)
    raise DialectError(
        "invalid_input", f"{where} must be a string, token ids, or a list of strings or token ids"
    )


def _embeddings(doc: Mapping[str, Any]) -> npt.NDArray[np.float64] | None:
    """Return ``data[i].embedding`` as an ``(n, d)`` float array, or None when not such a list.

    Base64 vectors, ragged rows and any other ``data`` are left as they are: only a rectangular
    float matrix can be rewritten and written back.
    """
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        return None
    if not all(isinstance(item, dict) and isinstance(item.get(EMBEDDING), list) for item in data):
        return None
    rows = [item[EMBEDDING] for item in data]
    if not rows[0] or len(set(map(len, rows))) != 1:
        return None
    try:
        numeric = as_numeric(rows, "data[].embedding")
    except DialectError:
        return None
    if numeric is None or numeric.datatype == "BOOL" or numeric.values.ndim != 2:
        return None
    return numeric.values
