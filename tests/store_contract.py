"""The behaviour every ``Store`` implementation must show, as a reusable test class.

Subclass ``StoreContract`` in a test module (as ``Test...``) and provide four fixtures:

- ``clock``: a ``FakeClock`` that the stores read, and that tests pass as ``now``;
- ``make_store``: an async factory ``(ttl_s) -> Store`` that closes its stores after the test;
- ``elapse``: an async ``(seconds) -> None`` that lets that much time pass for the store
  (advance the fake clock; a store whose expiry runs on a real clock also sleeps);
- ``short_ttl_s``: a TTL short enough to wait out (seconds, against ``elapse``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from extauthz.store.base import Store

MakeStore = Callable[..., Awaitable[Store]]
Elapse = Callable[[float], Awaitable[None]]

LONG_TTL_S = 3_600.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StoreContract:
    """The shared contract of ``Store`` implementations (see the module docstring)."""

    @pytest.fixture
    async def store(self, make_store: MakeStore) -> Store:
        return await make_store(ttl_s=LONG_TTL_S)

    # record / get_client

    async def test_record_accumulates_counters_and_returns_the_record(
        self, store: Store, clock: FakeClock
    ) -> None:
        """record() adds to the counters, keeps first_seen and moves last_seen and tier."""
        t0 = clock()
        first = await store.record("c1", tier="free", requests=1, instances=4, now=t0)
        assert (first.requests, first.instances) == (1, 4)
        assert first.first_seen == first.last_seen == t0
        clock.advance(2.5)
        second = await store.record("c1", tier="pro", requests=2, instances=64, now=clock())
        assert second.client_id == "c1"
        assert (second.requests, second.instances) == (3, 68)
        assert second.tier == "pro"
        assert second.first_seen == t0
        assert second.last_seen == t0 + 2.5
        assert await store.get_client("c1") == second

    async def test_get_client_of_an_unknown_client_is_none(self, store: Store) -> None:
        """get_client() answers None for a client never recorded."""
        assert await store.get_client("nobody") is None

    async def test_clients_are_kept_apart(self, store: Store, clock: FakeClock) -> None:
        """Counters of one client do not leak into another, whatever characters the ids hold."""
        ids = ["a", "ip:127.0.0.2", "x}y", "{z}", "%7D", "é"]
        for n, cid in enumerate(ids, start=1):
            await store.record(cid, tier="t", requests=n, instances=0, now=clock())
        for n, cid in enumerate(ids, start=1):
            got = await store.get_client(cid)
            assert got is not None and got.requests == n

    async def test_concurrent_records_are_all_counted(self, store: Store, clock: FakeClock) -> None:
        """Concurrent record() calls for one client lose no increment."""
        await asyncio.gather(
            *(
                store.record("busy", tier="t", requests=1, instances=2, now=clock())
                for _ in range(50)
            )
        )
        got = await store.get_client("busy")
        assert got is not None and (got.requests, got.instances) == (50, 100)

    # set_level

    async def test_set_level_pins_and_unpins(self, store: Store, clock: FakeClock) -> None:
        """A pinned level survives activity and is cleared by pinning None; counters stay."""
        await store.record("c1", tier="t", requests=5, instances=5, now=clock())
        pinned = await store.set_level(
            "c1", level="abusive", blocked=False, reason="ticket 7", now=clock(), ttl_s=None
        )
        assert (pinned.pinned_level, pinned.reason, pinned.requests) == ("abusive", "ticket 7", 5)
        after = await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        assert after.pinned_level == "abusive" and after.requests == 6
        unpinned = await store.set_level(
            "c1", level=None, blocked=False, reason="", now=clock(), ttl_s=None
        )
        assert unpinned.pinned_level is None and unpinned.requests == 6
        got = await store.get_client("c1")
        assert got is not None and got.pinned_level is None

    async def test_blocked_flag_is_set_kept_and_cleared(
        self, store: Store, clock: FakeClock
    ) -> None:
        """blocked=True holds through later activity until set_level clears it."""
        blocked = await store.set_level(
            "c1", level=None, blocked=True, reason="scraper", now=clock(), ttl_s=None
        )
        assert blocked.blocked and blocked.pinned_level is None and blocked.reason == "scraper"
        after = await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        assert after.blocked
        cleared = await store.set_level(
            "c1", level=None, blocked=False, reason="", now=clock(), ttl_s=None
        )
        assert not cleared.blocked

    async def test_set_level_on_an_unknown_client_creates_it(
        self, store: Store, clock: FakeClock
    ) -> None:
        """An operator may pin a client before it is seen; its counters start at zero."""
        rec = await store.set_level(
            "new", level="suspicious", blocked=False, reason="", now=clock(), ttl_s=None
        )
        assert (rec.pinned_level, rec.requests, rec.first_seen) == ("suspicious", 0, clock())
        assert await store.get_client("new") == rec

    async def test_pin_with_ttl_lapses_but_the_record_stays(
        self, store: Store, clock: FakeClock, elapse: Elapse, short_ttl_s: float
    ) -> None:
        """A pin with ttl_s ends after ttl_s; the record (with its counters) remains."""
        await store.record("c1", tier="t", requests=3, instances=3, now=clock())
        await store.set_level(
            "c1", level="abusive", blocked=True, reason="r", now=clock(), ttl_s=short_ttl_s
        )
        await elapse(short_ttl_s * 1.5)
        got = await store.get_client("c1")
        assert got is not None
        assert (got.pinned_level, got.blocked, got.reason, got.requests) == (None, False, "", 3)
        after = await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        assert (after.pinned_level, after.blocked, after.requests) == (None, False, 4)

    # reset_client

    async def test_reset_forgets_the_client(self, store: Store, clock: FakeClock) -> None:
        """reset_client() reports a known client once, then it is unknown and starts afresh."""
        await store.record("c1", tier="t", requests=9, instances=9, now=clock())
        await store.set_level(
            "c1", level="abusive", blocked=True, reason="", now=clock(), ttl_s=None
        )
        assert await store.reset_client("c1") is True
        assert await store.reset_client("c1") is False
        assert await store.get_client("c1") is None
        clock.advance(1.0)
        fresh = await store.record("c1", tier="t", requests=1, instances=1, now=clock())
        assert (fresh.requests, fresh.pinned_level, fresh.blocked) == (1, None, False)
        assert fresh.first_seen == clock()
        listed, _ = await store.list_clients(limit=10)
        assert [r.client_id for r in listed] == ["c1"]

    # list_clients

    async def test_list_clients_pages_through_every_client_once(
        self, store: Store, clock: FakeClock
    ) -> None:
        """Following the cursor yields each client exactly once, pages capped at limit."""
        ids = {f"client-{n:02d}" for n in range(23)} | {"ip:10.0.0.1", "{tag}", "a}b"}
        for cid in sorted(ids):
            await store.record(cid, tier="t", requests=1, instances=1, now=clock())
        await store.set_level(
            "client-05", level="abusive", blocked=False, reason="", now=clock(), ttl_s=None
        )
        seen: list[str] = []
        cursor, pages = "", 0
        while True:
            page, cursor = await store.list_clients(limit=7, cursor=cursor)
            assert len(page) <= 7
            seen += [r.client_id for r in page]
            pages += 1
            if not cursor:
                break
            assert pages < 10, "the cursor does not advance"
        assert sorted(seen) == sorted(ids)
        assert pages >= 4

    async def test_list_clients_of_an_empty_store(self, store: Store) -> None:
        """An empty store lists nothing and ends at once."""
        assert await store.list_clients(limit=5) == ([], "")

    async def test_list_clients_returns_current_records(
        self, store: Store, clock: FakeClock
    ) -> None:
        """Listed records are the same as get_client's."""
        await store.record("c1", tier="t", requests=2, instances=3, now=clock())
        page, _ = await store.list_clients(limit=5)
        assert page == [await store.get_client("c1")]

    async def test_list_clients_rejects_bad_arguments(self, store: Store) -> None:
        """A limit below 1 or a cursor the store never gave is a ValueError."""
        with pytest.raises(ValueError):
            await store.list_clients(limit=0)
        with pytest.raises(ValueError):
            await store.list_clients(limit=5, cursor="@@not-a-cursor@@")

    # expiry

    async def test_record_expires_after_ttl_without_activity(
        self, make_store: MakeStore, clock: FakeClock, elapse: Elapse, short_ttl_s: float
    ) -> None:
        """A record idle for longer than the TTL is gone: not returned, not listed."""
        store = await make_store(ttl_s=short_ttl_s)
        await store.record("idle", tier="t", requests=1, instances=1, now=clock())
        await elapse(short_ttl_s * 2)
        assert await store.get_client("idle") is None
        assert await store.list_clients(limit=5) == ([], "")
        again = await store.record("idle", tier="t", requests=1, instances=1, now=clock())
        assert again.requests == 1

    async def test_activity_refreshes_the_ttl(
        self, make_store: MakeStore, clock: FakeClock, elapse: Elapse, short_ttl_s: float
    ) -> None:
        """Each record() restarts the TTL, so an active client outlives one TTL."""
        store = await make_store(ttl_s=short_ttl_s)
        for _ in range(3):
            await store.record("active", tier="t", requests=1, instances=1, now=clock())
            await elapse(short_ttl_s * 0.45)
        got = await store.get_client("active")
        assert got is not None and got.requests == 3

    async def test_pin_without_ttl_keeps_the_record(
        self, make_store: MakeStore, clock: FakeClock, elapse: Elapse, short_ttl_s: float
    ) -> None:
        """A pin without ttl_s keeps the record past the TTL, through activity, until unpinned."""
        store = await make_store(ttl_s=short_ttl_s)
        await store.set_level(
            "pinned", level="abusive", blocked=True, reason="", now=clock(), ttl_s=None
        )
        await store.record("pinned", tier="t", requests=1, instances=1, now=clock())
        await elapse(short_ttl_s * 2)
        got = await store.get_client("pinned")
        assert got is not None and got.pinned_level == "abusive" and got.blocked
        await store.set_level(
            "pinned", level=None, blocked=False, reason="", now=clock(), ttl_s=None
        )
        await elapse(short_ttl_s * 2)
        assert await store.get_client("pinned") is None

    async def test_pin_longer_than_the_ttl_keeps_the_record_until_it_ends(
        self, make_store: MakeStore, clock: FakeClock, elapse: Elapse, short_ttl_s: float
    ) -> None:
        """A pin's ttl_s beyond the store TTL keeps the record pinned that long, then it expires."""
        store = await make_store(ttl_s=short_ttl_s)
        await store.set_level(
            "c1", level="abusive", blocked=False, reason="", now=clock(), ttl_s=short_ttl_s * 4
        )
        await elapse(short_ttl_s * 2)
        got = await store.get_client("c1")
        assert got is not None and got.pinned_level == "abusive"
        await elapse(short_ttl_s * 3)
        assert await store.get_client("c1") is None

    async def test_ping_answers(self, store: Store) -> None:
        """ping() is True while the store is up."""
        assert await store.ping() is True
