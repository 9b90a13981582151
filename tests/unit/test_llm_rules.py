"""LLM request rules: caps by clamping, logit_bias with logprobs, streaming, OpenAI errors."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.policy.model import LlmRules
from extauthz.protect.llm_rules import RuleOutcome, apply_llm_rules, openai_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
# Rules that change nothing by themselves, to test one rule at a time.
OPEN = LlmRules(logit_bias_with_logprobs="allow", stream="pass")


def rules(**fields: Any) -> LlmRules:
    return OPEN.model_copy(update=fields)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Once", **fields}


def rewritten(outcome: RuleOutcome) -> dict[str, Any]:
    assert outcome.refusal is None
    assert outcome.body is not None
    doc = orjson.loads(outcome.body)
    assert isinstance(doc, dict)
    return doc


def refusal(outcome: RuleOutcome) -> tuple[int, dict[str, Any]]:
    assert outcome.body is None
    assert outcome.refusal is not None
    status, raw = outcome.refusal
    return status, orjson.loads(raw)["error"]


class TestOpenAIError:
    """Errors have OpenAI's shape so that client libraries show them."""

    def test_shape(self) -> None:
        raw = openai_error(400, "no", param="stream", code="stream_not_allowed")
        assert orjson.loads(raw) == {
            "error": {
                "message": "no",
                "type": "invalid_request_error",
                "param": "stream",
                "code": "stream_not_allowed",
            }
        }

    def test_null_param_and_server_errors(self) -> None:
        error = orjson.loads(openai_error(503, "busy", param=None, code="x"))["error"]
        assert (error["param"], error["type"]) == (None, "server_error")


class TestCaps:
    """Numeric caps clamp the request's value and say so; values within the cap are kept."""

    @pytest.mark.parametrize(
        ("path", "doc", "field", "cap", "change"),
        [
            (CHAT, chat(logprobs=True, top_logprobs=20), "top_logprobs", 5, "top_logprobs_capped"),
            (COMPLETIONS, completion(logprobs=5), "logprobs", 2, "logprobs_capped"),
            (CHAT, chat(n=8), "n", 2, "n_capped"),
            (COMPLETIONS, completion(n=8), "n", 3, "n_capped"),
        ],
    )
    def test_clamped(
        self, path: str, doc: dict[str, Any], field: str, cap: int, change: str
    ) -> None:
        rule = {"top_logprobs": "max_top_logprobs", "logprobs": "max_top_logprobs"}.get(
            field, "max_n"
        )
        outcome = apply_llm_rules(doc, rules(**{rule: cap}), path=path)
        new = rewritten(outcome)
        assert new[field] == cap
        assert outcome.changes == (change,)
        assert {k: v for k, v in new.items() if k != field} == {
            k: v for k, v in doc.items() if k != field
        }

    def test_zero_top_logprobs_cap(self) -> None:
        new = rewritten(
            apply_llm_rules(
                chat(logprobs=True, top_logprobs=3), rules(max_top_logprobs=0), path=CHAT
            )
        )
        assert new["top_logprobs"] == 0
        assert new["logprobs"] is True

    @pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
    def test_max_tokens_fields_clamped(self, field: str) -> None:
        outcome = apply_llm_rules(chat(**{field: 4096}), rules(max_tokens=256), path=CHAT)
        assert rewritten(outcome)[field] == 256
        assert outcome.changes == (f"{field}_capped",)

    def test_both_token_fields_clamped(self) -> None:
        doc = chat(max_tokens=1000, max_completion_tokens=50)
        outcome = apply_llm_rules(doc, rules(max_tokens=100), path=CHAT)
        new = rewritten(outcome)
        assert (new["max_tokens"], new["max_completion_tokens"]) == (100, 50)
        assert outcome.changes == ("max_tokens_capped",)

    @pytest.mark.parametrize(
        ("path", "doc", "field"),
        [(CHAT, chat(), "max_completion_tokens"), (COMPLETIONS, completion(), "max_tokens")],
    )
    def test_missing_max_tokens_is_set(self, path: str, doc: dict[str, Any], field: str) -> None:
        outcome = apply_llm_rules(doc, rules(max_tokens=64), path=path)
        assert rewritten(outcome)[field] == 64
        assert outcome.changes == ("max_tokens_set",)

    def test_several_caps_at_once(self) -> None:
        doc = chat(n=10, max_tokens=9999, logprobs=True, top_logprobs=20)
        outcome = apply_llm_rules(
            doc, rules(max_n=1, max_tokens=100, max_top_logprobs=2), path=CHAT
        )
        new = rewritten(outcome)
        assert (new["n"], new["max_tokens"], new["top_logprobs"]) == (1, 100, 2)
        assert set(outcome.changes) == {"n_capped", "max_tokens_capped", "top_logprobs_capped"}

    def test_within_caps_is_unchanged(self) -> None:
        doc = chat(n=2, max_tokens=10, logprobs=True, top_logprobs=2)
        outcome = apply_llm_rules(doc, rules(max_n=2, max_tokens=10, max_top_logprobs=2), path=CHAT)
        assert outcome == RuleOutcome(None, None, ())

    def test_chat_logprobs_boolean_is_not_a_cap_field(self) -> None:
        outcome = apply_llm_rules(chat(logprobs=True), rules(max_top_logprobs=0), path=CHAT)
        assert outcome == RuleOutcome(None, None, ())

    @pytest.mark.parametrize(
        ("path", "doc", "field", "rule"),
        [
            (CHAT, chat(top_logprobs="20"), "top_logprobs", "max_top_logprobs"),
            (CHAT, chat(top_logprobs=20.0), "top_logprobs", "max_top_logprobs"),
            (COMPLETIONS, completion(logprobs=True), "logprobs", "max_top_logprobs"),
            (CHAT, chat(max_tokens="9999"), "max_tokens", "max_tokens"),
            (CHAT, chat(n=[4]), "n", "max_n"),
        ],
    )
    def test_non_integer_capped_values_are_refused(
        self, path: str, doc: dict[str, Any], field: str, rule: str
    ) -> None:
        outcome = apply_llm_rules(doc, rules(**{rule: 5}), path=path)
        status, error = refusal(outcome)
        assert status == 400
        assert (error["param"], error["code"]) == (field, "invalid_type")
        assert outcome.changes == (f"{field}_invalid",)

    def test_null_is_absent(self) -> None:
        outcome = apply_llm_rules(
            chat(top_logprobs=None, n=None), rules(max_top_logprobs=1, max_n=1), path=CHAT
        )
        assert outcome == RuleOutcome(None, None, ())

    def test_the_input_document_is_not_modified(self) -> None:
        doc = chat(n=5, logit_bias={"1": 5}, logprobs=True)
        before = copy.deepcopy(doc)
        apply_llm_rules(doc, rules(max_n=1, logit_bias_with_logprobs="strip"), path=CHAT)
        assert doc == before

    def test_body_is_compact_json(self) -> None:
        outcome = apply_llm_rules(chat(n=5), rules(max_n=1), path=CHAT)
        assert outcome.body is not None
        assert b", " not in outcome.body and b": " not in outcome.body


class TestLogitBias:
    """logit_bias with logprobs is refused, stripped or allowed; without logprobs it stays."""

    BIAS = {"50256": -100, "1234": 50}

    @pytest.mark.parametrize(
        ("path", "doc"),
        [
            (CHAT, chat(logprobs=True)),
            (CHAT, chat(top_logprobs=3)),
            (CHAT, chat(logprobs=True, top_logprobs=0)),
            (COMPLETIONS, completion(logprobs=1)),
            (COMPLETIONS, completion(logprobs=0)),
        ],
        ids=["chat-logprobs", "chat-top", "chat-top-zero", "completions", "completions-zero"],
    )
    def test_refused_with_logprobs(self, path: str, doc: dict[str, Any]) -> None:
        outcome = apply_llm_rules(
            {**doc, "logit_bias": self.BIAS}, rules(logit_bias_with_logprobs="refuse"), path=path
        )
        status, error = refusal(outcome)
        assert status == 400
        assert error["param"] == "logit_bias"
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "logit_bias_with_logprobs"
        assert "logprobs" in error["message"]
        assert outcome.changes == ("logit_bias_refused",)

    def test_default_rules_refuse(self) -> None:
        outcome = apply_llm_rules(chat(logprobs=True, logit_bias=self.BIAS), LlmRules(), path=CHAT)
        assert outcome.changes == ("logit_bias_refused",)

    def test_stripped_with_logprobs(self) -> None:
        doc = chat(logprobs=True, top_logprobs=5, logit_bias=self.BIAS)
        outcome = apply_llm_rules(doc, rules(logit_bias_with_logprobs="strip"), path=CHAT)
        new = rewritten(outcome)
        assert "logit_bias" not in new
        assert new == {k: v for k, v in doc.items() if k != "logit_bias"}
        assert outcome.changes == ("logit_bias_stripped",)

    def test_allowed(self) -> None:
        doc = chat(logprobs=True, logit_bias=self.BIAS)
        assert apply_llm_rules(
            doc, rules(logit_bias_with_logprobs="allow"), path=CHAT
        ) == RuleOutcome(None, None, ())

    @pytest.mark.parametrize("mode", ["refuse", "strip"])
    @pytest.mark.parametrize(
        ("path", "doc"),
        [
            (CHAT, chat()),
            (CHAT, chat(logprobs=False)),
            (CHAT, chat(logprobs=False, top_logprobs=0)),
            (CHAT, chat(logprobs=None)),
            (COMPLETIONS, completion()),
            (COMPLETIONS, completion(logprobs=None)),
        ],
    )
    def test_without_logprobs_bias_is_kept(self, mode: str, path: str, doc: dict[str, Any]) -> None:
        outcome = apply_llm_rules(
            {**doc, "logit_bias": self.BIAS}, rules(logit_bias_with_logprobs=mode), path=path
        )
        assert outcome == RuleOutcome(None, None, ())

    @pytest.mark.parametrize("bias", [None, {}])
    def test_empty_bias_is_no_bias(self, bias: object) -> None:
        doc = chat(logprobs=True, logit_bias=bias)
        assert (
            apply_llm_rules(doc, rules(logit_bias_with_logprobs="refuse"), path=CHAT).refusal
            is None
        )


class TestStream:
    """A tier that may not stream gets a 400 saying so; otherwise streams pass."""

    def test_refused(self) -> None:
        outcome = apply_llm_rules(chat(stream=True), rules(stream="refuse"), path=CHAT)
        status, error = refusal(outcome)
        assert status == 400
        assert error["param"] == "stream"
        assert error["code"] == "stream_not_allowed"
        assert "cannot stream" in error["message"]
        assert outcome.changes == ("stream_refused",)

    def test_refused_on_completions_too(self) -> None:
        outcome = apply_llm_rules(completion(stream=True), rules(stream="refuse"), path=COMPLETIONS)
        assert outcome.changes == ("stream_refused",)

    def test_refusal_comes_before_rewrites(self) -> None:
        outcome = apply_llm_rules(
            chat(stream=True, n=9), rules(stream="refuse", max_n=1), path=CHAT
        )
        assert outcome.changes == ("stream_refused",)

    def test_passed(self) -> None:
        assert apply_llm_rules(chat(stream=True), rules(stream="pass"), path=CHAT) == RuleOutcome(
            None, None, ()
        )

    @pytest.mark.parametrize("stream", [False, None])
    def test_not_streaming_passes(self, stream: object) -> None:
        assert apply_llm_rules(chat(stream=stream), LlmRules(), path=CHAT) == RuleOutcome(
            None, None, ()
        )


class TestScope:
    """Only chat and completions requests that are JSON objects are touched."""

    STRICT = LlmRules(max_n=1, max_tokens=1, max_top_logprobs=0)

    @pytest.mark.parametrize(
        "path",
        ["/v1/embeddings", "/v1/models/m:predict", "/v2/models/m/infer", "/healthz", "/"],
    )
    def test_other_paths_unchanged(self, path: str) -> None:
        doc = {"input": "x", "n": 9, "stream": True}
        assert apply_llm_rules(doc, self.STRICT, path=path) == RuleOutcome(None, None, ())

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/chat/completions?api-version=1",
            "/openai/deployments/d/chat/completions",
            "/V1/Chat/Completions",
            "/v1/chat/completions/",
        ],
    )
    def test_prefixed_query_and_case_variants_are_chat(self, path: str) -> None:
        new = rewritten(apply_llm_rules(chat(n=4, max_tokens=1), self.STRICT, path=path))
        assert new["n"] == 1

    @pytest.mark.parametrize("doc", [[1, 2], "text", 3, None])
    def test_non_objects_unchanged(self, doc: object) -> None:
        assert apply_llm_rules(doc, self.STRICT, path=CHAT) == RuleOutcome(None, None, ())

    def test_too_deep_to_rewrite_is_refused_not_raised(self) -> None:
        deep: object = "x"
        for _ in range(300):
            deep = [deep]
        outcome = apply_llm_rules(chat(n=5, extra=deep), rules(max_n=1), path=CHAT)
        status, error = refusal(outcome)
        assert (status, error["code"]) == (400, "nesting_too_deep")


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)
_fields = st.sampled_from(
    [
        "messages",
        "prompt",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "other",
    ]
)
_rules = st.builds(
    LlmRules,
    max_top_logprobs=st.none() | st.integers(0, 20),
    max_n=st.none() | st.integers(1, 10),
    max_tokens=st.none() | st.integers(1, 1000),
    logit_bias_with_logprobs=st.sampled_from(["allow", "strip", "refuse"]),
    stream=st.sampled_from(["refuse", "pass"]),
)


class TestNeverRaises:
    """Any JSON value with any rules gives an outcome: a body, a refusal, or nothing."""

    @settings(max_examples=500, deadline=None)
    @given(
        doc=st.dictionaries(_fields, _values, max_size=6) | _values,
        rule=_rules,
        path=st.sampled_from([CHAT, COMPLETIONS, "/v1/embeddings", "/x"]),
    )
    def test_random_requests(self, doc: object, rule: LlmRules, path: str) -> None:
        before = copy.deepcopy(doc)
        outcome = apply_llm_rules(doc, rule, path=path)
        assert doc == before  # the request document is never modified
        assert not (outcome.body is not None and outcome.refusal is not None)
        assert bool(outcome.changes) == (outcome.body is not None or outcome.refusal is not None)
        if outcome.body is not None:
            new = orjson.loads(outcome.body)
            for field, cap in (
                ("n", rule.max_n),
                ("max_tokens", rule.max_tokens),
                ("max_completion_tokens", rule.max_tokens),
            ):
                if cap is not None and new.get(field) is not None:
                    assert new[field] <= cap
        if outcome.refusal is not None:
            status, raw = outcome.refusal
            assert status == 400
            assert set(orjson.loads(raw)["error"]) == {"message", "type", "param", "code"}
