"""The misinformation mark: a clone that learned the key's wrong classes is convicted; honest,
confused and random models are not."""

from __future__ import annotations

import numpy as np
import pytest

from extauthz.evidence.verify import verify_misinformation
from extauthz.protect.perturb import wrong_classes

KEY = b"m" * 32
CLASSES = 10


def _model_labels(n: int = 2000) -> np.ndarray:
    return np.random.default_rng(0).integers(CLASSES, size=n)


class TestMisinformationMark:
    """The key's map against the suspect's answers, exact under the null: strong for clones,
    never more than one class's worth of evidence for an honest confusion."""

    def test_clone_of_misinformed_answers_is_convicted(self) -> None:
        model = _model_labels()
        clone = wrong_classes(KEY, CLASSES)[model]
        honest_share = np.random.default_rng(1).random(model.size) < 0.35
        clone[honest_share] = model[honest_share]  # answered truthfully before detection
        evidence = verify_misinformation(clone, model, KEY, CLASSES)
        assert evidence.statistic == np.mean(clone != model) and evidence.n == model.size
        # every class picked its key's column: (1/9)^10
        assert evidence.p_value == pytest.approx((1 / 9) ** 10, rel=1e-9)

    def test_a_clone_that_learned_four_classes_is_weighed_by_those(self) -> None:
        model = _model_labels()
        wrong = wrong_classes(KEY, CLASSES)
        clone = model.copy()
        learned = np.isin(model, [1, 4, 6, 8]) & (np.random.default_rng(2).random(model.size) < 0.7)
        clone[learned] = wrong[model[learned]]
        evidence = verify_misinformation(clone, model, KEY, CLASSES)
        # the per-class majority test said P(Binomial(10, 1/9) >= 4) = 0.016
        assert evidence.p_value == pytest.approx((1 / 9) ** 4, rel=1e-9)

    def test_honest_model_never_matches(self) -> None:
        model = _model_labels()
        evidence = verify_misinformation(model, model, KEY, CLASSES)
        assert evidence.statistic == 0.0 and evidence.p_value == 1.0

    def test_a_confused_pair_is_one_class_not_a_verdict(self) -> None:
        model = _model_labels()
        wrong = wrong_classes(KEY, CLASSES)
        suspect = model.copy()
        # The honest model confuses class 3 exactly as the key's map happens to.
        suspect[model == 3] = wrong[3]
        evidence = verify_misinformation(suspect, model, KEY, CLASSES)
        assert evidence.statistic == np.mean(model == 3)
        assert evidence.p_value == pytest.approx(1 / (CLASSES - 1))

    def test_another_key_is_chance(self) -> None:
        model = _model_labels()
        clone = wrong_classes(b"o" * 32, CLASSES)[model]
        evidence = verify_misinformation(clone, model, KEY, CLASSES)
        assert evidence.p_value > 1e-3

    def test_sparse_classes_are_skipped(self) -> None:
        model = np.array([0, 0, 1])
        evidence = verify_misinformation(model, model, KEY, CLASSES)
        assert evidence.n == 0 and evidence.p_value == 1.0

    def test_p_values_of_unrelated_clones_are_calibrated(self) -> None:
        model = _model_labels(500)
        ps = np.array(
            [
                verify_misinformation(
                    wrong_classes(b"other-%d" % i, CLASSES)[model], model, KEY, CLASSES
                ).p_value
                for i in range(300)
            ]
        )
        for alpha in (0.01, 0.05, 0.2):
            assert np.mean(ps <= alpha) <= alpha * 1.5 + 0.01
