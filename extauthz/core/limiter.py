"""Limits as GCRA (the generic cell rate algorithm): pure arithmetic shared by every store.

Why GCRA: one number per limit and key (the theoretical arrival time, TAT) is the whole
state, so a decision is one atomic read-modify-write (a Lua script in Redis) and memory per
client is constant; it is exact under concurrency when that step is atomic; and it refills
smoothly, so there is no window boundary where a client gets twice its budget (the flaw of
fixed windows). A limit of ``rate`` units per ``window`` with ``burst`` B has an emission
interval T = window / rate and admits a cost c when ``max(TAT, now) + c*T - now <= B*T``.
A quota (``10000 instances per day``) is the case B = rate: the whole day's budget can be
spent at once and comes back at rate / window.

The Redis store's Lua script mirrors ``step`` line for line; a contract test holds them equal.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass


class ChargeMode(enum.IntEnum):
    """How a charge treats its limit."""

    CHARGE = 0  # admit when the cost fits, then take it
    PROBE = 1  # admit when one unit is left; take nothing (a budget spent after the fact)
    FORCE = 2  # take the cost whatever is left (tokens, known only after the answer)


@dataclass(frozen=True, slots=True)
class LimitCharge:
    """One limit applied to one key: ``tag`` names the subject (a client, an address, a
    subnet), ``name`` the limit; the store keeps one TAT per (tag, name)."""

    tag: str
    name: str
    interval_s: float
    burst: int
    cost: int
    mode: ChargeMode = ChargeMode.CHARGE

    @property
    def tolerance_s(self) -> float:
        return self.burst * self.interval_s


@dataclass(frozen=True, slots=True)
class LimitState:
    """A limit's answer: admitted or not, units left, seconds until full, seconds to wait."""

    allowed: bool
    remaining: int
    reset_s: float
    retry_after_s: float = 0.0


def step(tat: float, now: float, charge: LimitCharge) -> tuple[LimitState, float]:
    """Apply ``charge`` to a limit whose stored TAT is ``tat``; return its state and new TAT.

    The arithmetic runs in integer microseconds (exact in a double up to 2**53, some 285 years
    of epoch time): float seconds near a unix-epoch clock carry rounding of a quarter
    microsecond per step, which adds up over a burst and refuses its last unit.
    """
    interval = micros(charge.interval_s) or 1
    tolerance = charge.burst * interval
    now_us = micros(now)
    tat_us = micros(tat)
    debt = max(tat_us - now_us, 0)  # budget already taken and not yet returned
    if charge.mode is ChargeMode.FORCE:
        new_debt = debt + charge.cost * interval
        remaining = max(0, (tolerance - new_debt) // interval)
        return LimitState(True, remaining, new_debt / 1e6), (now_us + new_debt) / 1e6
    cost = 1 if charge.mode is ChargeMode.PROBE else charge.cost
    wanted = debt + cost * interval
    if wanted <= tolerance:
        taken = wanted if charge.mode is ChargeMode.CHARGE else debt
        new_tat = (now_us + wanted) / 1e6 if charge.mode is ChargeMode.CHARGE else tat
        return LimitState(True, (tolerance - taken) // interval, taken / 1e6), new_tat
    remaining = max(0, (tolerance - debt) // interval)
    return LimitState(False, remaining, debt / 1e6, (wanted - tolerance) / 1e6), tat


def micros(seconds: float) -> int:
    """Seconds as whole microseconds (round half away from zero, as the Lua mirror does)."""
    return math.floor(seconds * 1_000_000 + 0.5)


def evaluate(
    tats: Sequence[float], charges: Sequence[LimitCharge], now: float
) -> tuple[list[LimitState], list[float]]:
    """Apply every charge all-or-nothing: when any CHARGE or PROBE is refused, no TAT moves
    but those of FORCE charges. Return the states and the TATs to store."""
    results = [step(tat, now, charge) for tat, charge in zip(tats, charges, strict=True)]
    refused = any(not state.allowed for state, _ in results)
    states = [state for state, _ in results]
    new_tats = [
        new_tat if (not refused or charge.mode is ChargeMode.FORCE) else tat
        for (_, new_tat), tat, charge in zip(results, tats, charges, strict=True)
    ]
    if refused:
        # The admitted parts of a refused request took nothing: report what is really left.
        states = [
            _untaken(tat, now, charge)
            if state.allowed and charge.mode is ChargeMode.CHARGE
            else state
            for state, tat, charge in zip(states, tats, charges, strict=True)
        ]
    return states, new_tats


def _untaken(tat: float, now: float, charge: LimitCharge) -> LimitState:
    probe = LimitCharge(
        charge.tag, charge.name, charge.interval_s, charge.burst, 1, ChargeMode.PROBE
    )
    return step(tat, now, probe)[0]


# --- from the policy to charges, and back to HTTP fields ------------------------------------


@dataclass(frozen=True, slots=True)
class AppliedLimit:
    """A policy limit as applied to one request, with its answer (for headers and bodies)."""

    name: str
    unit: str
    scope: str
    quota: int
    window_s: float
    state: LimitState


def subject_tag(
    scope: str, client_id: str, address: str, *, ipv4_prefix: int, ipv6_prefix: int
) -> str:
    """The store tag of a limit's subject: the client, its address, or its subnet."""
    if scope == "client":
        return f"c:{client_id}"
    if scope == "address":
        return f"a:{address}"
    return f"n:{subnet_of(address, ipv4_prefix=ipv4_prefix, ipv6_prefix=ipv6_prefix)}"


def subnet_of(address: str, *, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network (``203.0.113.0/24``, ``2001:db8::/64``) holding ``address``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # "unknown": one shared bucket for clients without an address
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def scaled(charge: LimitCharge, divisor: int) -> LimitCharge:
    """The same limit with its rate and burst divided by ``divisor`` (per-replica fallback)."""
    if divisor <= 1:
        return charge
    return LimitCharge(
        charge.tag,
        charge.name,
        charge.interval_s * divisor,
        max(1, charge.burst // divisor),
        charge.cost,
        charge.mode,
    )


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rate_limit_fields(applied: Sequence[AppliedLimit]) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` fields of draft-ietf-httpapi-ratelimit-headers-10.

    Each limit is a quota policy item ``"name";q=<quota>;w=<window s>;qu="<unit>"`` and a
    service limit item ``"name";r=<remaining>;t=<seconds until full>``.
    """
    if not applied:
        return []
    policies = ", ".join(
        f"{_quoted(a.name)};q={a.quota};w={round(a.window_s)};qu={_quoted(a.unit)}" for a in applied
    )
    limits = ", ".join(
        f"{_quoted(a.name)};r={a.state.remaining};t={math.ceil(a.state.reset_s)}" for a in applied
    )
    return [("ratelimit-policy", policies), ("ratelimit", limits)]


# An RFC 9651 list member as rate_limit_fields writes it: a name (a quoted string or a token)
# and its parameters, whose values may be quoted strings too.
_STRING = r'"(?:[^"\\]|\\.)*"'
_MEMBER = re.compile(
    rf'\s*(({_STRING}|[^;,\s]+)(?:\s*;\s*[^;,"\s=]+(?:=(?:{_STRING}|[^;,\s]*))?)*)\s*(?:,|$)'
)


def _members(value: str) -> list[tuple[str, str]]:
    """The (name as written, member) pairs of a RateLimit or RateLimit-Policy field value."""
    members = []
    position = 0
    while position < len(value):
        match = _MEMBER.match(value, position)
        if match is None or match.end() == position:
            break  # not a list this module wrote: what was read so far stands
        members.append((match.group(2), match.group(1)))
        position = match.end()
    return members


def merge_rate_limit_fields(
    earlier: Sequence[tuple[str, str]], later: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """One ``RateLimit-Policy`` and one ``RateLimit`` field out of two sets of them.

    ``earlier`` is what an earlier step answered (Check, before the body was read), ``later``
    what a later one charged (ext_proc, the instances): a limit named in both takes ``later``'s
    member in ``earlier``'s place; every other limit of either set is kept, ``earlier``'s first.
    """
    if not earlier:
        return list(later)
    if not later:
        return list(earlier)
    before, after = dict(earlier), dict(later)
    merged = []
    for field in ("ratelimit-policy", "ratelimit"):
        newer = dict(_members(after.get(field, "")))
        older = _members(before.get(field, ""))
        names = {name for name, _ in older}
        members = [newer.get(name, member) for name, member in older]
        members.extend(member for name, member in newer.items() if name not in names)
        if members:
            merged.append((field, ", ".join(members)))
    return merged
