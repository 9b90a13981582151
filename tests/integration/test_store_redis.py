"""RedisStore against a real redis-server: the Store contract, one round trip, hash tags,
script reloads, cluster mode and failures turned into StoreError."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from extauthz.store.base import StoreError
from extauthz.store.redis import RedisStore, _parse_sentinel
from tests.integration.conftest import RedisProcess, free_port
from tests.store_contract import LONG_TTL_S, Elapse, FakeClock, MakeStore, StoreContract

pytestmark = pytest.mark.redis

TIMEOUT_S = 2.0

MakeRedisStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def short_ttl_s() -> float:
    # Redis expires keys on its own clock, so expiry tests really wait this long.
    return 0.4


@pytest.fixture
def elapse(clock: FakeClock) -> Elapse:
    async def elapse(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(seconds)

    return elapse


async def _store_factory(url: str, clock: FakeClock) -> AsyncIterator[MakeRedisStore]:
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


@pytest.fixture
async def make_store(redis_url: str, clock: FakeClock) -> AsyncIterator[MakeRedisStore]:
    async for make in _store_factory(redis_url, clock):
        yield make


class TestRedisStoreContract(StoreContract):
    """RedisStore on a single redis-server keeps the Store contract."""


class TestRedisClusterStoreContract(StoreContract):
    """RedisStore in cluster mode keeps the Store contract (no CROSSSLOT anywhere)."""

    @pytest.fixture
    async def make_store(
        self, redis_cluster_url: str, clock: FakeClock
    ) -> AsyncIterator[MakeStore]:
        async for make in _store_factory(redis_cluster_url, clock):
            yield make


async def _commands_of(redis_url: str, action: Callable[[], Awaitable[object]]) -> list[str]:
    """The commands other than script-internal ones that Redis ran during ``action``.

    Counted on the server: MONITOR lists every command with its client, and marks commands run
    inside a script as ``lua``; an ECHO from the watcher ends the count.
    """
    async with Redis.from_url(redis_url, decode_responses=True, protocol=2) as watcher:
        async with watcher.monitor() as monitor:
            await action()
            await watcher.echo("end-of-count")
            commands: list[str] = []
            async with asyncio.timeout(5):
                while True:
                    seen = await monitor.next_command()
                    if seen["command"] == "ECHO end-of-count":
                        return commands
                    if seen["client_type"] != "lua":
                        commands.append(seen["command"])


class TestRoundTrips:
    """record() costs the server one command from the store: one round trip."""

    async def test_record_is_one_command(
        self, redis_url: str, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """MONITOR sees exactly one non-script command (EVALSHA) from the store per record()."""
        store = await make_store()
        await store.record("warm-up", tier="t", requests=1, instances=1, now=clock())
        commands = await _commands_of(
            redis_url,
            lambda: store.record("c1", tier="t", requests=1, instances=1, now=clock()),
        )
        assert len(commands) == 1, commands
        assert commands[0].startswith("EVALSHA")

    async def test_a_warm_store_sends_one_command_on_its_first_record(
        self, redis_url: str, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """warm() loads every script and opens a connection before the first request, even
        after Redis forgot its scripts: the first record() is one EVALSHA, no NOSCRIPT."""
        async with Redis.from_url(redis_url, decode_responses=True, protocol=2) as admin:
            await admin.script_flush()
            store = await make_store()
            await store.warm()
            shas = [
                s.sha
                for s in (store._record_script, store._limits_script, store._page_script)  # noqa: SLF001
            ]
            assert await admin.script_exists(*shas) == [True, True, True]
        commands = await _commands_of(
            redis_url,
            lambda: store.record("first", tier="t", requests=1, instances=1, now=clock()),
        )
        assert len(commands) == 1 and commands[0].startswith("EVALSHA"), commands

    async def test_warming_a_store_that_is_down_raises_store_error(self, clock: FakeClock) -> None:
        store = RedisStore.from_url(
            f"redis://127.0.0.1:{free_port()}/0",
            timeout_s=0.2,
            ttl_s=60,
            max_clients=10,
            clock=clock,
        )
        with pytest.raises(StoreError):
            await store.warm()
        await store.close()


class TestKeys:
    """Every key of one client lands in one cluster slot, whatever its id holds."""

    @pytest.mark.parametrize(
        "client_id", ["abc123", "ip:127.0.0.2", "a}b", "{x}", "}{", "%7D", "é"]
    )
    def test_keys_of_one_client_share_a_slot(self, client_id: str, clock: FakeClock) -> None:
        """The state key and any other kind of key hash to the slot of the client's tag."""
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout_s=1.0, clock=clock)
        keys = [store.key(client_id), store.key(client_id, "limits"), store.key(client_id, "fp")]
        assert len({key_slot(k.encode()) for k in keys}) == 1

    def test_braces_in_an_id_do_not_cut_the_tag(self, clock: FakeClock) -> None:
        """Ids sharing a prefix up to a brace get distinct keys and (here) distinct slots."""
        store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout_s=1.0, clock=clock)
        ids = [f"x}}{n}" for n in range(50)]
        keys = {store.key(cid) for cid in ids}
        slots = {key_slot(k.encode()) for k in keys}
        assert len(keys) == 50
        # Were the tag cut at the brace, all 50 would share the slot of "c:x".
        assert len(slots) > 1

    async def test_record_sets_the_ttl_on_the_key(
        self, redis_url: str, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """The state hash carries a Redis TTL equal to the store TTL."""
        store = await make_store(ttl_s=100.0)
        await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        async with Redis.from_url(redis_url) as raw:
            pttl = await raw.pttl(store.key("c1"))
        assert 99_000 < pttl <= 100_000

    async def test_registry_is_capped(
        self, redis_url: str, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """The client registry never holds more than max_clients entries, dropping the oldest."""
        store = await make_store(max_clients=5)
        for n in range(20):
            clock.advance(1.0)
            await store.record(f"c{n:02d}", tier="t", requests=1, instances=1, now=clock())
        async with Redis.from_url(redis_url, decode_responses=True) as raw:
            members = await raw.zrange("extauthz:clients", 0, -1)
        assert members == [f"c{n:02d}" for n in range(15, 20)]

    async def test_registry_drops_expired_clients_when_trimming(
        self,
        redis_url: str,
        make_store: MakeRedisStore,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every _TRIM_EVERY records, registry entries past their expiry are removed."""
        monkeypatch.setattr("extauthz.store.redis._TRIM_EVERY", 4)
        store = await make_store(ttl_s=10.0)
        await store.record("old", tier="t", requests=1, instances=1, now=clock())
        await store.set_level(
            "pinned", level="abusive", blocked=False, reason="", now=clock(), ttl_s=None
        )
        clock.advance(20.0)
        async with Redis.from_url(redis_url, decode_responses=True) as raw:
            for _ in range(2):
                await store.record("busy", tier="t", requests=1, instances=1, now=clock())
            assert await raw.zscore("extauthz:clients", "old") is not None
            await store.record("busy", tier="t", requests=1, instances=1, now=clock())
            assert set(await raw.zrange("extauthz:clients", 0, -1)) == {"busy", "pinned"}


class TestScripts:
    """The Lua scripts are reloaded when Redis forgot them."""

    async def test_script_flush_is_transparent(
        self, redis_url: str, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """After SCRIPT FLUSH, record() and set_level() still work and keep the counts."""
        store = await make_store()
        await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        async with Redis.from_url(redis_url) as raw:
            await raw.script_flush()
        again = await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        assert again.requests == 2
        async with Redis.from_url(redis_url) as raw:
            await raw.script_flush()
        pinned = await store.set_level(
            "c1", level="abusive", blocked=False, reason="", now=clock(), ttl_s=None
        )
        assert pinned.pinned_level == "abusive" and pinned.requests == 2


class TestUrls:
    """from_url takes the schemes it documents and refuses others."""

    async def test_unix_socket(
        self, redis_factory: Callable[..., RedisProcess], tmp_path: Path, clock: FakeClock
    ) -> None:
        """A unix:// URL reaches a server listening on a Unix socket."""
        sock = tmp_path / "redis.sock"
        redis_factory("--unixsocket", str(sock))
        store = RedisStore.from_url(f"unix://{sock}?db=0", timeout_s=TIMEOUT_S, clock=clock)
        try:
            rec = await store.record("c1", tier="t", requests=2, instances=3, now=clock())
            assert rec.requests == 2
            assert await store.ping() is True
        finally:
            await store.close()

    @pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "memcache://x:1"])
    def test_unknown_schemes_are_refused(self, url: str, clock: FakeClock) -> None:
        """Anything but redis, rediss, unix and their +cluster and +sentinel forms is a ValueError."""
        with pytest.raises(ValueError):
            RedisStore.from_url(url, timeout_s=1.0, clock=clock)

    @pytest.mark.parametrize(
        "url",
        [
            "redis+sentinel://127.0.0.1:26379",  # no service
            "redis+sentinel://127.0.0.1:26379/",
            "redis+sentinel://127.0.0.1/mymaster",  # no port
            "redis+sentinel://127.0.0.1:26379/mymaster/zero",
            "redis+sentinel://127.0.0.1:26379/mymaster/0/extra",
        ],
    )
    def test_malformed_sentinel_urls_are_refused(self, url: str, clock: FakeClock) -> None:
        """A Sentinel URL needs host:port pairs, a service name and at most a numeric db."""
        with pytest.raises(ValueError):
            RedisStore.from_url(url, timeout_s=1.0, clock=clock)

    def test_sentinel_url_parts(self) -> None:
        """Several sentinels, IPv6, credentials, the service and the db are all read."""
        target = _parse_sentinel("u:p%40ss@10.0.0.1:26379,[::1]:26380/my%2Fmaster/3")
        assert target.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
        assert (target.service, target.db, target.username, target.password) == (
            "my/master",
            3,
            "u",
            "p@ss",
        )

    def test_braces_in_the_prefix_are_refused(self, clock: FakeClock) -> None:
        """A prefix with a brace would move the hash tag, so it is refused."""
        with pytest.raises(ValueError):
            RedisStore.from_url("redis://127.0.0.1:1/0", timeout_s=1.0, prefix="{x}", clock=clock)


async def _every_call_raises_store_error(store: RedisStore, clock: FakeClock) -> None:
    calls = [
        store.record("c1", tier="t", requests=1, instances=1, now=clock()),
        store.get_client("c1"),
        store.list_clients(limit=5),
        store.set_level("c1", level="abusive", blocked=False, reason="", now=clock(), ttl_s=None),
        store.reset_client("c1"),
        store.ping(),
    ]
    for call in calls:
        # A generous guard: the point is that the call returns, not how fast.
        async with asyncio.timeout(10 * TIMEOUT_S):
            with pytest.raises(StoreError) as caught:
                await call
        assert caught.value.__cause__ is not None
        assert caught.value.code == "store_unavailable"


class TestFailures:
    """A Redis that is down, hung or holding foreign data yields StoreError, never a raw error."""

    async def test_nothing_listening(self, clock: FakeClock) -> None:
        """Every call against a closed port raises StoreError with the cause chained."""
        store = RedisStore.from_url(
            f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5, clock=clock
        )
        try:
            await _every_call_raises_store_error(store, clock)
        finally:
            await store.close()

    async def test_nothing_listening_in_cluster_mode(self, clock: FakeClock) -> None:
        """Cluster discovery failing is a StoreError too."""
        store = RedisStore.from_url(
            f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.5, clock=clock
        )
        try:
            await _every_call_raises_store_error(store, clock)
        finally:
            await store.close()

    async def test_stopped_server_times_out_then_recovers(
        self, redis_factory: Callable[..., RedisProcess], clock: FakeClock
    ) -> None:
        """A SIGSTOPped server makes calls raise StoreError; once resumed the store works again."""
        server = redis_factory()
        store = RedisStore.from_url(server.url, timeout_s=0.3, clock=clock)
        try:
            await store.record("c1", tier="t", requests=1, instances=1, now=clock())
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                async with asyncio.timeout(10):
                    with pytest.raises(StoreError) as caught:
                        await store.record("c1", tier="t", requests=1, instances=1, now=clock())
                assert caught.value.__cause__ is not None
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            rec = await store.get_client("c1")
            assert rec is not None and rec.requests >= 1
        finally:
            await store.close()

    async def test_foreign_value_in_a_key(
        self, redis_url: str, make_store: MakeRedisStore, clock: FakeClock
    ) -> None:
        """A key of the wrong type (WRONGTYPE) is reported as StoreError, not a ResponseError."""
        store = await make_store()
        async with Redis.from_url(redis_url) as raw:
            await raw.set(store.key("c1"), "not a hash")
        with pytest.raises(StoreError):
            await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        with pytest.raises(StoreError):
            await store.get_client("c1")
