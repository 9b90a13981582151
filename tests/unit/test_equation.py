"""Tests for the red team's equation-solving attack on a logistic model (Tramèr et al. 2016)."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from extauthz.demo.model import FEATURE_MAX, N_CLASSES, N_FEATURES, load_data
from extauthz.redteam.clone import accuracy, fidelity
from extauthz.redteam.equation import (
    EXACT_QUERIES,
    EquationSolvingAttacker,
    LinearClone,
    solve_logistic,
)
from extauthz.redteam.traffic import QuerySource

FloatArray = npt.NDArray[np.float64]


@cache
def _victim() -> Any:
    """Return an sklearn LogisticRegression fitted on the digits as the victim sees them."""
    from sklearn.linear_model import LogisticRegression

    x_train, _, y_train, _ = load_data()
    return LogisticRegression(max_iter=1000).fit(x_train / FEATURE_MAX, y_train)


def _x_test() -> FloatArray:
    return load_data()[1]


def _answers(x: FloatArray) -> FloatArray:
    proba: FloatArray = np.asarray(_victim().predict_proba(x / FEATURE_MAX), dtype=np.float64)
    return proba


def _victim_labels(x: npt.ArrayLike) -> npt.NDArray[np.int64]:
    rows = np.asarray(x, dtype=np.float64)
    return np.asarray(_victim().predict(rows / FEATURE_MAX), dtype=np.int64)


def _attack(answer: Any, n: int = EXACT_QUERIES, seed: int = 0) -> EquationSolvingAttacker:
    """Run the attacker for ``n`` queries, answering each batch with ``answer(probabilities)``."""
    attacker = EquationSolvingAttacker(rng=np.random.default_rng(seed))
    queries = attacker.next_batch(n)
    attacker.observe(queries, answer(_answers(queries)))
    return attacker


def _agreement(clone: LinearClone) -> float:
    x = _x_test()
    return float(np.mean(clone.predict(x) == _victim_labels(x)))


class TestExactScores:
    """From 65 exact answers to uniform queries the clone is the victim, up to rounding error."""

    def test_recovers_weight_and_bias_differences(self) -> None:
        clone = _attack(lambda p: p).solve()
        victim = _victim()
        np.testing.assert_allclose(clone.W, victim.coef_ - victim.coef_[0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            clone.b, victim.intercept_ - victim.intercept_[0], atol=1e-6, rtol=0
        )
        assert clone.W.shape == (N_CLASSES, N_FEATURES)
        assert clone.rank == N_FEATURES + 1
        assert clone.trained_on == EXACT_QUERIES and clone.dropped == 0

    def test_agrees_with_victim_on_every_held_out_digit(self) -> None:
        clone = _attack(lambda p: p).solve()
        assert _agreement(clone) == 1.0

    def test_probabilities_match_the_victim(self) -> None:
        clone = _attack(lambda p: p).solve()
        x = _x_test()
        np.testing.assert_allclose(clone.predict_proba(x), _answers(x), atol=1e-9)

    def test_residual_is_tiny_when_overdetermined(self) -> None:
        clone = _attack(lambda p: p, n=200).solve()
        assert clone.residual < 1e-9

    def test_too_few_queries_give_an_underdetermined_fit(self) -> None:
        clone = _attack(lambda p: p, n=30).solve()
        assert clone.rank == 30
        assert _agreement(clone) < 1.0


class TestRoundedScores:
    """Scores rounded to 2 decimals (zeros included) still give a clone, a worse one."""

    def test_rounded_answers_lower_fidelity(self) -> None:
        clone = _attack(lambda p: np.round(p, 2)).solve()
        assert np.isfinite(clone.W).all() and np.isfinite(clone.b).all()
        assert _agreement(clone) < 1.0

    def test_more_rounded_answers_help_and_residual_flags_them(self) -> None:
        few = _attack(lambda p: np.round(p, 2)).solve()
        many = _attack(lambda p: np.round(p, 2), n=1000).solve()
        assert _agreement(many) > _agreement(few)
        # Overdetermined, the fit cannot absorb the rounding: the residual is far from zero.
        assert many.residual > 1.0
        assert _attack(lambda p: p, n=1000).solve().residual < 1e-9


class TestDegradedAnswers:
    """Labels, top-1 truncation and broken rows never crash the solver."""

    def test_label_only_answers_give_a_crude_clone(self) -> None:
        attacker = _attack(lambda p: np.argmax(p, axis=1), n=1000)
        assert not attacker.scores_seen
        assert attacker.labelled == 1000 and attacker.scored == 0
        clone = attacker.solve(n_classes=N_CLASSES)
        predicted = clone.predict(_x_test())
        assert predicted.shape == (_x_test().shape[0],)
        assert ((predicted >= 0) & (predicted < N_CLASSES)).all()
        assert clone.residual > 1.0
        assert _agreement(clone) < 1.0

    def test_label_only_classes_default_to_largest_label(self) -> None:
        clone = solve_logistic(np.eye(3, N_FEATURES), np.array([0, 2, 1]))
        assert clone.W.shape == (3, N_FEATURES)

    def test_top1_truncated_answers_solve(self) -> None:
        def top1(p: FloatArray) -> FloatArray:
            kept = np.zeros_like(p)
            rows = np.arange(p.shape[0])
            kept[rows, p.argmax(axis=1)] = p[rows, p.argmax(axis=1)]
            return kept

        clone = _attack(top1, n=300).solve()
        assert np.isfinite(clone.W).all()
        assert clone.dropped == 0

    def test_invalid_rows_are_dropped(self) -> None:
        attacker = EquationSolvingAttacker(rng=np.random.default_rng(1))
        queries = attacker.next_batch(EXACT_QUERIES + 3)
        answers = _answers(queries)
        answers[0, 3] = np.nan
        answers[1, 5] = -0.2
        answers[2] = 0.0
        attacker.observe(queries, answers)
        clone = attacker.solve()
        assert clone.dropped == 3 and clone.trained_on == EXACT_QUERIES
        assert _agreement(clone) == 1.0

    def test_unnormalized_scores_solve_exactly(self) -> None:
        queries = EquationSolvingAttacker(rng=np.random.default_rng(2)).next_batch(EXACT_QUERIES)
        clone = solve_logistic(queries, 3.0 * _answers(queries))
        victim = _victim()
        np.testing.assert_allclose(clone.W, victim.coef_ - victim.coef_[0], atol=1e-6, rtol=0)

    def test_no_usable_row_raises(self) -> None:
        with pytest.raises(ValueError, match="usable probability vector"):
            solve_logistic(np.ones((2, N_FEATURES)), np.zeros((2, N_CLASSES)))

    def test_scores_win_over_labels_when_both_seen(self) -> None:
        attacker = _attack(lambda p: p)
        extra = attacker.next_batch(50)
        attacker.observe(extra, np.argmax(_answers(extra), axis=1))
        assert attacker.scores_seen and attacker.scored == EXACT_QUERIES
        assert attacker.labelled == 50
        assert _agreement(attacker.solve()) == 1.0


class TestCloneInterface:
    """The solved model scores like any red-team clone."""

    def test_as_clone_predicts_like_the_linear_clone(self) -> None:
        linear = _attack(lambda p: np.round(p, 2), n=200).solve()
        clone = linear.as_clone()
        x = _x_test()
        np.testing.assert_array_equal(clone.predict(x), linear.predict(x))
        assert clone.trained_on == linear.trained_on

    def test_fidelity_and_accuracy_of_the_exact_clone(self) -> None:
        clone = _attack(lambda p: p).solve().as_clone()
        _, x_test, _, y_test = load_data()
        assert fidelity(clone, _victim_labels, x_test) == 1.0
        victim_accuracy = float(np.mean(_victim_labels(x_test) == y_test))
        assert accuracy(clone, x_test, y_test) == victim_accuracy

    def test_attacker_is_a_query_source(self) -> None:
        source: QuerySource = EquationSolvingAttacker(rng=np.random.default_rng(0))
        assert source.next_batch(2).shape == (2, N_FEATURES)


class TestValidation:
    """Bad shapes raise ValueError saying what was expected; queries are reproducible."""

    def test_next_batch_is_deterministic_and_inside_the_box(self) -> None:
        first = EquationSolvingAttacker(rng=np.random.default_rng(7)).next_batch(500)
        second = EquationSolvingAttacker(rng=np.random.default_rng(7)).next_batch(500)
        np.testing.assert_array_equal(first, second)
        assert first.shape == (500, N_FEATURES) and first.dtype == np.float64
        assert first.min() >= 0.0 and first.max() <= FEATURE_MAX
        other = EquationSolvingAttacker(rng=np.random.default_rng(8)).next_batch(500)
        assert not np.array_equal(first, other)

    def test_next_batch_rejects_negative_n(self) -> None:
        attacker = EquationSolvingAttacker(rng=np.random.default_rng(0))
        assert attacker.next_batch(0).shape == (0, N_FEATURES)
        with pytest.raises(ValueError, match="n must be >= 0"):
            attacker.next_batch(-1)

    def test_observe_rejects_wrong_input_width(self) -> None:
        attacker = EquationSolvingAttacker(rng=np.random.default_rng(0))
        with pytest.raises(ValueError, match=r"inputs must have shape \(n, 64\)"):
            attacker.observe(np.zeros((3, 10)), np.full((3, 2), 0.5))

    def test_observe_rejects_answers_of_another_length(self) -> None:
        attacker = EquationSolvingAttacker(rng=np.random.default_rng(0))
        with pytest.raises(ValueError, match=r"expected answers of shape \(3, classes >= 2\)"):
            attacker.observe(attacker.next_batch(3), np.full((4, 10), 0.1))

    def test_observe_rejects_a_change_of_class_count(self) -> None:
        attacker = EquationSolvingAttacker(rng=np.random.default_rng(0))
        attacker.observe(attacker.next_batch(2), np.full((2, 10), 0.1))
        with pytest.raises(ValueError, match="hold 3 classes, earlier ones 10"):
            attacker.observe(attacker.next_batch(2), np.full((2, 3), 1 / 3))

    def test_labels_must_be_class_indices(self) -> None:
        with pytest.raises(ValueError, match="non-negative integers"):
            solve_logistic(np.zeros((2, N_FEATURES)), np.array([0.5, 1.0]))
        with pytest.raises(ValueError, match="largest label"):
            solve_logistic(np.zeros((2, N_FEATURES)), np.array([0, 4]), n_classes=3)

    def test_solve_rejects_mismatched_shapes(self) -> None:
        with pytest.raises(ValueError, match=r"x must have shape \(n, features\)"):
            solve_logistic(np.zeros(N_FEATURES), np.full((1, 10), 0.1))
        with pytest.raises(ValueError, match="NaN or infinite"):
            solve_logistic(np.full((1, N_FEATURES), np.nan), np.full((1, 10), 0.1))
        with pytest.raises(ValueError, match="n_classes=5 but the answers hold 10"):
            solve_logistic(np.zeros((1, N_FEATURES)), np.full((1, 10), 0.1), n_classes=5)
        with pytest.raises(ValueError, match="feature_max"):
            solve_logistic(np.zeros((1, N_FEATURES)), np.full((1, 10), 0.1), feature_max=0.0)

    def test_clone_rejects_inputs_of_another_width(self) -> None:
        clone = _attack(lambda p: p).solve()
        with pytest.raises(ValueError, match=r"x must have shape \(n, 64\)"):
            clone.predict(np.zeros((2, 10)))

    def test_solve_before_any_answer_raises(self) -> None:
        with pytest.raises(ValueError, match="no answers observed yet"):
            EquationSolvingAttacker(rng=np.random.default_rng(0)).solve()
