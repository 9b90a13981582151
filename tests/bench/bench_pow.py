"""How long does the Python solver take per difficulty? What a client pays for a challenge.

For each difficulty (8, 12, 14, 16, 18, 20 leading zero bits) fresh challenges (a different token
per sample) are solved with :func:`~extauthz.challenge.pow.solve` and timed with
``time.perf_counter``. Solve times are geometric, so many samples are needed for a stable median:
each difficulty takes up to ``--max-samples`` samples (at least ``--min-samples``) within an even
share of what is left of ``--budget-s`` (45 s), so the time the easy difficulties leave unused goes
to the hard ones and the whole run stays under about a minute. Reported per difficulty: median
and p90 in milliseconds, the mean number of hashes (expected ``2**d``) and hashes per second.
:func:`~extauthz.challenge.pow.verify` is timed too: the guard's cost per solution.

Run as ``python -m tests.bench.bench_pow [--json FILE]`` (default ``bench-pow.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from extauthz.challenge.pow import issue, solve, verify
from extauthz.keys import KeyRing

DIFFICULTIES = (8, 12, 14, 16, 18, 20)
KEYS = KeyRing.single(b"bench-secret-0123456789").derive("challenge")
NOW = 1_700_000_000.0


@dataclass(frozen=True, slots=True)
class Row:
    """Solve times for one difficulty."""

    difficulty: int
    samples: int
    median_ms: float
    p90_ms: float
    mean_hashes: float
    expected_hashes: int
    hashes_per_s: float


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    difficulty: int, *, seconds: float, min_samples: int, max_samples: int, seed: int
) -> Row:
    """Solve distinct challenges at ``difficulty`` until the sample or time budget runs out."""
    times: list[float] = []
    hashes: list[int] = []
    started = time.perf_counter()
    i = 0
    while len(times) < max_samples and (
        len(times) < min_samples or time.perf_counter() - started < seconds
    ):
        rng = (seed * 1_000_003 + i).to_bytes(16, "big")
        i += 1
        c = issue(KEYS, binding="bench", difficulty=difficulty, now=NOW, ttl_s=60, rng_bytes=rng)
        t0 = time.perf_counter()
        nonce = solve(c.token, difficulty)
        times.append(time.perf_counter() - t0)
        hashes.append(int(nonce) + 1)  # tries from 0 up to and including the nonce
    return Row(
        difficulty=difficulty,
        samples=len(times),
        median_ms=statistics.median(times) * 1e3,
        p90_ms=_quantile(times, 0.9) * 1e3,
        mean_hashes=statistics.fmean(hashes),
        expected_hashes=2**difficulty,
        hashes_per_s=sum(hashes) / sum(times),
    )


def verify_us(rounds: int = 20_000) -> float:
    """Return the median microseconds of one ``verify`` of a valid solution (best of 5 rounds)."""
    c = issue(KEYS, binding="bench", difficulty=12, now=NOW, ttl_s=60, rng_bytes=bytes(16))
    header = f"{c.token}:{solve(c.token, 12)}"
    assert verify(KEYS, header, binding="bench", now=NOW).ok
    per_round = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            verify(KEYS, header, binding="bench", now=NOW)
        per_round.append((time.perf_counter() - t0) / rounds * 1e6)
    return statistics.median(per_round)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and write the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_pow")
    parser.add_argument("--json", type=Path, default=Path("bench-pow.json"))
    parser.add_argument("--budget-s", type=float, default=45.0, help="time for all solving")
    parser.add_argument("--min-samples", type=int, default=9)
    parser.add_argument("--max-samples", type=int, default=400)
    args = parser.parse_args(argv)

    rows: list[Row] = []
    print(f"{'d':>3} {'samples':>7} {'median ms':>10} {'p90 ms':>10} {'hashes':>10} {'MH/s':>6}")
    deadline = time.perf_counter() + args.budget_s
    for left, d in enumerate(DIFFICULTIES):
        share = max(0.0, deadline - time.perf_counter()) / (len(DIFFICULTIES) - left)
        row = measure(
            d,
            seconds=share,
            min_samples=args.min_samples,
            max_samples=args.max_samples,
            seed=d,
        )
        rows.append(row)
        print(
            f"{d:>3} {row.samples:>7} {row.median_ms:>10.2f} {row.p90_ms:>10.2f} "
            f"{row.mean_hashes:>10.0f} {row.hashes_per_s / 1e6:>6.2f}"
        )
    check_us = verify_us()
    overall = sum(r.mean_hashes * r.samples for r in rows) / sum(
        r.mean_hashes * r.samples / r.hashes_per_s for r in rows
    )
    print(f"solver: {overall / 1e6:.2f} M hashes/s; verify: {check_us:.1f} us per solution")
    report = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "hashes_per_s": overall,
        "verify_us": check_us,
        "rows": [asdict(r) for r in rows],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
