"""The evidence ledger: which client was served which marked answer, under which key.

Records go to a bounded, retention-limited log: a Redis stream where Redis is the store
(``XADD ... MAXLEN ~``, ``XTRIM MINID``), an in-process deque otherwise. Inputs can be encrypted
at rest (AES-GCM, a key derived from the deployment's key ring); one client's records can be
erased; everything exports as JSONL for ``extauthz verify`` and for the lawyers.
"""

from __future__ import annotations

import base64
import collections
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import ResponseError

from extauthz.keys import KeyRing


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    """One marked answer: who got it, when, under which key, for which input, and what was served."""

    client_id: str
    kid: str
    time: float
    input: bytes
    served_label: int
    mark: str = "label"


class Ledger(Protocol):
    """Where evidence is kept. Every method may raise on store failure; callers count it."""

    async def append(self, records: Sequence[EvidenceRecord]) -> None: ...

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]: ...

    async def erase(self, client_id: str) -> int: ...


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
            data = self._cipher.seal(record.input) if self._cipher else record.input
            self._records.append(
                EvidenceRecord(
                    record.client_id,
                    record.kid,
                    record.time,
                    data,
                    record.served_label,
                    record.mark,
                )
            )
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
            out.append(
                EvidenceRecord(
                    record.client_id,
                    record.kid,
                    record.time,
                    data,
                    record.served_label,
                    record.mark,
                )
            )
            if len(out) >= limit:
                break
        return out

    async def erase(self, client_id: str) -> int:
        kept = [r for r in self._records if r.client_id != client_id]
        erased = len(self._records) - len(kept)
        self._records.clear()
        self._records.extend(kept)
        return erased

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
    ) -> None:
        self._client = client
        self._key = key
        self._max = max_records
        self._retention_s = retention_s
        self._clock = clock
        self._cipher = cipher

    async def append(self, records: Sequence[EvidenceRecord]) -> None:
        """Add records with stream ids from their own times, so retention trims by record time
        (an id below the stream's newest, from a replica's clock skew, falls back to now)."""
        for record in records:
            data = self._cipher.seal(record.input) if self._cipher else record.input
            fields = {
                "c": record.client_id,
                "k": record.kid,
                "t": repr(record.time),
                "i": base64.b64encode(data).decode("ascii"),
                "l": str(record.served_label),
                "m": record.mark,
            }
            try:
                await self._client.xadd(
                    self._key,
                    fields,
                    id=f"{int(record.time * 1000)}-*",
                    maxlen=self._max,
                    approximate=True,
                )
            except ResponseError:
                await self._client.xadd(self._key, fields, maxlen=self._max, approximate=True)
        horizon_ms = int((self._clock() - self._retention_s) * 1000)
        # Approximate trimming frees whole stream nodes; reads skip what is past retention anyway.
        await self._client.xtrim(self._key, minid=f"{max(horizon_ms, 0)}-0", approximate=True)

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]:
        out: list[EvidenceRecord] = []
        start = "-"
        while len(out) < limit:
            batch = await self._client.xrange(self._key, min=start, max="+", count=1000)
            if not batch:
                break
            horizon = self._clock() - self._retention_s
            for entry_id, fields in batch:
                record = self._record(fields)
                if record.time >= horizon and (client_id is None or record.client_id == client_id):
                    out.append(record)
                start = "(" + _text(entry_id)
            if len(batch) < 1000:
                break
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

    def _record(self, fields: Any) -> EvidenceRecord:
        data = base64.b64decode(_text(_field(fields, "i")))
        return EvidenceRecord(
            client_id=_text(_field(fields, "c")),
            kid=_text(_field(fields, "k")),
            time=float(_text(_field(fields, "t"))),
            input=self._cipher.open(data) if self._cipher else data,
            served_label=int(_text(_field(fields, "l"))),
            mark=_text(_field(fields, "m")),
        )


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
