"""Limits in RedisStore against real servers: the limits contract, exactness under
concurrency from several stores (replicas), one round trip, a real three-node Redis Cluster
(limits grouped by slot) and Sentinel."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from extauthz.core.limiter import ChargeMode, LimitCharge
from extauthz.store.base import ClientRecord, Store
from extauthz.store.redis import RedisStore
from tests.integration.conftest import RedisCluster3, RedisSentinelSetup
from tests.store_contract import LONG_TTL_S, FakeClock, LimitsContract, LimitTtl, daily

pytestmark = pytest.mark.redis

TIMEOUT_S = 5.0

MakeRedisStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clock_slack_s() -> float:
    # Limits run on Redis' TIME: real seconds pass during a test, the fake clock's do not.
    return 10.0


async def _factory(url: str, clock: FakeClock) -> AsyncIterator[MakeRedisStore]:
    stores: list[RedisStore] = []

    async def make(*, ttl_s: float = LONG_TTL_S, max_clients: int = 1_000) -> RedisStore:
        store = RedisStore.from_url(
            url, timeout_s=TIMEOUT_S, ttl_s=ttl_s, max_clients=max_clients, clock=clock
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def _raw(url: str) -> Redis | RedisCluster:
    """A plain client of the same server or cluster, to look at keys."""
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
    return Redis.from_url(url)


async def _ttl(url: str, store: Store, tag: str, name: str) -> float | None:
    assert isinstance(store, RedisStore)
    async with _raw(url) as raw:
        pttl = int(await raw.pttl(store.limit_key(tag, name)))
    return None if pttl == -2 else math.inf if pttl == -1 else pttl / 1000


@pytest.fixture(params=["single", "cluster3"])
def any_url(request: pytest.FixtureRequest) -> str:
    """The URL of an emptied single redis-server, then of the emptied three-node cluster."""
    if request.param == "single":
        return str(request.getfixturevalue("redis_url"))
    cluster: RedisCluster3 = request.getfixturevalue("redis_cluster3")
    return cluster.url


@pytest.fixture
async def make_store(any_url: str, clock: FakeClock) -> AsyncIterator[MakeRedisStore]:
    async for make in _factory(any_url, clock):
        yield make


@pytest.fixture
async def make_single(redis_url: str, clock: FakeClock) -> AsyncIterator[MakeRedisStore]:
    async for make in _factory(redis_url, clock):
        yield make


@pytest.fixture
async def make_cluster3(
    redis_cluster3: RedisCluster3, clock: FakeClock
) -> AsyncIterator[MakeRedisStore]:
    async for make in _factory(redis_cluster3.url, clock):
        yield make


@pytest.fixture
async def make_sentinel(
    redis_sentinel: RedisSentinelSetup, clock: FakeClock
) -> AsyncIterator[MakeRedisStore]:
    async for make in _factory(redis_sentinel.url, clock):
        yield make


@pytest.fixture
def limit_ttl(any_url: str) -> LimitTtl:
    async def limit_ttl(store: Store, tag: str, name: str) -> float | None:
        return await _ttl(any_url, store, tag, name)

    return limit_ttl


class TestRedisLimitsContract(LimitsContract):
    """RedisStore's limits (single node and three-node cluster) answer as evaluate() does."""


async def _flood(
    stores: Sequence[RedisStore], clock: FakeClock, limits: Sequence[LimitCharge], n: int
) -> list[ClientRecord]:
    """Send n record() calls at once, spread round-robin over the stores (the replicas)."""
    return await asyncio.gather(
        *(
            stores[i % len(stores)].record(
                "alice", tier="free", requests=1, instances=1, now=clock(), limits=limits
            )
            for i in range(n)
        )
    )


class TestExactUnderConcurrency:
    """Three stores (three guard replicas) sharing one Redis never admit beyond a quota."""

    async def test_exactly_the_quota_of_unit_charges(
        self, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """300 concurrent requests against 100 instances/day: exactly 100 pass."""
        stores = [await make_store() for _ in range(3)]
        records = await _flood(stores, clock, [daily("c:alice", "day", 100)], 300)
        admitted = [r for r in records if r.limits[0].allowed]
        assert len(admitted) == 100
        assert len({r.limits[0].remaining for r in admitted}) == 100  # each saw its own unit
        assert max(r.requests for r in records) == 300  # counters count refused ones too

    async def test_costs_never_overshoot(
        self, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """300 concurrent requests of 7 against 100: 14 pass (98), and a 7 no longer fits."""
        stores = [await make_store() for _ in range(3)]
        records = await _flood(stores, clock, [daily("c:alice", "day", 100, cost=7)], 300)
        taken = 7 * sum(r.limits[0].allowed for r in records)
        assert taken <= 100 < taken + 7
        refused = [r.limits[0] for r in records if not r.limits[0].allowed]
        assert len(refused) == 300 - taken // 7
        assert all(s.retry_after_s > 0 for s in refused)


async def _commands(watcher: Redis, run: Callable[[], Awaitable[Any]]) -> list[str]:
    """Return the commands (not those run inside scripts) a server saw during ``run``."""
    async with watcher.monitor() as monitor:
        await run()
        await watcher.echo("end-of-count")
        commands: list[str] = []
        async with asyncio.timeout(5):
            while True:
                seen = await monitor.next_command()
                if seen["command"] == "ECHO end-of-count":
                    return commands
                if seen["client_type"] != "lua":
                    commands.append(seen["command"])


THREE_SCOPES = [
    daily("c:alice", "day", 100, 3),
    daily("a:203.0.113.7", "day", 1000, 3),
    daily("n:203.0.113.0/24", "day", 10_000, 3),
]


class TestOneRoundTrip:
    """On one server, record() with limits is a single EVALSHA."""

    async def test_record_and_three_limits_are_one_command(
        self, redis_url: str, make_single: MakeRedisStore, clock: FakeClock
    ) -> None:
        """Client, address and subnet limits ride in the record's own script."""
        store = await make_single()
        await store.record("warm-up", tier="t", requests=1, instances=1, now=clock())
        async with Redis.from_url(redis_url, decode_responses=True, protocol=2) as watcher:
            got: list[ClientRecord] = []

            async def run() -> None:
                got.append(
                    await store.record(
                        "alice",
                        tier="t",
                        requests=1,
                        instances=3,
                        now=clock(),
                        limits=THREE_SCOPES,
                    )
                )

            commands = await _commands(watcher, run)
        assert len(commands) == 1 and commands[0].startswith("EVALSHA"), commands
        assert [s.allowed for s in got[0].limits] == [True, True, True]


def _slot_owners(port: int) -> dict[int, int]:
    """Map each slot to the port of the node that owns it."""
    owners: dict[int, int] = {}
    with redis.Redis(host="127.0.0.1", port=port) as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            owners.update(dict.fromkeys(range(int(start), int(end) + 1), int(primary[1])))
    return owners


class TestThreeNodeCluster:
    """In a real cluster, limits on other slots than the client's run beside its script."""

    async def test_scopes_on_other_nodes_still_limit(
        self, redis_cluster3: RedisCluster3, make_cluster3: MakeRedisStore, clock: FakeClock
    ) -> None:
        """Client and address limits live on different nodes; the client's node sees one
        EVALSHA (record + client limit), the address's node one limits-only EVALSHA."""
        owners = _slot_owners(redis_cluster3.nodes[0].port)
        store = await make_cluster3()
        client_key = store.limit_key("c:alice", "day")
        client_slot = key_slot(client_key.encode())
        assert client_slot == key_slot(store.key("alice").encode())
        address = next(
            f"a:203.0.113.{n}"
            for n in range(256)
            if owners[key_slot(store.limit_key(f"a:203.0.113.{n}", "day").encode())]
            not in (owners[client_slot], owners[key_slot(b"extauthz:clients")])
        )
        limits = [daily("c:alice", "day", 5, 2), daily(address, "day", 4, 2)]
        # Load both scripts first (the limits-only one through the address's node): a first
        # use is NOSCRIPT, SCRIPT LOAD and EVALSHA again.
        warm = [daily(address, "warm-up", 10), daily("c:warm-up", "day", 10)]
        await store.record("warm-up", tier="t", requests=1, instances=1, now=clock(), limits=warm)
        client_node = owners[client_slot]
        address_node = owners[key_slot(store.limit_key(address, "day").encode())]
        results: list[ClientRecord] = []

        async def run() -> None:
            results.append(
                await store.record(
                    "alice", tier="t", requests=1, instances=2, now=clock(), limits=limits
                )
            )

        async with (
            Redis(port=client_node, decode_responses=True, protocol=2) as at_client,
            Redis(port=address_node, decode_responses=True, protocol=2) as at_address,
        ):
            seen_client: list[str] = []

            async def run_watching_client() -> None:
                seen_client.extend(await _commands(at_client, run))

            seen_address = await _commands(at_address, run_watching_client)
        # The client's node may also own the registry (its EVALSHA is another key's);
        # what touches the client is one EVALSHA holding its state and its limit.
        on_client = [c for c in seen_client if "{c:alice}" in c]
        assert len(on_client) == 1 and on_client[0].startswith("EVALSHA"), seen_client
        assert store.key("alice") in on_client[0] and client_key in on_client[0]
        assert address not in " ".join(seen_client)
        on_address = [c for c in seen_address if address in c]
        assert len(on_address) == 1 and on_address[0].startswith("EVALSHA"), seen_address
        assert "{c:alice}" not in on_address[0]
        assert [(s.allowed, s.remaining) for s in results[0].limits] == [(True, 3), (True, 2)]
        # Both limits hold on their own nodes.
        again = [
            (
                await store.record(
                    "alice", tier="t", requests=1, instances=2, now=clock(), limits=limits
                )
            ).limits
            for _ in range(2)
        ]
        assert [(s.allowed, s.remaining) for s in again[0]] == [(True, 1), (True, 0)]
        # Per slot: the address refuses, and the client's slot (another one) still took its 2.
        assert [s.allowed for s in again[1]] == [False, False]
        probe = daily("c:alice", "day", 5, 1, ChargeMode.PROBE)
        left = await store.record(
            "alice", tier="t", requests=1, instances=1, now=clock(), limits=[probe]
        )
        assert left.limits[0].remaining == 1

    async def test_script_flush_on_every_node_is_transparent(
        self, redis_cluster3: RedisCluster3, make_cluster3: MakeRedisStore, clock: FakeClock
    ) -> None:
        """After SCRIPT FLUSH everywhere, record() with limits on three slots still works."""
        store = await make_cluster3()
        first = await store.record(
            "alice", tier="t", requests=1, instances=1, now=clock(), limits=THREE_SCOPES
        )
        for node in redis_cluster3.nodes:
            with redis.Redis(host="127.0.0.1", port=node.port) as raw:
                raw.script_flush()
        again = await store.record(
            "alice", tier="t", requests=1, instances=1, now=clock(), limits=THREE_SCOPES
        )
        assert again.requests == 2
        assert [s.remaining for s in again.limits] == [s.remaining - 3 for s in first.limits]


class TestSentinel:
    """redis+sentinel:// finds the master through Sentinel; records and limits work there."""

    async def test_record_and_limits_through_sentinel(
        self, redis_sentinel: RedisSentinelSetup, make_sentinel: MakeRedisStore, clock: FakeClock
    ) -> None:
        """A store built from the Sentinel URL writes to the master Sentinel names."""
        store = await make_sentinel()
        assert await store.ping() is True
        limit = [daily("c:alice", "day", 3)]
        records = [
            await store.record(
                "alice", tier="t", requests=1, instances=1, now=clock(), limits=limit
            )
            for _ in range(4)
        ]
        assert [r.limits[0].allowed for r in records] == [True, True, True, False]
        assert records[-1].requests == 4
        async with Redis(port=redis_sentinel.master.port) as master:
            assert await master.exists(store.key("alice"), store.limit_key("c:alice", "day")) == 2


class TestLimitKeys:
    """Limit keys carry their tag as the hash tag and expire with their TAT."""

    @pytest.mark.parametrize("client_id", ["alice", "key:bob", "a}b", "{x}", "%7D"])
    def test_client_limits_share_the_client_slot(self, client_id: str, clock: FakeClock) -> None:
        """A limit on tag c:<client> hashes to the slot of the client's state."""
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout_s=1.0, clock=clock)
        state_slot = key_slot(store.key(client_id).encode())
        for name in ("day", "tokens", "a}b{"):
            assert key_slot(store.limit_key(f"c:{client_id}", name).encode()) == state_slot

    def test_limit_keys_are_distinct(self, clock: FakeClock) -> None:
        """Tags and names with braces or colons never collide."""
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout_s=1.0, clock=clock)
        pairs = [("a", "b:c"), ("a:b", "c"), ("a}", "b"), ("a", "}b"), ("n:10.0.0.0/8", "day")]
        assert len({store.limit_key(tag, name) for tag, name in pairs}) == len(pairs)

    async def test_ttl_follows_the_tat(
        self, redis_url: str, make_single: MakeRedisStore, clock: FakeClock
    ) -> None:
        """A key's PTTL is its TAT's distance (plus a margin), shorter for smaller charges."""
        store = await make_single(ttl_s=60.0)
        rec = await store.record(
            "alice",
            tier="t",
            requests=1,
            instances=1,
            now=clock(),
            limits=[daily("c:alice", "day", 100, 10)],
        )
        ttl = await _ttl(redis_url, store, "c:alice", "day")
        assert ttl is not None
        assert rec.limits[0].reset_s <= ttl <= rec.limits[0].reset_s + 1.5
        assert ttl == pytest.approx(10 * 864.0, abs=2.0)
