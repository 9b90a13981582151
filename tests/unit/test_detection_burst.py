"""Detection in bursts: a client's requests that arrive while its detection runs are detected
together, with the same detector states as one by one and one state load and save."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from extauthz.core.identity import Identity
from extauthz.detect.base import Observation
from extauthz.detect.pipeline import DetectionPipeline, _merged
from extauthz.dialects.base import ParsedRequest, ParsedResponse
from extauthz.policy.loader import Snapshot
from extauthz.store.memory import MemoryStore
from extauthz.telemetry import metrics
from tests.store_contract import FakeClock

POLICY = """
    version: 1
    detection:
      enabled: true
      input_scale: 16
"""
# Detectors whose state is a pure function of the instances in order (volume also sees time).
ORDERED = ("prada", "margin", "fingerprint", "augmentation", "cross_client")


class CountingStore(MemoryStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.saves = 0

    async def save_detection(self, client_id: str, state: Any, *, ttl_s: float) -> None:
        self.saves += 1
        await super().save_detection(client_id, state, ttl_s=ttl_s)


def _answered(rng: np.random.Generator, n: int) -> tuple[ParsedRequest, ParsedResponse]:
    x = rng.integers(0, 17, size=(n, 64)).astype(np.float64)
    p = rng.dirichlet(np.ones(10), size=n)
    return ParsedRequest(n, {"instances": x}, None), ParsedResponse({"predictions": p}, None)


def _identity(client: str) -> Identity:
    return Identity(client, "anonymous", "anonymous")


@pytest.fixture
def snapshot(policy_from_text: Callable[[str], Snapshot]) -> Snapshot:
    return policy_from_text(POLICY)


class TestBursts:
    async def test_a_burst_is_detected_once_with_the_states_of_one_by_one(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        rng = np.random.default_rng(0)
        requests = [_answered(rng, int(n)) for n in rng.integers(1, 9, size=12)]
        key = b"k" * 32

        burst_store = CountingStore(clock)
        burst = DetectionPipeline(burst_store, key=key, clock=clock)
        for request, response in requests:  # no await between: one burst
            burst.submit(_identity("c"), request, response, snapshot)
        await burst.drain()

        single_store = CountingStore(clock)
        single = DetectionPipeline(single_store, key=key, clock=clock)
        for request, response in requests:
            await single.observe(_identity("c"), request, response, snapshot)

        assert burst_store.saves == 1
        assert single_store.saves == len(requests)
        together = await burst_store.load_detection("c")
        apart = await single_store.load_detection("c")
        assert together is not None and apart is not None
        for name in ORDERED:
            assert together.detectors[name] == apart.detectors[name], name

    async def test_requests_arriving_during_a_detection_form_the_next_burst(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        rng = np.random.default_rng(1)
        store = CountingStore(clock)
        pipeline = DetectionPipeline(store, key=b"k" * 32, clock=clock)
        pipeline.submit(_identity("c"), *_answered(rng, 2), snapshot)
        pipeline.submit(_identity("d"), *_answered(rng, 2), snapshot)
        await pipeline.drain()
        for _ in range(5):
            pipeline.submit(_identity("c"), *_answered(rng, 1), snapshot)
        await pipeline.drain()
        assert store.saves == 3  # c, d, then c's five together

    async def test_too_many_waiting_are_skipped_and_counted(
        self, snapshot: Snapshot, clock: FakeClock
    ) -> None:
        rng = np.random.default_rng(2)
        pipeline = DetectionPipeline(
            CountingStore(clock), key=b"k" * 32, clock=clock, max_pending=3
        )
        before = (
            metrics.REGISTRY.get_sample_value(
                "extauthz_errors_total", {"reason": "detection_skipped"}
            )
            or 0.0
        )
        for _ in range(5):
            pipeline.submit(_identity("c"), *_answered(rng, 1), snapshot)
        after = metrics.REGISTRY.get_sample_value(
            "extauthz_errors_total", {"reason": "detection_skipped"}
        )
        assert after == before + 2
        await pipeline.drain()
        pipeline.submit(_identity("c"), *_answered(rng, 1), snapshot)  # room again
        await pipeline.drain()
        assert (
            metrics.REGISTRY.get_sample_value(
                "extauthz_errors_total", {"reason": "detection_skipped"}
            )
            == before + 2
        )


class TestMerged:
    def test_rows_in_order_and_fields_only_when_every_request_has_them(self) -> None:
        a = Observation("c", 1.0, 2, raw=np.zeros((2, 4)), top1=np.array([1, 2]))
        b = Observation("c", 2.0, 1, raw=np.ones((1, 4)), top1=None)
        merged = _merged([a, b], 3.0)
        assert merged.instances == 3 and merged.now == 3.0
        assert merged.raw is not None and merged.raw.tolist() == [[0.0] * 4, [0.0] * 4, [1.0] * 4]
        assert merged.top1 is None

    def test_other_widths_are_left_out(self) -> None:
        a = Observation("c", 1.0, 1, raw=np.zeros((1, 4)))
        b = Observation("c", 2.0, 1, raw=np.zeros((1, 8)))
        assert _merged([a, b], 2.0).raw is None
