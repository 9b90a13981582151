"""The pure GCRA of core.limiter: quotas, refill, bursts, PROBE, FORCE and all-or-nothing."""

from __future__ import annotations

import pytest

from extauthz.core.limiter import ChargeMode, LimitCharge, LimitState, evaluate, step

DAY_S = 86_400.0
# A clock far from zero, so that sums run at a realistic float magnitude; see
# TestEpochScaleClock for the unix epoch itself.
T0 = 1_000_000.0


def quota(per_day: int, cost: int = 1, mode: ChargeMode = ChargeMode.CHARGE) -> LimitCharge:
    """A daily quota: the whole budget may be spent at once (burst == rate)."""
    return LimitCharge("c:alice", "day", DAY_S / per_day, per_day, cost, mode)


class Limit:
    """One limit's TAT, charged through ``step`` (no state: TAT == now)."""

    def __init__(self, tat: float | None = None) -> None:
        self.tat = tat

    def charge(self, charge: LimitCharge, now: float) -> LimitState:
        state, self.tat = step(now if self.tat is None else self.tat, now, charge)
        return state


class TestQuota:
    """A quota admits exactly its budget at one instant, whatever the cost of each charge."""

    @pytest.mark.parametrize("per_day", [100, 10_000, 7])
    def test_n_admitted_of_n_plus_k(self, per_day: int) -> None:
        """N + k charges of cost 1 at the same instant: exactly N pass, remaining counts down."""
        limit = Limit()
        states = [limit.charge(quota(per_day), T0) for _ in range(per_day + 5)]
        assert [s.allowed for s in states] == [True] * per_day + [False] * 5
        assert [s.remaining for s in states[:per_day]] == list(range(per_day - 1, -1, -1))
        assert all(s.remaining == 0 for s in states[per_day:])

    def test_costs_that_do_not_divide_the_budget(self) -> None:
        """Cost 7 against 100: 14 pass (98), then 2 are left and a 7 is refused."""
        limit = Limit()
        states = [limit.charge(quota(100, cost=7), T0) for _ in range(20)]
        assert sum(s.allowed for s in states) == 14
        assert states[13].remaining == 2
        refused = states[14]
        assert not refused.allowed and refused.remaining == 2
        # 5 more units must come back, one every 864 s.
        assert refused.retry_after_s == pytest.approx(5 * 864.0)

    def test_refused_charges_take_nothing(self) -> None:
        """A refused charge leaves the TAT where it was, so a smaller cost still fits."""
        limit = Limit()
        limit.charge(quota(100, cost=95), T0)
        tat = limit.tat
        assert not limit.charge(quota(100, cost=10), T0).allowed
        assert limit.tat == tat
        assert limit.charge(quota(100, cost=5), T0).allowed

    def test_reset_is_the_time_until_full(self) -> None:
        """After spending k units, reset_s is k emission intervals."""
        limit = Limit()
        state = limit.charge(quota(100, cost=30), T0)
        assert state.reset_s == pytest.approx(30 * 864.0)
        assert state.retry_after_s == 0.0


class TestRefill:
    """Spent budget comes back at rate / window as time passes, never more than the burst."""

    def test_one_unit_per_interval(self) -> None:
        """An empty quota admits nothing before one interval and one unit after it."""
        limit = Limit()
        for _ in range(100):
            limit.charge(quota(100), T0)
        half = limit.charge(quota(100), T0 + 432.0)
        assert not half.allowed
        assert half.retry_after_s == pytest.approx(432.0)
        one = limit.charge(quota(100), T0 + 864.0)
        assert one.allowed and one.remaining == 0
        assert not limit.charge(quota(100), T0 + 864.0).allowed

    def test_a_full_window_restores_the_budget(self) -> None:
        """After a whole idle window the budget is full again, and no fuller."""
        limit = Limit()
        for _ in range(100):
            limit.charge(quota(100), T0)
        later = T0 + 3 * DAY_S
        states = [limit.charge(quota(100), later) for _ in range(101)]
        assert sum(s.allowed for s in states) == 100

    def test_remaining_grows_with_time(self) -> None:
        """A PROBE's remaining rises by one per elapsed interval."""
        limit = Limit()
        limit.charge(quota(100, cost=100), T0)
        probe = quota(100, mode=ChargeMode.PROBE)
        seen = [limit.charge(probe, T0 + k * 864.0 + 1.0).remaining for k in range(1, 5)]
        assert seen == [1, 2, 3, 4]


class TestBurst:
    """A rate with a small burst admits the burst at once, then one per interval."""

    def test_burst_then_steady_rate(self) -> None:
        """10 per second with burst 3: 3 at t0, then one more each 0.1 s."""
        charge = LimitCharge("a:203.0.113.7", "rps", 0.1, 3, 1)
        limit = Limit()
        at_once = [limit.charge(charge, T0).allowed for _ in range(5)]
        assert at_once == [True, True, True, False, False]
        assert limit.charge(charge, T0 + 0.1).allowed
        assert not limit.charge(charge, T0 + 0.1).allowed
        assert limit.charge(charge, T0 + 0.2).allowed

    def test_cost_above_the_burst_is_never_admitted(self) -> None:
        """A cost larger than the burst is refused even when idle, with a retry_after that
        says how far beyond the burst it is."""
        charge = LimitCharge("a:203.0.113.7", "rps", 0.1, 3, 5)
        limit = Limit()
        for now in (T0, T0 + DAY_S, T0 + 30 * DAY_S):
            state = limit.charge(charge, now)
            assert not state.allowed
            assert state.remaining == 3
            assert state.retry_after_s == pytest.approx(0.2)
        assert limit.tat == T0  # never moved


class TestProbe:
    """PROBE admits while one unit is left and takes nothing."""

    def test_probe_takes_nothing(self) -> None:
        """Probes of any cost leave the TAT and the remaining budget unchanged."""
        limit = Limit()
        limit.charge(quota(100, cost=40), T0)
        tat = limit.tat
        for _ in range(10):
            state = limit.charge(quota(100, cost=500, mode=ChargeMode.PROBE), T0)
            assert state.allowed and state.remaining == 60
        assert limit.tat == tat

    def test_probe_refuses_when_nothing_is_left(self) -> None:
        """With the budget spent a probe is refused, with the wait for one unit."""
        limit = Limit()
        limit.charge(quota(100, cost=100), T0)
        state = limit.charge(quota(100, mode=ChargeMode.PROBE), T0 + 100.0)
        assert not state.allowed and state.remaining == 0
        assert state.retry_after_s == pytest.approx(764.0)

    def test_probe_on_no_state_stores_nothing(self) -> None:
        """A probe on an unused limit keeps the TAT at now (no state to store)."""
        state, new_tat = step(T0, T0, quota(100, mode=ChargeMode.PROBE))
        assert state == LimitState(True, 100, 0.0)
        assert new_tat == T0


class TestForce:
    """FORCE takes its cost whatever is left, and the debt refuses later charges until repaid."""

    def test_force_goes_into_debt_and_blocks_until_repaid(self) -> None:
        """1 000 tokens / 30 days: 1 500 forced, probes refused until 501 intervals pass."""
        tokens = LimitCharge("c:alice", "tokens", 30 * DAY_S / 1000, 1000, 1500, ChargeMode.FORCE)
        interval = tokens.interval_s
        probe = LimitCharge("c:alice", "tokens", interval, 1000, 1, ChargeMode.PROBE)
        limit = Limit()
        forced = limit.charge(tokens, T0)
        assert forced.allowed and forced.remaining == 0
        assert forced.reset_s == pytest.approx(1500 * interval)
        assert limit.tat == pytest.approx(T0 + 1500 * interval)
        day_later = limit.charge(probe, T0 + DAY_S)
        assert not day_later.allowed
        assert day_later.retry_after_s == pytest.approx(501 * interval - DAY_S)
        assert not limit.charge(probe, T0 + 500 * interval).allowed
        repaid = limit.charge(probe, T0 + 501 * interval)
        assert repaid.allowed and repaid.remaining == 1

    def test_force_on_an_empty_budget_is_admitted(self) -> None:
        """FORCE is always allowed, even with nothing left: the answer was already sent."""
        limit = Limit()
        limit.charge(quota(100, cost=100), T0)
        state = limit.charge(quota(100, cost=3, mode=ChargeMode.FORCE), T0)
        assert state.allowed and state.remaining == 0
        assert state.reset_s == pytest.approx(103 * 864.0)


class TestEvaluate:
    """evaluate() is all-or-nothing: one refusal and only FORCE charges move their TAT."""

    def test_all_admitted_all_taken(self) -> None:
        """Two limits that both fit are both charged."""
        charges = [quota(100, cost=10), LimitCharge("a:203.0.113.7", "day", 864.0, 100, 20)]
        states, tats = evaluate([T0, T0], charges, T0)
        assert [s.remaining for s in states] == [90, 80]
        assert tats == [pytest.approx(T0 + 10 * 864.0), pytest.approx(T0 + 20 * 864.0)]

    def test_a_refused_second_limit_leaves_the_first_untouched(self) -> None:
        """The first limit fits, the second does not: neither TAT moves, and the first
        reports its budget as if nothing were taken."""
        first = quota(100, cost=10)
        second = LimitCharge("a:203.0.113.7", "day", 864.0, 5, 10)
        states, tats = evaluate([T0 + 864.0, T0], [first, second], T0)
        assert tats == [T0 + 864.0, T0]
        assert states[0] == LimitState(True, 99, 864.0)
        assert not states[1].allowed and states[1].remaining == 5

    def test_a_refused_probe_stops_the_charges(self) -> None:
        """A spent budget probed alongside a fitting charge blocks that charge too."""
        spent = T0 + 100 * 864.0
        charges = [quota(100, mode=ChargeMode.PROBE), quota(1000, cost=1)]
        states, tats = evaluate([spent, T0], charges, T0)
        assert [s.allowed for s in states] == [False, True]
        assert states[1].remaining == 1000
        assert tats == [spent, T0]

    def test_force_moves_even_when_refused(self) -> None:
        """A FORCE charge is taken although another limit refuses the request."""
        force = LimitCharge("c:alice", "tokens", 864.0, 100, 7, ChargeMode.FORCE)
        refused = quota(100, cost=101)
        states, tats = evaluate([T0, T0], [force, refused], T0)
        assert states[0].allowed and states[0].remaining == 93
        assert not states[1].allowed
        assert tats == [pytest.approx(T0 + 7 * 864.0), T0]

    def test_lengths_must_match(self) -> None:
        """One TAT per charge, or a ValueError."""
        with pytest.raises(ValueError):
            evaluate([T0], [quota(10), quota(10)], T0)


EPOCH_NOW = 1_700_000_000.0


class TestEpochScaleClock:
    """At a real unix time, limits are as exact as at a small clock."""

    def test_a_fast_rate_admits_exactly_its_burst(self) -> None:
        """100 per second with burst 100: exactly 100 at one instant (not 100 + 1.7 s worth)."""
        charge = LimitCharge("a:203.0.113.7", "rps", 0.01, 100, 1)
        limit = Limit()
        admitted = sum(limit.charge(charge, EPOCH_NOW).allowed for _ in range(300))
        assert admitted == 100

    def test_remaining_after_one_unit(self) -> None:
        """After 1 of a 100-per-day quota, 99 remain."""
        assert Limit().charge(quota(100), EPOCH_NOW).remaining == 99
