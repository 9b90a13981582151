"""Blacklight fingerprints: salted window hashes, per-client near-duplicates, cross-client probing."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits

import extauthz.detect.fingerprint as fingerprint_module
from extauthz.detect.base import Observation
from extauthz.detect.fingerprint import (
    HISTORY,
    CrossClientDetector,
    FingerprintDetector,
    Fingerprinter,
    FingerprintIndex,
    MemoryFingerprintIndex,
    fingerprints,
    observe_all,
    salt_for,
)

F64 = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]

KEY = b"s" * 32
DIGITS: F64 = load_digits().data.astype(np.float64)  # 1,797 rows of 64 values in 0..16
FP = Fingerprinter(key=KEY, scale=16.0, quantum=50.0)


def variations(seed: F64, count: int, rng: np.random.Generator, pixels: int = 3) -> F64:
    """Return ``count`` copies of ``seed`` with ``pixels`` values each moved by up to 3 of 16."""
    rows = np.repeat(seed[None, :], count, axis=0)
    for row in rows:
        idx = rng.choice(seed.size, pixels, replace=False)
        row[idx] = np.clip(row[idx] + rng.integers(-3, 4, pixels), 0, 16)
    return rows


def line(a: F64, b: F64, count: int) -> F64:
    """Return ``count`` evenly spaced points from ``a`` to ``b`` (a line search)."""
    t = np.linspace(0.0, 1.0, count)[:, None]
    return (1.0 - t) * a + t * b


def feed(
    detector: FingerprintDetector, rows: F64, state: bytes | None = None, batch: int = 1
) -> tuple[bytes, list[float]]:
    """Send ``rows`` through ``detector`` ``batch`` at a time; return the state and the scores."""
    scores: list[float] = []
    for start in range(0, rows.shape[0], batch):
        chunk = rows[start : start + batch]
        obs = Observation("key:c", now=float(start), instances=chunk.shape[0], raw=chunk)
        state, verdict = detector.update(state, obs)
        scores.append(verdict.score)
    assert state is not None
    return state, scores


def shared(a: U64, b: U64) -> int:
    """Return how many non-zero hashes two fingerprints share (the brute-force reference)."""
    return int(np.intersect1d(a[a != 0], b[b != 0]).size)


class TestFingerprints:
    """A fingerprint is a fixed-size, deterministic, salted sketch that small changes mostly keep."""

    def test_shape_order_and_padding(self) -> None:
        hashes = FP(DIGITS[:10])
        assert hashes.shape == (10, 50) and hashes.dtype == np.uint64
        # 64 values give 45 windows of 20: 45 distinct hashes, largest first, then 0 padding.
        nonzero = hashes[:, :45]
        assert (nonzero > 0).all() and (hashes[:, 45:] == 0).all()
        assert (np.diff(nonzero.astype(np.float64), axis=1) < 0).all()

    def test_deterministic_and_keyed(self) -> None:
        again = Fingerprinter(key=KEY, scale=16.0, quantum=50.0)(DIGITS[:5])
        other = Fingerprinter(key=b"t" * 32, scale=16.0, quantum=50.0)(DIGITS[:5])
        assert np.array_equal(FP(DIGITS[:5]), again)
        assert max(shared(a, b) for a, b in zip(FP(DIGITS[:5]), other, strict=True)) < 5

    def test_small_change_keeps_most_hashes_unrelated_inputs_share_few(self) -> None:
        base = DIGITS[100]
        nudged = base.copy()
        nudged[30] = np.clip(nudged[30] + 3, 0, 16)
        a, b = FP(np.stack([base, nudged]))
        assert shared(a, b) >= 25
        natural = FP(DIGITS[200:400])
        cross = [shared(natural[i], natural[j]) for i in range(0, 200, 7) for j in range(i)]
        assert np.mean(cross) < 3

    def test_salt_is_deterministic_and_in_range(self) -> None:
        salt = salt_for(KEY, 1000)
        assert np.array_equal(salt, salt_for(KEY, 1000))
        assert salt.min() >= 0.0 and salt.max() < 255.0 and salt.std() > 50.0
        assert not np.array_equal(salt, salt_for(b"other", 1000))

    def test_short_rows_and_non_finite_values(self) -> None:
        short = fingerprints(
            np.arange(12.0).reshape(2, 6), salt=salt_for(KEY, 6), quantum=10, scale=6.0
        )
        assert (short[:, 0] > 0).all() and (short[:, 1:] == 0).all()
        bad = DIGITS[:2].copy()
        bad[0, 5] = np.nan
        bad[1, 7] = np.inf
        hashes = FP(bad)
        assert (hashes[:, :45] > 0).all()
        assert shared(hashes[0], FP(DIGITS[:1])[0]) < 45

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError):
            fingerprints(np.zeros(5), salt=salt_for(KEY, 5), quantum=50, scale=1.0)
        with pytest.raises(ValueError):
            fingerprints(np.zeros((1, 5)), salt=salt_for(KEY, 4), quantum=50, scale=1.0)
        with pytest.raises(ValueError):
            fingerprints(np.zeros((1, 5)), salt=salt_for(KEY, 5), quantum=0, scale=1.0)


class TestFingerprintDetector:
    """Probing streams become near-duplicate runs and score 1 within 100 queries; natural rows do not."""

    def test_natural_held_out_rows_stay_at_zero(self) -> None:
        _, scores = feed(FingerprintDetector(FP), DIGITS[1000:1400])
        assert max(scores) == 0.0
        _, batched = feed(FingerprintDetector(FP), DIGITS[1000:1400], batch=64)
        assert max(batched) == 0.0

    def test_variations_of_a_seed_input_score_one_within_100(self) -> None:
        rng = np.random.default_rng(7)
        _, scores = feed(FingerprintDetector(FP), variations(DIGITS[500], 100, rng))
        assert scores[-1] == 1.0
        assert scores[5] < 1.0  # it takes a run, not one pair

    def test_line_search_scores_one_within_100(self) -> None:
        _, scores = feed(FingerprintDetector(FP), line(DIGITS[600], DIGITS[601], 100))
        assert scores[-1] == 1.0

    def test_probing_after_natural_traffic_is_caught(self) -> None:
        detector = FingerprintDetector(FP)
        state, natural = feed(detector, DIGITS[:300])
        rng = np.random.default_rng(8)
        _, probing = feed(detector, variations(DIGITS[900], 100, rng), state)
        assert max(natural) == 0.0 and probing[-1] == 1.0

    def test_matches_equal_brute_force_with_eviction(self) -> None:
        """The sorted index finds the same best match as comparing with the last entries."""
        detector = FingerprintDetector(FP, max_entries=16)
        rng = np.random.default_rng(9)
        rows = np.concatenate([variations(DIGITS[50], 30, rng), DIGITS[60:90]])
        rows = rows[rng.permutation(rows.shape[0])]
        hashes = FP(rows)
        state: bytes | None = None
        for i in range(hashes.shape[0]):
            state, verdict = detector.update_hashes(state, hashes[i : i + 1])
            earlier = hashes[max(0, i - 16) : i]
            expected = max((shared(hashes[i], e) for e in earlier), default=0)
            assert f"last_max_match={expected}" in verdict.detail, i

    def test_repeats_and_batches_match_brute_force(self) -> None:
        """Exact repeats (found by digest, within a batch or against live slots) and near ones
        give the brute-force best match, whether rows come one by one or in batches."""
        rng = np.random.default_rng(21)
        pool = np.concatenate([DIGITS[:6], variations(DIGITS[7], 6, rng)])
        rows = pool[rng.integers(0, pool.shape[0], 120)]
        hashes = FP(rows)
        for max_entries, batch in ((16, 1), (16, 7), (8, 32), (1024, 32)):
            detector = FingerprintDetector(FP, max_entries=max_entries)
            state: bytes | None = None
            for start in range(0, hashes.shape[0], batch):
                chunk = hashes[start : start + batch]
                state, verdict = detector.update_hashes(state, chunk)
                # Stored rows are the last max_entries before the batch; the batch's own
                # earlier rows all count.
                expected = max(
                    max(
                        [shared(chunk[i], e) for e in hashes[max(0, start - max_entries) : start]]
                        + [shared(chunk[i], chunk[j]) for j in range(i)],
                        default=0,
                    )
                    for i in range(chunk.shape[0])
                )
                assert f"last_max_match={expected}" in verdict.detail, (max_entries, batch, start)

    def test_a_client_repeating_one_input_scans_no_postings(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An exact repeat is matched by its digest: no posting of the earlier copies is read."""
        detector = FingerprintDetector(FP, max_entries=256)
        row = FP(DIGITS[30:31])
        state, _ = detector.update_hashes(None, np.repeat(row, 300, axis=0))
        expanded: list[int] = []
        original = fingerprint_module._expand

        def counting(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            expanded.append(int((hi - lo).sum()))
            return original(lo, hi)

        monkeypatch.setattr(fingerprint_module, "_expand", counting)
        _, verdict = detector.update_hashes(state, np.repeat(row, 32, axis=0))
        assert sum(expanded) == 0
        assert verdict.score == 1.0 and f"last_max_match={int((row != 0).sum())}" in verdict.detail

    def test_one_batch_equals_single_queries(self) -> None:
        detector = FingerprintDetector(FP)
        rows = np.concatenate([DIGITS[:100], line(DIGITS[1], DIGITS[2], 50)])
        single, _ = feed(detector, rows)
        batched, _ = feed(detector, rows, batch=rows.shape[0])
        assert single == batched

    def test_state_round_trips_and_foreign_state_starts_afresh(self) -> None:
        detector = FingerprintDetector(FP)
        rng = np.random.default_rng(10)
        rows = variations(DIGITS[3], 60, rng)
        state, _ = feed(detector, rows[:30])
        restored = bytes(bytearray(state))
        a, sa = feed(detector, rows[30:], state)
        b, sb = feed(detector, rows[30:], restored)
        assert a == b and sa == sb
        _, fresh = detector.update(b"garbage", Observation("c", 0.0, 1, raw=DIGITS[:1]))
        assert fresh.score == 0.0
        other = FingerprintDetector(FP, max_entries=100)
        assert other.update(state, Observation("c", 0.0, 0))[0] != state  # other caps: reset

    def test_state_stays_bounded(self) -> None:
        detector = FingerprintDetector(FP, max_entries=256)
        rows = np.random.default_rng(11).integers(0, 17, (10_000, 64)).astype(np.float64)
        state, _ = feed(detector, rows, batch=500)
        # 6 bytes per stored hash (32 bits and a slot), 8 per slot (its digest), and a header
        # with the history.
        assert len(state) <= 256 * 45 * 6 + 256 * 8 + 256
        assert len(state) >= 256 * 45 * 6  # the ring is full, not emptied

    def test_observation_without_raw_keeps_state(self) -> None:
        detector = FingerprintDetector(FP)
        state, _ = feed(detector, DIGITS[:10])
        again, verdict = detector.update(state, Observation("c", 1.0, 3))
        assert again == state and verdict.score == 0.0

    def test_rejects_bad_settings(self) -> None:
        with pytest.raises(ValueError):
            FingerprintDetector(FP, max_entries=70_000)
        with pytest.raises(ValueError):
            FingerprintDetector(FP, match_threshold=50)
        with pytest.raises(ValueError):
            FingerprintDetector(FP).update_hashes(None, np.zeros((2, 10), dtype=np.uint64))


async def run_clients(
    index: FingerprintIndex, sends: list[tuple[str, F64]], detector: CrossClientDetector
) -> dict[str, float]:
    """Send each (client, row) in order through the index and the detector; return final scores."""
    states: dict[str, bytes | None] = {}
    scores: dict[str, float] = {}
    for t, (client, row) in enumerate(sends):
        matches = await observe_all(index, client, FP(row[None, :]), float(t))
        states[client], verdict = detector.verdict(states.get(client), matches, float(t))
        scores[client] = verdict.score
    return scores


class TestCrossClient:
    """Sybil clients probing around one input are caught; benign clients sharing one input are not."""

    async def test_fifty_clients_sending_one_popular_input_do_not_trigger(self) -> None:
        index = MemoryFingerprintIndex()
        popular = DIGITS[42]
        sends = [(f"key:user{c}", popular) for _ in range(3) for c in range(50)]
        # ...mixed with their own natural queries.
        sends += [(f"key:user{c}", DIGITS[100 + 5 * c + k]) for k in range(5) for c in range(50)]
        scores = await run_clients(index, sends, CrossClientDetector())
        assert max(scores.values()) == 0.0

    async def test_ten_clients_probing_one_seed_trigger(self) -> None:
        index = MemoryFingerprintIndex()
        rng = np.random.default_rng(12)
        probes = variations(DIGITS[77], 300, rng)
        sends = [(f"key:sybil{i % 10}", probes[i]) for i in range(300)]
        scores = await run_clients(index, sends, CrossClientDetector())
        assert len(scores) == 10 and min(scores.values()) == 1.0

    async def test_own_queries_are_not_cross_client_matches(self) -> None:
        index = MemoryFingerprintIndex()
        rng = np.random.default_rng(13)
        answers = await observe_all(index, "key:solo", FP(variations(DIGITS[5], 50, rng)), 0.0)
        assert answers.max() == 0

    async def test_near_match_reported_identical_skipped(self) -> None:
        index = MemoryFingerprintIndex()
        base = DIGITS[10]
        nudged = base.copy()
        nudged[60] = np.clip(nudged[60] + 4, 0, 16)  # near the end: a few windows change
        await index.observe("a", FP(base[None])[0], 0.0)
        assert await index.observe("b", FP(base[None])[0], 1.0) == 0  # identical
        expected = shared(FP(base[None])[0], FP(nudged[None])[0])
        assert 25 < expected < 45
        assert await index.observe("c", FP(nudged[None])[0], 2.0) == expected

    async def test_a_client_repeating_one_input_does_not_slow_every_lookup(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        index = MemoryFingerprintIndex()
        base = DIGITS[20]
        row = FP(base[None])[0]
        for t in range(500):  # one client sends the same input 500 times
            await index.observe("key:repeater", row, float(t))
        expanded: list[int] = []
        original = fingerprint_module._expand

        def counting(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            expanded.append(int((hi - lo).sum()))
            return original(lo, hi)

        monkeypatch.setattr(fingerprint_module, "_expand", counting)
        nudged = base.copy()
        nudged[60] = np.clip(nudged[60] + 4, 0, 16)
        # Another client's near-duplicate is still found among the newest postings...
        assert await index.observe("key:other", FP(nudged[None])[0], 600.0) > 25
        # ...and the lookup read at most MAX_POSTINGS per hash, not all 500 repeats.
        assert sum(expanded) <= fingerprint_module.MAX_POSTINGS * row.size

    async def test_batches_and_tail_merges_match_brute_force(self) -> None:
        """Rows looked up a request at a time, across tail merges and segments, get the
        brute-force answer: the best non-identical match with an earlier query of another
        client."""
        rng = np.random.default_rng(16)
        seeds = DIGITS[rng.choice(DIGITS.shape[0], 20, replace=False)]
        rows = np.concatenate([variations(seed, 20, rng) for seed in seeds])
        rows = rows[rng.permutation(rows.shape[0])]
        hashes = FP(rows)
        senders: list[str] = []  # the client of each row sent so far
        single = MemoryFingerprintIndex(segment_queries=150)
        batched = MemoryFingerprintIndex(segment_queries=150)
        at = 0
        while at < hashes.shape[0]:
            size = int(rng.integers(1, 40))
            chunk = hashes[at : at + size]
            client = f"key:c{int(rng.integers(0, 7))}"
            answers = await observe_all(batched, client, chunk, float(at))
            for i, row in enumerate(chunk):
                expected = max(
                    (
                        shared(row, hashes[j])
                        for j in range(at)
                        if senders[j] != client and shared(row, hashes[j]) < (row != 0).sum()
                    ),
                    default=0,
                )
                assert answers[i] == expected, at + i
                assert single.observe_sync(client, row, float(at)) == expected, at + i
            senders.extend([client] * chunk.shape[0])
            at += size
        assert len(single) == len(batched) == int((hashes != 0).sum())

    async def test_ttl_and_max_queries_evict(self) -> None:
        rng = np.random.default_rng(14)
        rows = FP(variations(DIGITS[11], 2, rng, pixels=1))
        index = MemoryFingerprintIndex(ttl_s=60.0)
        await index.observe("a", rows[0], 0.0)
        assert await index.observe("b", rows[1], 61.0) == 0
        small = MemoryFingerprintIndex(max_queries=100, segment_queries=10)
        await small.observe("a", rows[0], 0.0)
        noise = FP(np.random.default_rng(15).integers(0, 17, (300, 64)).astype(np.float64))
        for i, row in enumerate(noise):
            await small.observe(f"n{i}", row, 1.0)
        assert await small.observe("b", rows[1], 2.0) == 0
        assert len(small) <= (100 + 10) * 45

    def test_detector_state_round_trips_and_is_small(self) -> None:
        detector = CrossClientDetector()
        state, _ = detector.verdict(None, np.full(10, 40), 0.0)
        twice, verdict = detector.verdict(state, np.full(10, 40), 1.0)
        assert len(twice) < 2 * HISTORY and verdict.score == 1.0
        assert verdict.reason == "cross_client_probing"
        _, low = detector.verdict(b"junk", np.zeros(100, dtype=np.int64), 2.0)
        assert low.score == 0.0
