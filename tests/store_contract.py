"""The behaviour every ``Store`` implementation must show, as a reusable test class.

Subclass ``StoreContract`` (and ``LimitsContract``, below) in a test module (as ``Test...``) and provide four fixtures:

- ``clock``: a ``FakeClock`` that the stores read, and that tests pass as ``now``;
- ``make_store``: an async factory ``(ttl_s) -> Store`` that closes its stores after the test;
- ``elapse``: an async ``(seconds) -> None`` that lets that much time pass for the store
  (advance the fake clock; a store whose expiry runs on a real clock also sleeps);
- ``short_ttl_s``: a TTL short enough to wait out (seconds, against ``elapse``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from extauthz.core.limiter import ChargeMode, LimitCharge, LimitState, evaluate
from extauthz.store.base import ClientRecord, Store, StoreError
from extauthz.store.memory import MemoryStore

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


LimitTtl = Callable[[Store, str, str], Awaitable[float | None]]

DAY_S = 86_400.0


def daily(
    tag: str, name: str, per_day: int, cost: int = 1, mode: ChargeMode = ChargeMode.CHARGE
) -> LimitCharge:
    """A quota of ``per_day`` units per day, all spendable at once."""
    return LimitCharge(tag, name, DAY_S / per_day, per_day, cost, mode)


class Reference:
    """``core.limiter.evaluate`` driven by hand: the answers every store must give."""

    def __init__(self) -> None:
        self.tats: dict[tuple[str, str], float] = {}

    def charge(self, limits: Sequence[LimitCharge], now: float) -> list[LimitState]:
        keys = [(c.tag, c.name) for c in limits]
        states, new_tats = evaluate([self.tats.get(k, now) for k in keys], limits, now)
        self.tats.update(zip(keys, new_tats, strict=True))
        return states


class LimitsContract:
    """Limits charged through ``Store.record`` answer as ``core.limiter.evaluate`` does.

    Subclass it (as ``Test...``) with the fixtures of ``StoreContract`` (``make_store``,
    ``clock``) plus:

    - ``limit_ttl``: an async ``(store, tag, name) -> seconds`` that the limit's state will
      last (``math.inf`` for no expiry, ``None`` when the store holds none);
    - ``clock_slack_s``: how far the store's limit clock may be from ``clock()`` over a
      test (0 when it uses ``now``; Redis uses its own TIME). Windows are days long so
      that allowed and remaining never depend on that slack; times are compared within it.

    All-or-nothing is only required within one slot of a Redis Cluster, so every test
    whose request is refused keeps its limits on one tag.
    """

    @pytest.fixture
    async def store(self, make_store: MakeStore) -> Store:
        return await make_store(ttl_s=LONG_TTL_S)

    async def _charge(
        self, store: Store, clock: FakeClock, limits: Sequence[LimitCharge], client: str = "alice"
    ) -> list[LimitState]:
        record = await store.record(
            client, tier="free", requests=1, instances=1, now=clock(), limits=limits
        )
        assert len(record.limits) == len(limits)
        return list(record.limits)

    @staticmethod
    def _assert_same(got: Sequence[LimitState], want: Sequence[LimitState], slack_s: float) -> None:
        assert [(s.allowed, s.remaining) for s in got] == [(s.allowed, s.remaining) for s in want]
        for g, w in zip(got, want, strict=True):
            assert g.reset_s == pytest.approx(w.reset_s, abs=slack_s)
            assert g.retry_after_s == pytest.approx(w.retry_after_s, abs=slack_s)

    async def test_a_sequence_of_charges_matches_evaluate(
        self, store: Store, clock: FakeClock, clock_slack_s: float
    ) -> None:
        """Client, address and subnet limits in every mode give evaluate()'s answers, in order."""
        client, address, subnet = "c:alice", "a:203.0.113.7", "n:203.0.113.0/24"
        rounds: list[list[LimitCharge]] = [
            [
                daily(client, "day", 20, 3),
                daily(address, "day", 30, 5),
                daily(subnet, "day", 50, 5),
            ],
            [daily(client, "day", 20, 3), daily(client, "tokens", 100, 40, ChargeMode.FORCE)],
            [daily(address, "day", 30, 20), daily(subnet, "day", 50, 1, ChargeMode.PROBE)],
            # Refusals below stay on one tag (one cluster slot): all-or-nothing there.
            [daily(address, "day", 30, 10), daily(address, "hour", 5, 1)],
            [daily(client, "day", 20, 3), daily(client, "tokens", 100, 90, ChargeMode.FORCE)],
            [daily(client, "tokens", 100, 1, ChargeMode.PROBE), daily(client, "day", 20, 1)],
            [daily(client, "day", 20, 30)],
            # Exactly the 10 units left.
            [daily(client, "day", 20, 10), daily(address, "day", 30, 4)],
        ]
        reference = Reference()
        for limits in rounds:
            want = reference.charge(limits, clock())
            got = await self._charge(store, clock, limits)
            self._assert_same(got, want, clock_slack_s)
            clock.advance(1.0)
        # Sanity of the sequence itself: it refused something and took something.
        assert reference.tats[(client, "day")] > clock()

    async def test_a_refused_limit_takes_nothing_from_the_others(
        self, store: Store, clock: FakeClock, clock_slack_s: float
    ) -> None:
        """When one limit refuses, the others keep their budget and report it untaken."""
        day, hour = daily("c:alice", "day", 10, 2), daily("c:alice", "hour", 3, 2)
        probe = daily("c:alice", "day", 10, 1, ChargeMode.PROBE)
        reference = Reference()
        first = await self._charge(store, clock, [day, hour])
        self._assert_same(first, reference.charge([day, hour], clock()), clock_slack_s)
        assert [s.allowed for s in first] == [True, True]
        second = await self._charge(store, clock, [day, hour])
        self._assert_same(second, reference.charge([day, hour], clock()), clock_slack_s)
        assert [s.allowed for s in second] == [True, False]
        # The day limit reports what the probe sees: as if the second request took nothing.
        after = await self._charge(store, clock, [probe])
        self._assert_same(after, reference.charge([probe], clock()), clock_slack_s)
        assert after[0].remaining == second[0].remaining
        assert after[0].reset_s == pytest.approx(first[0].reset_s, abs=clock_slack_s)

    async def test_force_goes_into_debt_and_probe_refuses_until_repaid(
        self, store: Store, clock: FakeClock, clock_slack_s: float
    ) -> None:
        """1 000 tokens per 30 days: 1 500 forced; probes are then refused for ~15 days."""
        interval = 30 * DAY_S / 1000
        force = LimitCharge("c:alice", "tokens", interval, 1000, 1500, ChargeMode.FORCE)
        probe = LimitCharge("c:alice", "tokens", interval, 1000, 1, ChargeMode.PROBE)
        reference = Reference()
        before, forced, after = [
            await self._charge(store, clock, limits) for limits in ([probe], [force], [probe])
        ]
        for got, limits in zip((before, forced, after), ([probe], [force], [probe]), strict=True):
            self._assert_same(got, reference.charge(limits, clock()), clock_slack_s)
        assert before[0].allowed and before[0].reset_s == 0.0
        assert forced[0].allowed and forced[0].remaining == 0
        assert forced[0].reset_s == pytest.approx(1500 * interval, abs=clock_slack_s)
        assert not after[0].allowed and after[0].remaining == 0
        assert after[0].retry_after_s == pytest.approx(501 * interval, abs=clock_slack_s)

    async def test_state_lasts_as_long_as_its_tat(
        self, make_store: MakeStore, clock: FakeClock, limit_ttl: LimitTtl
    ) -> None:
        """A limit's state lasts at least until its TAT, beyond the (short) client TTL;
        probes and refusals on an unused limit store nothing."""
        store = await make_store(ttl_s=60.0)
        interval = 30 * DAY_S / 1000
        force = LimitCharge("c:alice", "tokens", interval, 1000, 1500, ChargeMode.FORCE)
        forced = await self._charge(store, clock, [force])
        ttl = await limit_ttl(store, "c:alice", "tokens")
        assert ttl is not None and ttl >= forced[0].reset_s > DAY_S
        probe = daily("a:203.0.113.7", "day", 100, 1, ChargeMode.PROBE)
        refused = daily("a:203.0.113.7", "hour", 5, 6)
        states = await self._charge(store, clock, [probe, refused])
        assert [s.allowed for s in states] == [True, False]
        assert await limit_ttl(store, "a:203.0.113.7", "day") is None
        assert await limit_ttl(store, "a:203.0.113.7", "hour") is None

    async def test_concurrent_charges_admit_exactly_the_quota(
        self, store: Store, clock: FakeClock
    ) -> None:
        """60 concurrent requests against a quota of 25: exactly 25 pass, each a distinct unit."""
        limit = [daily("c:alice", "day", 25)]
        records = await asyncio.gather(
            *(
                store.record(
                    "alice", tier="free", requests=1, instances=1, now=clock(), limits=limit
                )
                for _ in range(60)
            )
        )
        reference = Reference()
        sequential = [reference.charge(limit, clock())[0] for _ in range(60)]
        admitted = [r.limits[0].remaining for r in records if r.limits[0].allowed]
        assert len(admitted) == 25
        # Each admitted request saw a different count, the ones sequential requests see.
        assert sorted(admitted) == sorted(s.remaining for s in sequential if s.allowed)
        assert max(r.requests for r in records) == 60, sorted(r.requests for r in records)

    async def test_record_without_limits_has_none(self, store: Store, clock: FakeClock) -> None:
        """record() without limits returns an empty ``limits``."""
        record = await store.record("alice", tier="free", requests=1, instances=1, now=clock())
        assert record.limits == ()


class FailingStore(MemoryStore):
    """A store whose ``record`` always fails, as a Redis that is down."""

    async def record(
        self,
        client_id: str,
        *,
        tier: str,
        requests: int,
        instances: int,
        now: float,
        limits: Sequence[LimitCharge] = (),
    ) -> ClientRecord:
        raise StoreError("connection refused")
