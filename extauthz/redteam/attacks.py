"""Run extraction attacks over HTTP against a KServe v1 endpoint, guarded or not.

Each attack is a query source of :mod:`extauthz.redteam.traffic` driven batch by batch through
:class:`~extauthz.challenge.client.ChallengeSession` (which solves proof-of-work challenges and,
when asked, waits out a capped ``Retry-After``), optionally spread over K identities (one
session and one ``x-api-key`` each). The run records what a defender wants to know: how many
instances were sent and answered, where the first refusal or challenge came, how much work the
challenges cost, and the (inputs, labels) pairs a clone can be trained on.

Attacks: ``knockoff`` (natural digits with jitter, sampled at random from the attacker's pool),
``knockoff-adaptive`` (the same pool, sampled by Knockoff Nets' gradient bandit over its classes),
``uniform`` (uniform noise in the input box), ``jacobian`` (Papernot augmentation from a few
seeds), ``linesearch`` (Tramèr boundary search between seeds) and ``equation`` (Tramèr's equation
solving, meant for a logistic victim: its clone is solved from the answers' probabilities).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from extauthz.challenge.client import ChallengeSession, Response
from extauthz.dialects import get_dialect
from extauthz.dialects.base import DialectError
from extauthz.redteam.clone import labels_of
from extauthz.redteam.equation import EquationSolvingAttacker
from extauthz.redteam.traffic import (
    AdaptiveKnockoff,
    BenignClient,
    JacobianAttacker,
    LineSearchAttacker,
    QuerySource,
    SybilSplitter,
    UniformNoiseAttacker,
    natural_pool,
)

__all__ = [
    "ATTACKS",
    "API_KEY_HEADER",
    "AttackData",
    "AttackResult",
    "BatchEvent",
    "SessionFactory",
    "attack_data",
    "attack_split",
    "read_scores",
    "request_body",
    "make_source",
    "predict_over_http",
    "run_attack",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ATTACKS: Final = ("knockoff", "knockoff-adaptive", "uniform", "jacobian", "linesearch", "equation")
#: Attacks that learn from natural data (the rest are synthetic).
NATURAL_ATTACKS: Final = ("knockoff", "knockoff-adaptive")
API_KEY_HEADER: Final = "x-api-key"
#: Longest ``Retry-After`` wait, in seconds per request, an attack honours.
MAX_WAIT_S: Final = 5.0
#: Consecutive refused batches after which an attack gives up before its budget.
GIVE_UP_AFTER: Final = 20
#: Seeds the jacobian and linesearch attackers start from (natural digits they own).
N_SEEDS: Final = 20

#: ``factory(identity)`` returns a fresh session for identity 0..K-1.
SessionFactory = Callable[[int], ChallengeSession]


@dataclass(frozen=True, slots=True)
class BatchEvent:
    """One request of an attack, as progress bars and risk samplers see it."""

    identity: int
    instances: int
    sent: int
    """Instances sent by the whole attack so far, this batch included."""
    status: int
    answered: bool


@dataclass(frozen=True, slots=True, eq=False)  # array fields: no elementwise ==
class AttackResult:
    """What one attack run sent, what came back, and the answers it can train a clone on."""

    attack: str
    identities: int
    sent: int
    """Instances sent (refused ones included)."""
    answered: int
    """Instances answered with 200 and readable predictions."""
    first_refusal: int | None
    """Instances sent before the first refusal (status != 200) or solved challenge; None if none."""
    first_refusal_by_identity: tuple[int | None, ...]
    """Per identity: the instances it had sent itself before its first refusal or challenge."""
    work_s: float
    """Seconds spent solving proof-of-work challenges, over all identities."""
    challenges: int
    statuses: dict[int, int]
    """HTTP status -> batches answered with it."""
    inputs: FloatArray
    labels: IntArray
    """The victim's top-1 class for each answered input (scores are reduced to their argmax)."""
    scores: FloatArray
    """The answered scores, ``(answered, classes)`` as served (one-hot for label-only answers)."""
    sent_before: IntArray
    """Per answered input: instances the attack had sent before its batch (for fidelity curves)."""


@dataclass(frozen=True, slots=True, eq=False)  # array fields: no elementwise ==
class AttackData:
    """The attacker's labelled natural pool and the held-out set clones are scored on."""

    pool: FloatArray
    pool_labels: IntArray
    x_eval: FloatArray
    y_eval: IntArray


def attack_data(seed: int = 0) -> AttackData:
    """Split the held-out digits in two disjoint halves: the attacker's pool and the evaluation set.

    The attacker draws natural inputs and seeds from the pool only; clones are scored on the
    other half, so no clone is scored on an input it was trained near.
    """
    x, y = natural_pool(seed)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    half = x.shape[0] // 2
    mine, held = order[:half], order[half:]
    return AttackData(x[mine], y[mine], x[held], y[held])


def attack_split(seed: int = 0) -> tuple[FloatArray, FloatArray, IntArray]:
    """Return ``(attack_pool, x_eval, y_eval)`` of :func:`attack_data`."""
    data = attack_data(seed)
    return data.pool, data.x_eval, data.y_eval


def make_source(
    name: str,
    pool: npt.ArrayLike,
    rng: np.random.Generator,
    pool_labels: npt.ArrayLike | None = None,
) -> QuerySource:
    """Return the query source of attack ``name`` over the attacker's natural ``pool``.

    ``knockoff-adaptive`` needs the pool's own labels (the attacker's labelled data set).
    """
    rows = np.asarray(pool, dtype=np.float64)
    seeds = rows[rng.choice(rows.shape[0], size=min(N_SEEDS, rows.shape[0]), replace=False)]
    if name == "knockoff":
        return BenignClient(rows, rng=rng, jitter=1.0)
    if name == "knockoff-adaptive":
        if pool_labels is None:
            raise ValueError("knockoff-adaptive needs the labels of the attacker's pool")
        return AdaptiveKnockoff(rows, pool_labels, rng=rng, jitter=1.0)
    if name == "equation":
        return EquationSolvingAttacker(rng=rng)
    if name == "uniform":
        return UniformNoiseAttacker(rng=rng)
    if name == "jacobian":
        return JacobianAttacker(seeds, step=1.0, rng=rng)
    if name == "linesearch":
        return LineSearchAttacker(seeds, steps=8, rng=rng)
    raise ValueError(f"unknown attack {name!r} (expected one of: {', '.join(ATTACKS)})")


def request_body(x: FloatArray) -> bytes:
    return json.dumps({"instances": x.tolist()}).encode()


def read_scores(response: Response, n: int) -> FloatArray | None:
    """Return the ``(n, classes)`` scores of a 200 KServe v1 answer, or None if unreadable.

    An answer of ``(n,)`` labels comes back one-hot, so every answer has the same shape.
    """
    if response.status != 200:
        return None
    try:
        outputs = get_dialect("kserve_v1").parse_response(response.body).outputs
    except DialectError:
        return None
    values = outputs.get("predictions", next(iter(outputs.values()), None))
    if values is None or values.ndim not in (1, 2) or values.shape[0] != n:
        return None
    if values.ndim == 2 and values.shape[1] > 0:
        return np.asarray(values, dtype=np.float64)
    if values.ndim == 1 and (values >= 0).all() and (values == np.round(values)).all():
        labels = values.astype(np.int64)
        return np.eye(int(labels.max(initial=0)) + 1)[labels]
    return None


def predict_over_http(
    session: ChallengeSession,
    path: str,
    x: npt.ArrayLike,
    *,
    batch: int = 256,
    headers: Mapping[str, str] | None = None,
) -> IntArray:
    """Return the endpoint's top-1 class for each row of ``x``; raise RuntimeError on a refusal.

    Used to label the evaluation set against a reference (unguarded) endpoint.
    """
    rows = np.asarray(x, dtype=np.float64)
    parts: list[IntArray] = []
    for start in range(0, rows.shape[0], batch):
        chunk = rows[start : start + batch]
        response = session.request(
            "POST",
            path,
            request_body(chunk),
            {"content-type": "application/json", **(headers or {})},
        )
        scores = read_scores(response, chunk.shape[0])
        if scores is None:
            raise RuntimeError(f"reference answered {response.status}: {response.body[:200]!r}")
        parts.append(labels_of(scores))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def run_attack(
    name: str,
    session_factory: SessionFactory,
    *,
    path: str,
    budget: int,
    batch: int,
    rng: np.random.Generator,
    pool: npt.ArrayLike | None = None,
    pool_labels: npt.ArrayLike | None = None,
    identities: int = 1,
    keys: Sequence[str] = (),
    wait_on_429: bool = True,
    max_wait_s: float = MAX_WAIT_S,
    on_batch: Callable[[BatchEvent], None] | None = None,
) -> AttackResult:
    """Send attack ``name`` to ``path`` until ``budget`` instances are sent, in batches of ``batch``.

    Identity ``i`` sends with ``keys[i]`` as ``x-api-key`` when keys are given (there must be at
    least ``identities`` of them), else anonymously. ``pool`` is the attacker's natural data
    (default: the attack half of :func:`attack_split`). The run stops early after
    ``GIVE_UP_AFTER`` refused batches in a row; a ``Retry-After`` is honoured up to
    ``max_wait_s`` per request when ``wait_on_429`` is set. ``on_batch`` hears of every request
    (progress bars, risk samples).
    """
    if budget < 0 or batch < 1:
        raise ValueError(f"need budget >= 0 and batch >= 1, got {budget}, {batch}")
    if identities < 1 or (keys and len(keys) < identities):
        raise ValueError(f"need {identities} identities and as many keys, got {len(keys)} keys")
    if pool is None:
        data = attack_data()
        pool, pool_labels = data.pool, data.pool_labels
    source = make_source(name, pool, rng, pool_labels)
    splitter = SybilSplitter(source, identities)
    sessions = [session_factory(i) for i in range(identities)]
    headers = [
        {"content-type": "application/json", **({API_KEY_HEADER: keys[i]} if keys else {})}
        for i in range(identities)
    ]
    for session in sessions:
        session.wait_on_429 = wait_on_429
        session.max_wait_s = max_wait_s
    sent = 0
    first_refusal: int | None = None
    sent_by = [0] * identities
    first_by: list[int | None] = [None] * identities
    refused_in_a_row = 0
    statuses: dict[int, int] = {}
    inputs: list[FloatArray] = []
    scores: list[FloatArray] = []
    sent_before: list[IntArray] = []
    try:
        while sent < budget and refused_in_a_row < GIVE_UP_AFTER:
            step = splitter.next_batch(min(batch, budget - sent))
            session = sessions[step.identity]
            solved = session.solved
            response = session.request(
                "POST", path, request_body(step.inputs), headers[step.identity]
            )
            statuses[response.status] = statuses.get(response.status, 0) + 1
            answers = read_scores(response, step.inputs.shape[0])
            refused = answers is None or session.solved > solved
            if first_refusal is None and refused:
                first_refusal = sent
            if first_by[step.identity] is None and refused:
                first_by[step.identity] = sent_by[step.identity]
            n = step.inputs.shape[0]
            sent_by[step.identity] += n
            if answers is not None:
                sent_before.append(np.full(n, sent, dtype=np.int64))
            sent += n
            if on_batch is not None:
                on_batch(BatchEvent(step.identity, n, sent, response.status, answers is not None))
            if answers is None:
                refused_in_a_row += 1
                continue
            refused_in_a_row = 0
            splitter.observe(step.inputs, answers)
            inputs.append(step.inputs)
            scores.append(answers)
    finally:
        for session in sessions:
            session.close()
    return AttackResult(
        attack=name,
        identities=identities,
        sent=sent,
        answered=sum(x.shape[0] for x in inputs),
        first_refusal=first_refusal,
        first_refusal_by_identity=tuple(first_by),
        work_s=sum(s.work_s for s in sessions),
        challenges=sum(s.solved for s in sessions),
        statuses=statuses,
        inputs=np.concatenate(inputs) if inputs else np.empty((0, 64)),
        labels=np.concatenate([labels_of(a) for a in scores])
        if scores
        else np.empty(0, dtype=np.int64),
        scores=_stack_scores(scores),
        sent_before=np.concatenate(sent_before) if sent_before else np.empty(0, dtype=np.int64),
    )


def _stack_scores(parts: Sequence[FloatArray]) -> FloatArray:
    """Stack answered scores, padding narrower one-hot rows (labels seen so far) with zeros."""
    if not parts:
        return np.empty((0, 0))
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])
