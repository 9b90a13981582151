"""``extauthz verify``: is a suspect model a clone trained on our marked answers?

Reads the evidence ledger (JSONL, from ``extauthz admin export-evidence``), asks the suspect
about the ledger's inputs (an HTTP endpoint in a supported dialect, or a JSONL file of its
predictions), and for each mark prints the statistic, the rate expected by chance (calibrated with
decoy keys) and a p-value, then a combined p-value and a verdict. With ``--probe`` inputs the
soft mark is tested too, and with ``--model-url`` (the protected model itself, unguarded) and
``--noise-key-file`` the misinformation mark: whether the suspect answers the guard's keyed wrong
classes where the model answers the right ones. Each verdict names the terms of use versions
the clients had accepted when they were served the marked answers.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from extauthz.demo.client import Client
from extauthz.dialects import get_dialect
from extauthz.evidence.ledger import EvidenceRecord, import_jsonl
from extauthz.evidence.verify import (
    MarkEvidence,
    combine_p_values,
    decoy_labels,
    verify_label_marks,
    verify_misinformation,
    verify_soft_mark,
)
from extauthz.keys import KeyRing
from extauthz.protect.watermark import marked_label, watermark_rows

VERDICT_P = 1e-6


def ask_suspect(url: str, dialect_name: str, inputs: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """Query ``url`` (a model endpoint) with ``inputs`` in ``dialect_name``; return (n, K) probabilities."""
    parts = urllib.parse.urlsplit(url)
    dialect = get_dialect(dialect_name)
    rows: list[np.ndarray] = []
    with Client(parts.port or 80, host=parts.hostname or "127.0.0.1") as http:
        for start in range(0, len(inputs), batch):
            chunk = inputs[start : start + batch]
            if dialect_name == "oip_v2":
                body: object = {
                    "inputs": [
                        {
                            "name": "input-0",
                            "shape": list(chunk.shape),
                            "datatype": "FP64",
                            "data": chunk.ravel().tolist(),
                        }
                    ]
                }
            else:
                body = {"instances": chunk.tolist()}
            reply = http.post(parts.path or "/", body)
            if reply.status != 200:
                raise RuntimeError(f"the suspect answered {reply.status}: {reply.body[:200]!r}")
            parsed = dialect.parse_response(reply.body)
            probabilities = next(v for k, v in sorted(parsed.outputs.items()) if v.ndim == 2)
            rows.append(np.asarray(probabilities, dtype=np.float64))
    return np.vstack(rows)


def label_evidence(
    records: Sequence[EvidenceRecord], keys: KeyRing, suspect: np.ndarray
) -> MarkEvidence:
    """The suspect's agreement with the keyed labels of the ledger's inputs, against decoy keys."""
    inputs = np.asarray([json.loads(r.input) for r in records], dtype=np.float64)
    kid = records[0].kid
    classes = suspect.shape[1]
    canonical = watermark_rows(inputs)
    targets = np.asarray([r.served_label for r in records], dtype=np.int64)
    offsets = marked_label(
        keys, canonical, classes, np.zeros(len(records), dtype=np.int64), kid=kid
    )
    original = (targets - offsets) % classes
    decoys = decoy_labels(keys, canonical, classes, original, kid=kid)
    return verify_label_marks(
        suspect.argmax(axis=1), targets, classes, decoys=decoys, original_labels=original, kid=kid
    )


def terms_summary(records: Sequence[EvidenceRecord]) -> str:
    """The terms of use versions the records were served under, most records first, with
    counts: ``2024-06 (120), none (3)``; ``none`` for records without an accepted version."""
    counts = collections.Counter(r.terms_version or "none" for r in records)
    return ", ".join(f"{version} ({n})" for version, n in counts.most_common())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extauthz verify", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--evidence", required=True, type=Path, help="ledger JSONL (extauthz admin export-evidence)"
    )
    parser.add_argument(
        "--keys-file", required=True, type=Path, help="the guard's keys file (YAML {current, keys})"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--suspect-url",
        help="the suspect's model endpoint, e.g. http://host:port/v1/models/m:predict",
    )
    target.add_argument(
        "--predictions",
        type=Path,
        help="JSONL: the suspect's probabilities per ledger input, in order",
    )
    parser.add_argument("--dialect", default="kserve_v1", choices=("kserve_v1", "oip_v2"))
    parser.add_argument(
        "--probe", type=Path, help=".npy of inputs to test the soft mark on (with --suspect-url)"
    )
    parser.add_argument(
        "--model-url", help="the protected model, unguarded: labels the probe (misinformation mark)"
    )
    parser.add_argument(
        "--noise-key-file", type=Path, help="the guard's noise key (misinformation mark)"
    )
    args = parser.parse_args(argv)
    if (args.model_url or args.noise_key_file) and not (
        args.model_url and args.noise_key_file and args.probe and args.suspect_url
    ):
        parser.error(
            "the misinformation mark needs --model-url, --noise-key-file, --probe and --suspect-url"
        )

    keys = KeyRing.from_file(args.keys_file)
    records = import_jsonl(args.evidence.read_text().splitlines())
    if not records:
        print("extauthz verify: the ledger is empty", file=sys.stderr)
        return 2
    inputs = np.asarray([json.loads(r.input) for r in records], dtype=np.float64)
    if args.predictions:
        suspect = np.asarray(
            [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
        )
    else:
        suspect = ask_suspect(args.suspect_url, args.dialect, inputs)
    evidence = [label_evidence(records, keys, suspect)]
    if args.probe and args.suspect_url:
        probe = np.load(args.probe).astype(np.float64)
        suspect_probe = ask_suspect(args.suspect_url, args.dialect, probe)
        evidence.append(verify_soft_mark(suspect_probe, probe, keys, kid=records[0].kid))
        if args.model_url and args.noise_key_file:
            model = ask_suspect(args.model_url, args.dialect, probe)
            evidence.append(
                verify_misinformation(
                    suspect_probe.argmax(axis=1),
                    model.argmax(axis=1),
                    args.noise_key_file.read_bytes().strip(),
                    suspect_probe.shape[1],
                )
            )
    combined = combine_p_values([e.p_value for e in evidence])
    clients = sorted({r.client_id for r in records})
    print(
        f"evidence: {len(records)} marked answers under key {records[0].kid}, served to {len(clients)} client(s): {', '.join(clients[:10])}"
    )
    print(f"{'mark':8} {'n':>6} {'statistic':>10} {'chance':>10} {'p-value':>10}")
    for e in evidence:
        print(f"{e.mark:8} {e.n:>6} {e.statistic:>10.4f} {e.null_rate:>10.4f} {e.p_value:>10.3g}")
    verdict = (
        "the suspect carries the marks: a clone"
        if combined < VERDICT_P
        else "no evidence of cloning"
    )
    terms = terms_summary(records)
    print(f"terms of use accepted when served: {terms}")
    print(f"combined p-value {combined:.3g}: {verdict}; terms of use accepted: {terms}")
    return 0
