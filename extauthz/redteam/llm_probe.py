"""Read a language model's logit vector through top-k logprobs and ``logit_bias`` over HTTP.

The probe of Carlini et al. (2024), "Stealing part of a production language model": an API
that returns the top-k logprobs and honours a logit bias lets a client read the logit of any
token. One request without bias names a reference token (the most likely one) and gives the
logits of the top k relative to it. Every later request pushes k-1 unread tokens up by ``bias``
(+100): they fill the top k-1 places, the reference stays the best of the rest in place k, and
for each pushed token ``j``::

    logit_j - logit_ref = (logprob_j - bias) - logprob_ref

so ``ceil((V - 1) / (k - 1))`` requests read the whole vector (relative to the reference).
Logit vectors of more prompts than the hidden width span only that many dimensions:
:func:`hidden_dimension` reads the model's hidden size from their singular values.

Requests go through :class:`~extauthz.challenge.client.ChallengeSession` (which solves
proof-of-work challenges) like the classifier attacks of :mod:`extauthz.redteam.attacks`. A
request the guard refuses (status other than 200), or whose answer lacks what the probe asked
for (logprobs stripped or capped, the bias removed), is recorded as a refusal; the probe gives
up after ``GIVE_UP_AFTER`` refusals in a row. When ``top_logprobs`` comes back capped, the
probe goes on with the smaller k, as an attacker would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from extauthz.challenge.client import Response
from extauthz.demo.model import toy_vocabulary

__all__ = [
    "ATTACK",
    "FIDELITY_TOLERANCE",
    "GIVE_UP_AFTER",
    "ProbeResult",
    "ProbeSession",
    "hidden_dimension",
    "probe_fidelity",
    "requests_needed",
    "run_logprob_probe",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ATTACK: Final = "logprob_probe"
#: Consecutive refused requests after which the probe gives up before its budget.
GIVE_UP_AFTER: Final = 5
#: A recovered relative logit within this distance of the truth counts as read.
FIDELITY_TOLERANCE: Final = 1e-2


class ProbeSession(Protocol):
    """What the probe needs of a session: :class:`ChallengeSession` or an in-process fake."""

    solved: int
    work_s: float

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response: ...


@dataclass(frozen=True, slots=True, eq=False)  # array fields: no elementwise ==
class ProbeResult:
    """What one probe run sent, what came back, and the logits it read."""

    attack: str
    sent: int
    """Requests sent (refused ones included)."""
    answered: int
    """Requests answered with 200 and everything the probe asked for."""
    first_refusal: int | None
    """Requests sent before the first refused or challenged one; None if none."""
    work_s: float
    """Seconds spent solving proof-of-work challenges."""
    challenges: int
    statuses: dict[int, int]
    """HTTP status -> requests answered with it."""
    reference: int | None
    """The token id the logits are relative to (None: not even the first answer came)."""
    recovered: IntArray
    """Token ids whose relative logit was read, ascending (the reference among them)."""
    logits: FloatArray
    """``(V,)`` logit minus the reference's logit; NaN where not read."""


def requests_needed(vocab_size: int, top_k: int) -> int:
    """Return the requests that read all ``vocab_size`` logits with ``top_k`` logprobs."""
    return math.ceil((vocab_size - 1) / (top_k - 1))


def _body(prompt: str, top_k: int, tokens: Sequence[int], bias: float) -> bytes:
    request: dict[str, object] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
        "logprobs": True,
        "top_logprobs": top_k,
    }
    if tokens:
        request["logit_bias"] = {str(token): bias for token in tokens}
    return json.dumps(request).encode()


def _top_logprobs(response: Response) -> list[tuple[str, float]] | None:
    """Return ``(token, logprob)`` of the first position's top logprobs, or None if unreadable."""
    if response.status != 200:
        return None
    try:
        doc = json.loads(response.body)
    except (ValueError, RecursionError):
        return None
    try:
        entries = doc["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(entries, list):
        return None
    top: list[tuple[str, float]] = []
    for entry in entries:
        token = entry.get("token") if isinstance(entry, dict) else None
        logprob = entry.get("logprob") if isinstance(entry, dict) else None
        if (
            isinstance(token, str)
            and isinstance(logprob, int | float)
            and not isinstance(logprob, bool)
            and math.isfinite(logprob)
        ):
            top.append((token, float(logprob)))
    return top


def run_logprob_probe(
    session: ProbeSession,
    path: str,
    *,
    prompt: str,
    budget: int,
    top_k: int = 5,
    bias: float = 100.0,
    headers: Mapping[str, str] | None = None,
    on_request: Callable[[int], None] | None = None,
    vocabulary: Sequence[str] | None = None,
) -> ProbeResult:
    """Read the logits of the first reply position to ``prompt`` from chat completions at ``path``.

    Send at most ``budget`` requests (``max_tokens`` 1, ``logprobs`` true, ``top_logprobs``
    ``top_k``, ``logit_bias`` +``bias`` on k-1 unread tokens). ``vocabulary`` maps the token
    strings of the answers to the ids ``logit_bias`` takes (default: the demo model's public
    :func:`~extauthz.demo.model.toy_vocabulary`). ``on_request(sent)`` is called after each
    request. The session is the caller's: it is not closed.
    """
    if budget < 0 or top_k < 2:
        raise ValueError(f"need budget >= 0 and top_k >= 2, got {budget}, {top_k}")
    if not (math.isfinite(bias) and bias > 0):
        raise ValueError(f"bias must be a positive number, got {bias}")
    if not prompt.split():
        raise ValueError("the prompt needs a word: an empty reply has no logprobs")
    tokens = tuple(toy_vocabulary() if vocabulary is None else vocabulary)
    ids = {token: i for i, token in enumerate(tokens)}
    logits = np.full(len(tokens), np.nan)
    sent_headers = {"content-type": "application/json", **(headers or {})}
    solved0, work0 = session.solved, session.work_s
    reference: int | None = None
    k = top_k
    sent = answered = refused_in_a_row = 0
    first_refusal: int | None = None
    statuses: dict[int, int] = {}
    while sent < budget and refused_in_a_row < GIVE_UP_AFTER:
        pushed: list[int] = []
        if reference is not None:
            pushed = np.flatnonzero(np.isnan(logits))[: k - 1].tolist()
            if not pushed:
                break  # every logit read
        solved = session.solved
        response = session.request("POST", path, _body(prompt, k, pushed, bias), sent_headers)
        sent += 1
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if on_request is not None:
            on_request(sent)
        top = _top_logprobs(response)
        read = {ids[token]: logprob for token, logprob in (top or ()) if token in ids}
        complete = top is not None and len(top) >= k
        if reference is None and read:
            # Unbiased: the best token is the reference; the others read directly.
            reference = max(read, key=read.__getitem__)
            for token, logprob in read.items():
                logits[token] = logprob - read[reference]
        elif reference is not None and reference in read and all(t in read for t in pushed):
            for token in pushed:
                logits[token] = read[token] - bias - read[reference]
        else:
            complete = False  # refused, stripped, or the anchor fell out of a capped answer
        if first_refusal is None and (not complete or session.solved > solved):
            first_refusal = sent - 1
        if complete:
            answered += 1
            refused_in_a_row = 0
        else:
            refused_in_a_row += 1
        if top is not None and 2 <= len(top) < k:
            k = len(top)  # top_logprobs is capped: go on with what the API gives
    recovered = np.flatnonzero(~np.isnan(logits)).astype(np.int64)
    return ProbeResult(
        attack=ATTACK,
        sent=sent,
        answered=answered,
        first_refusal=first_refusal,
        work_s=session.work_s - work0,
        challenges=session.solved - solved0,
        statuses=statuses,
        reference=reference,
        recovered=recovered,
        logits=logits,
    )


def probe_fidelity(result: ProbeResult, true_logits: npt.ArrayLike) -> float:
    """Return the share of the V tokens whose read logit is within ``FIDELITY_TOLERANCE`` of the
    truth, both relative to the probe's reference token: the probe's fidelity in the report."""
    truth = np.asarray(true_logits, dtype=np.float64)
    if truth.shape != result.logits.shape:
        raise ValueError(f"expected {result.logits.shape[0]} true logits, got {truth.shape}")
    if result.reference is None:
        return 0.0
    error = np.abs(result.logits - (truth - truth[result.reference]))
    return float(np.mean(error <= FIDELITY_TOLERANCE))  # NaN (not read) is never close


def hidden_dimension(rows: npt.ArrayLike) -> int:
    """Return the hidden width of a model from its logit vectors, one row per prompt.

    The logits are ``W @ hidden`` with ``W`` of rank h, so rows from more than h prompts span h
    dimensions: the answer is where the singular values drop the most. Each row is centred
    first, since a probe reads logits only up to a constant (its reference's logit); columns
    not read in every row are dropped. Needs more rows than the hidden width.
    """
    matrix = np.asarray(rows, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise ValueError(f"need a 2-D array of at least 2 rows, got shape {matrix.shape}")
    matrix = matrix[:, np.isfinite(matrix).all(axis=0)]
    if matrix.shape[1] < 2:
        raise ValueError("need at least 2 tokens read in every row")
    centred = matrix - matrix.mean(axis=1, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)
    if singular[0] == 0.0:
        return 0
    logs = np.log(np.maximum(singular, singular[0] * np.finfo(np.float64).eps ** 2))
    return int(np.argmax(logs[:-1] - logs[1:])) + 1
