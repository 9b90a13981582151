"""The OpenAI dialect: paths, answer counts per API, errors, token usage, embeddings round trip."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.dialects import DIALECTS, DialectError, detect_dialect, get_dialect
from extauthz.dialects.openai import (
    EMBEDDING_OUTPUTS,
    LOGPROB,
    MAX_N,
    TOP_LOGPROBS,
    OpenAIDialect,
    is_streaming,
    token_usage,
)

OPENAI = OpenAIDialect()
CHAT = [{"role": "user", "content": "hello"}]


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def count(doc: object, max_instances: int = 10_000) -> int:
    return OPENAI.parse_request(body(doc), max_instances=max_instances).instances


def error_of(doc: object, max_instances: int = 10_000) -> DialectError:
    raw = doc if isinstance(doc, bytes) else body(doc)
    with pytest.raises(DialectError) as info:
        OPENAI.parse_request(raw, max_instances=max_instances)
    return info.value


def embeddings_response(vectors: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors)
        ],
        "model": "m",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
        **extra,
    }


class TestRegistration:
    """The dialect is registered as "openai" and auto-detected on its three paths only."""

    def test_registered_by_name(self) -> None:
        assert get_dialect("openai") is DIALECTS["openai"]
        assert isinstance(DIALECTS["openai"], OpenAIDialect)

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/chat/completions?api-version=2024-02-01",
        ],
    )
    def test_detected_on_its_paths(self, path: str) -> None:
        found = detect_dialect(path)
        assert found is not None and found.name == "openai"

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/chat/completions/extra",
            "/v1/chat",
            "/v2/chat/completions",
            "/v1/models",
            "/v1/responses",
            "/openai/v1/completions",
            "/v1/embeddings/",
        ],
    )
    def test_not_detected_elsewhere(self, path: str) -> None:
        found = detect_dialect(path)
        assert found is None or found.name != "openai"

    def test_kserve_paths_still_go_to_kserve(self) -> None:
        found = detect_dialect("/v1/models/chat:predict")
        assert found is not None and found.name == "kserve_v1"


class TestChatCounting:
    """A chat request asks for n answers: n defaults to 1 and must be an int in 1..128."""

    def test_default_is_one(self) -> None:
        assert count({"model": "m", "messages": CHAT}) == 1

    def test_null_n_is_the_default(self) -> None:
        assert count({"messages": CHAT, "n": None}) == 1

    @pytest.mark.parametrize("n", [1, 7, MAX_N])
    def test_n_is_the_count(self, n: int) -> None:
        assert count({"messages": CHAT, "n": n}) == n

    @pytest.mark.parametrize("n", [0, -1, MAX_N + 1, 2.0, "3", True, [2]])
    def test_bad_n_is_invalid(self, n: object) -> None:
        err = error_of({"messages": CHAT, "n": n})
        assert (err.code, err.status) == ("invalid_input", 400)

    @pytest.mark.parametrize("messages", [[], "hello", {"role": "user"}, ["hello"], None])
    def test_bad_messages_are_invalid(self, messages: object) -> None:
        assert error_of({"messages": messages}).code == "invalid_input"

    def test_parsed_request_keeps_the_document_and_no_numeric_inputs(self) -> None:
        doc = {"model": "m", "messages": CHAT, "temperature": 0.5}
        parsed = OPENAI.parse_request(body(doc), max_instances=10)
        assert parsed.doc == doc
        assert parsed.inputs == {}
        assert parsed.input_matrix() is None


class TestCompletionsCounting:
    """A completions request asks for n answers per prompt; prompts come in four shapes."""

    @pytest.mark.parametrize(
        ("prompt", "prompts"),
        [
            ("once upon a time", 1),
            ("", 1),
            (["a", "b", "c"], 3),
            ([101, 2023, 2003], 1),
            ([[101, 2023], [7], [1, 2, 3]], 3),
        ],
        ids=["string", "empty-string", "strings", "token-ids", "token-id-lists"],
    )
    @pytest.mark.parametrize("n", [None, 1, 4])
    def test_prompts_times_n(self, prompt: object, prompts: int, n: int | None) -> None:
        doc: dict[str, Any] = {"model": "m", "prompt": prompt}
        if n is not None:
            doc["n"] = n
        assert count(doc) == prompts * (n or 1)

    @pytest.mark.parametrize(
        "prompt",
        [
            [],
            None,
            7,
            {"text": "a"},
            ["a", 1],
            [[1, 2], "a"],
            [[1, 2], []],
            [[1, "2"]],
            [1.5, 2],
            [True, 1],
            [[[1]]],
        ],
        ids=[
            "empty",
            "null",
            "number",
            "object",
            "strings-and-ids",
            "lists-and-strings",
            "empty-token-list",
            "string-token",
            "float-token",
            "bool-token",
            "too-deep",
        ],
    )
    def test_bad_prompts_are_invalid(self, prompt: object) -> None:
        assert error_of({"prompt": prompt}).code == "invalid_input"

    def test_bad_n_is_invalid(self) -> None:
        assert error_of({"prompt": "a", "n": 0}).code == "invalid_input"


class TestEmbeddingsCounting:
    """An embeddings request asks for one vector per input; n does not apply."""

    @pytest.mark.parametrize(
        ("value", "inputs"),
        [("text", 1), (["a", "b"], 2), ([1, 2, 3], 1), ([[1, 2], [3], [4, 5]], 3)],
        ids=["string", "strings", "token-ids", "token-id-lists"],
    )
    def test_inputs(self, value: object, inputs: int) -> None:
        assert count({"model": "e", "input": value}) == inputs

    def test_n_is_not_a_multiplier(self) -> None:
        assert count({"input": ["a", "b"], "n": 5}) == 2

    @pytest.mark.parametrize("value", [[], None, 3, [["a"]], ["a", [1]]])
    def test_bad_inputs_are_invalid(self, value: object) -> None:
        assert error_of({"input": value}).code == "invalid_input"


class TestRequestErrors:
    """Bodies that are not one readable API request are refused with a stable code."""

    @pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe{}"])
    def test_unreadable_body(self, raw: bytes) -> None:
        err = error_of(raw)
        assert (err.code, err.status) == ("body_parse_error", 400)

    def test_non_finite_number(self) -> None:
        raw = b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}'
        assert error_of(raw).code == "invalid_input"

    @pytest.mark.parametrize("doc", [[CHAT], "text", 3, None])
    def test_body_must_be_object(self, doc: object) -> None:
        assert error_of(doc).code == "invalid_input"

    @pytest.mark.parametrize("doc", [{}, {"model": "m"}, {"model": "m", "n": 2}])
    def test_missing_required_field(self, doc: object) -> None:
        err = error_of(doc)
        assert err.code == "invalid_input"
        assert "messages" in err.message and "prompt" in err.message

    def test_two_api_fields_are_ambiguous(self) -> None:
        err = error_of({"messages": CHAT, "prompt": "a"})
        assert err.code == "invalid_input" and "found 'messages', 'prompt'" in err.message

    @pytest.mark.parametrize("stream", ["true", 1, [], {}])
    def test_non_boolean_stream_is_invalid(self, stream: object) -> None:
        assert error_of({"messages": CHAT, "stream": stream}).code == "invalid_input"

    @pytest.mark.parametrize(
        "doc",
        [
            {"messages": CHAT, "n": 11},
            {"prompt": ["a", "b", "c", "d"], "n": 3},
            {"input": ["x"] * 11},
        ],
        ids=["chat", "completions", "embeddings"],
    )
    def test_over_max_instances_is_413(self, doc: object) -> None:
        err = error_of(doc, max_instances=10)
        assert (err.code, err.status) == ("too_many_instances", 413)

    def test_exactly_max_instances_passes(self) -> None:
        assert count({"prompt": ["a", "b"], "n": 5}, max_instances=10) == 10


class TestStreaming:
    """Streaming requests are still counted; is_streaming tells them apart."""

    def test_streaming_request_is_counted(self) -> None:
        parsed = OPENAI.parse_request(
            body({"messages": CHAT, "n": 3, "stream": True}), max_instances=10
        )
        assert parsed.instances == 3
        assert is_streaming(parsed.doc)

    @pytest.mark.parametrize(
        ("doc", "expected"),
        [
            ({"stream": True}, True),
            ({"stream": False}, False),
            ({"stream": None}, False),
            ({}, False),
            ({"stream": "true"}, False),
            ({"stream": 1}, False),
            ([{"stream": True}], False),
            (None, False),
        ],
    )
    def test_is_streaming(self, doc: object, expected: bool) -> None:
        assert is_streaming(doc) is expected


class TestTokenUsage:
    """token_usage reads total_tokens, falls back to prompt + completion, else None."""

    @pytest.mark.parametrize(
        ("usage", "expected"),
        [
            ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, 12),
            ({"prompt_tokens": 5, "total_tokens": 5}, 5),
            ({"total_tokens": 0}, 0),
            ({"prompt_tokens": 5, "completion_tokens": 7}, 12),
            ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": -1}, 12),
            ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": "12"}, 12),
            ({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12.0}, 12),
            ({"total_tokens": -3}, None),
            ({"total_tokens": "12"}, None),
            ({"total_tokens": 12.0}, None),
            ({"total_tokens": True}, None),
            ({"total_tokens": None}, None),
            ({"prompt_tokens": 5}, None),
            ({"prompt_tokens": "5", "completion_tokens": 7}, None),
            ({"prompt_tokens": 5, "completion_tokens": -7}, None),
            ({"prompt_tokens": True, "completion_tokens": True}, None),
            ({}, None),
        ],
    )
    def test_usage_variants(self, usage: dict[str, object], expected: int | None) -> None:
        assert token_usage({"id": "x", "usage": usage}) == expected

    @pytest.mark.parametrize("doc", [{}, {"usage": None}, {"usage": 12}, {"usage": [12]}, [], None])
    def test_missing_usage(self, doc: object) -> None:
        assert token_usage(doc) is None

    def test_reads_a_parsed_response(self) -> None:
        raw = body(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
            }
        )
        parsed = OPENAI.parse_response(raw)
        assert parsed.outputs == {}
        assert token_usage(parsed.doc) == 10


class TestResponses:
    """Answers without logprobs have no numeric outputs; bad bodies are the upstream's."""

    def test_chat_response_round_trips_unchanged(self) -> None:
        doc = {
            "id": "c",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
            "usage": {"total_tokens": 3},
        }
        parsed = OPENAI.parse_response(body(doc))
        assert parsed.outputs == {}
        assert orjson.loads(OPENAI.serialize_response(parsed, {})) == doc

    @pytest.mark.parametrize("raw", [b"{bad", b"[1, 2]", b'"text"'])
    def test_bad_response_is_502(self, raw: bytes) -> None:
        with pytest.raises(DialectError) as info:
            OPENAI.parse_response(raw)
        assert info.value.status == 502

    def test_unknown_output_is_refused(self) -> None:
        parsed = OPENAI.parse_response(body({"choices": []}))
        with pytest.raises(ValueError, match="unknown output"):
            OPENAI.serialize_response(parsed, {"embedding": np.zeros((1, 2))})


class TestEmbeddingsResponse:
    """Embedding vectors are an (n, d) float output that writes back in place, all else kept."""

    def test_vectors_are_read_as_a_matrix(self) -> None:
        vectors = [[0.1, -0.2, 0.3], [1.0, 0.0, -1.5]]
        parsed = OPENAI.parse_response(body(embeddings_response(vectors)))
        assert list(parsed.outputs) == ["embedding"]
        assert parsed.embeddings == EMBEDDING_OUTPUTS == {"embedding"}
        np.testing.assert_array_equal(parsed.outputs["embedding"], np.asarray(vectors))
        assert parsed.outputs["embedding"].dtype == np.float64
        assert token_usage(parsed.doc) == 3

    def test_round_trip_unchanged_is_exact(self) -> None:
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((4, 8)).tolist()
        doc = embeddings_response(vectors, extra_field={"kept": True})
        parsed = OPENAI.parse_response(body(doc))
        out = OPENAI.serialize_response(parsed, dict(parsed.outputs))
        assert orjson.loads(out) == doc

    def test_rewritten_vectors_replace_only_the_embeddings(self) -> None:
        doc = embeddings_response([[0.5, 0.25], [1.0, 2.0]])
        parsed = OPENAI.parse_response(body(doc))
        rewritten = np.round(parsed.outputs["embedding"] * 3.0, 1)
        answer = orjson.loads(OPENAI.serialize_response(parsed, {"embedding": rewritten}))
        assert [item["embedding"] for item in answer["data"]] == [[1.5, 0.8], [3.0, 6.0]]
        for before, after in zip(doc["data"], answer["data"], strict=True):
            assert {k: v for k, v in after.items() if k != "embedding"} == {
                k: v for k, v in before.items() if k != "embedding"
            }
        assert {k: v for k, v in answer.items() if k != "data"} == {
            k: v for k, v in doc.items() if k != "data"
        }

    def test_integer_vectors_are_written_as_floats(self) -> None:
        parsed = OPENAI.parse_response(body(embeddings_response([[1, 0], [0, 1]])))
        assert parsed.dtypes["embedding"] == "FP64"
        answer = orjson.loads(OPENAI.serialize_response(parsed, dict(parsed.outputs)))
        assert answer["data"][0]["embedding"] == [1.0, 0.0]
        assert isinstance(answer["data"][0]["embedding"][0], float)

    def test_wrong_shape_is_refused(self) -> None:
        parsed = OPENAI.parse_response(body(embeddings_response([[0.1, 0.2]])))
        with pytest.raises(ValueError, match="shape"):
            OPENAI.serialize_response(parsed, {"embedding": np.zeros((1, 3))})

    @pytest.mark.parametrize(
        "data",
        [
            [{"embedding": "AAAAPwAAgD8="}],
            [{"embedding": [0.1, 0.2]}, {"embedding": [0.3]}],
            [{"embedding": []}],
            [{"embedding": [0.1, "x"]}],
            [{"embedding": [True, False]}],
            [{"embedding": [[0.1], [0.2, 0.3]]}],
            [{"index": 0}],
            [],
        ],
        ids=["base64", "ragged", "empty-vector", "mixed", "bools", "nested", "no-vector", "empty"],
    )
    def test_non_matrix_data_has_no_output_and_round_trips(self, data: list[Any]) -> None:
        doc = {"object": "list", "data": data, "usage": {"total_tokens": 1}}
        parsed = OPENAI.parse_response(body(doc))
        assert parsed.outputs == {}
        assert orjson.loads(OPENAI.serialize_response(parsed, {})) == doc


def chat_token(token: str, logprob: float, alternatives: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives
        ],
    }


def chat_logprobs_response(*choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(t["token"] for t in tokens)},
                "logprobs": {"content": tokens, "refusal": None},
                "finish_reason": "stop",
            }
            for i, tokens in enumerate(choices)
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }


def completions_logprobs_response(
    tokens: list[str], logprobs: list[float | None], top: list[dict[str, float] | None]
) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "".join(tokens),
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": logprobs,
                    "top_logprobs": top,
                    "text_offset": list(range(len(tokens))),
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"total_tokens": 5},
    }


def without(doc: Any, drop: tuple[str, ...]) -> Any:
    """Return ``doc`` with every value under a key in ``drop`` replaced by a marker."""
    if isinstance(doc, dict):
        return {k: "<dropped>" if k in drop else without(v, drop) for k, v in doc.items()}
    if isinstance(doc, list):
        return [without(v, drop) for v in doc]
    return doc


CHAT_TOKENS = [
    chat_token("Hel", -0.5, [("Hel", -0.5), ("Hi", -1.25), ("Hey", -2.0)]),
    chat_token("lo", -0.125, [("lo", -0.125), ("p", -3.0), ("l", -4.5)]),
]


class TestChatLogprobs:
    """Chat logprobs are (T,) and (T, M) outputs over every choice, written back in place."""

    def test_outputs_are_read_in_token_order_across_choices(self) -> None:
        second = [chat_token("x", -7.0, [("x", -7.0), ("y", -8.0), ("z", -9.0)])]
        parsed = OPENAI.parse_response(body(chat_logprobs_response(CHAT_TOKENS, second)))
        np.testing.assert_array_equal(parsed.outputs[LOGPROB], [-0.5, -0.125, -7.0])
        np.testing.assert_array_equal(
            parsed.outputs[TOP_LOGPROBS],
            [[-0.5, -1.25, -2.0], [-0.125, -3.0, -4.5], [-7.0, -8.0, -9.0]],
        )
        assert parsed.embeddings == frozenset()
        assert parsed.dtypes[LOGPROB] == parsed.dtypes[TOP_LOGPROBS] == "FP64"

    def test_round_trip_replaces_values_and_keeps_everything_else(self) -> None:
        doc = chat_logprobs_response(CHAT_TOKENS)
        parsed = OPENAI.parse_response(body(doc))
        new = {
            LOGPROB: np.array([-1.0, -2.0]),
            TOP_LOGPROBS: np.array([[-1.0, -1.5, -3.0], [-2.0, -2.5, -6.0]]),
        }
        answer = orjson.loads(OPENAI.serialize_response(parsed, new))
        content = answer["choices"][0]["logprobs"]["content"]
        assert [t["token"] for t in content] == ["Hel", "lo"]
        assert [t["logprob"] for t in content] == [-1.0, -2.0]
        assert [[a["logprob"] for a in t["top_logprobs"]] for t in content] == new[
            TOP_LOGPROBS
        ].tolist()
        assert [[a["token"] for a in t["top_logprobs"]] for t in content] == [
            ["Hel", "Hi", "Hey"],
            ["lo", "p", "l"],
        ]
        assert without(answer, ("logprob",)) == without(doc, ("logprob",))
        assert parsed.doc == doc  # the parsed document is not modified

    def test_only_logprob_replaced_leaves_alternatives(self) -> None:
        doc = chat_logprobs_response(CHAT_TOKENS)
        parsed = OPENAI.parse_response(body(doc))
        answer = orjson.loads(OPENAI.serialize_response(parsed, {LOGPROB: np.array([-3.0, -4.0])}))
        content = answer["choices"][0]["logprobs"]["content"]
        assert [t["logprob"] for t in content] == [-3.0, -4.0]
        assert [t["top_logprobs"] for t in content] == [t["top_logprobs"] for t in CHAT_TOKENS]

    def test_unchanged_round_trip_is_equal(self) -> None:
        doc = chat_logprobs_response(CHAT_TOKENS, CHAT_TOKENS[:1])
        parsed = OPENAI.parse_response(body(doc))
        assert orjson.loads(OPENAI.serialize_response(parsed, dict(parsed.outputs))) == doc

    def test_ragged_alternatives_are_left_out(self) -> None:
        tokens = [CHAT_TOKENS[0], chat_token("lo", -0.1, [("lo", -0.1)])]
        parsed = OPENAI.parse_response(body(chat_logprobs_response(tokens)))
        assert TOP_LOGPROBS not in parsed.outputs
        np.testing.assert_array_equal(parsed.outputs[LOGPROB], [-0.5, -0.1])
        with pytest.raises(ValueError, match="unknown output"):
            OPENAI.serialize_response(parsed, {TOP_LOGPROBS: np.zeros((2, 1))})

    @pytest.mark.parametrize(
        "alternatives",
        [[{"token": "a", "logprob": "x"}], [{"token": "a"}], ["a"], "a", []],
        ids=["text", "missing", "not-object", "not-list", "empty"],
    )
    def test_malformed_alternatives_are_left_out(self, alternatives: object) -> None:
        tokens = [{**CHAT_TOKENS[0], "top_logprobs": alternatives}, CHAT_TOKENS[1]]
        if alternatives == []:
            tokens = [{**t, "top_logprobs": []} for t in CHAT_TOKENS]
        parsed = OPENAI.parse_response(body(chat_logprobs_response(tokens)))
        assert TOP_LOGPROBS not in parsed.outputs
        assert LOGPROB in parsed.outputs

    def test_no_top_logprobs_requested(self) -> None:
        tokens = [{k: v for k, v in t.items() if k != "top_logprobs"} for t in CHAT_TOKENS]
        parsed = OPENAI.parse_response(body(chat_logprobs_response(tokens)))
        assert set(parsed.outputs) == {LOGPROB}

    def test_null_logprobs_give_no_outputs(self) -> None:
        doc = chat_logprobs_response(CHAT_TOKENS)
        doc["choices"][0]["logprobs"] = None
        assert OPENAI.parse_response(body(doc)).outputs == {}


class TestCompletionsLogprobs:
    """Completions logprobs: token_logprobs (T,) and top_logprobs (T, M) in each object's order."""

    TOKENS = ["The", " cat", " sat"]
    LOGPROBS: list[float | None] = [-0.25, -1.5, -0.75]
    TOP: list[dict[str, float] | None] = [
        {"The": -0.25, "A": -2.0},
        {" dog": -1.0, " cat": -1.5},
        {" sat": -0.75, " ran": -1.75},
    ]

    def test_outputs_keep_each_objects_order(self) -> None:
        doc = completions_logprobs_response(self.TOKENS, self.LOGPROBS, self.TOP)
        parsed = OPENAI.parse_response(body(doc))
        np.testing.assert_array_equal(parsed.outputs[LOGPROB], [-0.25, -1.5, -0.75])
        np.testing.assert_array_equal(
            parsed.outputs[TOP_LOGPROBS], [[-0.25, -2.0], [-1.0, -1.5], [-0.75, -1.75]]
        )

    def test_round_trip_replaces_values_and_keeps_token_order(self) -> None:
        doc = completions_logprobs_response(self.TOKENS, self.LOGPROBS, self.TOP)
        parsed = OPENAI.parse_response(body(doc))
        new_top = np.array([[-0.5, -1.0], [-2.0, -3.0], [-4.0, -5.0]])
        raw = OPENAI.serialize_response(
            parsed, {LOGPROB: np.array([-9.0, -8.0, -7.0]), TOP_LOGPROBS: new_top}
        )
        answer = orjson.loads(raw)
        lp = answer["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == [-9.0, -8.0, -7.0]
        assert [list(m.items()) for m in lp["top_logprobs"]] == [
            [("The", -0.5), ("A", -1.0)],
            [(" dog", -2.0), (" cat", -3.0)],
            [(" sat", -4.0), (" ran", -5.0)],
        ]
        # Key order survives serialization, not just dict equality.
        assert raw.index(b'" dog"') < raw.index(b'" cat":-3.0')
        assert without(answer, ("token_logprobs", "top_logprobs")) == without(
            doc, ("token_logprobs", "top_logprobs")
        )

    def test_echoed_null_first_token_is_skipped(self) -> None:
        doc = completions_logprobs_response(self.TOKENS, [None, -1.5, -0.75], [None, *self.TOP[1:]])
        parsed = OPENAI.parse_response(body(doc))
        np.testing.assert_array_equal(parsed.outputs[LOGPROB], [-1.5, -0.75])
        assert parsed.outputs[TOP_LOGPROBS].shape == (2, 2)
        answer = orjson.loads(
            OPENAI.serialize_response(
                parsed, {LOGPROB: np.array([-1.0, -2.0]), TOP_LOGPROBS: np.zeros((2, 2)) - 1}
            )
        )
        lp = answer["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == [None, -1.0, -2.0]
        assert lp["top_logprobs"][0] is None
        assert lp["top_logprobs"][1] == {" dog": -1.0, " cat": -1.0}

    def test_ragged_top_logprobs_left_out(self) -> None:
        top = [self.TOP[0], {" dog": -1.0}, self.TOP[2]]
        doc = completions_logprobs_response(self.TOKENS, self.LOGPROBS, top)
        parsed = OPENAI.parse_response(body(doc))
        assert set(parsed.outputs) == {LOGPROB}
        answer = orjson.loads(OPENAI.serialize_response(parsed, {LOGPROB: np.zeros(3)}))
        assert answer["choices"][0]["logprobs"]["top_logprobs"] == top

    def test_integer_logprobs_are_written_as_floats(self) -> None:
        doc = completions_logprobs_response(["a"], [0], [{"a": 0}])
        parsed = OPENAI.parse_response(body(doc))
        answer = orjson.loads(OPENAI.serialize_response(parsed, dict(parsed.outputs)))
        assert answer["choices"][0]["logprobs"]["token_logprobs"] == [0.0]
        assert isinstance(answer["choices"][0]["logprobs"]["token_logprobs"][0], float)

    def test_wrong_length_is_refused(self) -> None:
        doc = completions_logprobs_response(self.TOKENS, self.LOGPROBS, self.TOP)
        parsed = OPENAI.parse_response(body(doc))
        with pytest.raises(ValueError, match="shape"):
            OPENAI.serialize_response(parsed, {LOGPROB: np.zeros(2)})


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "choices",
                    "logprobs",
                    "content",
                    "logprob",
                    "top_logprobs",
                    "token_logprobs",
                    "data",
                    "embedding",
                    "messages",
                    "prompt",
                    "input",
                    "n",
                    "stream",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


class TestNeverRaisesOtherThanDialectError:
    """Any JSON through the OpenAI dialect either parses or raises DialectError, and a parsed
    answer written back unchanged is the same document."""

    @settings(max_examples=400, deadline=None)
    @given(doc=_json)
    def test_random_documents(self, doc: object) -> None:
        raw = orjson.dumps(doc)
        try:
            OPENAI.parse_request(raw, max_instances=1000)
        except DialectError:
            pass
        try:
            parsed = OPENAI.parse_response(raw)
        except DialectError:
            return
        assert orjson.loads(OPENAI.serialize_response(parsed, dict(parsed.outputs))) == doc
