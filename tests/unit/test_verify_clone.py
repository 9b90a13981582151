"""Ownership verification: clones of the marked demo model are caught, independent models are not.

Real training on scikit-learn's digits with fixed seeds (see ``tests/bench/power_curve.py`` for
the scenario and the full power curve with 20 null models; here 5 keep the suite fast).
"""

from __future__ import annotations

import numpy as np
import pytest

from extauthz.evidence.verify import combine_p_values, verify_label_marks
from tests.bench.power_curve import Scenario


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario()


class TestCloneVerdicts:
    """A soft-label clone of 2,000 answers and a 3-account pooled clone reach p < 1e-6."""

    def test_clone_of_2000_answers_is_verified(self, scenario: Scenario) -> None:
        verdict = scenario.clone_verdict(2000)
        assert verdict.combined < 1e-6
        assert verdict.soft.p_value < 1e-6
        assert verdict.soft.statistic > 5 * verdict.soft.null_rate
        assert verdict.label.n > 0 and verdict.soft.kid == "wm1"

    def test_pooled_accounts_clone_is_verified(self, scenario: Scenario) -> None:
        assert scenario.pooled_verdict().combined < 1e-6

    def test_independent_models_are_not_accused(self, scenario: Scenario) -> None:
        for verdict in scenario.null_verdicts(5):
            assert verdict.combined > 1e-3
            assert verdict.label.p_value > 1e-3 and verdict.soft.p_value > 1e-3


class TestLabelStatistic:
    """The label test rejects only a suspect that answers the keyed labels above chance."""

    def test_copied_labels_give_tiny_p_random_labels_do_not(self) -> None:
        rng = np.random.default_rng(0)
        targets = rng.integers(0, 10, size=40)
        decoys = rng.integers(0, 10, size=(200, 40))
        copied = verify_label_marks(targets, targets, 10, decoys=decoys)
        assert copied.statistic == 1.0 and copied.p_value < 1e-30
        assert copied.null_rate == pytest.approx(0.1, abs=0.02)
        independent = verify_label_marks(rng.integers(0, 10, size=40), targets, 10, decoys=decoys)
        assert independent.p_value > 1e-3

    def test_analytic_null_without_decoys(self) -> None:
        original = np.zeros(20, dtype=np.int64)
        evidence = verify_label_marks(original, np.ones(20), 10, original_labels=original)
        assert evidence.statistic == 0.0 and evidence.p_value == 1.0
        assert evidence.null_rate == pytest.approx(1 / 20 / 9)


class TestCombine:
    """Fisher's method: strong evidence survives a null companion; nulls stay null."""

    def test_fisher(self) -> None:
        assert combine_p_values([1e-9, 1.0]) < 1e-6
        assert combine_p_values([0.5, 0.5]) > 0.3
        assert combine_p_values([]) == 1.0
        assert combine_p_values([0.0]) > 0.0
