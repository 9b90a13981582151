"""Turn attack results into report rows: what was sent and refused, and how good the clones got.

One :class:`AttackReport` per attack run; :func:`to_json` and :func:`to_table` render a list of
them. Fidelity and accuracy are None when the attack got no answers to train on, and fidelity
is None too when no reference labels for the evaluation set were available.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from extauthz.redteam.attacks import AttackResult
from extauthz.redteam.clone import CloneKind, accuracy, train_clone

__all__ = ["REPORT_VERSION", "AttackReport", "evaluate", "to_json", "to_table"]

REPORT_VERSION: Final = 1
CLONE_KINDS: Final[tuple[CloneKind, ...]] = ("softmax", "mlp")


@dataclass(frozen=True, slots=True)
class AttackReport:
    """One row of the red-team report."""

    attack: str
    identities: int
    sent: int
    answered: int
    first_refusal: int | None
    work_s: float
    challenges: int
    fidelity_softmax: float | None
    accuracy_softmax: float | None
    fidelity_mlp: float | None
    accuracy_mlp: float | None


def evaluate(
    result: AttackResult,
    x_eval: npt.ArrayLike,
    y_eval: npt.ArrayLike,
    victim_eval: npt.ArrayLike | None,
    *,
    seed: int = 0,
) -> AttackReport:
    """Train a softmax and an MLP clone on ``result``'s answers and score them on ``x_eval``.

    ``victim_eval`` is the victim's top-1 class on ``x_eval`` (from an unguarded reference), or
    None when unknown; ``y_eval`` are the true labels.
    """
    scores: dict[str, float | None] = {}
    for kind in CLONE_KINDS:
        fid: float | None = None
        acc: float | None = None
        if result.answered:
            clone = train_clone(result.inputs, result.labels, kind, seed)
            acc = accuracy(clone, x_eval, y_eval)
            if victim_eval is not None:
                fid = float(np.mean(clone.predict(x_eval) == np.asarray(victim_eval)))
        scores[f"fidelity_{kind}"] = fid
        scores[f"accuracy_{kind}"] = acc
    return AttackReport(
        attack=result.attack,
        identities=result.identities,
        sent=result.sent,
        answered=result.answered,
        first_refusal=result.first_refusal,
        work_s=result.work_s,
        challenges=result.challenges,
        fidelity_softmax=scores["fidelity_softmax"],
        accuracy_softmax=scores["accuracy_softmax"],
        fidelity_mlp=scores["fidelity_mlp"],
        accuracy_mlp=scores["accuracy_mlp"],
    )


def to_json(reports: list[AttackReport]) -> str:
    """Return the reports as a JSON document ``{"version": 1, "reports": [row, ...]}``."""
    return json.dumps(
        {"version": REPORT_VERSION, "reports": [asdict(r) for r in reports]}, indent=2
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_COLUMNS: Final = (
    ("attack", "attack"),
    ("K", "identities"),
    ("sent", "sent"),
    ("answered", "answered"),
    ("1st refusal", "first_refusal"),
    ("work s", "work_s"),
    ("fid softmax", "fidelity_softmax"),
    ("acc softmax", "accuracy_softmax"),
    ("fid mlp", "fidelity_mlp"),
    ("acc mlp", "accuracy_mlp"),
)


def to_table(reports: list[AttackReport]) -> str:
    """Return the reports as a plain-text table, one line per attack ("-" for no value)."""
    rows = [[title for title, _ in _COLUMNS]]
    rows += [[_cell(getattr(r, field)) for _, field in _COLUMNS] for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
