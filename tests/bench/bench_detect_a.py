"""What do the PRADA and margin detectors cost per query, and how large is a client's state?

One client's state is built from ``N`` stored queries (100 and 10,000), then the next queries are
timed from that state with ``time.perf_counter``: ten single-query updates in a row (so one
Shapiro-Wilk check, due every 10 queries, is included at its real rate), and one batch of 32.
Each update decodes the state bytes and encodes the new ones, as the Store round trip requires.
The median over rounds is reported in microseconds per query, with the state size in bytes.

PRADA runs on two inputs: ``digits64`` (jittered digit images, 64 raw values, 10 classes: most
queries are natural) and ``random32`` (uniform 32-dim vectors: nearly every query joins its
growing set, so the caps of 512 members per class and 2,048 distances are reached: the worst
case). Margin runs on natural answer margins.

Run as ``python -m tests.bench.bench_detect_a [--seconds 0.3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits

from extauthz.detect.base import Detector, Observation
from extauthz.detect.margin import MarginDetector
from extauthz.detect.prada import PradaDetector

STORED = (100, 10_000)
BATCH = 32
SEQUENCE = 10


@dataclass(frozen=True, slots=True)
class Result:
    """One detector on one input after ``stored`` queries: microseconds per query, state size."""

    detector: str
    inputs: str
    stored: int
    single_us: float
    batch_us: float
    state_bytes: int


def _median_seconds(fn: Callable[[], object], seconds: float) -> float:
    """Return the median seconds per call over 7 rounds filling about ``seconds``."""
    start = time.perf_counter()
    fn()
    reps = max(1, int(seconds / 7 / max(time.perf_counter() - start, 1e-7)))
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps)
    return statistics.median(rounds)


def _prada_stream(kind: str, n: int, seed: int) -> list[Observation]:
    """``n`` single-query observations of one client of the given input kind."""
    rng = np.random.default_rng(seed)
    if kind == "digits64":
        data = load_digits()
        pick = rng.integers(0, len(data.data), n)
        rows = (data.data[pick] + rng.normal(0.0, 0.5, (n, 64))).astype(np.float32)
        labels = data.target[pick].astype(np.int64)
        return [
            Observation("c", 0.0, 1, raw=rows[i : i + 1], top1=labels[i : i + 1]) for i in range(n)
        ]
    vectors = rng.uniform(0.0, 1.0, (n, 32)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    return [
        Observation("c", 0.0, 1, vectors=vectors[i : i + 1], top1=labels[i : i + 1])
        for i in range(n)
    ]


def _margin_stream(n: int, seed: int) -> list[Observation]:
    """``n`` single-answer observations carrying natural margins."""
    rng = np.random.default_rng(seed)
    margins: npt.NDArray[np.float32] = rng.beta(2.0, 1.0, n).astype(np.float32)
    return [Observation("c", 0.0, 1, margin=margins[i : i + 1]) for i in range(n)]


def _batched(observations: Sequence[Observation]) -> Observation:
    """Merge single-instance observations into one batch."""

    def stack(field: str) -> npt.NDArray[np.generic] | None:
        parts = [getattr(o, field) for o in observations]
        return None if parts[0] is None else np.concatenate(parts)

    return Observation(
        "c",
        0.0,
        len(observations),
        raw=stack("raw"),
        vectors=stack("vectors"),
        top1=stack("top1"),
        margin=stack("margin"),
    )


def _build(detector: Detector, stream: Sequence[Observation], stored: int) -> bytes:
    """Fold the first ``stored`` observations in batches of 100: the client's stored state."""
    state: bytes | None = None
    for start in range(0, stored, 100):
        state, _ = detector.update(state, _batched(stream[start : min(start + 100, stored)]))
    assert state is not None
    return state


def _measure(
    detector: Detector, name: str, inputs: str, stream: list[Observation], seconds: float
) -> list[Result]:
    """Time single queries and a batch after each number of stored queries."""
    results = []
    for stored in STORED:
        state = _build(detector, stream, stored)
        nxt = stream[stored : stored + SEQUENCE]
        batch = _batched(stream[stored : stored + BATCH])

        def singles(state: bytes = state, nxt: list[Observation] = nxt) -> None:
            for observation in nxt:
                state, _ = detector.update(state, observation)

        def batched(state: bytes = state, batch: Observation = batch) -> None:
            detector.update(state, batch)

        single = _median_seconds(singles, seconds) / SEQUENCE
        whole = _median_seconds(batched, seconds) / BATCH
        results.append(Result(name, inputs, stored, single * 1e6, whole * 1e6, len(state)))
    return results


def bench(seconds: float) -> list[Result]:
    """Measure PRADA on both inputs and margin, at every stored count."""
    total = max(STORED) + BATCH
    results = []
    for kind in ("digits64", "random32"):
        results += _measure(PradaDetector(), "prada", kind, _prada_stream(kind, total, 0), seconds)
    margin = MarginDetector(0.05)
    results += _measure(margin, "margin", "margins", _margin_stream(total, 0), seconds)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    args = parser.parse_args(argv)
    print("microseconds per query (median of 7 rounds), state bytes after the stored queries")
    print(f"{'detector':<9}{'inputs':<10}{'stored':>8}{'single':>10}{'batch32':>10}{'state':>10}")
    for r in bench(args.seconds):
        print(
            f"{r.detector:<9}{r.inputs:<10}{r.stored:>8}{r.single_us:>10.1f}"
            f"{r.batch_us:>10.1f}{r.state_bytes:>10}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
