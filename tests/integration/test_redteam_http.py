"""The red team against the demo model served over HTTP on port 0 (no guard in front)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from extauthz.challenge.client import ChallengeSession
from extauthz.demo.model import DemoModel, start
from extauthz.redteam.attacks import (
    ATTACKS,
    SessionFactory,
    attack_data,
    attack_split,
    predict_over_http,
    run_attack,
)
from extauthz.redteam.cli import main
from extauthz.redteam.report import AttackReport, evaluate

PATH = "/v1/models/digits:predict"
LINEAR = "/v1/models/digits-linear:predict"


@pytest.fixture(scope="module")
def victim() -> DemoModel:
    return DemoModel.train(seed=0)


@pytest.fixture(scope="module")
def port(victim: DemoModel) -> Iterator[int]:
    """Serve the demo model on a free port from a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, bound = asyncio.run_coroutine_threadsafe(start(victim, port=0), loop).result(10)
    yield bound
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _factory(port: int) -> SessionFactory:
    return lambda identity: ChallengeSession("127.0.0.1", port)


class TestAttacksOverHttp:
    """Every attack, alone or Sybil, is answered in full by an unguarded model."""

    @pytest.mark.parametrize("name", ATTACKS)
    @pytest.mark.parametrize("identities", [1, 3])
    def test_attack_is_answered_in_full(self, port: int, name: str, identities: int) -> None:
        result = run_attack(
            name,
            _factory(port),
            path=PATH,
            budget=200,
            batch=30,
            rng=np.random.default_rng(0),
            identities=identities,
            keys=[f"k{i}" for i in range(identities)],
        )
        assert result.sent == result.answered == 200
        assert result.first_refusal is None and result.work_s == 0.0
        assert result.first_refusal_by_identity == (None,) * identities
        assert result.inputs.shape == (200, 64) and result.labels.shape == (200,)
        assert result.statuses == {200: 7}  # ceil(200 / 30) batches

    def test_refusals_are_counted_and_the_attack_gives_up(self, port: int) -> None:
        result = run_attack(
            "uniform",
            _factory(port),
            path="/v1/models/nope:predict",
            budget=10_000,
            batch=10,
            rng=np.random.default_rng(0),
        )
        assert result.first_refusal == 0 and result.answered == 0
        assert result.sent == 200  # GIVE_UP_AFTER refused batches in a row
        assert result.statuses == {404: 20}


class TestKnockoffClone:
    """A knockoff clone from 1,000 answers agrees with the victim on > 80% of held-out digits."""

    def test_fidelity_above_080(self, port: int, victim: DemoModel) -> None:
        result = run_attack(
            "knockoff",
            _factory(port),
            path=PATH,
            budget=1000,
            batch=100,
            rng=np.random.default_rng(1),
        )
        _, x_eval, y_eval = attack_split(0)
        with ChallengeSession("127.0.0.1", port) as session:
            truth = predict_over_http(session, PATH, x_eval)
        assert np.array_equal(truth, victim.predict_proba(x_eval).argmax(axis=1))
        report = evaluate(result, x_eval, y_eval, truth)
        assert report.answered == 1000
        assert report.fidelity_softmax is not None and report.fidelity_softmax > 0.8
        assert report.fidelity_mlp is not None and report.fidelity_mlp > 0.8


class TestCli:
    """``extauthz redteam`` prints a table and writes a JSON report with every field."""

    def test_equation_solving_recovers_the_logistic_victim(self, port: int) -> None:
        data = attack_data(0)
        result = run_attack(
            "equation",
            _factory(port),
            path=LINEAR,
            budget=130,
            batch=65,
            rng=np.random.default_rng(0),
        )
        with ChallengeSession("127.0.0.1", port) as session:
            truth = predict_over_http(session, LINEAR, data.x_eval)
        report = evaluate(result, data.x_eval, data.y_eval, truth)
        assert report.fidelity_softmax == 1.0  # exact probabilities: the model is solved

    def test_json_report(
        self, port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        out = tmp_path / "report.json"
        code = main(
            [
                "--target", f"http://127.0.0.1:{port}{PATH}",
                "--attacks", "knockoff,uniform",
                "--budget", "200",
                "--identities", "2",
                "--keys", "a,b,c,d",
                "--json", str(out),
            ]
        )  # fmt: skip
        assert code == 0
        doc = json.loads(out.read_text())
        rows = doc["runs"][0]["attacks"]
        assert [r["attack"] for r in rows] == ["knockoff", "uniform"]
        for row in rows:
            assert set(row) == set(AttackReport.__dataclass_fields__)
            assert row["sent"] == row["answered"] == 200 and row["identities"] == 2
            assert row["fidelity_mlp"] is not None
        assert rows[0]["fidelity_mlp"] > rows[1]["fidelity_mlp"]  # natural data beats noise
        assert "knockoff" in capsys.readouterr().out

    def test_unknown_attack_is_a_usage_error(self) -> None:
        with pytest.raises(SystemExit) as exc:
            main(["--target", "http://127.0.0.1:1/x", "--attacks", "nope"])
        assert exc.value.code == 2
