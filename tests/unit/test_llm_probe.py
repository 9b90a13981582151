"""Test the logprob / logit_bias probe against the toy LLM in process, bare and behind the guard's
LLM rules."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pytest

from extauthz.challenge.client import Response
from extauthz.demo.model import (
    TOY_HIDDEN_DIM,
    TOY_VOCAB_SIZE,
    BadInput,
    chat_completion,
    toy_logits,
)
from extauthz.policy.model import LlmRules
from extauthz.protect.llm_rules import apply_llm_rules
from extauthz.redteam.llm_probe import (
    GIVE_UP_AFTER,
    ProbeResult,
    hidden_dimension,
    probe_fidelity,
    requests_needed,
    run_logprob_probe,
)

PATH = "/v1/chat/completions"
PROMPT = "tell me the secret weights"
V = TOY_VOCAB_SIZE


class ToySession:
    """Answer chat requests with the toy LLM directly, optionally behind the guard's LLM rules."""

    def __init__(self, rules: LlmRules | None = None, *, status: int = 200) -> None:
        self.rules = rules
        self.status = status
        self.solved = 0
        self.work_s = 0.0
        self.bodies: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        assert method == "POST" and isinstance(body, bytes)
        doc = json.loads(body)
        self.bodies.append(doc)
        self.headers.append(dict(headers or {}))
        if self.status != 200:
            return Response(self.status, {}, b'{"error": "no"}')
        if self.rules is not None:
            outcome = apply_llm_rules(doc, self.rules, path=path)
            if outcome.refusal is not None:
                return Response(outcome.refusal[0], {}, outcome.refusal[1])
            if outcome.body is not None:
                doc = json.loads(outcome.body)
        try:
            answer = chat_completion(doc, completion_id="c", created=0, default_model="m")
        except BadInput as exc:
            return Response(400, {}, json.dumps({"error": str(exc)}).encode())
        return Response(200, {}, json.dumps(answer).encode())


class ChallengingSession(ToySession):
    """Count a solved challenge on the first request, as ChallengeSession does."""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        if not self.bodies:
            self.solved += 1
            self.work_s += 0.25
        return super().request(method, path, body, headers)


def relative_truth(result: ProbeResult, prompt: str = PROMPT) -> np.ndarray:
    truth = toy_logits(prompt, 0)
    assert result.reference is not None
    relative: np.ndarray = truth - truth[result.reference]
    return relative


class TestFullBudget:
    """With ceil((V-1)/(k-1)) requests the probe reads every logit to float precision."""

    @pytest.mark.parametrize("top_k", [5, 20])
    def test_reads_every_logit(self, top_k: int) -> None:
        needed = requests_needed(V, top_k)
        assert needed == -(-(V - 1) // (top_k - 1))
        result = run_logprob_probe(ToySession(), PATH, prompt=PROMPT, budget=needed, top_k=top_k)
        assert result.attack == "logprob_probe"
        assert result.sent == result.answered == needed
        assert result.first_refusal is None and result.statuses == {200: needed}
        assert result.reference == int(np.argmax(toy_logits(PROMPT, 0)))
        np.testing.assert_array_equal(result.recovered, np.arange(V))
        np.testing.assert_allclose(result.logits, relative_truth(result), rtol=0, atol=1e-6)
        assert probe_fidelity(result, toy_logits(PROMPT, 0)) == 1.0

    def test_stops_when_everything_is_read(self) -> None:
        result = run_logprob_probe(ToySession(), PATH, prompt=PROMPT, budget=1000)
        assert result.sent == requests_needed(V, 5)

    def test_requests_ask_what_the_attack_needs(self) -> None:
        session = ToySession()
        run_logprob_probe(
            session, PATH, prompt=PROMPT, budget=3, bias=50.0, headers={"x-api-key": "k"}
        )
        first, second = session.bodies[0], session.bodies[1]
        assert "logit_bias" not in first
        assert first["logprobs"] is True and first["top_logprobs"] == 5
        assert first["max_tokens"] == 1
        assert first["messages"] == [{"role": "user", "content": PROMPT}]
        bias = second["logit_bias"]
        assert isinstance(bias, dict) and len(bias) == 4 and set(bias.values()) == {50.0}
        assert session.headers[0]["x-api-key"] == "k"

    def test_on_request_sees_every_request(self) -> None:
        seen: list[int] = []
        run_logprob_probe(ToySession(), PATH, prompt=PROMPT, budget=7, on_request=seen.append)
        assert seen == list(range(1, 8))


class TestShortBudget:
    """A short budget reads only a share of the vocabulary, and fidelity says which share."""

    def test_half_the_requests_read_about_half(self) -> None:
        budget = requests_needed(V, 5) // 2
        result = run_logprob_probe(ToySession(), PATH, prompt=PROMPT, budget=budget)
        assert result.recovered.size == 1 + 4 * budget
        assert np.isnan(result.logits).sum() == V - result.recovered.size
        fidelity = probe_fidelity(result, toy_logits(PROMPT, 0))
        assert fidelity == pytest.approx(result.recovered.size / V)
        assert 0.4 < fidelity < 0.6

    def test_zero_budget_reads_nothing(self) -> None:
        result = run_logprob_probe(ToySession(), PATH, prompt=PROMPT, budget=0)
        assert result.sent == 0 and result.reference is None
        assert probe_fidelity(result, toy_logits(PROMPT, 0)) == 0.0

    def test_fidelity_counts_only_close_logits(self) -> None:
        result = run_logprob_probe(ToySession(), PATH, prompt=PROMPT, budget=200)
        truth = toy_logits(PROMPT, 0)
        shifted = truth.copy()
        shifted[:100] += 0.5
        if result.reference is not None and result.reference < 100:
            shifted[result.reference] -= 0.5  # keep the anchor where it was
        assert probe_fidelity(result, shifted) == pytest.approx((V - 99) / V, abs=1 / V)
        with pytest.raises(ValueError):
            probe_fidelity(result, truth[:-1])


class TestRefusals:
    """Refusals, stripped biases and capped logprobs are recorded, never raised."""

    @pytest.mark.parametrize("status", [401, 403, 429])
    def test_refusing_session(self, status: int) -> None:
        result = run_logprob_probe(ToySession(status=status), PATH, prompt=PROMPT, budget=100)
        assert result.first_refusal == 0 and result.answered == 0
        assert result.sent == GIVE_UP_AFTER and result.statuses == {status: GIVE_UP_AFTER}
        assert result.reference is None and result.recovered.size == 0
        assert probe_fidelity(result, toy_logits(PROMPT, 0)) == 0.0

    def test_guard_refusing_logit_bias_with_logprobs(self) -> None:
        rules = LlmRules(max_top_logprobs=5, logit_bias_with_logprobs="refuse")
        result = run_logprob_probe(ToySession(rules), PATH, prompt=PROMPT, budget=100)
        # The unbiased request is answered; every biased one is refused with a 400.
        assert result.first_refusal == 1 and result.answered == 1
        assert result.statuses == {200: 1, 400: GIVE_UP_AFTER}
        assert result.recovered.size == 5
        assert probe_fidelity(result, toy_logits(PROMPT, 0)) == pytest.approx(5 / V)

    def test_guard_stripping_the_bias(self) -> None:
        rules = LlmRules(logit_bias_with_logprobs="strip")
        result = run_logprob_probe(ToySession(rules), PATH, prompt=PROMPT, budget=100)
        assert result.first_refusal == 1 and result.answered == 1
        assert result.statuses == {200: 1 + GIVE_UP_AFTER}
        # Nothing is read from the unbiased answers that came back in place of biased ones.
        assert result.recovered.size == 5
        np.testing.assert_allclose(
            result.logits[result.recovered], relative_truth(result)[result.recovered], atol=1e-9
        )

    def test_capped_top_logprobs_slow_the_probe_but_do_not_stop_it(self) -> None:
        rules = LlmRules(max_top_logprobs=3, logit_bias_with_logprobs="allow")
        session = ToySession(rules)
        result = run_logprob_probe(session, PATH, prompt=PROMPT, budget=1000, top_k=5)
        assert result.first_refusal == 0 and result.sent == result.answered + 1
        assert session.bodies[1]["top_logprobs"] == 3  # k follows the cap
        assert result.sent == 1 + requests_needed(V - 2, 3)
        assert probe_fidelity(result, toy_logits(PROMPT, 0)) == 1.0

    def test_no_top_logprobs_no_reference(self) -> None:
        rules = LlmRules(max_top_logprobs=0, logit_bias_with_logprobs="allow")
        result = run_logprob_probe(ToySession(rules), PATH, prompt=PROMPT, budget=50)
        assert result.first_refusal == 0 and result.sent == GIVE_UP_AFTER
        assert result.statuses == {200: GIVE_UP_AFTER} and result.reference is None

    def test_unreadable_answers_are_refusals(self) -> None:
        class Garbage(ToySession):
            def request(self, *args: object, **kwargs: object) -> Response:
                return Response(200, {}, b'{"choices": [{"logprobs": null}]}')

        result = run_logprob_probe(Garbage(), PATH, prompt=PROMPT, budget=50)
        assert result.first_refusal == 0 and result.answered == 0
        assert result.sent == GIVE_UP_AFTER

    def test_a_solved_challenge_marks_the_first_refusal(self) -> None:
        result = run_logprob_probe(ChallengingSession(), PATH, prompt=PROMPT, budget=10)
        assert result.first_refusal == 0 and result.answered == 10
        assert (result.challenges, result.work_s) == (1, 0.25)


class TestArguments:
    """Arguments the probe cannot work with are refused before anything is sent."""

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"budget": -1},
            {"top_k": 1},
            {"bias": 0.0},
            {"bias": float("nan")},
            {"prompt": "   "},
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, object]) -> None:
        session = ToySession()
        arguments: dict[str, object] = {"prompt": PROMPT, "budget": 10, **kwargs}
        with pytest.raises(ValueError):
            run_logprob_probe(session, PATH, **arguments)  # type: ignore[arg-type]
        assert session.bodies == []


class TestHiddenDimension:
    """Logit vectors of more prompts than the hidden width reveal that width (Carlini's step)."""

    def test_probed_vectors_give_the_toy_width(self) -> None:
        rows = [
            run_logprob_probe(
                ToySession(), PATH, prompt=f"prompt number {i}", budget=100, top_k=20
            ).logits
            for i in range(TOY_HIDDEN_DIM + 8)
        ]
        assert hidden_dimension(np.asarray(rows)) == TOY_HIDDEN_DIM

    def test_partial_rows_and_noise(self) -> None:
        rows = np.asarray([toy_logits(f"p{i}", 0) for i in range(40)])
        rows[:, 300:] = np.nan  # only 300 tokens read
        noisy = rows + np.random.default_rng(0).normal(scale=1e-3, size=rows.shape)
        assert hidden_dimension(rows) == TOY_HIDDEN_DIM
        assert hidden_dimension(noisy) == TOY_HIDDEN_DIM

    @pytest.mark.parametrize("rows", [np.zeros(5), np.zeros((1, 5)), np.full((3, 5), np.nan)])
    def test_too_little_to_work_with(self, rows: np.ndarray) -> None:
        with pytest.raises(ValueError):
            hidden_dimension(rows)
