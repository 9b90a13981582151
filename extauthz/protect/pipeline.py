"""Response protection for one request: canonical request keys, then the output pipeline.

Pure: the ext_proc service hands in parsed bodies and gets a new body and its distortion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from extauthz.dialects.base import Dialect, ParsedRequest, ParsedResponse
from extauthz.policy.model import OutputStep
from extauthz.protect.perturb import NoiseContext, canonical_rows, canonical_text, protect_outputs

# Fields of an OpenAI-compatible request that make up its input (for keyed noise).
_TEXT_FIELDS = ("messages", "prompt", "input")


@dataclass(frozen=True, slots=True)
class RequestKey:
    """What keyed noise is derived from: one canonical byte string per instance when the
    request's numeric inputs are row-aligned, and a digest of the whole canonical input."""

    rows: tuple[bytes, ...] | None
    digest: bytes


@dataclass(frozen=True, slots=True)
class Rewrite:
    """A rewritten answer and what the rewrite cost it, per instance."""

    body: bytes
    l1: np.ndarray
    top1_changed: np.ndarray


def quantum_of(steps: Sequence[OutputStep]) -> float:
    """The input grid of the pipeline's keyed noise (its first keyed step), or the default."""
    for step in steps:
        if step.policy == "keyed_noise":
            return step.quantum
    return OutputStep().quantum


def request_key(parsed: ParsedRequest, *, quantum: float) -> RequestKey:
    """Canonicalise the request's inputs so that repeats and tiny jitter give the same key."""
    if parsed.inputs:
        per_input = [
            canonical_rows(parsed.inputs[name], quantum=quantum) for name in sorted(parsed.inputs)
        ]
        if all(len(rows) == parsed.instances for rows in per_input):
            rows = tuple(b"".join(parts) for parts in zip(*per_input, strict=True))
            return RequestKey(rows, hashlib.sha256(b"".join(rows)).digest())
    text = b""
    if isinstance(parsed.doc, dict):
        fields = {name: parsed.doc[name] for name in _TEXT_FIELDS if name in parsed.doc}
        text = canonical_text(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode())
    return RequestKey(None, hashlib.sha256(text).digest())


def rewrite_response(
    dialect: Dialect,
    parsed: ParsedResponse,
    steps: Sequence[OutputStep],
    *,
    key: bytes,
    client_id: str,
    request: RequestKey | None,
) -> Rewrite | None:
    """Apply ``steps`` to the answer's outputs; ``None`` when nothing changes."""
    if not steps or not parsed.outputs:
        return None
    rows = _rows(parsed)
    canonical: Sequence[bytes] | None = None
    if request is not None:
        if request.rows is not None and len(request.rows) == rows:
            canonical = request.rows  # row i answers input i: noise keyed by that input alone
        else:
            canonical = [request.digest + i.to_bytes(4, "big") for i in range(rows)]
    context = NoiseContext(key=key, client_id=client_id, canonical_inputs=canonical)
    protected = protect_outputs(
        parsed.outputs, steps, context, embedding_names=parsed.embeddings, dtypes=parsed.dtypes
    )
    if protected is None:
        return None
    body = dialect.serialize_response(parsed, protected.outputs)
    return Rewrite(body, protected.l1, protected.top1_changed)


def _rows(parsed: ParsedResponse) -> int:
    first = next(iter(parsed.outputs.values()))
    return int(first.shape[0]) if first.ndim else 1
