"""Write-behind evidence: nothing waits for the shared ledger, nothing served is lost while it
is down (up to the bound), and a retried write that had landed is read once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from extauthz.evidence.ledger import BufferedLedger, EvidenceRecord, MemoryLedger
from extauthz.telemetry import metrics
from tests.store_contract import FakeClock


def _records(n: int, client: str = "key:a", start: int = 0) -> list[EvidenceRecord]:
    return [
        EvidenceRecord(client, "k1", 1000.0 + i, b"[%d]" % i, i % 10)
        for i in range(start, start + n)
    ]


def _errors(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("extauthz_errors_total", {"reason": reason}) or 0.0


class FlakyLedger(MemoryLedger):
    """A shared ledger that fails ``fail`` writes; with ``land_then_fail`` a failed write has
    landed all the same (a timeout after Redis applied it)."""

    def __init__(
        self, *, fail: int = 0, land_then_fail: bool = False, delay_s: float = 0.0
    ) -> None:
        super().__init__(clock=FakeClock(), retention_s=1e12)
        self.fail = fail
        self.land_then_fail = land_then_fail
        self.delay_s = delay_s
        self.writes = 0

    async def append(self, records: Sequence[EvidenceRecord]) -> None:
        self.writes += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail > 0:
            self.fail -= 1
            if self.land_then_fail:
                await super().append(records)
            raise TimeoutError("the ledger did not answer")
        await super().append(records)

    async def read(
        self, *, client_id: str | None = None, limit: int = 1_000_000
    ) -> list[EvidenceRecord]:
        # Read once per nonce, as RedisLedger does.
        seen: set[str] = set()
        out = []
        for record in await super().read(client_id=client_id, limit=limit):
            if record.nonce and record.nonce in seen:
                continue
            seen.add(record.nonce)
            out.append(record)
        return out


class TestWriteBehind:
    async def test_append_returns_before_the_write(self) -> None:
        inner = FlakyLedger(delay_s=0.5)
        ledger = BufferedLedger(inner)
        async with asyncio.timeout(0.1):
            await ledger.append(_records(3))
        assert ledger.pending == 3  # queued; nothing written yet
        assert await ledger.flush(2.0)
        assert len(await inner.read()) == 3
        await ledger.close()

    async def test_records_served_during_an_outage_are_written_after_it(self) -> None:
        inner = FlakyLedger(fail=3)
        ledger = BufferedLedger(inner, retry_s=(0.01, 0.02))
        before = _errors("ledger_unavailable")
        await ledger.append(_records(5))
        await ledger.append(_records(5, start=5))
        assert await ledger.flush(2.0)
        got = await ledger.read()
        assert [r.served_label for r in got] == [i % 10 for i in range(10)]
        assert _errors("ledger_unavailable") - before == 3
        await ledger.close()

    async def test_a_retried_write_that_had_landed_is_read_once(self) -> None:
        inner = FlakyLedger(fail=2, land_then_fail=True)
        ledger = BufferedLedger(inner, retry_s=(0.01, 0.02))
        await ledger.append(_records(4))
        assert await ledger.flush(2.0)
        stored = await MemoryLedger.read(inner)
        assert len(stored) == 12  # three writes of the same batch landed
        assert len(await ledger.read()) == 4
        assert len({r.nonce for r in stored}) == 4

    async def test_beyond_the_bound_new_records_are_dropped_and_counted(self) -> None:
        inner = FlakyLedger(fail=1_000)
        ledger = BufferedLedger(inner, max_pending=6, retry_s=(0.01, 0.02))
        before = _errors("ledger_dropped")
        await ledger.append(_records(4))
        await ledger.append(_records(4, start=4))
        assert ledger.pending <= 6
        assert _errors("ledger_dropped") - before >= 2
        await ledger.close(timeout_s=0.05)
        assert ledger.pending == 0

    async def test_erase_reaches_queued_records(self) -> None:
        inner = FlakyLedger(fail=2)
        ledger = BufferedLedger(inner, retry_s=(0.01, 0.02))
        await ledger.append(_records(3, client="key:a") + _records(2, client="key:b"))
        assert await ledger.erase("key:a") == 3
        assert await ledger.flush(2.0)
        assert {r.client_id for r in await ledger.read()} == {"key:b"}

    async def test_close_writes_what_is_queued(self) -> None:
        inner = FlakyLedger(delay_s=0.05)
        ledger = BufferedLedger(inner)
        await ledger.append(_records(7))
        await ledger.close()
        assert len(await inner.read()) == 7

    def test_settings_out_of_range_are_refused(self) -> None:
        with pytest.raises(ValueError):
            BufferedLedger(FlakyLedger(), max_pending=0)
        with pytest.raises(ValueError):
            BufferedLedger(FlakyLedger(), retry_s=(1.0, 0.5))
