"""What does one query cost in the near-duplicate, cross-client, volume and coverage detectors?

For one client, each detector's state is first filled with 100 and then 10,000 earlier queries
(one instance each, MNIST-sized inputs of 784 values in [0, 1]); then one more single-instance
request is timed against that state, as the pipeline would run it: ``update`` from the state
bytes to new state bytes. The fingerprint detector is timed with and without computing the
fingerprints (:class:`~extauthz.detect.fingerprint.Fingerprinter` alone is timed too), and the
cross-client index with 100 and 10,000 queries of other clients stored. Times are medians of 7
rounds with ``time.perf_counter``; the state size is the bytes the Store would hold.

Run as ``python -m tests.bench.bench_detect_b [--seconds 0.2] [--width 784] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from extauthz.detect.base import Observation
from extauthz.detect.coverage import CoverageDetector
from extauthz.detect.features import Projector
from extauthz.detect.fingerprint import (
    CrossClientDetector,
    FingerprintDetector,
    Fingerprinter,
    MemoryFingerprintIndex,
)
from extauthz.detect.volume import VolumeDetector

STORED = (100, 10_000)
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Result:
    """Microseconds for one more single-instance query after ``stored`` ones, and state bytes."""

    detector: str
    stored: int
    us_per_query: float
    state_bytes: int


def _time(fn: Callable[[], object], seconds: float) -> float:
    """Return the median seconds per call over 7 rounds filling about ``seconds``."""
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
    return statistics.median(rounds)


def _inputs(count: int, width: int, seed: int) -> F64:
    """Return ``count`` MNIST-like rows: sparse, a few bright pixels, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.0, 1.0, (count, width))
    rows[rng.uniform(size=rows.shape) < 0.8] = 0.0
    return rows


@dataclass(frozen=True, slots=True)
class _Setup:
    """The detectors and the timed query, shared by every state size."""

    width: int
    seconds: float
    projector: Projector
    fingerprinter: Fingerprinter
    fingerprint: FingerprintDetector
    cross: CrossClientDetector
    volume: VolumeDetector
    coverage: CoverageDetector
    probe_hashes: npt.NDArray[np.uint64]
    probes: npt.NDArray[np.uint64]
    observation: Observation


def bench(seconds: float, width: int) -> list[Result]:
    """Fill every detector's state for one client, then time one more query."""
    projector = Projector(dim=32, seed=0)
    fingerprinter = Fingerprinter(key=b"bench-salt-key-0", scale=1.0, quantum=50.0)
    probe = _inputs(1, width, 7)
    setup = _Setup(
        width=width,
        seconds=seconds,
        projector=projector,
        fingerprinter=fingerprinter,
        fingerprint=FingerprintDetector(fingerprinter),
        cross=CrossClientDetector(),
        volume=VolumeDetector(sustained_per_min=1000),
        coverage=CoverageDetector(projector.project(_inputs(2000, width, 99))),
        probe_hashes=fingerprinter(probe),
        probes=fingerprinter(_inputs(3000, width, 8)),
        observation=Observation(
            "key:bench", now=0.0, instances=1, raw=probe, vectors=projector.project(probe)
        ),
    )
    once = _time(lambda: fingerprinter(probe), seconds) * 1e6
    results = [Result("fingerprints (one row)", 0, once, 0)]
    for stored in STORED:
        results.extend(_bench_stored(setup, stored))
    return results


def _bench_stored(setup: _Setup, stored: int) -> list[Result]:
    """Time one more query of every detector after ``stored`` earlier ones."""
    seconds = setup.seconds
    history = _inputs(stored, setup.width, stored)
    hashes = setup.fingerprinter(history)
    vectors = setup.projector.project(history)
    now = float(stored)
    obs = Observation(
        "key:bench",
        now=now,
        instances=1,
        raw=setup.observation.raw,
        vectors=setup.observation.vectors,
    )
    results: list[Result] = []

    fp_state, _ = setup.fingerprint.update_hashes(None, hashes)
    given = _time(lambda: setup.fingerprint.update_hashes(fp_state, setup.probe_hashes), seconds)
    from_raw = _time(lambda: setup.fingerprint.update(fp_state, obs), seconds)
    results.append(Result("fingerprint update (hashes given)", stored, given * 1e6, len(fp_state)))
    results.append(Result("fingerprint update (from raw)", stored, from_raw * 1e6, len(fp_state)))

    index = MemoryFingerprintIndex()
    for i, row in enumerate(hashes):
        index.observe_sync(f"key:other{i % 50}", row, now - 1.0)
    # Observing records the query, so each timed call sends another one.
    fresh = itertools.cycle(setup.probes)
    observe = _time(lambda: index.observe_sync("key:bench", next(fresh), now), seconds / 4)
    results.append(Result("cross-client index observe", stored, observe * 1e6, 0))

    x_state, _ = setup.cross.verdict(None, np.zeros(stored, dtype=np.int64), now)
    one = np.array([30])
    cross = _time(lambda: setup.cross.verdict(x_state, one, now), seconds)
    results.append(Result("cross-client verdict", stored, cross * 1e6, len(x_state)))

    v_state: bytes | None = None
    for t in range(stored):
        v_state, _ = setup.volume.update(
            v_state, Observation("key:bench", now=now - stored + t, instances=1)
        )
    volume = _time(lambda: setup.volume.update(v_state, obs), seconds)
    results.append(Result("volume update", stored, volume * 1e6, len(v_state or b"")))

    c_state, _ = setup.coverage.update(
        None, Observation("key:bench", now=now, instances=stored, vectors=vectors)
    )
    coverage = _time(lambda: setup.coverage.update(c_state, obs), seconds)
    results.append(Result("coverage update", stored, coverage * 1e6, len(c_state)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a table and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.2, help="time budget per measurement")
    parser.add_argument("--width", type=int, default=784, help="input values per instance")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = bench(args.seconds, args.width)
    print(f"one client, single-instance queries of {args.width} values; median of 7 rounds")
    print(f"{'detector':<36}{'stored':>8}{'us/query':>11}{'state bytes':>13}")
    for r in results:
        print(f"{r.detector:<36}{r.stored:>8}{r.us_per_query:>11.1f}{r.state_bytes:>13}")
    if args.json is not None:
        report = {
            "width": args.width,
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "machine": platform.machine(),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
