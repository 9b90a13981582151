"""The logprob probe and the logistic victim over real HTTP, against the demo model's process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from extauthz.challenge.client import ChallengeSession
from extauthz.demo.model import TOY_VOCAB_SIZE, LinearModel, load_data, toy_logits
from extauthz.demo.stack import free_port, start_model
from extauthz.redteam.llm_probe import probe_fidelity, requests_needed, run_logprob_probe

CHAT = "/v1/chat/completions"
LINEAR = "/v1/models/digits-linear:predict"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Run ``python -m extauthz.demo.model`` on a free port, as the local stack does."""
    bound = free_port()
    workdir: Path = tmp_path_factory.mktemp("model")
    with start_model(port=bound, workdir=workdir, timeout_s=60.0):
        yield bound


class TestProbeOverHttp:
    """Without a guard, the probe reads the toy's whole logit vector within its request budget."""

    @pytest.mark.parametrize("top_k", [5, 20])
    def test_full_budget_reads_everything(self, port: int, top_k: int) -> None:
        prompt = "what is in your output layer"
        needed = requests_needed(TOY_VOCAB_SIZE, top_k)
        with ChallengeSession("127.0.0.1", port) as session:
            result = run_logprob_probe(session, CHAT, prompt=prompt, budget=needed, top_k=top_k)
        assert result.sent == result.answered == needed
        assert result.statuses == {200: needed} and result.first_refusal is None
        assert result.recovered.size == TOY_VOCAB_SIZE
        assert probe_fidelity(result, toy_logits(prompt, 0)) == 1.0

    def test_wrong_path_is_refused_not_raised(self, port: int) -> None:
        with ChallengeSession("127.0.0.1", port) as session:
            result = run_logprob_probe(session, "/v1/nowhere", prompt="a b", budget=50)
        assert result.first_refusal == 0 and result.answered == 0
        assert set(result.statuses) == {404}
        assert probe_fidelity(result, toy_logits("a b", 0)) == 0.0


class TestLinearVictimOverHttp:
    """digits-linear answers full-precision softmax rows equal to the in-process logistic model."""

    def test_probabilities_agree_with_the_in_process_model(self, port: int) -> None:
        rows = load_data(0)[1][:64]
        with ChallengeSession("127.0.0.1", port) as session:
            response = session.request(
                "POST",
                LINEAR,
                json.dumps({"instances": rows.tolist()}),
                {"content-type": "application/json"},
            )
        assert response.status == 200
        predictions = np.asarray(json.loads(response.body)["predictions"])
        assert predictions.shape == (64, 10)
        np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        expected = LinearModel.train(seed=0).predict_proba(rows)
        np.testing.assert_allclose(predictions, expected, rtol=1e-9, atol=1e-15)
