"""MemoryStore: the Store and limits contracts, plus its bounds (LRU cap, pinned evicted last,
expiry, limit keys)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest

from extauthz.store.base import DetectionState, Store
from extauthz.store.memory import MemoryStore
from tests.store_contract import (
    LONG_TTL_S,
    Elapse,
    FakeClock,
    LimitsContract,
    LimitTtl,
    MakeStore,
    StoreContract,
    daily,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def short_ttl_s() -> float:
    return 60.0


@pytest.fixture
def elapse(clock: FakeClock) -> Elapse:
    async def elapse(seconds: float) -> None:
        clock.advance(seconds)

    return elapse


@pytest.fixture
async def make_store(clock: FakeClock) -> AsyncIterator[MakeStore]:
    stores: list[MemoryStore] = []

    async def make(*, ttl_s: float = LONG_TTL_S, max_clients: int = 1_000) -> MemoryStore:
        store = MemoryStore(max_clients=max_clients, ttl_s=ttl_s, clock=clock)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class TestMemoryStoreContract(StoreContract):
    """MemoryStore keeps the Store contract."""


class TestMemoryStoreBounds:
    """MemoryStore never holds more than max_clients records and drops expired ones."""

    async def test_lru_cap_holds(self, clock: FakeClock) -> None:
        """Ten times the cap in distinct clients leaves exactly the cap, the newest ones."""
        store = MemoryStore(max_clients=50, ttl_s=LONG_TTL_S, clock=clock)
        for n in range(500):
            await store.record(f"c{n}", tier="t", requests=1, instances=1, now=clock())
            assert len(store) <= 50
        assert len(store) == 50
        assert await store.get_client("c449") is None
        assert await store.get_client("c450") is not None
        assert await store.get_client("c499") is not None

    async def test_recent_activity_protects_from_eviction(self, clock: FakeClock) -> None:
        """The least recently active client is evicted, not the first inserted."""
        store = MemoryStore(max_clients=3, ttl_s=LONG_TTL_S, clock=clock)
        for cid in ("a", "b", "c"):
            await store.record(cid, tier="t", requests=1, instances=1, now=clock())
        await store.record("a", tier="t", requests=1, instances=1, now=clock())
        await store.record("d", tier="t", requests=1, instances=1, now=clock())
        assert await store.get_client("b") is None
        assert await store.get_client("a") is not None

    async def test_pinned_clients_are_evicted_last(self, clock: FakeClock) -> None:
        """A pinned client survives a flood of new clients; when all are pinned the oldest goes."""
        store = MemoryStore(max_clients=4, ttl_s=LONG_TTL_S, clock=clock)
        await store.set_level(
            "op", level="abusive", blocked=True, reason="", now=clock(), ttl_s=None
        )
        for n in range(40):
            await store.record(f"c{n}", tier="t", requests=1, instances=1, now=clock())
        got = await store.get_client("op")
        assert got is not None and got.blocked
        assert len(store) == 4
        for n in range(4):
            await store.set_level(
                f"p{n}", level="abusive", blocked=False, reason="", now=clock(), ttl_s=None
            )
        assert await store.get_client("op") is None
        assert len(store) == 4

    async def test_expired_records_are_dropped_when_clients_arrive(self, clock: FakeClock) -> None:
        """Expired records at the old end make room before any live record is evicted."""
        store = MemoryStore(max_clients=100, ttl_s=10.0, clock=clock)
        for n in range(20):
            await store.record(f"old{n}", tier="t", requests=1, instances=1, now=clock())
        clock.advance(11.0)
        await store.record("new", tier="t", requests=1, instances=1, now=clock())
        assert len(store) == 1

    async def test_expiry_is_judged_on_the_injected_clock(self, clock: FakeClock) -> None:
        """A record lives ttl_s after last activity: present just before, gone at the TTL."""
        store = MemoryStore(ttl_s=10.0, clock=clock)
        await store.record("c", tier="t", requests=1, instances=1, now=clock())
        clock.advance(9.999)
        assert await store.get_client("c") is not None
        clock.advance(0.001)
        assert await store.get_client("c") is None


class TestMemoryStoreDetectionBudget:
    """Detection states together stay under their byte budget; the least recently observed
    clients lose theirs first, and their records stay."""

    async def test_oldest_states_go_first_and_the_total_stays_under_the_budget(
        self, clock: FakeClock
    ) -> None:
        store = MemoryStore(clock=clock, max_detection_bytes=10_000)
        for i in range(30):
            await store.record(f"c{i}", tier="t", requests=1, instances=1, now=clock())
            state = DetectionState({"fingerprint": bytes(1_000)}, 0.1, "normal")
            await store.save_detection(f"c{i}", state, ttl_s=60)
        kept = [i for i in range(30) if await store.load_detection(f"c{i}") is not None]
        assert kept == list(range(20, 30))
        assert all([await store.get_client(f"c{i}") is not None for i in range(30)])

    async def test_a_client_saving_again_is_counted_once(self, clock: FakeClock) -> None:
        store = MemoryStore(clock=clock, max_detection_bytes=5_000)
        for _ in range(50):
            await store.save_detection("a", DetectionState({"x": bytes(4_000)}), ttl_s=60)
        assert await store.load_detection("a") is not None

    def test_the_budget_must_be_positive(self, clock: FakeClock) -> None:
        with pytest.raises(ValueError):
            MemoryStore(clock=clock, max_detection_bytes=0)


class TestMemoryStoreValidation:
    """MemoryStore refuses settings and arguments that would make it unbounded or wrong."""

    @pytest.mark.parametrize("kwargs", [{"max_clients": 0}, {"ttl_s": 0.0}, {"ttl_s": -1.0}])
    def test_bad_settings_are_refused(self, clock: FakeClock, kwargs: dict[str, float]) -> None:
        """A zero cap or a non-positive TTL is a ValueError."""
        with pytest.raises(ValueError):
            MemoryStore(clock=clock, **kwargs)  # type: ignore[arg-type]

    async def test_non_positive_pin_ttl_is_refused(self, clock: FakeClock) -> None:
        """set_level with ttl_s <= 0 is a ValueError, not an instantly lapsed pin."""
        store = MemoryStore(clock=clock)
        with pytest.raises(ValueError):
            await store.set_level(
                "c", level="abusive", blocked=False, reason="", now=clock(), ttl_s=0.0
            )


@pytest.fixture
def clock_slack_s() -> float:
    return 0.0  # limits run on the ``now`` given to record()


@pytest.fixture
def limit_ttl() -> LimitTtl:
    async def limit_ttl(store: Store, tag: str, name: str) -> float | None:
        # MemoryStore keeps a TAT until the key cap evicts it: no time limit.
        assert isinstance(store, MemoryStore)
        return math.inf if (tag, name) in store._tats else None

    return limit_ttl


class TestMemoryStoreLimits(LimitsContract):
    """MemoryStore's limits answer as core.limiter.evaluate does."""


class TestMemoryStoreLimitKeys:
    """MemoryStore bounds its limit state by a cap on keys."""

    async def test_limit_keys_are_capped(self, clock: FakeClock) -> None:
        """More subjects than max_limit_keys leave exactly the cap, the most recent kept."""
        store = MemoryStore(max_clients=10, ttl_s=LONG_TTL_S, clock=clock, max_limit_keys=20)
        for n in range(100):
            await store.record(
                "c",
                tier="t",
                requests=1,
                instances=1,
                now=clock(),
                limits=[daily(f"a:{n}", "day", 5)],
            )
        assert len(store._tats) == 20
        assert ("a:99", "day") in store._tats and ("a:79", "day") not in store._tats
