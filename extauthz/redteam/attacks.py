"""Run extraction attacks over HTTP against a KServe v1 endpoint, guarded or not.

Each attack is a query source of :mod:`extauthz.redteam.traffic` driven batch by batch through
:class:`~extauthz.challenge.client.ChallengeSession` (which solves proof-of-work challenges and,
when asked, waits out a capped ``Retry-After``), optionally spread over K identities (one
session and one ``x-api-key`` each). The run records what a defender wants to know: how many
instances were sent and answered, where the first refusal or challenge came, how much work the
challenges cost, and the (inputs, labels) pairs a clone can be trained on.

Attacks: ``knockoff`` (natural digits with jitter, sampled at random from the attacker's pool),
``uniform`` (uniform noise in the input box), ``jacobian`` (Papernot augmentation from a few
seeds) and ``linesearch`` (Tramèr boundary search between seeds).
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
from extauthz.redteam.traffic import (
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
    "AttackResult",
    "SessionFactory",
    "attack_split",
    "make_source",
    "predict_over_http",
    "run_attack",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ATTACKS: Final = ("knockoff", "uniform", "jacobian", "linesearch")
API_KEY_HEADER: Final = "x-api-key"
#: Longest ``Retry-After`` wait, in seconds per request, an attack honours.
MAX_WAIT_S: Final = 5.0
#: Consecutive refused batches after which an attack gives up before its budget.
GIVE_UP_AFTER: Final = 20
#: Seeds the jacobian and linesearch attackers start from (natural digits they own).
N_SEEDS: Final = 20

#: ``factory(identity)`` returns a fresh session for identity 0..K-1.
SessionFactory = Callable[[int], ChallengeSession]


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
    work_s: float
    """Seconds spent solving proof-of-work challenges, over all identities."""
    challenges: int
    statuses: dict[int, int]
    """HTTP status -> batches answered with it."""
    inputs: FloatArray
    labels: IntArray
    """The victim's top-1 class for each answered input (scores are reduced to their argmax)."""


def attack_split(seed: int = 0) -> tuple[FloatArray, FloatArray, IntArray]:
    """Return ``(attack_pool, x_eval, y_eval)``: disjoint halves of the held-out digits.

    The attacker draws natural inputs and seeds from the pool only; clones are scored on the
    other half, so no clone is scored on an input it was trained near.
    """
    x, y = natural_pool(seed)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    half = x.shape[0] // 2
    return x[order[:half]], x[order[half:]], y[order[half:]]


def make_source(name: str, pool: npt.ArrayLike, rng: np.random.Generator) -> QuerySource:
    """Return the query source of attack ``name`` over the attacker's natural ``pool``."""
    rows = np.asarray(pool, dtype=np.float64)
    seeds = rows[rng.choice(rows.shape[0], size=min(N_SEEDS, rows.shape[0]), replace=False)]
    if name == "knockoff":
        return BenignClient(rows, rng=rng, jitter=1.0)
    if name == "uniform":
        return UniformNoiseAttacker(rng=rng)
    if name == "jacobian":
        return JacobianAttacker(seeds, step=1.0, rng=rng)
    if name == "linesearch":
        return LineSearchAttacker(seeds, steps=8, rng=rng)
    raise ValueError(f"unknown attack {name!r} (expected one of: {', '.join(ATTACKS)})")


def _body(x: FloatArray) -> bytes:
    return json.dumps({"instances": x.tolist()}).encode()


def _answers(response: Response, n: int) -> IntArray | None:
    """Return the top-1 class per instance of a 200 KServe v1 answer, or None if unreadable."""
    if response.status != 200:
        return None
    try:
        outputs = get_dialect("kserve_v1").parse_response(response.body).outputs
    except DialectError:
        return None
    values = outputs.get("predictions", next(iter(outputs.values()), None))
    if values is None or values.shape[0] != n:
        return None
    try:
        return labels_of(values)
    except ValueError:
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
            "POST", path, _body(chunk), {"content-type": "application/json", **(headers or {})}
        )
        labels = _answers(response, chunk.shape[0])
        if labels is None:
            raise RuntimeError(f"reference answered {response.status}: {response.body[:200]!r}")
        parts.append(labels)
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
    identities: int = 1,
    keys: Sequence[str] = (),
    wait_on_429: bool = True,
    max_wait_s: float = MAX_WAIT_S,
) -> AttackResult:
    """Send attack ``name`` to ``path`` until ``budget`` instances are sent, in batches of ``batch``.

    Identity ``i`` sends with ``keys[i]`` as ``x-api-key`` when keys are given (there must be at
    least ``identities`` of them), else anonymously. ``pool`` is the attacker's natural data
    (default: the attack half of :func:`attack_split`). The run stops early after
    ``GIVE_UP_AFTER`` refused batches in a row; a ``Retry-After`` is honoured up to
    ``max_wait_s`` per request when ``wait_on_429`` is set.
    """
    if budget < 0 or batch < 1:
        raise ValueError(f"need budget >= 0 and batch >= 1, got {budget}, {batch}")
    if identities < 1 or (keys and len(keys) < identities):
        raise ValueError(f"need {identities} identities and as many keys, got {len(keys)} keys")
    source = make_source(name, attack_split()[0] if pool is None else pool, rng)
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
    refused_in_a_row = 0
    statuses: dict[int, int] = {}
    inputs: list[FloatArray] = []
    labels: list[IntArray] = []
    try:
        while sent < budget and refused_in_a_row < GIVE_UP_AFTER:
            step = splitter.next_batch(min(batch, budget - sent))
            session = sessions[step.identity]
            solved = session.solved
            response = session.request("POST", path, _body(step.inputs), headers[step.identity])
            statuses[response.status] = statuses.get(response.status, 0) + 1
            answers = _answers(response, step.inputs.shape[0])
            if first_refusal is None and (answers is None or session.solved > solved):
                first_refusal = sent
            sent += step.inputs.shape[0]
            if answers is None:
                refused_in_a_row += 1
                continue
            refused_in_a_row = 0
            splitter.observe(step.inputs, answers)
            inputs.append(step.inputs)
            labels.append(answers)
    finally:
        for session in sessions:
            session.close()
    return AttackResult(
        attack=name,
        identities=identities,
        sent=sent,
        answered=sum(x.shape[0] for x in inputs),
        first_refusal=first_refusal,
        work_s=sum(s.work_s for s in sessions),
        challenges=sum(s.solved for s in sessions),
        statuses=statuses,
        inputs=np.concatenate(inputs) if inputs else np.empty((0, 64)),
        labels=np.concatenate(labels) if labels else np.empty(0, dtype=np.int64),
    )
