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

Records expire through Redis' own ``PEXPIRE``, so Redis memory stays bounded by the TTL
(run Redis with ``maxmemory`` and ``maxmemory-policy volatile-lru`` as a second bound).
Pins end on the injected clock, checked by the script. Needs Redis 6.2+ (``ZADD GT``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from extauthz.store.base import ClientRecord, StoreError

_TRIM_EVERY = 1024
"""Trim the registry of expired entries once per this many ``record`` calls."""

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

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

# KEYS[1] state hash, KEYS[2] registry (single node only). ARGV: client_id, tier,
# requests, instances, now, ttl_ms, registry_score, cap, trim_before.
_RECORD_SCRIPT = (
    _REGISTRY_LUA
    + """
local key, now = KEYS[1], tonumber(ARGV[5])
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
if KEYS[2] then
  touch_registry(KEYS[2], ARGV[1], ARGV[7], 'gt', ARGV[8], ARGV[9])
end
return redis.call('HGETALL', key)
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
    ``record`` is one round trip that also updates the registry; in cluster mode the
    registry lives in another slot, so its update is a second command sent concurrently
    (one round trip of latency, two commands, and one hot registry key to watch).
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
    ) -> None:
        """Wrap an existing client; prefer ``from_url``, which configures timeouts."""
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

        Schemes: ``redis://host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock``,
        and for Redis Cluster ``redis+cluster://host:port`` or ``rediss+cluster://``
        (any node; the others are discovered). The scheme, not a flag, picks cluster
        mode so that one setting says everything. ``timeout_s`` bounds connecting,
        each socket read and each whole call; a dropped connection is retried once.
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
        if scheme in _CLUSTER_SCHEMES:
            client = RedisCluster.from_url(
                f"{_CLUSTER_SCHEMES[scheme]}://{rest}",
                retry=Retry(NoBackoff(), 1),
                **options,
            )
            cluster = True
        elif scheme in ("redis", "rediss", "unix"):
            client = Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
            cluster = False
        else:
            raise ValueError(
                f"unsupported Redis URL scheme {scheme!r} (expected redis, rediss, unix, "
                "redis+cluster or rediss+cluster)"
            )
        return cls(
            client,
            cluster=cluster,
            timeout_s=timeout_s,
            ttl_s=ttl_s,
            prefix=prefix,
            max_clients=max_clients,
            clock=clock,
        )

    def key(self, client_id: str, kind: str = "state") -> str:
        """Return the Redis key of the client's ``kind`` of state, in the client's slot.

        Other per-client Redis state (limits, fingerprints) should use this too, so a
        script can touch all of one client's keys in cluster mode.
        """
        return f"{self._prefix}:{{c:{_escape(client_id)}}}:{kind}"

    async def record(
        self, client_id: str, *, tier: str, requests: int, instances: int, now: float
    ) -> ClientRecord:
        """Add to the client's counters, refresh its TTL and return the record."""
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
        async with self._guard("record"):
            if self._cluster:
                fields, _ = await asyncio.gather(
                    self._record_script(keys=[self.key(client_id)], args=args),
                    self._touch_registry_script(
                        keys=[self._registry],
                        args=[client_id, score, "gt", self._max_clients, trim_before],
                    ),
                )
            else:
                fields = await self._record_script(
                    keys=[self.key(client_id), self._registry],
                    args=[*args, self._max_clients, trim_before],
                )
            return _parse(client_id, _pairs(fields), now)

    async def get_client(self, client_id: str) -> ClientRecord | None:
        """Return the client's record, or ``None`` when unknown or expired."""
        async with self._guard("get_client"):
            fields = await self._client.hgetall(self.key(client_id))
            return _parse(client_id, _text(fields), self._clock()) if fields else None

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

    async def reset_client(self, client_id: str) -> bool:
        """Delete the client's record and registry entry; return whether it existed."""
        async with self._guard("reset_client"):
            deleted, _ = await asyncio.gather(
                self._client.delete(self.key(client_id)),
                self._client.zrem(self._registry, client_id),
            )
            return bool(deleted)

    async def ping(self) -> bool:
        """Return True when Redis (every node, in cluster mode) answers PING."""
        async with self._guard("ping"):
            return bool(await self._client.ping())

    async def close(self) -> None:
        """Close the client and its connections."""
        async with self._guard("close"):
            await self._client.aclose()

    @contextlib.asynccontextmanager
    async def _guard(self, operation: str) -> AsyncIterator[None]:
        """Bound the block by ``timeout_s`` and turn any failure into ``StoreError``."""
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except TimeoutError as exc:
            raise StoreError(f"redis {operation} timed out after {self._timeout_s}s") from exc
        except (RedisError, RedisClusterException, OSError, ValueError, TypeError) as exc:
            # ValueError/TypeError: a reply we cannot parse (a foreign value in our key).
            raise StoreError(f"redis {operation} failed: {exc!r}") from exc


def _escape(client_id: str) -> str:
    """Percent-escape what would end or confuse the hash tag (injective)."""
    return client_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


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
