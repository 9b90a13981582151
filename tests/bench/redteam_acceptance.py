"""Issue 8's acceptance, measured: the red team at 2,000 instances per attack against the demo
model with the demo policy, directly (undefended) and through the real Envoy and the guard.

    python -m tests.bench.redteam_acceptance [--budget 2000] [--seed 0] [--out DIR]

Prints the side-by-side table, then one line per criterion (PASS or FAIL with the figures):

- every synthetic attack (uniform, jacobian, linesearch, equation, logprob_probe) is refused or
  challenged within 300 instances, and its clone's fidelity is at least 20 points under the
  undefended baseline at the same budget;
- the Sybil variant (jacobian over 4 keys): the same two figures, the first counted per
  identity (the instances each key sent itself, as issue 6's Sybil test counts them; the total
  over all keys is printed beside it);
- each natural-data attack (knockoff, knockoff-adaptive) has its clone verified as stolen
  (p < 1e-6) or is refused before 2,000 answers;
- the benign clients, sending as many instances as an attack, see no refusals.

Exits 1 when a criterion fails. Writes redteam-report.json and .html into ``--out``. Takes about
five minutes on 2 cores, most of it the attackers' proof-of-work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from extauthz.demo.local import LocalStack
from extauthz.demo.run import red_team_plan, run_red_team
from extauthz.demo.workspace import prepare
from extauthz.redteam.html import render_html
from extauthz.redteam.report import AttackReport, RunReport, to_json, to_table

SYNTHETIC = ("uniform", "jacobian", "linesearch", "equation", "logprob_probe")
NATURAL = ("knockoff", "knockoff-adaptive")
WITHIN = 300
DROP = 0.20
STOLEN_P = 1e-6


def _find(run: RunReport, attack: str, identities: int = 1) -> AttackReport:
    return next(a for a in run.attacks if a.attack == attack and a.identities == identities)


def _synthetic(base: AttackReport, guarded: AttackReport) -> tuple[bool, str]:
    """Caught within WITHIN instances (per key: the instances each key sent itself) and a clone
    at least DROP under the undefended one."""
    per_key = guarded.first_refusal_by_identity
    caught = all(n is not None and n <= WITHIN for n in per_key)
    drop = None
    if base.fidelity is not None and guarded.fidelity is not None:
        drop = base.fidelity - guarded.fidelity
    drop_text = "-" if drop is None else f"{drop * 100:.0f} pts"
    if guarded.identities > 1:
        label = f"{guarded.attack} (K={guarded.identities})"
        where = f"per key at {per_key} (each <= {WITHIN}; {guarded.first_refusal} over all keys)"
    else:
        label, where = guarded.attack, f"at {guarded.first_refusal} (<= {WITHIN})"
    return caught and drop is not None and drop >= DROP, (
        f"{label}: first refusal/challenge {where}, fidelity {base.fidelity} -> "
        f"{guarded.fidelity} (drop {drop_text}, >= {DROP * 100:.0f})"
    )


def criteria(runs: Sequence[RunReport], budget: int) -> list[tuple[bool, str]]:
    """Return (held, line) for each acceptance criterion."""
    base, guarded = runs[0], runs[-1]
    lines = [_synthetic(_find(base, a), _find(guarded, a)) for a in SYNTHETIC]
    lines += [
        _synthetic(_find(base, a.attack, a.identities), a)
        for a in guarded.attacks
        if a.identities > 1
    ]
    for name in NATURAL:
        attack = _find(guarded, name)
        mark = attack.watermark or {}
        stolen = mark.get("verdict") == "stolen" and mark.get("p_value", 1.0) < STOLEN_P
        refused = attack.answered < budget
        lines.append(
            (
                stolen or refused,
                f"{name}: watermark {mark.get('verdict')} (p={mark.get('p_value')}), "
                f"{attack.answered}/{attack.sent} answered, fidelity {attack.fidelity}",
            )
        )
    benign = guarded.benign
    lines.append(
        (
            benign is not None and benign.refusals == 0 and benign.queries >= budget,
            "benign: "
            + (
                "none"
                if benign is None
                else f"{benign.clients} clients, {benign.queries} instances, {benign.refusals} "
                f"refusals, {benign.challenges} challenges, top-1 changes {benign.top1_changes}"
            ),
        )
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="extauthz-redteam-"))
    files = prepare(workdir)
    with LocalStack(policy=files.policy, workdir=workdir, guard_args=files.guard_args) as stack:
        runs, doc = run_red_team(stack, red_team_plan(budget=args.budget, seed=args.seed), say)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "redteam-report.json").write_text(to_json(doc) + "\n")
    (args.out / "redteam-report.html").write_text(render_html(doc))
    print(to_table(doc))
    results = criteria(runs, args.budget)
    for held, line in results:
        print(f"{'PASS' if held else 'FAIL'}  {line}")
    print(f"reports: {args.out / 'redteam-report.html'}")
    return 0 if all(held for held, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
