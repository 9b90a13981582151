"""Label marks and the soft mark: keyed, nested, deterministic, and cheap for benign clients."""

from __future__ import annotations

import numpy as np
import pytest

from extauthz.keys import KeyRing
from extauthz.protect.perturb import canonical_rows
from extauthz.protect.watermark import (
    CANONICAL_QUANTUM,
    MarkSettings,
    apply_label_marks,
    apply_soft_mark,
    mark_selection,
    marked_label,
    soft_key,
)

KEYS = KeyRing.single(b"unit-watermark-key-0123456789ab", "wm1")
QUANTUM = CANONICAL_QUANTUM


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(np.float64)


def _probs(n: int, k: int = 10, seed: int = 1) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, 3.0, size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class TestSelection:
    """Selection is a keyed number per whole input: nested tiers, jitter-proof, key-dependent."""

    def test_higher_rate_marks_a_superset(self) -> None:
        u, _ = mark_selection(KEYS, canonical_rows(_inputs(5000), quantum=QUANTUM))
        low, high = u < 0.005, u < 0.02
        assert low.sum() > 0
        assert np.all(high[low])
        assert high.sum() > low.sum()

    def test_whole_input_counts_not_a_prefix(self) -> None:
        x = _inputs(200)
        y = x.copy()
        y[:, -1] += 1.0  # only the last feature differs
        u, _ = mark_selection(KEYS, canonical_rows(x, quantum=QUANTUM))
        v, _ = mark_selection(KEYS, canonical_rows(y, quantum=QUANTUM))
        assert np.all(u != v)

    def test_jitter_and_int_spelling_select_the_same(self) -> None:
        x = _inputs(300)
        jittered = x + np.random.default_rng(3).uniform(-1e-5, 1e-5, size=x.shape)
        u, _ = mark_selection(KEYS, canonical_rows(x.astype(np.int64), quantum=QUANTUM))
        v, _ = mark_selection(KEYS, canonical_rows(jittered, quantum=QUANTUM))
        np.testing.assert_array_equal(u, v)

    def test_other_key_selects_other_inputs_and_kid_is_recorded(self) -> None:
        rotated = KeyRing(
            current_id="wm2", keys={**KEYS.keys, "wm2": b"another-key-9876543210zyxw"}
        )
        rows = canonical_rows(_inputs(2000), quantum=QUANTUM)
        u, kid = mark_selection(rotated, rows)
        old, old_kid = mark_selection(rotated, rows, kid="wm1")
        assert (kid, old_kid) == ("wm2", "wm1")
        np.testing.assert_array_equal(old, mark_selection(KEYS, rows)[0])
        assert np.corrcoef(u, old)[0, 1] < 0.1
        with pytest.raises(KeyError):
            mark_selection(KEYS, rows, kid="gone")


class TestLabelMarks:
    """Marked rows get a keyed other top-1 by a swap; unmarked rows are served unchanged."""

    def test_target_is_never_the_original_and_covers_the_others(self) -> None:
        rows = canonical_rows(_inputs(3000), quantum=QUANTUM)
        original = np.full(3000, 4)
        target = marked_label(KEYS, rows, 10, original)
        assert np.all(target != 4)
        assert set(np.unique(target)) == set(range(10)) - {4}

    def test_marked_rows_swap_unmarked_rows_stay(self) -> None:
        x, p = _inputs(4000), _probs(4000)
        marks = apply_label_marks(p, canonical_rows(x, quantum=QUANTUM), KEYS, 0.05)
        m = marks.marked
        assert 100 < m.sum() < 300
        np.testing.assert_array_equal(marks.served[~m], p[~m])
        np.testing.assert_array_equal(np.argmax(marks.served[m], axis=1), marks.targets[m])
        # Swapping keeps each row's values: it still looks like a model's answer.
        np.testing.assert_allclose(np.sort(marks.served, axis=1), np.sort(p, axis=1))
        assert marks.kid == "wm1"

    def test_benign_top1_change_share_is_the_rate_and_repeats_agree(self) -> None:
        settings = MarkSettings(label_rate=0.005)
        x, p = _inputs(10_000, seed=9), _probs(10_000, seed=10)

        def serve(batch: np.ndarray, probs: np.ndarray) -> np.ndarray:
            soft = apply_soft_mark(probs, batch, KEYS, settings.soft_epsilon)
            rows = canonical_rows(batch, quantum=QUANTUM)
            return apply_label_marks(soft, rows, KEYS, settings.label_rate).served

        served = serve(x, p)
        changed = float(np.mean(np.argmax(served, axis=1) != np.argmax(p, axis=1)))
        assert abs(changed - settings.label_rate) <= 0.003
        # The same inputs, asked again in another order, get the same answers.
        order = np.random.default_rng(2).permutation(10_000)
        np.testing.assert_array_equal(serve(x[order], p[order]), served[order])


class TestSoftMark:
    """The soft mark adds a keyed cosine to one class, keeps top-1 and keeps rows distributions."""

    def test_keeps_top1_and_sums(self) -> None:
        x, p = _inputs(3000), _probs(3000)
        q = apply_soft_mark(p, x, KEYS, 0.1)
        np.testing.assert_array_equal(np.argmax(q, axis=1), np.argmax(p, axis=1))
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
        assert np.all(q >= 0.0)

    def test_bump_follows_the_key_cosine(self) -> None:
        x = _inputs(2000)
        key = soft_key(KEYS, 10, 64)
        p = np.full((2000, 10), 0.09)
        p[:, (key.target_class + 1) % 10] = 0.19  # a top-1 the bump never overtakes
        q = apply_soft_mark(p, x, KEYS, 0.05)
        bump = 0.05 * (1 + np.cos(key.frequency * x @ key.direction))
        np.testing.assert_allclose(q[:, key.target_class], (0.09 + bump) / (1 + bump))
        assert 0.2 <= key.frequency <= 0.35
        assert np.isclose(np.linalg.norm(key.direction), 1.0)

    def test_zero_epsilon_serves_unchanged(self) -> None:
        p = _probs(50)
        np.testing.assert_array_equal(apply_soft_mark(p, _inputs(50), KEYS, 0.0), p)
