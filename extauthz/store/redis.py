"""The shared store: per-client records in Redis or Redis Cluster.

Layout, for a ``prefix`` of ``extauthz``:

- ``extauthz:{c:<client>}:state``: a hash per client (tier, counters, timestamps, pin).
  The ``{c:<client>}`` hash tag puts every key of one client in one cluster slot, so a
  Lua script may touch them together. ``%``, ``{`` and ``}`` in the client id are
  percent-escaped so an id cannot end the tag early.
- ``extauthz:clients``: the registry of known clients for listing, a sorted set scored
  by the time each record expires (last activity + TTL, the pin's end if later, ``+inf``
  for a pin without end). Its size is capped at ``max_clients`` (soonest-to-expire
  dropped first, so pinned clients go last) and entries past their expiry are trimmed
  every ``_TRIM_EVERY`` records.
- ``extauthz:{<tag>}:l:<limit name>``: one GCRA limit of one subject (``core.limiter``), a
  string holding the TAT (theoretical arrival time, seconds since the epoch). The tag is
  the hash tag (``c:key:alice``, ``a:203.0.113.7``, ``n:203.0.113.0/24``), so the limits of
  a client (tag ``c:<client>``) share the slot of its state hash. Each key expires when its
  TAT falls into the past (a TAT at or before now is the same as no key), so a 30-day
  quota's debt outlives any client-record TTL and an idle limit costs nothing.

Records expire through Redis' own ``PEXPIRE``, so Redis memory stays bounded by the TTL
(run Redis with ``maxmemory`` and ``maxmemory-policy volatile-lru`` as a second bound).
Pins end on the injected clock, checked by the script. Needs Redis 6.2+ (``ZADD GT``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from extauthz.core.limiter import LimitCharge, LimitState
from extauthz.store.base import ClientRecord, DetectionState, StoreError
from extauthz.telemetry import metrics

# Every call is timed by op (extauthz_store_seconds); a StoreError is counted by kind
# (extauthz_store_errors_total: timeout or error).
_timed = functools.partial(metrics.timed_store, "redis", failure=StoreError)

_TRIM_EVERY = 1024
"""Trim the registry of expired entries once per this many ``record`` calls."""

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
_SCHEMES = "redis, rediss, unix, redis+cluster, rediss+cluster, redis+sentinel or rediss+sentinel"

_CLUSTER_MAX_CONNECTIONS = 4_096
# Idle connections kept for record()'s direct EVALSHA; more are closed when released.
_MAX_IDLE_CONNECTIONS = 64
"""Connections per cluster node. redis-py's default (100) fails a burst of more concurrent
calls with MaxConnectionsError instead of waiting; one Redis handles thousands."""

_LIMIT_EXPIRY_MARGIN_MS = 1_000
"""Keep a limit key this long past its TAT, for clock steps between Redis nodes on failover."""

# GCRA: ``step`` and ``evaluate`` of core.limiter, line for line (Lua numbers are doubles
# like Python floats, and the same epsilon and floor give the same answers; the limits
# contract holds them equal). ``now`` is this server's TIME, shared by every replica of
# the guard whatever their own clocks say. apply_limits(first_key, first_arg, n) charges
# KEYS[first_key .. first_key+n-1] with 4 ARGV each from first_arg (interval_s, burst,
# cost, mode) all-or-nothing and returns 4 values per charge: allowed (0 | 1), remaining,
# reset_s and retry_after_s (as text: a Lua number in a reply is cut to an integer).
_LIMITS_LUA = f"""
local CHARGE, PROBE, FORCE = 0, 1, 2

-- core.limiter.step in integer microseconds (exact in Lua's doubles up to 2^53).
local function micros(seconds)
  return math.floor(seconds * 1000000 + 0.5)
end

local function step(tat, now, interval_s, burst, cost, mode)
  local interval = math.max(micros(interval_s), 1)
  local tolerance = burst * interval
  local debt = math.max(tat - now, 0)
  if mode == FORCE then
    local new_debt = debt + cost * interval
    local remaining = math.max(0, math.floor((tolerance - new_debt) / interval))
    return {{true, remaining, new_debt, 0}}, now + new_debt
  end
  if mode == PROBE then
    cost = 1
  end
  local wanted = debt + cost * interval
  if wanted <= tolerance then
    local taken, new_tat = debt, tat
    if mode == CHARGE then
      taken, new_tat = wanted, now + wanted
    end
    return {{true, math.floor((tolerance - taken) / interval), taken, 0}}, new_tat
  end
  local remaining = math.max(0, math.floor((tolerance - debt) / interval))
  return {{false, remaining, debt, wanted - tolerance}}, tat
end

local function apply_limits(first_key, first_arg, n)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000000 + tonumber(time[2])  -- microseconds
  local keys, tats, charges, states, new_tats = {{}}, {{}}, {{}}, {{}}, {{}}
  local refused = false
  for i = 1, n do
    local a = first_arg + (i - 1) * 4
    local charge = {{
      tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    }}
    keys[i] = KEYS[first_key + i - 1]
    tats[i] = tonumber(redis.call('GET', keys[i]) or now)
    charges[i] = charge
    states[i], new_tats[i] = step(tats[i], now, charge[1], charge[2], charge[3], charge[4])
    refused = refused or not states[i][1]
  end
  local reply = {{}}
  for i = 1, n do
    local charge, state, new_tat = charges[i], states[i], new_tats[i]
    if refused and charge[4] ~= FORCE then
      new_tat = tats[i]
      if state[1] and charge[4] == CHARGE then
        -- The admitted parts of a refused request took nothing: report what is left.
        state = step(tats[i], now, charge[1], charge[2], 1, PROBE)
      end
    end
    if new_tat ~= tats[i] then
      if new_tat > now then
        local ms = math.ceil((new_tat - now) / 1000) + {_LIMIT_EXPIRY_MARGIN_MS}
        redis.call('SET', keys[i], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ms))
      else
        redis.call('DEL', keys[i])
      end
    end
    -- Microsecond integers as text: Redis turns Lua numbers in replies into integers anyway.
    reply[#reply + 1] = state[1] and 1 or 0
    reply[#reply + 1] = state[2]
    reply[#reply + 1] = string.format('%.0f', state[3])
    reply[#reply + 1] = string.format('%.0f', state[4])
  end
  return reply
end
"""

# KEYS: the limit keys, all in one slot. ARGV: 4 per key (see apply_limits).
#: Start-up is not inside a decision: connecting and loading scripts may take this long.
_WARM_TIMEOUT_S: Final = 2.0
_LIMITS_SCRIPT = _LIMITS_LUA + "return apply_limits(1, 1, #KEYS)\n"

# Adds a client to the registry: ZADD GT only lengthens a stay (a pin's +inf survives
# activity), the size cap drops the soonest-to-expire, and a trim drops the expired.
_REGISTRY_LUA = """
local function touch_registry(registry, member, score, mode, cap, trim_before)
  if mode == 'gt' then
    redis.call('ZADD', registry, 'GT', score, member)
  else
    redis.call('ZADD', registry, score, member)
  end
  if trim_before ~= '' then
    redis.call('ZREMRANGEBYSCORE', registry, '-inf', '(' .. trim_before)
  end
  local extra = redis.call('ZCARD', registry) - tonumber(cap)
  if extra > 0 then
    redis.call('ZREMRANGEBYRANK', registry, 0, extra - 1)
  end
end
"""

# KEYS[1] registry. ARGV: client_id, score, mode ('gt' | 'set'), cap, trim_before.
_TOUCH_REGISTRY_SCRIPT = (
    _REGISTRY_LUA + "touch_registry(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\n"
)

# KEYS[1] state hash, KEYS[2] registry (single node only), then the n limit keys (in the
# state's slot). ARGV: client_id, tier, requests, instances, now, ttl_ms, registry_score,
# cap, trim_before, n, then 4 per limit. Returns {HGETALL of the state, apply_limits reply}.
_RECORD_SCRIPT = (
    _REGISTRY_LUA
    + _LIMITS_LUA
    + """
local key, now, n = KEYS[1], tonumber(ARGV[5]), tonumber(ARGV[10])
local pin = redis.call('HGET', key, 'pin')
if pin and pin ~= 'forever' and tonumber(pin) <= now then
  redis.call('HDEL', key, 'level', 'blocked', 'reason', 'pin')
  pin = false
end
redis.call('HINCRBY', key, 'requests', ARGV[3])
redis.call('HINCRBY', key, 'instances', ARGV[4])
redis.call('HSET', key, 'tier', ARGV[2], 'last_seen', ARGV[5])
redis.call('HSETNX', key, 'first_seen', ARGV[5])
if pin ~= 'forever' then
  local ms = tonumber(ARGV[6])
  if pin then
    ms = math.max(ms, math.ceil((tonumber(pin) - now) * 1000))
  end
  redis.call('PEXPIRE', key, ms)
end
local first_limit = 2
if #KEYS == n + 2 then
  touch_registry(KEYS[2], ARGV[1], ARGV[7], 'gt', ARGV[8], ARGV[9])
  first_limit = 3
end
return {redis.call('HGETALL', key), apply_limits(first_limit, 11, n)}
"""
)

# KEYS[1] state hash, KEYS[2] registry (single node only). ARGV: client_id, level
# ('' = none), blocked ('0' | '1'), reason, now, pin ('' | 'forever' | end time),
# expire_ms ('' = persist), registry_score, cap.
_SET_LEVEL_SCRIPT = (
    _REGISTRY_LUA
    + """
local key = KEYS[1]
if ARGV[2] == '' then
  redis.call('HDEL', key, 'level')
else
  redis.call('HSET', key, 'level', ARGV[2])
end
redis.call('HSET', key, 'blocked', ARGV[3], 'reason', ARGV[4])
if ARGV[6] == '' then
  redis.call('HDEL', key, 'pin')
else
  redis.call('HSET', key, 'pin', ARGV[6])
end
redis.call('HSETNX', key, 'first_seen', ARGV[5])
redis.call('HSETNX', key, 'last_seen', ARGV[5])
if ARGV[7] == '' then
  redis.call('PERSIST', key)
else
  redis.call('PEXPIRE', key, ARGV[7])
end
if KEYS[2] then
  touch_registry(KEYS[2], ARGV[1], ARGV[8], 'set', ARGV[9], '')
end
return redis.call('HGETALL', key)
"""
)

# KEYS[1] registry. ARGV: after_score ('' = from the start), after_member, limit.
# Pages in ascending score order. Activity only raises a score, so a client moves later
# and is still listed; when the cursor's member has moved or gone, restart at its old
# score (ties there may repeat, nothing is skipped).
_PAGE_SCRIPT = """
local key, n = KEYS[1], tonumber(ARGV[3])
local start = 0
if ARGV[1] ~= '' then
  if redis.call('ZSCORE', key, ARGV[2]) == ARGV[1] then
    start = redis.call('ZRANK', key, ARGV[2]) + 1
  else
    start = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[1])
  end
end
return redis.call('ZRANGE', key, start, start + n - 1, 'WITHSCORES')
"""


class RedisStore:
    """Keep client records in Redis, shared by every replica.

    Build it with ``from_url``. Every call is bounded by ``timeout_s`` and raises
    ``StoreError`` (the cause chained) on any Redis error, timeout or bad reply.
    ``record`` and ``set_level`` are Lua scripts, atomic per client: on a single node
    ``record`` is one round trip (one EVALSHA) that also updates the registry and applies
    every limit, all-or-nothing. In cluster mode the registry lives in another slot, so its
    update is a second command sent concurrently (one round trip of latency, two commands,
    and one hot registry key to watch); limits whose tag hashes to the client's slot run in
    the client's script, and the others in one limits-only script per slot, concurrently:
    all-or-nothing then holds within each slot, not across slots.
    """

    self_bounded = True  # every call runs under asyncio.timeout(timeout_s) and socket timeouts

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        cluster: bool,
        timeout_s: float,
        ttl_s: float = 86_400.0,
        prefix: str = "extauthz",
        max_clients: int = 1_000_000,
        clock: Callable[[], float],
        helpers: Sequence[Redis] = (),
    ) -> None:
        """Wrap an existing client; prefer ``from_url``, which configures timeouts.

        ``helpers`` are other clients the store owns and closes with it (Sentinel's).
        """
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be non-empty and brace-free, got {prefix!r}")
        self._client = client
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._ttl_ms = math.ceil(ttl_s * 1000)
        self._prefix = prefix
        self._registry = f"{prefix}:clients"
        self._max_clients = max_clients
        self._clock = clock
        self._records = 0
        self._record_script = client.register_script(_RECORD_SCRIPT)
        self._set_level_script = client.register_script(_SET_LEVEL_SCRIPT)
        self._touch_registry_script = client.register_script(_TOUCH_REGISTRY_SCRIPT)
        self._page_script = client.register_script(_PAGE_SCRIPT)
        self._limits_script = client.register_script(_LIMITS_SCRIPT)
        self._scripts = (
            self._record_script,
            self._set_level_script,
            self._touch_registry_script,
            self._page_script,
            self._limits_script,
        )
        self._helpers = tuple(helpers)
        self._discovered = not cluster  # cluster: slots not yet read
        self._discovery = asyncio.Lock()
        # record() on one plain server sends its EVALSHA on connections of its own: redis-py's
        # pool and command dispatch (locks, observability hooks, a readiness probe per
        # command, a timer per read) cost more CPU than the round trip. Cluster and Sentinel
        # clients keep redis-py's routing and failover.
        self._idle: list[Any] | None = None
        if not cluster and not helpers and isinstance(client, Redis):
            pool = client.connection_pool
            # No per-read timer: _guard bounds the whole call by timeout_s already.
            options = {**pool.connection_kwargs, "socket_timeout": None}
            self._new_connection: Callable[[], Any] = lambda: pool.connection_class(**options)
            self._idle = []

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        ttl_s: float = 86_400.0,
        prefix: str = "extauthz",
        max_clients: int = 1_000_000,
        clock: Callable[[], float],
    ) -> RedisStore:
        """Connect (lazily) to the Redis at ``url``.

        Accepted forms (the scheme, not a flag, picks the mode, so one setting says all):

        - ``redis://[[user]:password@]host:port[/db]``, ``rediss://...`` (TLS),
          ``unix://[[user]:password@]/path.sock[?db=N]``: one Redis server;
        - ``redis+cluster://[[user]:password@]host:port``, ``rediss+cluster://...``: Redis
          Cluster, from any node (the others are discovered);
        - ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``,
          ``rediss+sentinel://...``: the master that the Sentinels name ``service`` (the
          credentials and TLS are the master's; Sentinels are asked without a password),
          found again after a failover.

        ``timeout_s`` bounds connecting, each socket read and each whole call; a dropped
        connection is retried once.
        """
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise ValueError(f"not a Redis URL: {url!r}")
        options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "decode_responses": True,
        }
        client: Redis | RedisCluster
        helpers: list[Redis] = []
        if scheme in _CLUSTER_SCHEMES:
            client = RedisCluster.from_url(
                f"{_CLUSTER_SCHEMES[scheme]}://{rest}",
                retry=Retry(NoBackoff(), 1),
                max_connections=_CLUSTER_MAX_CONNECTIONS,
                **options,
            )
            cluster = True
        elif scheme in ("redis", "rediss", "unix"):
            client = Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
            cluster = False
        elif scheme in _SENTINEL_SCHEMES:
            tls = _SENTINEL_SCHEMES[scheme]
            where = _parse_sentinel(rest)
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                where.sentinels,
                sentinel_kwargs={
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": timeout_s,
                    "ssl": tls,
                },
            )
            client = sentinel.master_for(
                where.service,
                db=where.db,
                username=where.username,
                password=where.password,
                ssl=tls,
                retry=Retry(NoBackoff(), 1),
                **options,
            )
            helpers = list(sentinel.sentinels)
            cluster = False
        else:
            raise ValueError(f"unsupported Redis URL scheme {scheme!r} (expected {_SCHEMES})")
        return cls(
            client,
            cluster=cluster,
            timeout_s=timeout_s,
            ttl_s=ttl_s,
            prefix=prefix,
            max_clients=max_clients,
            clock=clock,
            helpers=helpers,
        )

    @property
    def redis(self) -> Any:
        """The underlying redis.asyncio client (the evidence ledger writes its stream with it)."""
        return self._client

    def key(self, client_id: str, kind: str = "state") -> str:
        """Return the Redis key of the client's ``kind`` of state, in the client's slot.

        Other per-client Redis state (limits, fingerprints) should use this too, so a
        script can touch all of one client's keys in cluster mode.
        """
        return f"{self._prefix}:{{c:{_escape(client_id)}}}:{kind}"

    def limit_key(self, tag: str, name: str) -> str:
        """Return the Redis key holding the TAT of limit ``name`` on subject ``tag``.

        The tag is the hash tag, so a client's limits (tag ``c:<client>``) share the slot
        of ``key(client)``.
        """
        return f"{self._prefix}:{{{_escape(tag)}}}:l:{_escape(name)}"

    @_timed("record")
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
        """Add to the client's counters, refresh its TTL, apply ``limits`` and return the record.

        Limits run on the Redis server's clock (``TIME``), the same for every replica of
        the guard; ``now`` dates the record's fields. On a single node this is one EVALSHA.
        In cluster mode, limits in the client's slot run in the client's script and the
        others in one script per slot, all concurrently; each slot is all-or-nothing.
        """
        self._records += 1
        trim_before = repr(now) if self._records % _TRIM_EVERY == 0 else ""
        score = repr(now + self._ttl_s)
        args: list[str | int] = [
            client_id,
            tier,
            requests,
            instances,
            repr(now),
            self._ttl_ms,
            score,
        ]
        state_key = self.key(client_id)
        limit_keys = [self.limit_key(charge.tag, charge.name) for charge in limits]
        async with self._guard("record"):
            if not self._cluster:
                keys = [state_key, self._registry, *limit_keys]
                args += [self._max_clients, trim_before, len(limits), *_limit_args(limits)]
                if self._idle is not None:
                    fields, replies = await self._evalsha(self._record_script, keys, args)
                else:
                    fields, replies = await self._record_script(keys=keys, args=args)
                record = _parse(client_id, _pairs(fields), now)
                return _with_limits(record, _limit_states(replies))
            # Cluster: group the limits by slot; the client's slot goes with its record.
            client_slot = key_slot(state_key.encode())
            groups: dict[int, list[int]] = {client_slot: []}
            for index, limit_key in enumerate(limit_keys):
                groups.setdefault(key_slot(limit_key.encode()), []).append(index)
            own = groups.pop(client_slot)
            calls = [
                self._record_script(
                    keys=[state_key, *(limit_keys[i] for i in own)],
                    args=[*args, "", "", len(own), *_limit_args([limits[i] for i in own])],
                ),
                self._touch_registry_script(
                    keys=[self._registry],
                    args=[client_id, score, "gt", self._max_clients, trim_before],
                ),
                *(
                    self._limits_script(
                        keys=[limit_keys[i] for i in indexes],
                        args=_limit_args([limits[i] for i in indexes]),
                    )
                    for indexes in groups.values()
                ),
            ]
            (fields, own_replies), _, *other_replies = await asyncio.gather(*calls)
            states: list[LimitState | None] = [None] * len(limits)
            for indexes, replies in zip(
                [own, *groups.values()], [own_replies, *other_replies], strict=True
            ):
                for index, state in zip(indexes, _limit_states(replies), strict=True):
                    states[index] = state
            record = _parse(client_id, _pairs(fields), now)
            return _with_limits(record, [state for state in states if state is not None])

    @_timed("get_client")
    async def get_client(self, client_id: str) -> ClientRecord | None:
        """Return the client's record, or ``None`` when unknown or expired."""
        async with self._guard("get_client"):
            fields = await self._client.hgetall(self.key(client_id))
            return _parse(client_id, _text(fields), self._clock()) if fields else None

    @_timed("list_clients")
    async def list_clients(self, *, limit: int, cursor: str = "") -> tuple[list[ClientRecord], str]:
        """Return up to ``limit`` records, oldest activity first, and the next cursor.

        A client whose record is not changed during the walk is listed exactly once; an
        active one may be listed again with fresher counters. A page may hold fewer than
        ``limit`` records when some expired. Raise ``ValueError`` on a malformed cursor.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        after_score, after_member = _decode_cursor(cursor)
        async with self._guard("list_clients"):
            flat = await self._page_script(
                keys=[self._registry], args=[after_score, after_member, limit]
            )
            members = [str(m) for m in flat[0::2]]
            scores = [str(s) for s in flat[1::2]]
            async with self._client.pipeline() as pipe:
                for member in members:
                    pipe.hgetall(self.key(member))
                replies = await pipe.execute()
            now = self._clock()
            records = [
                _parse(member, _text(fields), now)
                for member, fields in zip(members, replies, strict=True)
                if fields
            ]
        more = len(members) == limit
        return records, _encode_cursor(scores[-1], members[-1]) if more else ""

    @_timed("set_level")
    async def set_level(
        self,
        client_id: str,
        *,
        level: str | None,
        blocked: bool,
        reason: str,
        now: float,
        ttl_s: float | None,
    ) -> ClientRecord:
        """Pin (or unpin) the client's level and block flag; create the record if unknown.

        A pin with ``ttl_s`` ends then and keeps the record at least that long; a pin
        without one keeps the record (no Redis TTL) until reset or unpinned.
        """
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")
        pinned = level is not None or blocked
        if not pinned:
            pin, expire_ms, score = "", str(self._ttl_ms), repr(now + self._ttl_s)
        elif ttl_s is None:
            pin, expire_ms, score = "forever", "", "+inf"
        else:
            stay_s = max(self._ttl_s, ttl_s)
            pin, expire_ms, score = (
                repr(now + ttl_s),
                str(math.ceil(stay_s * 1000)),
                repr(now + stay_s),
            )
        args: list[str | int] = [
            client_id,
            level or "",
            "1" if blocked else "0",
            reason,
            repr(now),
            pin,
            expire_ms,
        ]
        async with self._guard("set_level"):
            if self._cluster:
                fields, _ = await asyncio.gather(
                    self._set_level_script(keys=[self.key(client_id)], args=args),
                    self._touch_registry_script(
                        keys=[self._registry],
                        args=[client_id, score, "set", self._max_clients, ""],
                    ),
                )
            else:
                fields = await self._set_level_script(
                    keys=[self.key(client_id), self._registry],
                    args=[*args, score, self._max_clients],
                )
            return _parse(client_id, _pairs(fields), now)

    @_timed("load_detection")
    async def load_detection(self, client_id: str) -> DetectionState | None:
        """Read the detector states and the risk fields (one slot: one pipeline)."""
        async with self._guard("load_detection"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.key(client_id, "det"))
                pipe.hmget(self.key(client_id), *_RISK_FIELDS)
                blobs, meta = await pipe.execute()
        if not blobs:
            return None
        detectors = {
            str(k): base64.b64decode(v) for k, v in _text(blobs).items() if k != "timeline"
        }
        timeline = tuple(tuple(item) for item in json.loads(_text(blobs).get("timeline", "[]")))
        fields = dict(zip(_RISK_FIELDS, meta, strict=True))
        return DetectionState(
            detectors=detectors,
            risk=float(fields.get("risk") or 0.0),
            level=str(fields.get("dlevel") or "normal"),
            reasons=tuple(r for r in str(fields.get("rreasons") or "").split(",") if r),
            updated_at=float(fields.get("rupdated") or 0.0),
            timeline=timeline,
        )

    @_timed("save_detection")
    async def save_detection(self, client_id: str, state: DetectionState, *, ttl_s: float) -> None:
        """Write detector states (base64 in a hash beside the record) and the risk fields on
        the record, atomically (both keys share the client's slot)."""
        blobs: dict[str, str] = {
            name: base64.b64encode(data).decode("ascii") for name, data in state.detectors.items()
        }
        blobs["timeline"] = json.dumps([list(item) for item in state.timeline])
        meta = {
            "risk": repr(float(state.risk)),
            "dlevel": state.level,
            "rreasons": ",".join(state.reasons),
            "rupdated": repr(float(state.updated_at)),
        }
        det_key = self.key(client_id, "det")
        async with self._guard("save_detection"):
            async with self._client.pipeline(transaction=not self._cluster) as pipe:
                pipe.hset(det_key, mapping=blobs)  # type: ignore[arg-type]
                pipe.pexpire(det_key, max(1, int(ttl_s * 1000)))
                pipe.hset(self.key(client_id), mapping=meta)  # type: ignore[arg-type]
                await pipe.execute()

    @_timed("reset_client")
    async def reset_client(self, client_id: str) -> bool:
        """Delete the client's record, detection state and registry entry; return whether it existed."""
        async with self._guard("reset_client"):
            deleted, _, _ = await asyncio.gather(
                self._client.delete(self.key(client_id)),
                self._client.delete(self.key(client_id, "det")),
                self._client.zrem(self._registry, client_id),
            )
            return bool(deleted)

    @_timed("ping")
    async def ping(self) -> bool:
        """Return True when Redis (every node, in cluster mode) answers PING."""
        async with self._guard("ping"):
            return bool(await self._client.ping())

    async def warm(self) -> None:
        """Do before the first request what it would otherwise pay inside its budget: read the
        cluster's slots, load every script, and open one connection of the store's own."""
        async with self._guard("warm", timeout_s=max(self._timeout_s, _WARM_TIMEOUT_S)):
            for script in self._scripts:
                script.sha = await self._client.script_load(script.script)
            if self._idle is not None and not self._idle:
                connection = self._new_connection()
                await connection.connect()
                self._idle.append(connection)

    @_timed("close")
    async def close(self) -> None:
        """Close the client, the helpers (Sentinel's) and their connections."""
        async with self._guard("close", discover=False):
            while self._idle:
                await self._idle.pop().disconnect()
            await self._client.aclose()
            for helper in self._helpers:
                await helper.aclose()

    async def _discover(self) -> None:
        """Read the cluster's slots once, before the first command.

        redis-py 8.1 discovers them lazily inside the first commands; a burst of concurrent
        first commands then meets MOVED replies, closes connections under commands in
        flight and retries them, and a script that had already run runs twice (a request
        counted and charged twice). One discovery up front avoids that.
        """
        async with self._discovery:
            if not self._discovered:
                assert isinstance(self._client, RedisCluster)
                await self._client.initialize()
                self._discovered = True

    async def _evalsha(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` by EVALSHA on an idle connection of the store's own (one round trip).

        As redis-py's client does: a script Redis forgot (a restart, SCRIPT FLUSH) is loaded
        and run again, and a connection found closed is retried once on a new one.
        """
        idle = self._idle
        assert idle is not None
        connection = idle.pop() if idle else self._new_connection()
        try:
            try:
                reply = await self._evalsha_loaded(connection, script, keys, args)
            except RedisConnectionError:
                # Closed under us: after a Redis restart the new connection meets an empty
                # script cache too, so the retry loads the script as well.
                await connection.disconnect(nowait=True)
                reply = await self._evalsha_loaded(connection, script, keys, args)
        except BaseException:
            # A reply may still be on its way (a timeout): never reuse this connection as is.
            await connection.disconnect(nowait=True)
            raise
        if len(idle) < _MAX_IDLE_CONNECTIONS:
            idle.append(connection)
        else:
            await connection.disconnect(nowait=True)
        return reply

    async def _evalsha_loaded(
        self, connection: Any, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        """EVALSHA on ``connection``, loading the script first if Redis forgot it."""
        try:
            return await _evalsha_on(connection, script.sha, keys, args)
        except NoScriptError:
            script.sha = await self._client.script_load(script.script)
            return await _evalsha_on(connection, script.sha, keys, args)

    @contextlib.asynccontextmanager
    async def _guard(
        self, operation: str, *, discover: bool = True, timeout_s: float | None = None
    ) -> AsyncIterator[None]:
        """Bound the block by ``timeout_s`` (the store's own by default) and turn any failure
        into ``StoreError``."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                if discover and not self._discovered:
                    await self._discover()
                yield
        except TimeoutError as exc:
            raise StoreError(f"redis {operation} timed out after {timeout_s}s") from exc
        except (RedisError, RedisClusterException, OSError, ValueError, TypeError) as exc:
            # ValueError/TypeError: a reply we cannot parse (a foreign value in our key).
            raise StoreError(f"redis {operation} failed: {exc!r}") from exc


async def _evalsha_on(connection: Any, sha: str, keys: list[str], args: list[Any]) -> Any:
    if not connection.is_connected:
        await connection.connect()
    await connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
    return await connection.read_response()


def _escape(client_id: str) -> str:
    """Percent-escape what would end or confuse the hash tag (injective)."""
    return client_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _limit_args(limits: Sequence[LimitCharge]) -> list[str | int]:
    """Flatten charges into the scripts' ARGV: interval_s, burst, cost, mode per charge."""
    args: list[str | int] = []
    for charge in limits:
        args += [repr(float(charge.interval_s)), charge.burst, charge.cost, int(charge.mode)]
    return args


def _limit_states(flat: Sequence[Any]) -> list[LimitState]:
    """Turn apply_limits' reply (4 values per charge) into states."""
    return [
        LimitState(
            allowed=int(flat[i]) == 1,
            remaining=int(flat[i + 1]),
            reset_s=float(flat[i + 2]) / 1e6,
            retry_after_s=float(flat[i + 3]) / 1e6,
        )
        for i in range(0, len(flat), 4)
    ]


def _with_limits(record: ClientRecord, states: Sequence[LimitState]) -> ClientRecord:
    return dataclasses.replace(record, limits=tuple(states)) if states else record


@dataclass(frozen=True, slots=True)
class _SentinelTarget:
    """Where a ``redis+sentinel://`` URL points."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None


def _parse_sentinel(rest: str) -> _SentinelTarget:
    """Parse ``[[user]:password@]host:port[,host:port...]/service[/db]`` (after the scheme)."""
    where, _, path = rest.partition("/")
    userinfo, at, hosts = where.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    parts = [part for part in path.split("/") if part]
    if not hosts or not 1 <= len(parts) <= 2 or "?" in path:
        raise ValueError(
            f"expected {{redis,rediss}}+sentinel://host:port[,host:port...]/service[/db], "
            f"got {rest!r}"
        )
    sentinels = []
    for address in hosts.split(","):
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"sentinel address must be host:port, got {address!r}")
        sentinels.append((host.strip("[]"), int(port)))
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"sentinel database must be a number, got {parts[1]!r}")
    db = int(parts[1]) if len(parts) == 2 else 0
    return _SentinelTarget(sentinels, unquote(parts[0]), db, username, password)


_RISK_FIELDS = ("risk", "dlevel", "rreasons", "rupdated")


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    """Turn a script's flat HGETALL reply into a mapping."""
    return {str(k): str(v) for k, v in zip(flat[0::2], flat[1::2], strict=True)}


def _text(fields: Mapping[Any, Any]) -> dict[str, str]:
    """Type an HGETALL reply (already decoded by the client) as text."""
    return {str(k): str(v) for k, v in fields.items()}


def _parse(client_id: str, fields: Mapping[str, str], now: float) -> ClientRecord:
    """Build the record from the hash; a pin that ended by ``now`` is reported cleared."""
    pin = fields.get("pin")
    lapsed = pin is not None and pin != "forever" and float(pin) <= now
    return ClientRecord(
        client_id=client_id,
        tier=fields.get("tier", ""),
        pinned_level=None if lapsed else fields.get("level"),
        blocked=not lapsed and fields.get("blocked") == "1",
        reason="" if lapsed else fields.get("reason", ""),
        first_seen=float(fields.get("first_seen", 0.0)),
        last_seen=float(fields.get("last_seen", 0.0)),
        requests=int(fields.get("requests", 0)),
        instances=int(fields.get("instances", 0)),
        risk=float(fields.get("risk", 0.0)),
        detected_level=fields.get("dlevel", ""),
        risk_reasons=tuple(r for r in fields.get("rreasons", "").split(",") if r),
    )


def _encode_cursor(score: str, member: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([score, member]).encode()).decode("ascii")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    if not cursor:
        return "", ""
    try:
        score, member = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError, TypeError) as exc:
        raise ValueError(f"malformed cursor {cursor!r}") from exc
    if not isinstance(score, str) or not isinstance(member, str) or not score:
        raise ValueError(f"malformed cursor {cursor!r}")
    return score, member
