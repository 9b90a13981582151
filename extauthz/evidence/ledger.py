"""The evidence ledger: which client was served which marked answer, under which key.

Records go to a bounded, retention-limited log: a Redis stream where Redis is the store
(``XADD ... MAXLEN ~``, ``XTRIM MINID``), an in-process deque otherwise. Inputs can be encrypted
at rest (AES-GCM, a key derived from the deployment's key ring); one client's records can be
erased; everything exports as JSONL for ``extauthz verify`` and for the lawyers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, Protocol

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import ResponseError

from extauthz.keys import KeyRing
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.evidence")

# What a record this guard cannot open raises: a key id it does not hold (KeyError), a key of
# the same id that is not the one that sealed it (InvalidTag), or a malformed entry.
_UNREADABLE = (InvalidTag, KeyError, ValueError, IndexError)


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    """One marked answer: who got it, when, under which key, for which input, and what was served."""

    client_id: str
    kid: str
    time: float
    input: bytes
    served_label: int
    mark: str = "label"
    # The terms of use version the client had accepted when it was served ("" when none).
    terms_version: str = ""
    # Random, set once when the record is queued: a write retried after a timeout that did
    # land is read once ("" in records made before write-behind).
    nonce: str = ""


class Ledger(Protocol):
    """Where evidence is kept. Every method may raise on store failure; callers count it."""

    async def append(self, records: Sequence[EvidenceRecord]) -> None: ...

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]: ...

    async def erase(self, client_id: str) -> int: ...

    async def close(self) -> None:
        """Write what is still queued, if anything is (the guard stops)."""
        ...


class Cipher:
    """AES-GCM for inputs at rest, keyed per key id (so rotation keeps old records readable)."""

    def __init__(self, keys: KeyRing) -> None:
        derived = keys.derive("ledger")
        self._keys = {
            kid: AESGCM(secret[:32].ljust(32, b"\0")) for kid, secret in derived.keys.items()
        }
        self._current = derived.current_id

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(12)
        kid = self._current.encode()
        return bytes([len(kid)]) + kid + nonce + self._keys[self._current].encrypt(nonce, data, kid)

    def open(self, blob: bytes) -> bytes:
        size = blob[0]
        kid = blob[1 : 1 + size]
        nonce, sealed = blob[1 + size : 13 + size], blob[13 + size :]
        return self._keys[kid.decode()].decrypt(nonce, sealed, kid)


class MemoryLedger:
    """The ledger in this process: the newest ``max_records`` within ``retention_s``."""

    def __init__(
        self,
        *,
        max_records: int = 1_000_000,
        retention_s: float = 365 * 86_400.0,
        clock: Callable[[], float],
        cipher: Cipher | None = None,
    ) -> None:
        self._records: collections.deque[EvidenceRecord] = collections.deque(maxlen=max_records)
        self._retention_s = retention_s
        self._clock = clock
        self._cipher = cipher

    async def append(self, records: Sequence[EvidenceRecord]) -> None:
        for record in records:
            sealed = self._cipher.seal(record.input) if self._cipher else record.input
            self._records.append(dataclasses.replace(record, input=sealed))
        self._expire()

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]:
        self._expire()
        out = []
        for record in self._records:
            if client_id is not None and record.client_id != client_id:
                continue
            data = self._cipher.open(record.input) if self._cipher else record.input
            out.append(dataclasses.replace(record, input=data))
            if len(out) >= limit:
                break
        return out

    async def erase(self, client_id: str) -> int:
        kept = [r for r in self._records if r.client_id != client_id]
        erased = len(self._records) - len(kept)
        self._records.clear()
        self._records.extend(kept)
        return erased

    async def close(self) -> None:
        """Nothing is queued: every append is kept at once."""

    def _expire(self) -> None:
        horizon = self._clock() - self._retention_s
        while self._records and self._records[0].time < horizon:
            self._records.popleft()


class RedisLedger:
    """The ledger as one Redis stream (one key, so one slot in a cluster)."""

    def __init__(
        self,
        client: Any,
        *,
        key: str = "extauthz:evidence",
        max_records: int = 1_000_000,
        retention_s: float = 365 * 86_400.0,
        clock: Callable[[], float],
        cipher: Cipher | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """``timeout_s`` bounds each ``append`` (the guard passes its decision budget: the
        append runs while Envoy waits for the answer); None leaves it to the socket timeouts."""
        self._client = client
        self._key = key
        self._max = max_records
        self._retention_s = retention_s
        self._clock = clock
        self._cipher = cipher
        self._timeout_s = timeout_s

    async def append(self, records: Sequence[EvidenceRecord]) -> None:
        """Add records with stream ids from their own times, so retention trims by record time
        (an id below the stream's newest, from a replica's clock skew, falls back to now).

        One round trip (a pipeline of XADDs and the XTRIM) within ``timeout_s``: a slow Redis
        costs the answer the budget at most, not one timeout per record.
        """
        entries = [(self._fields(record), f"{int(record.time * 1000)}-*") for record in records]
        horizon_ms = int((self._clock() - self._retention_s) * 1000)
        bound = (
            asyncio.timeout(self._timeout_s)
            if self._timeout_s is not None
            else contextlib.nullcontext()
        )
        async with bound:
            async with self._client.pipeline(transaction=False) as pipe:
                for fields, entry_id in entries:
                    pipe.xadd(self._key, fields, id=entry_id, maxlen=self._max, approximate=True)
                # Approximate trimming frees whole stream nodes; reads skip what is past
                # retention anyway.
                pipe.xtrim(self._key, minid=f"{max(horizon_ms, 0)}-0", approximate=True)
                *added, trimmed = await pipe.execute(raise_on_error=False)
            if isinstance(trimmed, Exception):
                raise trimmed
            # An id below the stream's newest is refused: those go again with Redis's own ids.
            late = [
                fields
                for (fields, _), reply in zip(entries, added, strict=True)
                if isinstance(reply, ResponseError)
            ]
            if late:
                async with self._client.pipeline(transaction=False) as pipe:
                    for fields in late:
                        pipe.xadd(self._key, fields, maxlen=self._max, approximate=True)
                    await pipe.execute()

    def _fields(self, record: EvidenceRecord) -> dict[str, str]:
        data = self._cipher.seal(record.input) if self._cipher else record.input
        return {
            "c": record.client_id,
            "k": record.kid,
            "t": repr(record.time),
            "i": base64.b64encode(data).decode("ascii"),
            "l": str(record.served_label),
            "m": record.mark,
            # Records written before terms existed have no "v": read as "".
            "v": record.terms_version,
            "n": record.nonce,
        }

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]:
        """Return the records within retention, oldest first.

        A record this guard cannot open (sealed under a key it does not hold: a guard restarted
        without ``--keys-file``, or a key id removed from the ring) is skipped, counted
        (``ledger_unreadable``) and logged, so the rest of the ledger can still be exported.
        """
        out: list[EvidenceRecord] = []
        seen: set[str] = set()
        unreadable = 0
        start = "-"
        while len(out) < limit:
            batch = await self._client.xrange(self._key, min=start, max="+", count=1000)
            if not batch:
                break
            horizon = self._clock() - self._retention_s
            for entry_id, fields in batch:
                start = "(" + _text(entry_id)
                try:
                    record = self._record(fields)
                except _UNREADABLE:
                    unreadable += 1
                    continue
                if record.nonce:
                    if record.nonce in seen:
                        continue  # a retried write that had landed
                    seen.add(record.nonce)
                if record.time >= horizon and (client_id is None or record.client_id == client_id):
                    out.append(record)
            if len(batch) < 1000:
                break
        if unreadable:
            metrics.ERRORS.labels("ledger_unreadable").inc(unreadable)
            log.warning(
                "ledger_records_unreadable",
                count=unreadable,
                detail="sealed under a key this guard does not hold (see --keys-file)",
            )
        return out[:limit]

    async def erase(self, client_id: str) -> int:
        doomed: list[str] = []
        start = "-"
        while True:
            batch = await self._client.xrange(self._key, min=start, max="+", count=1000)
            if not batch:
                break
            for entry_id, fields in batch:
                if _text(_field(fields, "c")) == client_id:
                    doomed.append(_text(entry_id))
                start = "(" + _text(entry_id)
            if len(batch) < 1000:
                break
        for chunk in range(0, len(doomed), 500):
            await self._client.xdel(self._key, *doomed[chunk : chunk + 500])
        return len(doomed)

    async def close(self) -> None:
        """Nothing is queued: every append is written before it returns."""

    def _record(self, fields: Any) -> EvidenceRecord:
        data = base64.b64decode(_text(_field(fields, "i")))
        return EvidenceRecord(
            client_id=_text(_field(fields, "c")),
            kid=_text(_field(fields, "k")),
            time=float(_text(_field(fields, "t"))),
            input=self._cipher.open(data) if self._cipher else data,
            served_label=int(_text(_field(fields, "l"))),
            mark=_text(_field(fields, "m")),
            terms_version=_text(_field(fields, "v") or ""),
            nonce=_text(_field(fields, "n") or ""),
        )


class BufferedLedger:
    """Write-behind in front of a shared ledger: ``append`` queues and returns at once, and a
    background task writes the queue in batches, retrying with backoff while the ledger fails.

    An answer never waits for Redis, and marks served during an outage are written when it
    ends instead of being lost. Each queued record gets a random ``nonce``, so a batch written
    again after a timeout that did land is read once. At most ``max_pending`` records wait;
    beyond that new ones are dropped and counted (``ledger_dropped``). ``read`` and ``erase``
    flush first (a bounded try), so an export sees what was served. ``close`` flushes what it
    can within its time; what is left is counted as dropped.
    """

    def __init__(
        self,
        inner: Ledger,
        *,
        max_pending: int = 100_000,
        batch: int = 500,
        retry_s: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        if max_pending < 1 or batch < 1 or not 0 < retry_s[0] <= retry_s[1]:
            raise ValueError("need max_pending >= 1, batch >= 1 and 0 < first retry <= last")
        self._inner = inner
        self._max = max_pending
        self._batch = batch
        self._retry_s = retry_s
        self._pending: collections.deque[EvidenceRecord] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._pending)

    async def append(self, records: Sequence[EvidenceRecord]) -> None:
        room = self._max - len(self._pending)
        if room < len(records):
            metrics.ERRORS.labels("ledger_dropped").inc(len(records) - max(room, 0))
            records = records[: max(room, 0)]
        for record in records:
            self._pending.append(
                record if record.nonce else dataclasses.replace(record, nonce=os.urandom(8).hex())
            )
        if records:
            self._idle.clear()
            self._wake.set()
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._drain())

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the queue to be written; return whether it was."""
        if self._idle.is_set():
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]:
        await self.flush(_FLUSH_BEFORE_READ_S)
        return await self._inner.read(client_id=client_id, limit=limit)

    async def erase(self, client_id: str) -> int:
        queued = [r for r in self._pending if r.client_id != client_id]
        dropped = len(self._pending) - len(queued)
        self._pending.clear()
        self._pending.extend(queued)
        await self.flush(_FLUSH_BEFORE_READ_S)  # a batch in flight may hold the client's records
        return dropped + await self._inner.erase(client_id)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop the writer."""
        if not await self.flush(timeout_s) and self._pending:
            metrics.ERRORS.labels("ledger_dropped").inc(len(self._pending))
            log.warning("ledger_records_dropped", count=len(self._pending), detail="at shutdown")
            self._pending.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _drain(self) -> None:
        delay = self._retry_s[0]
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(self._batch, len(self._pending)))]
            try:
                await self._inner.append(batch)
            except Exception as exc:  # the ledger is down: keep the records, try again later
                self._pending.extendleft(reversed(batch))
                metrics.ERRORS.labels("ledger_unavailable").inc()
                log.warning(
                    "ledger_append_failed", error=str(exc)[:200], pending=len(self._pending)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_s[1])
                continue
            delay = self._retry_s[0]


# An export waits this long for queued records before it reads the shared ledger.
_FLUSH_BEFORE_READ_S = 2.0


def _field(fields: Any, name: str) -> Any:
    return fields.get(name, fields.get(name.encode()))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def export_jsonl(records: Iterable[EvidenceRecord], out: IO[str]) -> int:
    """Write one JSON object per record (inputs base64); return how many."""
    count = 0
    for record in records:
        document = asdict(record)
        document["input"] = base64.b64encode(record.input).decode("ascii")
        out.write(json.dumps(document, separators=(",", ":")) + "\n")
        count += 1
    return count


def import_jsonl(lines: Iterable[str]) -> list[EvidenceRecord]:
    """Read records written by ``export_jsonl``."""
    records = []
    for line in lines:
        if line.strip():
            document = json.loads(line)
            document["input"] = base64.b64decode(document["input"])
            records.append(EvidenceRecord(**document))
    return records
