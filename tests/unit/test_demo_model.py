"""Test the demo model server: training, KServe v1, Open Inference v2, bad input, big batches,
the logistic victim, and the toy LLM's OpenAI-compatible chat (with logprobs and logit_bias),
completions and embeddings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.demo.model import (
    EMBEDDING_DIM,
    LLM_NAME,
    MAX_BODY_BYTES,
    TOY_HIDDEN_DIM,
    TOY_VOCAB_SIZE,
    UNK_TOKEN,
    BadInput,
    DemoModel,
    LinearModel,
    build_app,
    chat_completion,
    count_tokens,
    embed,
    embeddings,
    load_data,
    parse_v1,
    parse_v2,
    start,
    text_completion,
    token_id,
    toy_logits,
    toy_logprobs,
    toy_vocabulary,
)
from extauthz.dialects.openai import OpenAIDialect, token_usage

Client = TestClient[web.Request, web.Application]
V1 = "/v1/models/digits:predict"
V2 = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def model() -> DemoModel:
    return DemoModel.train(seed=0)


@pytest.fixture(scope="module")
def test_rows() -> np.ndarray:
    return load_data(0)[1]


@pytest.fixture(scope="module")
def big_rows(test_rows: np.ndarray) -> np.ndarray:
    """Return 20,000 natural digit rows: an extraction-sized batch."""
    return np.resize(test_rows, (20_000, 64))


@pytest.fixture
async def client(model: DemoModel) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app(model))) as test_client:
        yield test_client


def v2_body(rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": rows.ravel().tolist()}], **extra}


class TestTraining:
    """The model trains in-process on a fixed held-out split and is accurate and deterministic."""

    def test_held_out_accuracy_is_above_ninety_percent(self, model: DemoModel) -> None:
        assert model.accuracy > 0.9

    def test_split_is_stratified_raw_pixels_and_fixed_by_seed(self) -> None:
        x_train, x_test, y_train, y_test = load_data(0)
        assert x_train.shape[1] == x_test.shape[1] == 64
        assert len(x_train) == len(y_train) and len(x_test) == len(y_test)
        assert x_test.min() >= 0 and x_test.max() == 16
        assert set(np.unique(y_test)) == set(range(10))
        np.testing.assert_array_equal(load_data(0)[1], x_test)
        assert not np.array_equal(load_data(1)[1], x_test)

    def test_same_seed_gives_the_same_model(self, model: DemoModel, test_rows: np.ndarray) -> None:
        again = DemoModel.train(seed=0)
        np.testing.assert_array_equal(
            again.predict_proba(test_rows[:50]), model.predict_proba(test_rows[:50])
        )

    def test_predict_proba_returns_distributions(
        self, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        proba = model.predict_proba(test_rows)
        assert proba.shape == (len(test_rows), 10) and proba.dtype == np.float64
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
        assert (proba >= 0).all()

    @pytest.mark.parametrize(
        "batch",
        [np.zeros((2, 63)), np.zeros(64), np.zeros((0, 64)), np.full((1, 64), np.nan)],
        ids=["narrow", "one-dimensional", "empty", "nan"],
    )
    def test_predict_proba_refuses_bad_batches(self, model: DemoModel, batch: np.ndarray) -> None:
        with pytest.raises(BadInput):
            model.predict_proba(batch)


class TestKServeV1:
    """KServe v1 predict answers one exact probability row per instance."""

    async def test_predictions_match_the_model_at_full_precision(
        self, client: Client, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        rows = test_rows[:32]
        response = await client.post(V1, json={"instances": rows.tolist()})
        assert response.status == 200
        predictions = np.asarray((await response.json())["predictions"])
        assert predictions.shape == (32, 10)
        np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-9)
        # JSON floats round-trip float64 exactly: no precision is lost on the wire.
        np.testing.assert_array_equal(predictions, model.predict_proba(rows))

    async def test_http_answers_are_accurate_on_held_out_digits(self, client: Client) -> None:
        _, x_test, _, y_test = load_data(0)
        response = await client.post(V1, json={"instances": x_test.tolist()})
        predictions = np.asarray((await response.json())["predictions"])
        assert np.mean(predictions.argmax(axis=1) == y_test) > 0.9

    async def test_model_status(self, client: Client) -> None:
        response = await client.get("/v1/models/digits")
        assert response.status == 200
        assert await response.json() == {"name": "digits", "ready": True}


class TestOpenInferenceV2:
    """Open Inference v2 infer answers probability and label tensors and echoes the request id."""

    async def test_outputs_have_the_right_shapes_and_values(
        self, client: Client, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        rows = test_rows[:7]
        response = await client.post(V2, json=v2_body(rows, id="req-42"))
        assert response.status == 200
        answer = await response.json()
        assert answer["model_name"] == "digits"
        assert answer["id"] == "req-42"
        proba, label = answer["outputs"]
        assert (proba["name"], proba["shape"]) == ("probabilities", [7, 10])
        assert (label["name"], label["shape"]) == ("label", [7])
        assert (proba["datatype"], label["datatype"]) == ("FP32", "INT64")
        probabilities = np.asarray(proba["data"]).reshape(7, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
        np.testing.assert_array_equal(probabilities, model.predict_proba(rows))
        assert label["data"] == probabilities.argmax(axis=1).tolist()

    async def test_no_id_is_invented(self, client: Client, test_rows: np.ndarray) -> None:
        answer = await (await client.post(V2, json=v2_body(test_rows[:1]))).json()
        assert "id" not in answer

    async def test_nested_data_reads_like_flat_data(
        self, client: Client, test_rows: np.ndarray
    ) -> None:
        flat = await (await client.post(V2, json=v2_body(test_rows[:3]))).json()
        nested_body = v2_body(test_rows[:3])
        nested_body["inputs"][0]["data"] = test_rows[:3].tolist()
        nested = await (await client.post(V2, json=nested_body)).json()
        assert nested["outputs"] == flat["outputs"]

    async def test_requested_outputs_only(self, client: Client, test_rows: np.ndarray) -> None:
        body = v2_body(test_rows[:2], outputs=[{"name": "label"}])
        answer = await (await client.post(V2, json=body)).json()
        assert [tensor["name"] for tensor in answer["outputs"]] == ["label"]

    async def test_health_and_metadata(self, client: Client, model: DemoModel) -> None:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready"):
            assert (await client.get(path)).status == 200, path
        metadata = await (await client.get("/v2/models/digits")).json()
        assert metadata["name"] == "digits"
        assert metadata["accuracy"] == model.accuracy
        assert metadata["inputs"][0]["shape"] == [-1, 64]
        assert [output["name"] for output in metadata["outputs"]] == ["probabilities", "label"]


def _good_v2() -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}


def _v2_with(**tensor: Any) -> bytes:
    body = _good_v2()
    body["inputs"][0].update(tensor)
    return json.dumps(body).encode()


BAD_V1 = {
    "not-json": b"{instances:",
    "invalid-utf8": b'{"instances": [[\xff]]}',
    "not-an-object": b"[[1, 2, 3]]",
    "no-instances": b'{"inputs": []}',
    "empty": b'{"instances": []}',
    "wrong-width": json.dumps({"instances": [[0] * 63]}).encode(),
    "flat-instance": json.dumps({"instances": [0] * 64}).encode(),
    "nan": ('{"instances": [[NaN' + ", 0" * 63 + "]]}").encode(),
    "infinity": ('{"instances": [[1e400' + ", 0" * 63 + "]]}").encode(),
    "ragged": json.dumps({"instances": [[0] * 64, [0] * 10]}).encode(),
    "strings": json.dumps({"instances": [["0"] * 64]}).encode(),
    "nulls": json.dumps({"instances": [[None] * 64]}).encode(),
    "huge-int": ('{"instances": [[' + "9" * 40 + ", 0" * 63 + "]]}").encode(),
    "deep": b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}

BAD_V2 = {
    "not-json": b"nope",
    "no-inputs": b'{"id": "x"}',
    "two-inputs": json.dumps({"inputs": _good_v2()["inputs"] * 2}).encode(),
    "bytes-datatype": _v2_with(datatype="BYTES"),
    "wrong-width": _v2_with(shape=[1, 63], data=[0] * 63),
    "shape-not-ints": _v2_with(shape=["1", 64]),
    "size-mismatch": _v2_with(shape=[2, 64]),
    "empty": _v2_with(shape=[0, 64], data=[]),
    "no-data": json.dumps({"inputs": [{"shape": [1, 64], "datatype": "FP32"}]}).encode(),
    "nan": _v2_with(data=[float("nan")] * 64),
    "id-not-string": json.dumps({**_good_v2(), "id": 7}).encode(),
    "unknown-output": json.dumps({**_good_v2(), "outputs": [{"name": "logits"}]}).encode(),
}


class TestBadInput:
    """Bad bodies get a 400 JSON error and the server keeps serving."""

    @pytest.mark.parametrize("body", BAD_V1.values(), ids=BAD_V1.keys())
    async def test_kserve_v1(self, client: Client, body: bytes, test_rows: np.ndarray) -> None:
        response = await client.post(V1, data=body)
        assert response.status == 400
        assert isinstance((await response.json())["error"], str)
        healthy = await client.post(V1, json={"instances": test_rows[:1].tolist()})
        assert healthy.status == 200

    @pytest.mark.parametrize("body", BAD_V2.values(), ids=BAD_V2.keys())
    async def test_open_inference_v2(
        self, client: Client, body: bytes, test_rows: np.ndarray
    ) -> None:
        response = await client.post(V2, data=body)
        assert response.status == 400
        assert isinstance((await response.json())["error"], str)
        healthy = await client.post(V2, json=v2_body(test_rows[:1]))
        assert healthy.status == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(["instances", "inputs", "shape", "data", "id"]), children)
    ),
    max_leaves=40,
)


class TestParsersNeverFail:
    """Any JSON value parses into a valid batch or raises BadInput, never anything else."""

    @settings(max_examples=300, deadline=None)
    @given(payload=json_values)
    def test_kserve_v1(self, payload: object) -> None:
        try:
            batch = parse_v1(payload)
        except BadInput:
            return
        assert batch.ndim == 2 and batch.shape[1] == 64 and np.isfinite(batch).all()

    @settings(max_examples=300, deadline=None)
    @given(
        rows=st.integers(min_value=-1, max_value=3),
        data=st.lists(st.lists(st.floats() | st.integers(), min_size=64, max_size=64), max_size=3),
        nested=st.booleans(),
        datatype=st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", None]),
        request_id=st.none() | st.text(max_size=3) | st.integers(),
    )
    def test_open_inference_v2(
        self,
        rows: int,
        data: list[list[float]],
        nested: bool,
        datatype: str | None,
        request_id: object,
    ) -> None:
        values = data if nested else [value for row in data for value in row]
        tensor = {"name": "input-0", "shape": [rows, 64], "datatype": datatype, "data": values}
        try:
            parsed = parse_v2({"inputs": [tensor], "id": request_id})
        except BadInput:
            return
        assert parsed.instances.shape == (rows, 64) and np.isfinite(parsed.instances).all()
        assert parsed.id == request_id


class TestRouting:
    """Only the served model name answers; other names and paths get JSON 404s."""

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/v1/models/mnist"),
            ("POST", "/v1/models/mnist:predict"),
            ("GET", "/v2/models/mnist"),
            ("GET", "/v2/models/mnist/ready"),
            ("POST", "/v2/models/mnist/infer"),
            ("GET", "/nowhere"),
        ],
    )
    async def test_unknown_model_is_404(self, client: Client, method: str, path: str) -> None:
        response = await client.request(method, path, json={"instances": [[0] * 64]})
        assert response.status == 404
        assert "error" in await response.json()

    async def test_unknown_model_error_names_it(self, client: Client) -> None:
        response = await client.post("/v1/models/mnist:predict", json={"instances": [[0] * 64]})
        assert "mnist" in (await response.json())["error"]

    async def test_wrong_method_is_json_405(self, client: Client) -> None:
        response = await client.get(V1)
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert "error" in await response.json()

    async def test_custom_name(self, model: DemoModel, test_rows: np.ndarray) -> None:
        async with TestClient(TestServer(build_app(model, name="mnist"))) as custom:
            body = {"instances": test_rows[:1].tolist()}
            assert (await custom.post("/v1/models/mnist:predict", json=body)).status == 200
            assert (await custom.post(V1, json=body)).status == 404


class TestLargeBatches:
    """Extraction-sized batches (20,000 rows, > 2 MB) are answered; oversized bodies get 413."""

    async def test_kserve_v1(self, client: Client, big_rows: np.ndarray) -> None:
        body = json.dumps({"instances": big_rows.astype(int).tolist()}).encode()
        assert len(body) > 2 * 1024 * 1024
        response = await client.post(V1, data=body)
        assert response.status == 200
        predictions = np.asarray((await response.json())["predictions"])
        assert predictions.shape == (20_000, 10)
        np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-9)

    async def test_open_inference_v2(self, client: Client, big_rows: np.ndarray) -> None:
        body = json.dumps(v2_body(big_rows.astype(int), id="big")).encode()
        assert len(body) > 2 * 1024 * 1024
        response = await client.post(V2, data=body)
        assert response.status == 200
        answer = await response.json()
        assert answer["outputs"][0]["shape"] == [20_000, 10]
        assert len(answer["outputs"][1]["data"]) == 20_000

    async def test_body_over_the_limit_is_413(self, client: Client) -> None:
        response = await client.post(V1, data=b" " * (MAX_BODY_BYTES + 1))
        assert response.status == 413
        assert "error" in await response.json()


class TestServing:
    """The server binds a real port, and the module's entry point stops cleanly on a signal."""

    async def test_start_binds_a_free_port(self, model: DemoModel) -> None:
        runner, port = await start(model, port=0)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/v2/health/ready") as response,
            ):
                assert response.status == 200
        finally:
            await runner.cleanup()

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    async def test_entry_point_serves_until_signalled(self, signum: signal.Signals) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extauthz.demo.model", "--port", "0", "--name", "digits",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
            assert line.startswith("demo model ready on http://127.0.0.1:")
            port = int(line.split("http://127.0.0.1:")[1].split()[0])
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/v1/models/digits") as response,
            ):
                assert response.status == 200
            process.send_signal(signum)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
OPENAI = OpenAIDialect()


def chat_body(*messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "model": "toy",
        "messages": [{"role": role, "content": content} for role, content in messages],
        **extra,
    }


def answer_count(doc: dict[str, Any]) -> int:
    """Return the instances the guard's OpenAI dialect charges for a request body."""
    return OPENAI.parse_request(json.dumps(doc).encode(), max_instances=10_000).instances


class TestOpenAIChat:
    """Chat completions reply with the last user message reversed and count words as tokens."""

    async def test_reply_and_usage(self, client: Client) -> None:
        body = chat_body(
            ("system", "you are a helpful toy"),
            ("user", "first question here"),
            ("assistant", "here question first"),
            ("user", "the quick brown fox"),
        )
        response = await client.post(CHAT_PATH, json=body)
        assert response.status == 200
        answer = await response.json()
        assert answer["object"] == "chat.completion"
        assert answer["model"] == "toy"
        assert answer["id"].startswith("chatcmpl-")
        assert isinstance(answer["created"], int) and answer["created"] > 0
        assert answer["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "fox brown quick the"},
                "finish_reason": "stop",
            }
        ]
        # 5 + 3 + 3 + 4 prompt words; 4 words generated.
        assert answer["usage"] == {"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19}
        assert token_usage(OPENAI.parse_response(await response.read()).doc) == 19

    async def test_max_tokens_caps_the_reply(self, client: Client) -> None:
        words = " ".join(f"w{i}" for i in range(40))
        default = await (await client.post(CHAT_PATH, json=chat_body(("user", words)))).json()
        assert count_tokens(default["choices"][0]["message"]["content"]) == 16
        assert default["choices"][0]["finish_reason"] == "length"
        assert default["usage"]["completion_tokens"] == 16
        capped = await (
            await client.post(CHAT_PATH, json=chat_body(("user", words), max_tokens=3))
        ).json()
        assert capped["choices"][0]["message"]["content"] == "w39 w38 w37"
        assert capped["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}
        newer = await (
            await client.post(
                CHAT_PATH, json=chat_body(("user", words), max_tokens=3, max_completion_tokens=5)
            )
        ).json()
        assert newer["usage"]["completion_tokens"] == 5

    async def test_n_choices_are_each_counted(self, client: Client) -> None:
        body = chat_body(("user", "one two three"), n=4)
        answer = await (await client.post(CHAT_PATH, json=body)).json()
        assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2, 3]
        assert {choice["message"]["content"] for choice in answer["choices"]} == {"three two one"}
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
        assert len(answer["choices"]) == answer_count(body)

    async def test_text_parts_are_read(self, client: Client) -> None:
        content = [{"type": "text", "text": "alpha beta"}, {"type": "text", "text": "gamma"}]
        body = {"messages": [{"role": "user", "content": content}]}
        answer = await (await client.post(CHAT_PATH, json=body)).json()
        assert answer["choices"][0]["message"]["content"] == "gamma beta alpha"
        assert answer["model"] == LLM_NAME
        assert answer["usage"]["prompt_tokens"] == 3

    async def test_deterministic_but_for_id_and_time(self, client: Client) -> None:
        body = chat_body(("user", "same words every time"), n=2)
        first = await (await client.post(CHAT_PATH, json=body)).json()
        second = await (await client.post(CHAT_PATH, json=body)).json()
        assert first["id"] != second["id"]
        for key in ("choices", "usage", "model", "object"):
            assert first[key] == second[key]

    def test_pure_function_takes_id_and_time(self) -> None:
        answer = chat_completion(
            chat_body(("user", "a b")), completion_id="c-1", created=7, default_model="m"
        )
        assert (answer["id"], answer["created"], answer["model"]) == ("c-1", 7, "toy")

    async def test_stream_is_refused(self, client: Client) -> None:
        response = await client.post(CHAT_PATH, json=chat_body(("user", "hi"), stream=True))
        assert response.status == 400
        assert await response.json() == {"error": "streaming is not supported by the demo model"}

    async def test_stream_false_is_answered(self, client: Client) -> None:
        response = await client.post(CHAT_PATH, json=chat_body(("user", "hi"), stream=False))
        assert response.status == 200

    async def test_does_not_shadow_kserve(self, client: Client, test_rows: np.ndarray) -> None:
        response = await client.post(
            "/v1/models/digits:predict", json={"instances": test_rows[:1].tolist()}
        )
        assert response.status == 200
        assert (await client.get(CHAT_PATH)).status == 405


class TestOpenAICompletions:
    """Completions answer n choices per prompt, indexed prompt by prompt, with summed usage."""

    async def test_one_prompt(self, client: Client) -> None:
        response = await client.post(COMPLETIONS_PATH, json={"model": "t", "prompt": "a b c"})
        assert response.status == 200
        answer = await response.json()
        assert answer["object"] == "text_completion"
        assert answer["id"].startswith("cmpl-")
        assert answer["choices"] == [
            {"index": 0, "text": "c b a", "logprobs": None, "finish_reason": "stop"}
        ]
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    async def test_prompts_times_n(self, client: Client) -> None:
        body = {"prompt": ["a b", "c d e f"], "n": 3, "max_tokens": 3}
        answer = await (await client.post(COMPLETIONS_PATH, json=body)).json()
        assert [c["index"] for c in answer["choices"]] == list(range(6))
        assert [c["text"] for c in answer["choices"]] == ["b a"] * 3 + ["f e d"] * 3
        assert [c["finish_reason"] for c in answer["choices"]] == ["stop"] * 3 + ["length"] * 3
        # Prompt words 2 + 4; generated 3 x (2 + 3).
        assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 15, "total_tokens": 21}
        assert len(answer["choices"]) == answer_count(body)

    def test_pure_function(self) -> None:
        answer = text_completion(
            {"prompt": "x y"}, completion_id="cmpl-9", created=1, default_model="d"
        )
        assert (answer["id"], answer["created"], answer["model"]) == ("cmpl-9", 1, "d")
        assert answer["choices"][0]["text"] == "y x"

    async def test_stream_is_refused(self, client: Client) -> None:
        response = await client.post(COMPLETIONS_PATH, json={"prompt": "a", "stream": True})
        assert response.status == 400
        assert await response.json() == {"error": "streaming is not supported by the demo model"}


class TestOpenAIEmbeddings:
    """Embeddings are deterministic unit vectors per input text, with prompt-only usage."""

    async def test_vectors_and_usage(self, client: Client) -> None:
        body = {"model": "e", "input": ["hello world", "a b c", "hello world"]}
        response = await client.post(EMBEDDINGS_PATH, json=body)
        assert response.status == 200
        answer = await response.json()
        assert answer["object"] == "list" and answer["model"] == "e"
        assert [item["index"] for item in answer["data"]] == [0, 1, 2]
        vectors = np.asarray([item["embedding"] for item in answer["data"]])
        assert vectors.shape == (3, EMBEDDING_DIM)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(vectors[0], vectors[2])
        assert not np.allclose(vectors[0], vectors[1])
        assert answer["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
        # The guard's dialect reads the same vectors and tokens back.
        parsed = OPENAI.parse_response(await response.read())
        np.testing.assert_array_equal(parsed.outputs["embedding"], vectors)
        assert token_usage(parsed.doc) == 7
        assert answer_count(body) == 3

    def test_same_text_same_vector_in_every_call(self) -> None:
        np.testing.assert_array_equal(embed(["x y"]), embed(["x y"]))
        single = embeddings({"input": "x y"}, default_model="m")
        assert single["data"][0]["embedding"] == embed(["x y"])[0].tolist()
        assert single["model"] == "m"

    async def test_base64_is_refused(self, client: Client) -> None:
        body = {"input": "a", "encoding_format": "base64"}
        assert (await client.post(EMBEDDINGS_PATH, json=body)).status == 400


BAD_OPENAI = {
    "chat-not-json": (CHAT_PATH, b"{messages"),
    "chat-not-object": (CHAT_PATH, b"[]"),
    "chat-no-messages": (CHAT_PATH, b'{"model": "m"}'),
    "chat-empty-messages": (CHAT_PATH, b'{"messages": []}'),
    "chat-no-user": (CHAT_PATH, b'{"messages": [{"role": "system", "content": "x"}]}'),
    "chat-no-role": (CHAT_PATH, b'{"messages": [{"content": "x"}]}'),
    "chat-image-part": (
        CHAT_PATH,
        b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    ),
    "chat-n-zero": (CHAT_PATH, b'{"messages": [{"role": "user", "content": "x"}], "n": 0}'),
    "chat-n-huge": (CHAT_PATH, b'{"messages": [{"role": "user", "content": "x"}], "n": 129}'),
    "chat-n-string": (CHAT_PATH, b'{"messages": [{"role": "user", "content": "x"}], "n": "2"}'),
    "chat-max-tokens-zero": (
        CHAT_PATH,
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
    ),
    "chat-model-number": (
        CHAT_PATH,
        b'{"messages": [{"role": "user", "content": "x"}], "model": 3}',
    ),
    "completions-no-prompt": (COMPLETIONS_PATH, b'{"model": "m"}'),
    "completions-token-ids": (COMPLETIONS_PATH, b'{"prompt": [1, 2, 3]}'),
    "completions-empty-list": (COMPLETIONS_PATH, b'{"prompt": []}'),
    "embeddings-no-input": (EMBEDDINGS_PATH, b'{"model": "m"}'),
    "embeddings-number": (EMBEDDINGS_PATH, b'{"input": 3}'),
}


class TestOpenAIBadInput:
    """Bad LLM bodies get a 400 JSON error and the server keeps serving."""

    @pytest.mark.parametrize(("path", "body"), BAD_OPENAI.values(), ids=BAD_OPENAI.keys())
    async def test_bad_body(self, client: Client, path: str, body: bytes) -> None:
        response = await client.post(path, data=body)
        assert response.status == 400
        assert isinstance((await response.json())["error"], str)
        healthy = await client.post(CHAT_PATH, json=chat_body(("user", "still here")))
        assert healthy.status == 200

    @settings(max_examples=200, deadline=None)
    @given(
        payload=st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda children: (
                st.lists(children, max_size=5)
                | st.dictionaries(
                    st.sampled_from(
                        ["messages", "role", "content", "prompt", "input", "n", "max_tokens"]
                    ),
                    children,
                )
            ),
            max_leaves=30,
        )
    )
    def test_handlers_raise_only_bad_input(self, payload: object) -> None:
        for call in (
            lambda: chat_completion(payload, completion_id="c", created=0, default_model="m"),
            lambda: text_completion(payload, completion_id="c", created=0, default_model="m"),
            lambda: embeddings(payload, default_model="m"),
        ):
            try:
                call()
            except BadInput:
                pass


LINEAR_V1 = "/v1/models/digits-linear:predict"


class TestLinearModel:
    """The logistic victim trains beside the MLP and answers exact softmax rows as digits-linear."""

    def test_trained_with_the_mlp_and_accurate(self, model: DemoModel) -> None:
        assert model.linear is not None
        assert model.linear.accuracy > 0.9 and model.linear.seed == model.seed

    def test_probabilities_are_the_softmax_of_its_logits(
        self, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        assert model.linear is not None
        logits = model.linear.logits(test_rows)
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(model.linear.predict_proba(test_rows), expected, atol=1e-12)
        # Linear in the pixels: the score of a sum of offsets is the sum of the scores' offsets.
        zero = np.zeros((1, 64))
        a, b = test_rows[:1], test_rows[1:2]
        np.testing.assert_allclose(
            model.linear.logits(a + b) - model.linear.logits(zero),
            model.linear.logits(a) + model.linear.logits(b) - 2 * model.linear.logits(zero),
            atol=1e-9,
        )

    def test_same_seed_gives_the_same_model(self, model: DemoModel, test_rows: np.ndarray) -> None:
        assert model.linear is not None
        again = LinearModel.train(seed=0)
        np.testing.assert_array_equal(
            again.predict_proba(test_rows), model.linear.predict_proba(test_rows)
        )

    async def test_http_answers_are_exact(
        self, client: Client, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        assert model.linear is not None
        response = await client.post(LINEAR_V1, json={"instances": test_rows[:20].tolist()})
        assert response.status == 200
        predictions = np.asarray((await response.json())["predictions"])
        np.testing.assert_array_equal(predictions, model.linear.predict_proba(test_rows[:20]))
        assert not np.array_equal(predictions, model.predict_proba(test_rows[:20]))
        status = await client.get("/v1/models/digits-linear")
        assert await status.json() == {"name": "digits-linear", "ready": True}

    @pytest.mark.parametrize("body", [BAD_V1["nan"], BAD_V1["wrong-width"], BAD_V1["not-json"]])
    async def test_bad_input_is_400(self, client: Client, body: bytes) -> None:
        response = await client.post(LINEAR_V1, data=body)
        assert response.status == 400
        assert isinstance((await response.json())["error"], str)

    async def test_kserve_v1_only_and_named_after_the_mlp(
        self, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        body = {"instances": test_rows[:1].tolist()}
        async with TestClient(TestServer(build_app(model, name="mnist"))) as custom:
            assert (await custom.post("/v1/models/mnist-linear:predict", json=body)).status == 200
            assert (await custom.post(LINEAR_V1, json=body)).status == 404
            assert (await custom.get("/v2/models/mnist-linear")).status == 404

    async def test_absent_without_a_linear_model(
        self, model: DemoModel, test_rows: np.ndarray
    ) -> None:
        alone = dataclasses.replace(model, linear=None)
        async with TestClient(TestServer(build_app(alone))) as bare:
            response = await bare.post(LINEAR_V1, json={"instances": test_rows[:1].tolist()})
            assert response.status == 404


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    result: np.ndarray = shifted - np.log(np.exp(shifted).sum())
    return result


def logprob_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return chat_body(("user", prompt), logprobs=True, **extra)


def answer_of(body: dict[str, Any]) -> dict[str, Any]:
    return chat_completion(body, completion_id="c", created=0, default_model="m")


class TestToyVocabulary:
    """The toy's vocabulary is public and fixed: token strings map back to logit_bias ids."""

    def test_ids_and_strings(self) -> None:
        vocabulary = toy_vocabulary()
        assert len(vocabulary) == len(set(vocabulary)) == TOY_VOCAB_SIZE
        assert vocabulary[0] == UNK_TOKEN and vocabulary[1] == "baba"
        assert all(token_id(token) == i for i, token in enumerate(vocabulary))
        assert token_id("nonword") == 0

    def test_logits_are_deterministic_per_prompt_and_position(self) -> None:
        first = toy_logits("a b c", 0)
        assert first.shape == (TOY_VOCAB_SIZE,)
        np.testing.assert_array_equal(first, toy_logits("a b c", 0))
        assert not np.allclose(first, toy_logits("a b c", 1))
        assert not np.allclose(first, toy_logits("a b d", 0))
        with pytest.raises(ValueError):
            toy_logits("a", -1)

    def test_logits_have_the_hidden_rank(self) -> None:
        rows = np.asarray([toy_logits(f"prompt {i}", i % 3) for i in range(40)])
        singular = np.linalg.svd(rows, compute_uv=False)
        assert singular[TOY_HIDDEN_DIM - 1] > 1e-6 * singular[0]
        assert singular[TOY_HIDDEN_DIM] < 1e-10 * singular[0]


class TestToyLogprobs:
    """Chat logprobs are log_softmax(W @ hidden + logit_bias), top_logprobs sorted, per position."""

    PROMPT = "the quick baba fox"

    def test_top_logprobs_are_the_log_softmax_of_the_logits(self) -> None:
        answer = answer_of(logprob_body(self.PROMPT, top_logprobs=7))
        content = answer["choices"][0]["logprobs"]["content"]
        words = self.PROMPT.split()[::-1]
        assert [entry["token"] for entry in content] == words
        assert answer["choices"][0]["message"]["content"] == " ".join(words)
        for position, entry in enumerate(content):
            expected = log_softmax(toy_logits(self.PROMPT, position))
            assert abs(np.exp(expected).sum() - 1.0) < 1e-9
            top = entry["top_logprobs"]
            assert len(top) == 7
            values = [item["logprob"] for item in top]
            assert values == sorted(values, reverse=True)
            assert [token_id(item["token"]) for item in top] == list(np.argsort(-expected)[:7])
            np.testing.assert_allclose(values, np.sort(expected)[::-1][:7], rtol=0, atol=1e-12)
            assert entry["logprob"] == pytest.approx(expected[token_id(entry["token"])], abs=1e-12)
            assert entry["bytes"] == list(entry["token"].encode())
            assert all(item["bytes"] == list(item["token"].encode()) for item in top)
        # "fox" (position 0) is scored as <unk>; "baba" (position 1) is token 1.
        assert content[0]["logprob"] == log_softmax(toy_logits(self.PROMPT, 0))[0]
        assert content[1]["logprob"] == log_softmax(toy_logits(self.PROMPT, 1))[1]

    def test_helper_matches_the_answer(self) -> None:
        answer = answer_of(logprob_body(self.PROMPT, top_logprobs=3, logit_bias={"9": -5}))
        top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        lp = toy_logprobs(self.PROMPT, 0, {9: -5.0})
        assert abs(np.exp(lp).sum() - 1.0) < 1e-9
        assert [item["logprob"] for item in top] == pytest.approx(np.sort(lp)[::-1][:3], abs=1e-12)

    def test_bias_moves_a_token_into_the_top_k(self) -> None:
        logits = toy_logits(self.PROMPT, 0)
        last = int(np.argmin(logits))
        body = logprob_body(self.PROMPT, top_logprobs=5, logit_bias={str(last): 100})
        top = answer_of(body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert token_id(top[0]["token"]) == last
        biased = logits.copy()
        biased[last] += 100
        assert top[0]["logprob"] == pytest.approx(log_softmax(biased)[last], abs=1e-12)
        # The rest keep their order and their logit differences.
        assert top[1]["logprob"] - top[2]["logprob"] == pytest.approx(
            np.sort(logits)[-1] - np.sort(logits)[-2], abs=1e-9
        )

    def test_negative_bias_pushes_the_best_token_out(self) -> None:
        best = int(np.argmax(toy_logits(self.PROMPT, 0)))
        body = logprob_body(self.PROMPT, top_logprobs=20, logit_bias={str(best): -100.0})
        top = answer_of(body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert best not in {token_id(item["token"]) for item in top}

    def test_logprobs_without_top_and_with_zero_top(self) -> None:
        for body in (logprob_body("a b"), logprob_body("a b", top_logprobs=0)):
            content = answer_of(body)["choices"][0]["logprobs"]["content"]
            assert len(content) == 2 and all(entry["top_logprobs"] == [] for entry in content)

    def test_logprobs_false_or_absent_adds_nothing(self) -> None:
        for extra in ({}, {"logprobs": False}, {"logprobs": None}):
            choice = answer_of(chat_body(("user", "a b"), **extra))["choices"][0]
            assert "logprobs" not in choice

    def test_every_choice_and_position_is_scored(self) -> None:
        answer = answer_of(logprob_body("a b c d", top_logprobs=2, n=3, max_tokens=2))
        contents = [choice["logprobs"]["content"] for choice in answer["choices"]]
        assert contents[0] == contents[1] == contents[2]
        assert [entry["token"] for entry in contents[0]] == ["d", "c"]

    async def test_over_http(self, client: Client) -> None:
        body = logprob_body(self.PROMPT, top_logprobs=20, logit_bias={"3": 100, "4": 99.5})
        response = await client.post(CHAT_PATH, json=body)
        assert response.status == 200
        over_http = (await response.json())["choices"][0]["logprobs"]
        assert over_http == answer_of(body)["choices"][0]["logprobs"]
        top = over_http["content"][0]["top_logprobs"]
        assert [item["token"] for item in top[:2]] == [toy_vocabulary()[3], toy_vocabulary()[4]]


BAD_LOGPROBS: dict[str, dict[str, Any]] = {
    "top-without-logprobs": {"top_logprobs": 3},
    "top-with-logprobs-false": {"logprobs": False, "top_logprobs": 3},
    "logprobs-not-bool": {"logprobs": "yes"},
    "top-too-many": {"logprobs": True, "top_logprobs": 21},
    "top-negative": {"logprobs": True, "top_logprobs": -1},
    "top-string": {"logprobs": True, "top_logprobs": "3"},
    "bias-list": {"logit_bias": [1, 2]},
    "bias-key-word": {"logit_bias": {"baba": 1}},
    "bias-key-negative": {"logit_bias": {"-1": 1}},
    "bias-key-out-of-range": {"logit_bias": {str(TOY_VOCAB_SIZE): 1}},
    "bias-key-other-digits": {"logit_bias": {"\u0663": 1}},
    "bias-key-huge": {"logit_bias": {"9" * 5000: 1}},
    "bias-too-big": {"logit_bias": {"1": 100.5}},
    "bias-too-small": {"logit_bias": {"1": -101}},
    "bias-string": {"logit_bias": {"1": "5"}},
    "bias-bool": {"logit_bias": {"1": True}},
    "bias-nan": {"logit_bias": {"1": float("nan")}},
    "bias-huge-int": {"logit_bias": {"1": 10**400}},
}


class TestToyLogprobsBadInput:
    """Bad logprobs and logit_bias fields get the 400 JSON error, as OpenAI refuses them."""

    @pytest.mark.parametrize("extra", BAD_LOGPROBS.values(), ids=BAD_LOGPROBS.keys())
    def test_refused(self, extra: dict[str, Any]) -> None:
        with pytest.raises(BadInput):
            answer_of(chat_body(("user", "a b"), **extra))

    async def test_over_http(self, client: Client) -> None:
        response = await client.post(CHAT_PATH, json=chat_body(("user", "a"), top_logprobs=2))
        assert response.status == 400
        assert "logprobs" in (await response.json())["error"]
        nan = b'{"messages": [{"role": "user", "content": "a"}], "logit_bias": {"1": NaN}}'
        assert (await client.post(CHAT_PATH, data=nan)).status == 400

    @settings(max_examples=200, deadline=None)
    @given(
        fields=st.dictionaries(
            st.sampled_from(["logprobs", "top_logprobs", "logit_bias"]),
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text(max_size=4)
            | st.dictionaries(st.text(max_size=4), st.integers() | st.floats() | st.text()),
        )
    )
    def test_only_bad_input_is_raised(self, fields: dict[str, Any]) -> None:
        try:
            answer = answer_of(chat_body(("user", "a b \ud800"), **fields))
        except BadInput:
            return
        if fields.get("logprobs") is True:
            assert len(answer["choices"][0]["logprobs"]["content"]) == 3
