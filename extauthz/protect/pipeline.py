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
from extauthz.keys import KeyRing
from extauthz.policy.model import OutputStep
from extauthz.protect.perturb import (
    NoiseContext,
    canonical_rows,
    canonical_text,
    detect_kind,
    protect_outputs,
)
from extauthz.protect.watermark import LabelMarks, apply_label_marks, apply_soft_mark

# Fields of an OpenAI-compatible request that make up its input (for keyed noise).
_TEXT_FIELDS = ("messages", "prompt", "input")


@dataclass(frozen=True, slots=True)
class RequestKey:
    """What keyed noise is derived from: one canonical byte string per instance when the
    request's numeric inputs are row-aligned, and a digest of the whole canonical input."""

    rows: tuple[bytes, ...] | None
    digest: bytes


@dataclass(frozen=True, slots=True)
class Marks:
    """Watermarks for one answer: the soft mark's strength and the label-mark rate, the keys,
    and the request's inputs (raw rows for the soft mark, canonical rows for the selection)."""

    keys: KeyRing
    label_rate: float
    soft_epsilon: float
    raw: np.ndarray | None
    canonical: Sequence[bytes] | None


@dataclass(frozen=True, slots=True)
class Rewrite:
    """A rewritten answer, what the rewrite cost it per instance, and the label marks it got."""

    body: bytes
    l1: np.ndarray
    top1_changed: np.ndarray
    label_marks: LabelMarks | None = None


def quantum_of(steps: Sequence[OutputStep]) -> float:
    """The input grid of the pipeline's keyed steps (its first one), or the default."""
    for step in steps:
        if step.policy in ("keyed_noise", "misinform"):
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
    marks: Marks | None = None,
) -> Rewrite | None:
    """Soft mark, then ``steps``, then label marks; ``None`` when nothing changes.

    The soft mark goes first so the pipeline's rounding and noise act on the marked answer;
    label marks go last because argmax-preserving steps would undo them.
    """
    if not parsed.outputs or not (steps or (marks and (marks.label_rate or marks.soft_epsilon))):
        return None
    rows = _rows(parsed)
    outputs = dict(parsed.outputs)
    target = _probabilities(parsed, rows)
    original = outputs[target].reshape(rows, -1) if target else None
    if (
        marks
        and target
        and original is not None
        and marks.soft_epsilon
        and marks.raw is not None
        and len(marks.raw) == rows
    ):
        outputs[target] = apply_soft_mark(
            original, marks.raw, marks.keys, marks.soft_epsilon
        ).reshape(outputs[target].shape)
    l1 = np.zeros(rows)
    top1_changed = np.zeros(rows, dtype=bool)
    if steps:
        canonical: Sequence[bytes] | None = None
        if request is not None:
            if request.rows is not None and len(request.rows) == rows:
                canonical = request.rows  # row i answers input i: noise keyed by that input alone
            else:
                canonical = [request.digest + i.to_bytes(4, "big") for i in range(rows)]
        context = NoiseContext(key=key, client_id=client_id, canonical_inputs=canonical)
        protected = protect_outputs(
            outputs, steps, context, embedding_names=parsed.embeddings, dtypes=parsed.dtypes
        )
        if protected is not None:
            outputs = dict(protected.outputs)
            l1, top1_changed = protected.l1, protected.top1_changed
    label_marks = None
    if (
        marks
        and target
        and marks.label_rate
        and marks.canonical is not None
        and len(marks.canonical) == rows
    ):
        label_marks = apply_label_marks(
            outputs[target].reshape(rows, -1), marks.canonical, marks.keys, marks.label_rate
        )
        outputs[target] = label_marks.served.reshape(outputs[target].shape)
    if target and original is not None:
        served = outputs[target].reshape(rows, -1)
        l1 = np.abs(served - original).sum(axis=1)
        top1_changed = served.argmax(axis=1) != original.argmax(axis=1)
    if all(outputs[name] is parsed.outputs[name] for name in outputs):
        return None
    body = dialect.serialize_response(parsed, outputs)
    return Rewrite(body, l1, top1_changed, label_marks)


def _probabilities(parsed: ParsedResponse, rows: int) -> str | None:
    """The first output holding one probability row per instance (what marks go on)."""
    for name in sorted(parsed.outputs):
        values = parsed.outputs[name]
        kind = detect_kind(
            name, values, embedding_names=parsed.embeddings, dtype=parsed.dtypes.get(name)
        )
        if kind == "probabilities" and values.ndim >= 1 and values.shape[0] == rows:
            return name
    return None


def _rows(parsed: ParsedResponse) -> int:
    first = next(iter(parsed.outputs.values()))
    return int(first.shape[0]) if first.ndim else 1
