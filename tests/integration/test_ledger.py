"""The evidence ledger on memory and on a real Redis stream: append, read by client, bounded,
retention, erasure of one client, encryption at rest, JSONL round trip."""

from __future__ import annotations

import io

import pytest
import redis.asyncio as aioredis

from extauthz.evidence.ledger import (
    Cipher,
    EvidenceRecord,
    MemoryLedger,
    RedisLedger,
    export_jsonl,
    import_jsonl,
)
from extauthz.keys import KeyRing
from tests.store_contract import FakeClock

KEYS = KeyRing.single(b"ledger-test-secret-0123456789", kid="k1")


def _records(clock: FakeClock, n: int, client: str) -> list[EvidenceRecord]:
    return [
        EvidenceRecord(client, "k1", clock() + i, f"input-{client}-{i}".encode(), i % 10)
        for i in range(n)
    ]


@pytest.fixture(params=["memory", "redis"])
async def ledger_factory(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    clients = []

    async def make(
        clock: FakeClock, *, max_records: int = 1000, retention_s: float = 3600, cipher=None
    ):  # type: ignore[no-untyped-def]
        if request.param == "memory":
            return MemoryLedger(
                max_records=max_records, retention_s=retention_s, clock=clock, cipher=cipher
            )
        client = aioredis.from_url(request.getfixturevalue("redis_url"))
        clients.append(client)
        return RedisLedger(
            client, max_records=max_records, retention_s=retention_s, clock=clock, cipher=cipher
        )

    yield make
    for client in clients:
        await client.aclose()


class TestLedger:
    """What the ledger keeps, and what it gives back."""

    async def test_append_read_erase(self, ledger_factory) -> None:  # type: ignore[no-untyped-def]
        clock = FakeClock()
        ledger = await ledger_factory(clock, cipher=Cipher(KEYS))
        await ledger.append(_records(clock, 5, "key:a") + _records(clock, 3, "key:b"))
        a = await ledger.read(client_id="key:a")
        assert [r.input for r in a] == [f"input-key:a-{i}".encode() for i in range(5)]
        assert await ledger.erase("key:a") == 5
        assert await ledger.read(client_id="key:a") == []
        assert len(await ledger.read()) == 3

    async def test_bounded_and_retained(self, ledger_factory) -> None:  # type: ignore[no-untyped-def]
        clock = FakeClock()
        ledger = await ledger_factory(clock, max_records=100, retention_s=3600)
        await ledger.append(_records(clock, 50, "key:old"))
        clock.advance(7200)
        await ledger.append(_records(clock, 10, "key:new"))
        kept = await ledger.read()
        assert {r.client_id for r in kept} == {"key:new"}  # the old ones passed their retention

    def test_encryption_at_rest_and_rotation(self) -> None:
        old = Cipher(KEYS)
        sealed = old.seal(b"secret input")
        assert b"secret input" not in sealed
        rotated = Cipher(
            KeyRing(
                current_id="k2",
                keys={"k1": b"ledger-test-secret-0123456789", "k2": b"another-secret-0123456789"},
            )
        )
        assert rotated.open(sealed) == b"secret input"

    def test_jsonl_round_trip(self) -> None:
        clock = FakeClock()
        records = _records(clock, 3, "key:a")
        out = io.StringIO()
        assert export_jsonl(records, out) == 3
        assert import_jsonl(out.getvalue().splitlines()) == records
