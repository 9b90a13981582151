"""``extauthz redteam``: run extraction attacks against a model endpoint and report the clones.

    extauthz redteam --target URL [--dialect kserve_v1] [--attacks knockoff,uniform,...]
                     [--budget N] [--batch B] [--identities K] [--keys k1,k2,...]
                     [--reference URL] [--seed S] [--no-wait] [--json FILE]

Fidelity needs the victim's own labels on the evaluation set: they are read from ``--reference``
(an unguarded endpoint of the same model) when given, else from the target before the attacks,
with the first key; if that is refused, fidelity is left out. Prints a plain-text table; writes
the JSON report to FILE. An HTML report is not implemented.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from extauthz.challenge.client import ChallengeSession
from extauthz.redteam.attacks import (
    API_KEY_HEADER,
    ATTACKS,
    attack_split,
    predict_over_http,
    run_attack,
)
from extauthz.redteam.report import AttackReport, evaluate, to_json, to_table

__all__ = ["main"]

DIALECTS = ("kserve_v1",)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown attack(s) {', '.join(unknown) or '(none)'}; expected {', '.join(ATTACKS)}"
        )
    return names


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="extauthz redteam",
        description="Run model-extraction attacks against an endpoint and train clones.",
    )
    parser.add_argument("--target", required=True, help="model URL, e.g. .../v1/models/x:predict")
    parser.add_argument("--dialect", default="kserve_v1", choices=DIALECTS)
    parser.add_argument("--attacks", type=_names, default=list(ATTACKS), help="comma-separated")
    parser.add_argument("--budget", type=int, default=1000, help="instances per attack")
    parser.add_argument("--batch", type=int, default=50, help="instances per request")
    parser.add_argument("--identities", type=int, default=1, help="Sybil identities K")
    parser.add_argument("--keys", default="", help="comma-separated API keys, one per identity")
    parser.add_argument("--reference", help="unguarded URL of the same model, for fidelity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wait", action="store_true", help="do not honour Retry-After")
    parser.add_argument("--json", type=Path, help="write the JSON report to this file")
    args = parser.parse_args(argv)
    args.keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    if args.budget < 0 or args.batch < 1 or args.identities < 1:
        parser.error("need --budget >= 0, --batch >= 1 and --identities >= 1")
    if args.keys and len(args.keys) < args.identities:
        parser.error(f"--identities {args.identities} needs as many --keys")
    return args


def _reference_labels(
    url: str, key: str | None, x_eval: npt.ArrayLike
) -> npt.NDArray[np.int64] | None:
    """Return the victim's labels on ``x_eval`` from ``url``, or None (with a note) if refused."""
    session, path = ChallengeSession.from_url(url, wait_on_429=True, max_wait_s=5.0)
    headers = {API_KEY_HEADER: key} if key else {}
    try:
        with session:
            return predict_over_http(session, path, x_eval, headers=headers)
    except (RuntimeError, OSError) as exc:
        print(f"extauthz redteam: no reference labels, fidelity left out: {exc}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the attacks, print the table, write the JSON report; return the exit code."""
    args = _parse_args(argv)
    try:
        _, path = ChallengeSession.from_url(args.target)
    except ValueError as exc:
        print(f"extauthz redteam: {exc}", file=sys.stderr)
        return 2
    pool, x_eval, y_eval = attack_split(args.seed)
    first_key = args.keys[0] if args.keys and not args.reference else None
    victim = _reference_labels(args.reference or args.target, first_key, x_eval)

    def factory(identity: int) -> ChallengeSession:
        return ChallengeSession.from_url(args.target)[0]

    reports: list[AttackReport] = []
    for offset, name in enumerate(args.attacks):
        try:
            result = run_attack(
                name,
                factory,
                path=path,
                budget=args.budget,
                batch=args.batch,
                rng=np.random.default_rng([args.seed, offset]),
                pool=pool,
                identities=args.identities,
                keys=args.keys,
                wait_on_429=not args.no_wait,
            )
        except OSError as exc:
            print(f"extauthz redteam: {name}: {exc}", file=sys.stderr)
            return 1
        reports.append(evaluate(result, x_eval, y_eval, victim, seed=args.seed))
    sys.stdout.write(to_table(reports))
    if args.json is not None:
        args.json.write_text(to_json(reports) + "\n")
    return 0
