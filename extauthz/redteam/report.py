"""Turn red-team runs into a report: what was sent and refused, and how good the clones got.

A report (JSON version 2, documented in the README) holds one or more runs, typically the
undefended model and the same model behind Envoy and the guard. Each run has one
:class:`AttackReport` per attack and, optionally, a :class:`BenignReport` for the natural clients
sent beside them. :func:`to_json`, :func:`to_table` and ``extauthz.redteam.html.render_html``
render the document. Fidelity and accuracy are None when an attack got no answers to train on;
fidelity is None too when no reference labels for the evaluation set were available.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from extauthz.redteam.attacks import AttackResult
from extauthz.redteam.clone import Clone, CloneKind, accuracy, train_clone
from extauthz.redteam.equation import solve_logistic

__all__ = [
    "REPORT_VERSION",
    "AttackReport",
    "BenignReport",
    "RunReport",
    "document",
    "evaluate",
    "to_json",
    "to_table",
]

REPORT_VERSION: Final = 2
CLONE_KINDS: Final[tuple[CloneKind, ...]] = ("softmax", "mlp")
#: Points of the fidelity curve, as shares of the instances the attack sent.
CURVE_SHARES: Final = (0.125, 0.25, 0.5, 0.75, 1.0)

#: ``check(clone, result)`` returns the watermark verdict as a JSON object, or None.
WatermarkCheck = Callable[[Clone, AttackResult], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class AttackReport:
    """One attack of one run."""

    attack: str
    target: str
    identities: int
    sent: int
    answered: int
    first_refusal: int | None
    first_refusal_by_identity: list[int | None]
    """Per identity, the instances it sent itself before its first refusal or challenge."""
    work_s: float
    challenges: int
    statuses: dict[str, int]
    fidelity_softmax: float | None
    accuracy_softmax: float | None
    fidelity_mlp: float | None
    accuracy_mlp: float | None
    fidelity: float | None
    """The best clone's fidelity (for ``logprob_probe``: the share of logits read exactly)."""
    accuracy: float | None
    watermark: dict[str, Any] | None
    curve: list[dict[str, float | int]] = field(default_factory=list)
    risk: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BenignReport:
    """The natural clients of one run: what they lost to the guard."""

    clients: int
    queries: int
    answered: int
    refusals: int
    """Requests answered with a status other than 200 after any challenge was solved."""
    challenges: int
    top1_changes: float | None
    """Share of answered instances whose top-1 class differs from the undefended model's."""
    statuses: dict[str, int]
    risk: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunReport:
    """Every attack and the benign workload against one target."""

    label: str
    target: str
    attacks: list[AttackReport]
    benign: BenignReport | None = None


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def _clones(result: AttackResult, seed: int) -> dict[str, Clone]:
    """Train the attack's clones: softmax and MLP on the labels; equation solving on the scores."""
    clones: dict[str, Clone] = {}
    for kind in CLONE_KINDS:
        if kind == "softmax" and result.attack == "equation" and result.scores.shape[1] > 1:
            clones[kind] = solve_logistic(result.inputs, result.scores).as_clone()
        else:
            clones[kind] = train_clone(result.inputs, result.labels, kind, seed)
    return clones


def _curve(
    result: AttackResult, x_eval: npt.ArrayLike, victim_eval: npt.ArrayLike, seed: int
) -> list[dict[str, float | int]]:
    """Return the softmax clone's fidelity when trained on what the first shares of ``sent`` got."""
    points: list[dict[str, float | int]] = []
    victim = np.asarray(victim_eval)
    for share in CURVE_SHARES:
        cut = max(1, round(result.sent * share))
        rows = result.sent_before < cut
        answered = int(rows.sum())
        if answered == 0 or (points and points[-1]["answered"] == answered and share < 1.0):
            continue
        clone = train_clone(result.inputs[rows], result.labels[rows], "softmax", seed)
        fid = float(np.mean(clone.predict(x_eval) == victim))
        points.append({"sent": cut, "answered": answered, "fidelity": round(fid, 4)})
    return points


def evaluate(
    result: AttackResult,
    x_eval: npt.ArrayLike,
    y_eval: npt.ArrayLike,
    victim_eval: npt.ArrayLike | None,
    *,
    seed: int = 0,
    target: str = "",
    watermark: WatermarkCheck | None = None,
    risk: Sequence[Mapping[str, Any]] = (),
) -> AttackReport:
    """Train a softmax and an MLP clone on ``result``'s answers and score them on ``x_eval``.

    ``victim_eval`` is the victim's top-1 class on ``x_eval`` (from an unguarded reference), or
    None when unknown; ``y_eval`` are the true labels. ``watermark`` checks the best clone.
    """
    scores: dict[str, float | None] = {}
    best: tuple[float, Clone] | None = None
    if result.answered:
        for kind, clone in _clones(result, seed).items():
            acc = accuracy(clone, x_eval, y_eval)
            fid = None
            if victim_eval is not None:
                fid = float(np.mean(clone.predict(x_eval) == np.asarray(victim_eval)))
            scores[f"fidelity_{kind}"], scores[f"accuracy_{kind}"] = fid, acc
            rank = fid if fid is not None else acc
            if best is None or rank > best[0]:
                best = (rank, clone)
    fids = [scores.get(f"fidelity_{k}") for k in CLONE_KINDS]
    known = [f for f in fids if f is not None]
    best_kind = None if best is None else best[1].kind
    return AttackReport(
        attack=result.attack,
        target=target,
        identities=result.identities,
        sent=result.sent,
        answered=result.answered,
        first_refusal=result.first_refusal,
        first_refusal_by_identity=list(result.first_refusal_by_identity),
        work_s=round(result.work_s, 3),
        challenges=result.challenges,
        statuses={str(k): v for k, v in sorted(result.statuses.items())},
        fidelity_softmax=_round(scores.get("fidelity_softmax")),
        accuracy_softmax=_round(scores.get("accuracy_softmax")),
        fidelity_mlp=_round(scores.get("fidelity_mlp")),
        accuracy_mlp=_round(scores.get("accuracy_mlp")),
        fidelity=_round(max(known)) if known else None,
        accuracy=_round(scores.get(f"accuracy_{best_kind}")) if best_kind else None,
        watermark=None if best is None or watermark is None else watermark(best[1], result),
        curve=[]
        if victim_eval is None or not result.answered
        else _curve(result, x_eval, victim_eval, seed),
        risk=[dict(sample) for sample in risk],
    )


def document(
    runs: Sequence[RunReport],
    *,
    started: str,
    seed: int,
    budget: int,
    batch: int,
    dialect: str,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Return the JSON report (version 2) of ``runs``."""
    return {
        "version": REPORT_VERSION,
        "started": started,
        "seed": seed,
        "budget": budget,
        "batch": batch,
        "dialect": dialect,
        "thresholds": dict(thresholds) if thresholds else None,
        "runs": [asdict(run) for run in runs],
    }


def to_json(doc: Mapping[str, Any]) -> str:
    """Return the report as indented JSON."""
    return json.dumps(doc, indent=2)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)


def _watermark_cell(value: object) -> str:
    if not isinstance(value, Mapping):
        return "-"
    return f"{value.get('verdict')} (p={value.get('p_value'):.1g})"


_ATTACK_COLUMNS: Final = (
    ("sent", "sent"),
    ("answered", "answered"),
    ("1st refusal", "first_refusal"),
    ("work s", "work_s"),
    ("fidelity", "fidelity"),
    ("accuracy", "accuracy"),
)


def _rows_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _attack_name(attack: Mapping[str, Any]) -> str:
    k = attack.get("identities") or 1
    return f"{attack['attack']} (K={k})" if k > 1 else str(attack["attack"])


def _comparison(runs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """Return the side-by-side table: each attack's fidelity per run, and the last run's costs."""
    base, last = runs[0], runs[-1]
    rows = [
        [
            "attack",
            f"fidelity {base['label']}",
            f"fidelity {last['label']}",
            "drop (pts)",
            "1st refusal",
            "answered/sent",
            "work s",
            "watermark",
        ]
    ]
    for name in names:
        before = next((a for a in base["attacks"] if _attack_name(a) == name), None)
        after = next((a for a in last["attacks"] if _attack_name(a) == name), None)
        f0 = None if before is None else before.get("fidelity")
        f1 = None if after is None else after.get("fidelity")
        drop = "-" if f0 is None or f1 is None else f"{(f0 - f1) * 100:.0f}"
        rows.append(
            [
                name,
                _cell(f0),
                _cell(f1),
                drop,
                "-" if after is None else _cell(after.get("first_refusal")),
                "-" if after is None else f"{after['answered']}/{after['sent']}",
                "-" if after is None else _cell(after.get("work_s")),
                "-" if after is None else _watermark_cell(after.get("watermark")),
            ]
        )
    return f"{base['label']} vs {last['label']}\n" + _rows_table(rows)


def to_table(doc: Mapping[str, Any]) -> str:
    """Return the report as plain-text tables: attacks side by side per run, then benign clients."""
    runs: list[Mapping[str, Any]] = list(doc.get("runs") or [])
    if not runs:
        return "(no runs)\n"
    names: list[str] = []
    for run in runs:
        for attack in run["attacks"]:
            if _attack_name(attack) not in names:
                names.append(_attack_name(attack))
    header = ["attack"]
    for run in runs:
        header += [f"{run['label']}: {title}" for title, _ in _ATTACK_COLUMNS]
        header.append(f"{run['label']}: watermark")
    rows = [header]
    for name in names:
        row = [name]
        for run in runs:
            found = next((a for a in run["attacks"] if _attack_name(a) == name), None)
            if found is None:
                row += ["-"] * (len(_ATTACK_COLUMNS) + 1)
                continue
            row += [_cell(found.get(key)) for _, key in _ATTACK_COLUMNS]
            row.append(_watermark_cell(found.get("watermark")))
        rows.append(row)
    # One block per run keeps a terminal line short: split the wide table by run.
    out = [_comparison(runs, names)] if len(runs) > 1 else []
    per_run = len(_ATTACK_COLUMNS) + 1
    for index, run in enumerate(runs):
        cols = [0, *range(1 + index * per_run, 1 + (index + 1) * per_run)]
        block = [[r[c] for c in cols] for r in rows]
        block[0] = ["attack"] + [h.split(": ", 1)[1] for h in block[0][1:]]
        out.append(f"{run['label']} ({run['target']})\n" + _rows_table(block))
    benign = [["run", "clients", "queries", "refusals", "challenges", "top-1 changes"]]
    for run in runs:
        b = run.get("benign")
        if b:
            benign.append(
                [
                    run["label"],
                    str(b["clients"]),
                    str(b["queries"]),
                    str(b["refusals"]),
                    str(b["challenges"]),
                    "-" if b["top1_changes"] is None else f"{b['top1_changes']:.2%}",
                ]
            )
    if len(benign) > 1:
        out.append("benign clients\n" + _rows_table(benign))
    return "\n".join(out)
