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
Responses expose their token usage through :func:`token_usage` for token quotas, and the numbers
output protection may rewrite as outputs, which :meth:`OpenAIDialect.serialize_response` writes
back in place (every other field, and the order of tokens, kept):

- ``embedding``: an embeddings response's ``data[i].embedding``, an ``(n, d)`` float array; the
  names in :data:`EMBEDDING_OUTPUTS` (and ``ParsedResponse.embeddings``) are embedding vectors;
- ``logprob``: the sampled tokens' log probabilities, ``(T,)`` over every choice in order, from
  ``choices[i].logprobs.content[j].logprob`` (chat) or ``choices[i].logprobs.token_logprobs[j]``
  (completions; the null of an echoed first token is skipped);
- ``top_logprobs``: the alternatives, ``(T, M)``, from ``content[j].top_logprobs[m].logprob``
  (chat) or the values of each ``top_logprobs[j]`` object in its order (completions). Left out
  when the rows differ in length: only a rectangular matrix can be rewritten and written back.

Streaming (``"stream": true``) is not protected yet: such a request is counted like any other,
but its answer is a server-sent event stream that ``parse_response`` cannot read. A later issue
protects SSE; until then callers can tell such requests apart with :func:`is_streaming`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
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

__all__ = [
    "EMBEDDING",
    "EMBEDDING_OUTPUTS",
    "LOGPROB",
    "MAX_N",
    "TOP_LOGPROBS",
    "OpenAIDialect",
    "is_streaming",
    "token_usage",
]

_PATH: Final = re.compile(r"/v1/(?:chat/completions|completions|embeddings)")
#: The largest ``n`` accepted, OpenAI's own bound.
MAX_N: Final = 128
#: The output name of an embeddings response's vectors.
EMBEDDING: Final = "embedding"
#: The outputs that are embedding vectors rather than scores.
EMBEDDING_OUTPUTS: Final = frozenset({EMBEDDING})
#: The output name of the sampled tokens' log probabilities, ``(T,)``.
LOGPROB: Final = "logprob"
#: The output name of the alternatives' log probabilities, ``(T, M)``.
TOP_LOGPROBS: Final = "top_logprobs"
# The field that names each API, in the order the error message lists them.
_API_FIELDS: Final = ("messages", "prompt", "input")


class OpenAIDialect:
    """Count the answers of OpenAI-compatible requests; read usage and embeddings of responses."""

    __slots__ = ()
    name: str = "openai"

    def matches(self, path: str) -> bool:
        """Tell whether ``path`` is a chat, completions or embeddings path (query ignored)."""
        return _PATH.fullmatch(path.partition("?")[0]) is not None

    def parse_request(
        self, body: bytes, *, max_instances: int, headers: Mapping[str, str] | None = None
    ) -> ParsedRequest:
        """Count the answers the request asks for; refuse bad fields and oversized requests.

        ``headers`` is ignored: OpenAI-compatible bodies are always JSON.
        """
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
        """Read a response's embeddings and token logprobs; an unreadable body is a 502."""
        try:
            doc = _object(load_json(body))
        except DialectError as exc:
            raise upstream_error(exc) from None
        outputs: dict[str, npt.NDArray[np.float64]] = {}
        vectors = _embeddings(doc)
        if vectors is not None:
            outputs[EMBEDDING] = vectors
        slots = _logprob_slots(doc)
        if slots.logprob:
            outputs[LOGPROB] = np.array([v for _, v in slots.logprob], dtype=np.float64)
        if slots.top is not None:
            outputs[TOP_LOGPROBS] = np.array([row for _, row in slots.top], dtype=np.float64)
        return ParsedResponse(
            outputs=outputs,
            doc=doc,
            dtypes=dict.fromkeys(outputs, "FP64"),
            embeddings=EMBEDDING_OUTPUTS & outputs.keys(),
        )

    def serialize_response(
        self, parsed: ParsedResponse, outputs: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        """Write replaced embeddings and logprobs back where they were read; keep all else."""
        check_replacements(parsed, outputs)
        doc = _object(parsed.doc)
        if not outputs:
            return dump_json(doc)
        encoded = {name: encode_output(v, "FP64", name).tolist() for name, v in outputs.items()}
        if EMBEDDING in encoded:
            data = [
                {**item, EMBEDDING: row}
                for item, row in zip(doc["data"], encoded[EMBEDDING], strict=True)
            ]
            doc = {**doc, "data": data}
        if LOGPROB in encoded or TOP_LOGPROBS in encoded:
            doc = _write_logprobs(doc, encoded.get(LOGPROB), encoded.get(TOP_LOGPROBS))
        return dump_json(doc)


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


# --- token logprobs ---------------------------------------------------------------------------

# A token's place: (choice index, token index within that choice's logprobs).
_Slot = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _LogprobSlots:
    """Where a response's token logprobs are, in reading order, with their values."""

    logprob: list[tuple[_Slot, float]]
    top: list[tuple[_Slot, list[float]]] | None
    """The alternatives' rows, or None when absent, ragged or not all numbers."""


def _is_number(value: object) -> TypeGuard[int | float]:
    return type(value) is float or type(value) is int


def _logprob_slots(doc: Mapping[str, Any]) -> _LogprobSlots:
    """Find every sampled token's logprob and every row of alternatives, choice by choice.

    A choice's ``logprobs`` holding ``content`` is chat's form, one holding ``token_logprobs``
    the completions form. Tokens without a number (an echoed first token's null) are skipped;
    a malformed or ragged set of alternatives leaves them all out.
    """
    logprob: list[tuple[_Slot, float]] = []
    top: list[tuple[_Slot, list[float]]] = []
    top_ok = True
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return _LogprobSlots(logprob, None)
    for i, choice in enumerate(choices):
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(lp, dict):
            continue
        content = lp.get("content")
        if isinstance(content, list):
            for j, entry in enumerate(content):
                if not isinstance(entry, dict):
                    continue
                if _is_number(value := entry.get("logprob")):
                    logprob.append(((i, j), float(value)))
                if top_ok and (alternatives := entry.get("top_logprobs")) is not None:
                    row = _chat_row(alternatives)
                    top_ok = row is not None
                    if row is not None:
                        top.append(((i, j), row))
            continue
        values = lp.get("token_logprobs")
        if isinstance(values, list):
            logprob.extend(((i, j), float(v)) for j, v in enumerate(values) if _is_number(v))
        rows = lp.get("top_logprobs")
        if top_ok and isinstance(rows, list):
            for j, mapping in enumerate(rows):
                if mapping is None:
                    continue
                if not (isinstance(mapping, dict) and all(map(_is_number, mapping.values()))):
                    top_ok = False
                    break
                top.append(((i, j), [float(v) for v in mapping.values()]))
        elif rows is not None:
            top_ok = False
    rectangular = bool(top) and bool(top[0][1]) and len({len(r) for _, r in top}) == 1
    return _LogprobSlots(logprob, top if top_ok and rectangular else None)


def _chat_row(alternatives: object) -> list[float] | None:
    """Return the logprobs of a chat token's alternatives, or None when malformed."""
    if not isinstance(alternatives, list):
        return None
    row = []
    for item in alternatives:
        value = item.get("logprob") if isinstance(item, dict) else None
        if not _is_number(value):
            return None
        row.append(float(value))
    return row


def _write_logprobs(
    doc: dict[str, Any], logprob: list[float] | None, top: list[list[float]] | None
) -> dict[str, Any]:
    """Return ``doc`` with the slots :func:`_logprob_slots` found holding the new values.

    Only the containers on the way to a replaced number are copied; ``doc`` is not changed.
    """
    slots = _logprob_slots(doc)
    new_logprob: dict[_Slot, float] = {}
    new_top: dict[_Slot, list[float]] = {}
    if logprob is not None:
        new_logprob = {slot: value for (slot, _), value in zip(slots.logprob, logprob, strict=True)}
    if top is not None and slots.top is not None:
        new_top = {slot: row for (slot, _), row in zip(slots.top, top, strict=True)}
    logprob_choices = {i for i, _ in new_logprob}
    top_choices = {i for i, _ in new_top}
    choices = list(doc["choices"])
    for i in sorted(logprob_choices | top_choices):
        lp = dict(choices[i]["logprobs"])
        if isinstance(lp.get("content"), list):
            lp["content"] = [
                _chat_entry(entry, new_logprob.get((i, j)), new_top.get((i, j)))
                for j, entry in enumerate(lp["content"])
            ]
        else:
            if i in logprob_choices:
                lp["token_logprobs"] = [
                    new_logprob.get((i, j), v) for j, v in enumerate(lp["token_logprobs"])
                ]
            if i in top_choices:
                lp["top_logprobs"] = [
                    mapping
                    if (row := new_top.get((i, j))) is None
                    else dict(zip(mapping, row, strict=True))
                    for j, mapping in enumerate(lp["top_logprobs"])
                ]
        choices[i] = {**choices[i], "logprobs": lp}
    return {**doc, "choices": choices}


def _chat_entry(entry: Any, value: float | None, row: list[float] | None) -> Any:
    """Return a chat token entry with its logprob and its alternatives' logprobs replaced."""
    if value is None and row is None:
        return entry
    entry = dict(entry)
    if value is not None:
        entry["logprob"] = value
    if row is not None:
        entry["top_logprobs"] = [
            {**item, "logprob": x} for item, x in zip(entry["top_logprobs"], row, strict=True)
        ]
    return entry
