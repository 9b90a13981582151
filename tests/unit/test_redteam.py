"""Unit tests of the red team's clone training and report rendering (no sockets)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from extauthz.demo.model import DemoModel
from extauthz.redteam.attacks import AttackResult, attack_split, make_source
from extauthz.redteam.clone import CloneKind, accuracy, fidelity, labels_of, train_clone
from extauthz.redteam.report import (
    AttackReport,
    BenignReport,
    RunReport,
    document,
    evaluate,
    to_json,
    to_table,
)


@pytest.fixture(scope="module")
def victim() -> DemoModel:
    return DemoModel.train(seed=0)


def _knockoff(n: int, seed: int) -> np.ndarray:
    pool, _, _ = attack_split(0)
    return make_source("knockoff", pool, np.random.default_rng(seed)).next_batch(n)


class TestCloneTraining:
    """A clone trained on the victim's answers agrees with it more as answers grow."""

    @pytest.mark.parametrize("kind", ["softmax", "mlp"])
    def test_fidelity_rises_with_answers(self, victim: DemoModel, kind: CloneKind) -> None:
        _, x_eval, y_eval = attack_split(0)
        x = _knockoff(1000, seed=1)
        answers = victim.predict_proba(x)
        few = train_clone(x[:20], answers[:20], kind, seed=0)
        many = train_clone(x, answers, kind, seed=0)
        low = fidelity(few, victim.predict_proba, x_eval)
        high = fidelity(many, victim.predict_proba, x_eval)
        assert high > 0.85
        assert high > low + 0.1
        assert accuracy(many, x_eval, y_eval) > 0.8

    def test_labels_and_scores_train_the_same_clone(self, victim: DemoModel) -> None:
        x = _knockoff(300, seed=2)
        proba = victim.predict_proba(x)
        by_scores = train_clone(x, proba, "softmax", seed=0)
        by_labels = train_clone(x, proba.argmax(axis=1), "softmax", seed=0)
        assert np.array_equal(by_scores.predict(x), by_labels.predict(x))

    def test_one_class_gives_a_constant_clone(self) -> None:
        x = _knockoff(10, seed=3)
        clone = train_clone(x, np.full(10, 7), "mlp", seed=0)
        assert clone.predict(x).tolist() == [7] * 10

    def test_mismatched_or_empty_answers_are_refused(self) -> None:
        x = _knockoff(5, seed=4)
        with pytest.raises(ValueError, match="answers"):
            train_clone(x, np.zeros(4), "softmax", seed=0)
        with pytest.raises(ValueError, match="no answers"):
            train_clone(x[:0], np.zeros(0), "softmax", seed=0)

    def test_labels_of_reads_scores_and_labels(self) -> None:
        assert labels_of([[0.1, 0.9], [0.8, 0.2]]).tolist() == [1, 0]
        assert labels_of([3, 4]).tolist() == [3, 4]
        with pytest.raises(ValueError):
            labels_of(np.zeros((2, 2, 2)))


class TestAttackSplit:
    """The attacker's pool and the evaluation set are disjoint halves of the held-out digits."""

    def test_halves_are_disjoint(self) -> None:
        pool, x_eval, y_eval = attack_split(0)
        assert x_eval.shape[0] == y_eval.shape[0]
        joined = {row.tobytes() for row in pool} & {row.tobytes() for row in x_eval}
        assert not joined

    def test_unknown_attack_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown attack"):
            make_source("nope", attack_split(0)[0], np.random.default_rng(0))


def _result(answered: int, victim: DemoModel, attack: str = "knockoff") -> AttackResult:
    x = _knockoff(answered, seed=5)
    scores = victim.predict_proba(x) if answered else np.empty((0, 10))
    return AttackResult(
        attack=attack,
        identities=2,
        sent=answered + 50,
        answered=answered,
        first_refusal=answered if answered else 0,
        first_refusal_by_identity=(answered, None),
        work_s=0.25,
        challenges=1,
        statuses={200: 1},
        inputs=x,
        labels=scores.argmax(axis=1),
        scores=scores,
        sent_before=np.arange(answered, dtype=np.int64) // 50 * 50,
    )


def _doc(*runs: RunReport) -> dict[str, object]:
    return document(
        runs, started="2026-11-28T00:00:00Z", seed=0, budget=450, batch=50, dialect="kserve_v1"
    )


class TestReport:
    """Reports carry every field as JSON and as a table, with no scores when nothing was answered."""

    def test_json_has_every_field(self, victim: DemoModel) -> None:
        _, x_eval, y_eval = attack_split(0)
        truth = victim.predict_proba(x_eval).argmax(axis=1)
        report = evaluate(_result(400, victim), x_eval, y_eval, truth)
        doc = json.loads(to_json(_doc(RunReport("r", "http://x", [report]))))
        row = doc["runs"][0]["attacks"][0]
        assert doc["version"] == 2
        assert set(row) == set(AttackReport.__dataclass_fields__)
        assert row["sent"] == 450 and row["answered"] == 400 and row["first_refusal"] == 400
        assert row["fidelity_softmax"] > 0.8 and row["fidelity_mlp"] > 0.8
        assert row["fidelity"] == max(row["fidelity_softmax"], row["fidelity_mlp"])

    def test_curve_rises_with_the_answers_trained_on(self, victim: DemoModel) -> None:
        _, x_eval, y_eval = attack_split(0)
        truth = victim.predict_proba(x_eval).argmax(axis=1)
        curve = evaluate(_result(400, victim), x_eval, y_eval, truth).curve
        assert [p["answered"] for p in curve] == sorted(p["answered"] for p in curve)
        assert curve[-1]["answered"] == 400 and curve[0]["answered"] <= 100
        assert curve[-1]["fidelity"] > curve[0]["fidelity"]

    def test_equation_solving_clone_comes_from_the_scores(self, victim: DemoModel) -> None:
        _, x_eval, y_eval = attack_split(0)
        truth = victim.predict_proba(x_eval).argmax(axis=1)
        report = evaluate(_result(200, victim, "equation"), x_eval, y_eval, truth)
        # A logistic model solved from an MLP's probabilities: usable but not exact.
        assert report.fidelity_softmax is not None and 0.5 < report.fidelity_softmax < 1.0

    def test_no_answers_no_scores(self, victim: DemoModel) -> None:
        _, x_eval, y_eval = attack_split(0)
        report = evaluate(_result(0, victim), x_eval, y_eval, None)
        assert report.fidelity_mlp is None and report.accuracy_softmax is None
        assert report.curve == [] and report.watermark is None
        table = to_table(_doc(RunReport("solo", "http://x", [report])))
        lines = table.splitlines()
        assert lines[0].startswith("solo") and lines[1].split()[0] == "attack"
        assert "knockoff (K=2)" in lines[2] and " -" in lines[2]

    def test_no_reference_leaves_fidelity_out_but_scores_accuracy(self, victim: DemoModel) -> None:
        _, x_eval, y_eval = attack_split(0)
        report = evaluate(_result(200, victim), x_eval, y_eval, None)
        assert report.fidelity_softmax is None and report.fidelity is None
        assert report.accuracy_softmax is not None and report.accuracy_softmax > 0.5

    def test_side_by_side_table_shows_the_drop(self, victim: DemoModel) -> None:
        _, x_eval, y_eval = attack_split(0)
        truth = victim.predict_proba(x_eval).argmax(axis=1)
        full = evaluate(_result(400, victim), x_eval, y_eval, truth)
        few = evaluate(_result(20, victim), x_eval, y_eval, truth)
        benign = BenignReport(5, 100, 100, 0, 0, 0.02, {"200": 20})
        table = to_table(
            _doc(
                RunReport("open", "http://a", [full], benign),
                RunReport("guarded", "http://b", [few]),
            )
        )
        header, row = table.splitlines()[1:3]
        assert "fidelity open" in header and "fidelity guarded" in header
        drop = int(row.split()[4])
        assert drop == round((full.fidelity - few.fidelity) * 100)  # type: ignore[operator]
        assert drop > 5
        assert "benign clients" in table and "2.00%" in table
