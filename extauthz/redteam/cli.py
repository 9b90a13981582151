"""``extauthz redteam``: run extraction attacks against a model endpoint and report the clones.

    extauthz redteam --target URL [--dialect kserve_v1|openai] [--attacks knockoff,uniform,...]
                     [--budget N] [--batch B] [--identities K] [--sybil ATTACKS]
                     [--keys k1,k2,...] [--client-ids id1,id2,...]
                     [--benign-clients C] [--benign-queries N] [--benign-keys ...]
                     [--reference URL] [--equation-path PATH]
                     [--admin HOST:PORT --admin-token-file F] [--keys-file F]
                     [--noise-key-file F]
                     [--seed S] [--no-wait] [--json FILE] [--html FILE]

Fidelity needs the victim's own answers on the evaluation set: they are read from
``--reference`` (an unguarded endpoint of the same model) when given, else from the target
itself before the attacks, with the first key; if that is refused, fidelity is left out. With
``--admin`` (the guard's gRPC address) the run records each client's risk after every request,
and with ``--keys-file`` too it checks every clone against the evidence ledger (``--noise-key-file``
adds the misinformation mark). Prints the table;
writes the JSON report (schema in the README) and a self-contained HTML report with plots.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from extauthz.admin_client import AdminClient
from extauthz.keys import KeyRing
from extauthz.redteam.attacks import ATTACKS
from extauthz.redteam.campaign import (
    PROBE,
    Endpoint,
    Plan,
    base_url_of,
    reference_for,
    run_campaign,
)
from extauthz.redteam.html import render_html
from extauthz.redteam.report import document, to_json, to_table

__all__ = ["main"]

DIALECTS: Final = ("kserve_v1", "openai")
#: Risk thresholds of the default detection settings, drawn on the HTML risk plot.
THRESHOLDS: Final = {"elevated": 0.3, "suspicious": 0.6, "abusive": 0.9}


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _names(text: str) -> list[str]:
    names = _list(text)
    known = (*ATTACKS, PROBE)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown attack(s) {', '.join(unknown)}; expected {', '.join(known)}"
        )
    return names


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="extauthz redteam",
        description="Run model-extraction attacks against an endpoint and train clones.",
    )
    parser.add_argument("--target", required=True, help="model URL, e.g. .../v1/models/x:predict")
    parser.add_argument(
        "--dialect",
        default="kserve_v1",
        choices=DIALECTS,
        help="kserve_v1: classifier attacks; openai: the logprob / logit_bias probe",
    )
    parser.add_argument("--attacks", type=_names, help="comma-separated (default: all)")
    parser.add_argument("--budget", type=int, default=1000, help="instances per attack")
    parser.add_argument("--batch", type=int, default=32, help="instances per request")
    parser.add_argument("--identities", type=int, default=1, help="identities per attack (K)")
    parser.add_argument(
        "--sybil", type=_names, default=[], help="attacks to repeat over --sybil-identities keys"
    )
    parser.add_argument("--sybil-identities", type=int, default=4)
    parser.add_argument("--keys", type=_list, default=[], help="API keys, K per attack in order")
    parser.add_argument("--client-ids", type=_list, default=[], help="the guard's ids of --keys")
    parser.add_argument("--benign-clients", type=int, default=0)
    parser.add_argument("--benign-queries", type=int, default=400, help="instances per client")
    parser.add_argument("--benign-keys", type=_list, default=[])
    parser.add_argument("--benign-client-ids", type=_list, default=[])
    parser.add_argument("--reference", help="unguarded base URL or model URL, for fidelity")
    parser.add_argument("--equation-path", help="path of a logistic model for 'equation'")
    parser.add_argument("--admin", help="the guard's gRPC address, for risk samples and evidence")
    parser.add_argument("--admin-token-file", type=Path)
    parser.add_argument("--keys-file", type=Path, help="the guard's key ring, for watermarks")
    parser.add_argument(
        "--noise-key-file", type=Path, help="the guard's noise key, for the misinformation mark"
    )
    parser.add_argument("--label", default="target", help="the run's name in the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wait", action="store_true", help="do not honour Retry-After")
    parser.add_argument("--json", type=Path, help="write the JSON report to this file")
    parser.add_argument("--html", type=Path, help="write the HTML report to this file")
    args = parser.parse_args(argv)
    if args.attacks is None:
        args.attacks = [PROBE] if args.dialect == "openai" else list(ATTACKS)
    if args.dialect == "openai" and set(args.attacks) - {PROBE}:
        parser.error(f"--dialect openai runs only the {PROBE} attack")
    if args.dialect == "kserve_v1" and PROBE in args.attacks:
        parser.error(f"{PROBE} needs --dialect openai")
    if args.budget < 0 or args.batch < 1 or args.identities < 1 or args.sybil_identities < 1:
        parser.error("need --budget >= 0, --batch >= 1 and identities >= 1")
    if args.keys_file and not args.admin:
        parser.error("--keys-file needs --admin (the evidence comes from the guard)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the attacks, print the table, write the reports; return the exit code."""
    args = _parse_args(argv)
    try:
        base_url, path = base_url_of(args.target)
        reference_url = base_url_of(args.reference)[0] if args.reference else None
        keyring = KeyRing.from_file(args.keys_file) if args.keys_file else None
        noise_key = args.noise_key_file.read_bytes().strip() if args.noise_key_file else None
        token = args.admin_token_file.read_text().strip() if args.admin_token_file else None
    except (ValueError, OSError) as exc:
        print(f"extauthz redteam: {exc}", file=sys.stderr)
        return 2
    paths = {PROBE: path}
    if args.equation_path:
        paths["equation"] = args.equation_path
    plan = Plan(
        attacks=args.attacks,
        path=path,
        budget=args.budget,
        batch=args.batch,
        seed=args.seed,
        identities=args.identities,
        sybil=args.sybil,
        sybil_identities=args.sybil_identities,
        paths=paths,
        benign_clients=args.benign_clients,
        benign_queries=args.benign_queries,
        wait_on_429=not args.no_wait,
    )
    endpoint = Endpoint(
        args.label,
        base_url,
        keys=args.keys,
        client_ids=args.client_ids,
        benign_keys=args.benign_keys,
        benign_client_ids=args.benign_client_ids,
    )

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    admin = AdminClient(args.admin, token) if args.admin else None
    try:
        first_key = args.keys[0] if args.keys and not reference_url else None
        try:
            reference = reference_for(plan, reference_url or base_url, key=first_key)
        except (RuntimeError, OSError) as exc:
            say(f"extauthz redteam: no reference answers, fidelity left out: {exc}")
            reference = reference_for(plan, None)
        run = run_campaign(
            endpoint, plan, reference, admin=admin, keyring=keyring, noise_key=noise_key, say=say
        )
    except (ValueError, OSError) as exc:
        print(f"extauthz redteam: {exc}", file=sys.stderr)
        return 1
    finally:
        if admin is not None:
            admin.close()
    doc = document(
        [run],
        started=started,
        seed=args.seed,
        budget=args.budget,
        batch=args.batch,
        dialect=args.dialect,
        thresholds=THRESHOLDS,
    )
    sys.stdout.write(to_table(doc))
    if args.json is not None:
        args.json.write_text(to_json(doc) + "\n")
    if args.html is not None:
        args.html.write_text(render_html(doc))
    return 0
