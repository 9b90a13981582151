"""What does output protection cost per row? Parse, rewrite and serialize a KServe v1 answer.

A batch of 64 rows of probabilities (10 and 1,000 classes) goes through the kserve_v1 dialect's
``parse_response``, :func:`~extauthz.protect.perturb.protect_outputs` with one pipeline, and
``serialize_response``, as ext_proc does on a model route. Each pipeline is timed with
``time.perf_counter`` over repeated rounds; the median round is reported, in microseconds per row,
for the whole and for each of the three parts. ``canonical_rows`` of a 64 x 784 request (the
keyed-noise key material, computed on the request side) is timed too.

Run as ``python -m tests.bench.bench_protect [--rows 64] [--seconds 0.3] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson

from extauthz.dialects import get_dialect
from extauthz.policy.model import OutputStep
from extauthz.protect.perturb import NoiseContext, canonical_rows, protect_outputs

PIPELINES: dict[str, tuple[OutputStep, ...]] = {
    "passthrough": (),
    "round": (OutputStep(policy="round", decimals=3),),
    "top_k": (OutputStep(policy="top_k", k=3),),
    "label_only": (OutputStep(policy="label_only"),),
    "reverse_sigmoid": (OutputStep(policy="reverse_sigmoid", beta=1.0, gamma=0.1),),
    "keyed_noise": (OutputStep(policy="keyed_noise", scale=0.5),),
    "keyed_noise+round": (
        OutputStep(policy="keyed_noise", scale=0.5),
        OutputStep(policy="round", decimals=3),
    ),
}
CLASSES = (10, 1000)
INPUT_FEATURES = 784


@dataclass(frozen=True, slots=True)
class Result:
    """Microseconds per row of one pipeline at one class count (medians over rounds)."""

    pipeline: str
    classes: int
    rows: int
    total_us_per_row: float
    parse_us_per_row: float
    protect_us_per_row: float
    serialize_us_per_row: float
    rounds: int
    repetitions: int


def _time(fn: Callable[[], object], seconds: float) -> tuple[float, int, int]:
    """Return the median seconds per call over rounds filling about ``seconds``."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    reps = max(1, int(seconds / 7 / once))
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps)
    return statistics.median(rounds), len(rounds), reps


def _body(rows: int, classes: int) -> bytes:
    probs = np.random.default_rng(classes).dirichlet(np.ones(classes), size=rows)
    return orjson.dumps({"predictions": probs.tolist()})


def bench(rows: int, seconds: float) -> tuple[list[Result], float]:
    """Time every pipeline at every class count; also canonical_rows per row of input."""
    inputs = np.random.default_rng(0).normal(size=(rows, INPUT_FEATURES))
    canonical = canonical_rows(inputs, quantum=OutputStep().quantum)
    ctx = NoiseContext(b"bench-key-" * 4, "key:bench", canonical)
    results = []
    for classes in CLASSES:
        body = _body(rows, classes)
        for name, steps in PIPELINES.items():
            results.append(_measure(name, classes, rows, body, steps, ctx, seconds))
    seconds_per_call, _, _ = _time(lambda: canonical_rows(inputs, quantum=1e-3), seconds / 3)
    return results, seconds_per_call * 1e6 / rows


def _measure(
    name: str,
    classes: int,
    rows: int,
    body: bytes,
    steps: Sequence[OutputStep],
    ctx: NoiseContext,
    seconds: float,
) -> Result:
    """Time one pipeline on one body: the whole path, then each part alone."""
    dialect = get_dialect("kserve_v1")
    parsed = dialect.parse_response(body)
    protected = protect_outputs(parsed.outputs, steps, ctx, dtypes=parsed.dtypes)
    served = {} if protected is None else protected.outputs

    def full() -> bytes:
        p = dialect.parse_response(body)
        out = protect_outputs(p.outputs, steps, ctx, dtypes=p.dtypes)
        return dialect.serialize_response(p, {} if out is None else out.outputs)

    total, n_rounds, reps = _time(full, seconds)
    parse, _, _ = _time(lambda: dialect.parse_response(body), seconds / 3)
    rewrite, _, _ = _time(
        lambda: protect_outputs(parsed.outputs, steps, ctx, dtypes=parsed.dtypes), seconds / 3
    )
    serialize, _, _ = _time(lambda: dialect.serialize_response(parsed, served), seconds / 3)
    per_row = 1e6 / rows
    return Result(
        name,
        classes,
        rows,
        total * per_row,
        parse * per_row,
        rewrite * per_row,
        serialize * per_row,
        n_rounds,
        reps,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    parser.add_argument("--json", type=Path, default=Path("bench-protect.json"))
    args = parser.parse_args(argv)
    results, canonical = bench(args.rows, args.seconds)
    print(f"KServe v1, {args.rows} rows; microseconds per row (median of 7 rounds)")
    print(
        f"{'pipeline':<20}{'classes':>8}{'total':>10}{'parse':>10}{'protect':>10}{'serialize':>11}"
    )
    for r in results:
        print(
            f"{r.pipeline:<20}{r.classes:>8}{r.total_us_per_row:>10.2f}{r.parse_us_per_row:>10.2f}"
            f"{r.protect_us_per_row:>10.2f}{r.serialize_us_per_row:>11.2f}"
        )
    print(f"canonical_rows of a {args.rows} x {INPUT_FEATURES} request: {canonical:.2f} us per row")
    report = {
        "rows": args.rows,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "results": [asdict(r) for r in results],
        "canonical_rows_us_per_row": canonical,
        "canonical_input_features": INPUT_FEATURES,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
