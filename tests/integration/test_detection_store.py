"""Detection state in the stores: saved once, read by any replica, returned with the record."""

from __future__ import annotations

import time

import pytest

from extauthz.store.base import DetectionState
from extauthz.store.memory import MemoryStore
from extauthz.store.redis import RedisStore

STATE = DetectionState(
    detectors={"prada": bytes(range(256)) * 3, "margin": b"\x00\x01"},
    risk=0.72,
    level="suspicious",
    reasons=("prada_non_normal", "boundary_probing"),
    updated_at=1_700_000_000.5,
    timeline=((1_700_000_000.5, "suspicious", "prada_non_normal"),),
)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def stores(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if request.param == "memory":
        store = MemoryStore(clock=time.time)
        yield store, store
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    first = RedisStore.from_url(url, timeout_s=2.0, clock=time.time)
    second = RedisStore.from_url(url, timeout_s=2.0, clock=time.time)
    yield first, second
    await first.close()
    await second.close()


class TestDetectionState:
    """One replica saves, another loads the same bytes, and the record carries the risk."""

    async def test_round_trip_across_replicas(self, stores) -> None:  # type: ignore[no-untyped-def]
        writer, reader = stores
        assert await reader.load_detection("ip:198.51.100.60") is None
        await writer.record(
            "ip:198.51.100.60", tier="anonymous", requests=1, instances=1, now=time.time()
        )
        await writer.save_detection("ip:198.51.100.60", STATE, ttl_s=60)
        loaded = await reader.load_detection("ip:198.51.100.60")
        assert loaded == STATE
        record = await reader.record(
            "ip:198.51.100.60", tier="anonymous", requests=1, instances=0, now=time.time()
        )
        assert (record.risk, record.detected_level, record.risk_reasons) == (
            0.72,
            "suspicious",
            STATE.reasons,
        )
        assert await reader.reset_client("ip:198.51.100.60")
        assert await reader.load_detection("ip:198.51.100.60") is None
