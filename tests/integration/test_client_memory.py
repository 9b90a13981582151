"""Many distinct clients through the limiter and the store: memory per client stays under the
documented bound, and the caps and TTLs evict.

The scaled-down ``tests/bench/million_clients.py``: the same driver (the built-in policy's
Check, then ext_proc's instance charge, one IPv4 address per client). The memory store is
measured with tracemalloc, Redis with ``INFO memory`` ``used_memory``. README (Sizing): Redis
holds a few hundred bytes per active client and per limit, all with TTLs.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

import pytest
import redis

from extauthz.core import identity
from extauthz.policy.loader import parse_policy
from extauthz.store.memory import MemoryStore
from extauthz.store.redis import RedisStore
from tests.bench.million_clients import Driver, client_address, used_memory

CLIENTS = 20_000
# The memory store's bound per held client at its caps: the record and four limit keys (the
# limit keys' cap is four per record), about 1.6 KB measured; room left for other Pythons.
MEMORY_BYTES_PER_CLIENT = 2_500
# "A few hundred bytes per active client and per limit": the record and registry entry plus
# the two client-scoped limits of the built-in anonymous tier.
REDIS_BYTES_PER_CLIENT = 3 * 350
REGISTRY = "extauthz:clients"
START = 1_700_000_000.0

# Limits that end within a second, so their Redis keys expire during the test.
SHORT_POLICY = """
version: 1
tiers:
  anonymous:
    limits:
      - {name: burst, unit: requests, rate: 50, per: second}
      - {name: flow, unit: instances, rate: 100, per: second}
"""


class _Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def _traced() -> int:
    """Python memory in use now, without the process-wide address caches the driver fills."""
    identity.normalize_address.cache_clear()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _fill(store: MemoryStore, start: int, stop: int, clock: _Clock) -> None:
    """Send clients ``start .. stop - 1``; the driver (and its cache of charges) goes after."""
    driver = Driver.for_store(store, clock=clock)
    await driver.drive(start, stop)
    assert driver.refused == 0 and driver.degraded == 0


class TestMemoryStore:
    """The embedded store holds at most its cap of clients, about 1 KB each, and frees the
    state of clients past their TTL, limits included."""

    async def test_bytes_per_client_stay_under_the_bound_and_flat_past_the_cap(self) -> None:
        # Each client leaves two limit keys (its request and instance limits): at twice the cap
        # of records the limit keys reach their own cap (four per record) too, and after one
        # more round of eviction the hash tables have their steady size.
        cap = CLIENTS // 5
        clock = _Clock()
        store = MemoryStore(max_clients=cap, ttl_s=86_400.0, clock=clock)
        tracemalloc.start()
        try:
            base = _traced()
            await _fill(store, 0, 3 * cap, clock)
            at_caps = _traced()
            await _fill(store, 3 * cap, CLIENTS, clock)
            later = _traced()
        finally:
            tracemalloc.stop()
        per_client = (at_caps - base) / cap
        assert 100 < per_client < MEMORY_BYTES_PER_CLIENT
        # Two caps' worth of clients more: the caps evict, memory does not grow with them.
        assert later - base < 1.1 * (at_caps - base)
        assert len(store) == cap
        assert await store.get_client(f"ip:{client_address(0)}") is None
        assert await store.get_client(f"ip:{client_address(CLIENTS - 1)}") is not None

    async def test_records_and_limits_are_freed_after_the_ttl(self) -> None:
        clock = _Clock()
        store = MemoryStore(max_clients=CLIENTS, ttl_s=3_600.0, clock=clock)
        tracemalloc.start()
        try:
            base = _traced()
            await _fill(store, 0, CLIENTS // 4, clock)
            filled = _traced()
            # Two days on, every record and every limit (the daily quota too) has lapsed:
            # the next client to arrive finds them gone.
            clock.now += 2 * 86_400.0
            await _fill(store, CLIENTS, CLIENTS + 1, clock)
            after = _traced()
        finally:
            tracemalloc.stop()
        assert len(store) == 1
        assert await store.get_client(f"ip:{client_address(0)}") is None
        # What stays is the hash tables' size (dicts do not shrink on deletion); the limit
        # keys alone were 70 % of it.
        assert after - base < 0.25 * (filled - base)


@pytest.mark.redis
class TestRedisStore:
    """Redis holds a few hundred bytes per client and limit; the registry is capped and every
    key expires."""

    async def test_bytes_per_client_stay_under_the_documented_bound(self, redis_url: str) -> None:
        store = RedisStore.from_url(redis_url, timeout_s=2.0, clock=time.time)
        with redis.Redis.from_url(redis_url) as admin:
            try:
                base = used_memory(admin)
                driver = Driver.for_store(store)
                await driver.drive(0, CLIENTS, concurrency=16)
                grown = used_memory(admin) - base
                held = int(admin.zcard(REGISTRY))
            finally:
                await store.close()
        assert driver.refused == 0 and driver.degraded == 0
        assert held == CLIENTS
        assert 100 < grown / CLIENTS < REDIS_BYTES_PER_CLIENT

    async def test_registry_cap_and_ttls_evict(self, redis_url: str) -> None:
        cap = 2_000
        snapshot = parse_policy(SHORT_POLICY, source="short-limits")
        store = RedisStore.from_url(
            redis_url, timeout_s=2.0, ttl_s=1.0, max_clients=cap, clock=time.time
        )
        with redis.Redis.from_url(redis_url) as admin:
            try:
                driver = Driver.for_store(store, snapshot)
                await driver.drive(0, cap + cap // 2, concurrency=16)
                assert driver.refused == 0 and driver.degraded == 0
                assert int(admin.zcard(REGISTRY)) == cap
                # Records expire after the TTL, limit keys once their TAT passes (+1 s).
                for _ in range(60):  # 15 s at most
                    if admin.dbsize() <= 1:
                        break
                    await asyncio.sleep(0.25)
                assert admin.dbsize() == 1  # the registry alone
                # New clients' records trim the expired entries from the registry.
                fresh = range(10 * cap, 10 * cap + 1_100)
                await driver.drive(fresh.start, fresh.stop, concurrency=16)
                members = {m.decode() for m in admin.zrange(REGISTRY, 0, -1)}
            finally:
                await store.close()
        assert members
        assert members <= {f"ip:{client_address(i)}" for i in fresh}
