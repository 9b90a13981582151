"""What does :class:`DetectionPipeline` cost per answered request, in process?

The hot-path figure behind bench set-up g (Envoy + the guard, full pipeline with detection on):
one client of the bench pipeline policy (tests/bench/bench-pipeline-policy.yaml, coverage
reference from the digits) sends KServe requests of 1 or 32 digit instances, answered with 10
softmax probabilities. Each request runs :meth:`DetectionPipeline.observe` as the background
task does: load the client's detection state from the memory store, run every detector and the
cross-client index, save the state. Four shapes:

- ``repeat``: the same input every request (what wrk sends: the worst case for repeat handling,
  and the shape of one client hammering one input);
- ``natural``: distinct digits (held-out rows with a little pixel jitter), in a fixed order.

Each shape first runs ``--warm`` instances (so the client's state and the index are at a steady
size, not empty), then times ``--requests`` requests; the figure is the median of 5 rounds in
microseconds per request and per instance. ``--profile`` prints a cProfile of one shape instead.

Run as ``python -m tests.bench.bench_detect_path [--requests 400] [--warm 6000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from extauthz.core.identity import Identity
from extauthz.demo.model import LinearModel, load_data
from extauthz.demo.workspace import write_coverage_reference
from extauthz.detect.pipeline import DetectionPipeline
from extauthz.dialects.base import ParsedRequest, ParsedResponse
from extauthz.policy.loader import Snapshot, load_policy
from extauthz.store.memory import MemoryStore

POLICY = Path(__file__).with_name("bench-pipeline-policy.yaml")
SHAPES = (("repeat", 1), ("natural", 1), ("repeat", 32), ("natural", 32))
ROUNDS = 5
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Result:
    """One shape: microseconds of pipeline work per request and per instance."""

    inputs: str
    batch: int
    us_per_request: float
    us_per_instance: float


class _Clock:
    """A clock the bench advances by 1 ms per request (detectors see time move)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _snapshot(workdir: Path) -> Snapshot:
    """Load the bench pipeline policy beside a coverage reference made from the digits."""
    write_coverage_reference(workdir / "coverage-reference.npy")
    policy = workdir / POLICY.name
    shutil.copyfile(POLICY, policy)
    return load_policy(policy)


def _batches(kind: str, batch: int, count: int, seed: int) -> list[F64]:
    """Return ``count`` input batches of ``batch`` rows: one repeated row, or distinct digits."""
    held_out = load_data()[1]
    if kind == "repeat":
        return [np.repeat(held_out[:1], batch, axis=0)] * count
    rng = np.random.default_rng(seed)
    rows = held_out[rng.integers(0, held_out.shape[0], count * batch)]
    rows = np.clip(rows + rng.normal(0.0, 0.5, rows.shape), 0.0, 16.0)
    return [rows[i * batch : (i + 1) * batch] for i in range(count)]


class _Driver:
    """One pipeline, one client, the policy: run requests as the background task would."""

    def __init__(self, snapshot: Snapshot, model: LinearModel) -> None:
        self.clock = _Clock()
        self.snapshot = snapshot
        self.model = model
        self.pipeline = DetectionPipeline(
            MemoryStore(clock=self.clock), key=b"bench-fingerprint-key", clock=self.clock
        )
        self.identity = Identity("ip:198.51.100.7", "anonymous", "anonymous")

    def pairs(self, batches: Sequence[F64]) -> list[tuple[ParsedRequest, ParsedResponse]]:
        """Parse nothing: build the requests and answers the dialect would hand over."""
        return [
            (
                ParsedRequest(rows.shape[0], {"instances": rows}, None),
                ParsedResponse({"predictions": self.model.predict_proba(rows)}, None),
            )
            for rows in batches
        ]

    async def run(self, pairs: Sequence[tuple[ParsedRequest, ParsedResponse]]) -> None:
        for request, response in pairs:
            self.clock.now += 0.001
            await self.pipeline.observe(self.identity, request, response, self.snapshot)


def bench(requests: int, warm: int, profile: str | None) -> list[Result]:
    """Time every shape (or profile the one named ``kind-batch``)."""
    model = LinearModel.train(0)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = _snapshot(Path(tmp))
        for kind, batch in SHAPES:
            if profile is not None and profile != f"{kind}-{batch}":
                continue
            driver = _Driver(snapshot, model)
            warm_pairs = driver.pairs(_batches(kind, batch, max(1, warm // batch), seed=1))
            asyncio.run(driver.run(warm_pairs))
            timed = [driver.pairs(_batches(kind, batch, requests, seed=2 + r)) for r in range(5)]
            if profile is not None:
                profiler = cProfile.Profile()
                profiler.enable()
                asyncio.run(driver.run(timed[0]))
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
                continue
            rounds = []
            for pairs in timed[:ROUNDS]:
                start = time.perf_counter()
                asyncio.run(driver.run(pairs))
                rounds.append((time.perf_counter() - start) / len(pairs))
            per_request = statistics.median(rounds) * 1e6
            results.append(Result(kind, batch, per_request, per_request / batch))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Print microseconds of DetectionPipeline work per request for each shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per timed round")
    parser.add_argument("--warm", type=int, default=6000, help="instances sent before timing")
    parser.add_argument("--profile", choices=[f"{k}-{b}" for k, b in SHAPES], default=None)
    args = parser.parse_args(argv)
    # Level changes log at info: keep them out of the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = bench(args.requests, args.warm, args.profile)
    if results:
        print(f"{'inputs':<8} {'batch':>5} {'us/request':>11} {'us/instance':>12}")
    for result in results:
        print(
            f"{result.inputs:<8} {result.batch:>5} "
            f"{result.us_per_request:>11.0f} {result.us_per_instance:>12.1f}"
        )


if __name__ == "__main__":
    main()
