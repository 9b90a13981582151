"""Response protection through the real Envoy, with a fake upstream that speaks every dialect,
gzips and chunks on request: each answer is rewritten as the client's tier and risk level say,
and the client still parses it with the API's own schema."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from extauthz.admin_client import AdminClient
from extauthz.demo.client import Client, Reply
from extauthz.demo.local import LocalStack
from tests.e2e.conftest import require_envoy

FREE_KEY = "protect-free-key"
TRUSTED_KEY = "protect-trusted-key"
KSERVE = "/v1/models/m:predict"
OIP = "/v2/models/m/infer"
COSINE_CHANGE = 0.02


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


POLICY = f"""
identity:
  api_keys:
    - {{name: freebie, tier: free, sha256: {_digest(FREE_KEY)}}}
    - {{name: bigco, tier: trusted, sha256: {_digest(TRUSTED_KEY)}}}
tiers:
  anonymous: {{max_instances: 4, output: {{policy: label_only}}}}
  free:
    max_instances: 64
    output:
      - {{policy: keyed_noise, scale: 0.5, cosine_change: {COSINE_CHANGE}}}
      - {{policy: round, decimals: 4}}
    output_by_level:
      suspicious: {{policy: label_only}}
    llm: {{max_top_logprobs: 2, logit_bias_with_logprobs: refuse}}
  trusted: {{max_instances: 64, llm: {{logit_bias_with_logprobs: allow}}}}
levels: {{suspicious: allow}}
"""


class KServeResponse(BaseModel):
    """KServe v1 predict answer."""

    predictions: list[list[float]]


class OipOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float | int]


class OipResponse(BaseModel):
    """Open Inference Protocol v2 inference answer."""

    model_name: str
    outputs: list[OipOutput]


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_envoy()
    workdir = tmp_path_factory.mktemp("protect-stack")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    key = workdir / "noise.key"
    key.write_bytes(b"e2e-noise-key-0123456789abcdef")
    upstream = [sys.executable, "-m", "tests.e2e.fake_upstream", "{port}"]
    local = LocalStack(
        policy=policy, workdir=workdir, upstream=upstream, guard_args=["--noise-key-file", str(key)]
    )
    with local:
        yield local


def _rows(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 64)).round(3).tolist()


def _post(
    stack: LocalStack,
    path: str,
    body: Any,
    key: str | None,
    source: str = "127.0.0.40",
    **headers: str,
) -> Reply:
    all_headers = dict(headers)
    if key:
        all_headers["x-api-key"] = key
    with Client(stack.ports.listener, source=source) as http:
        return http.post(path, body, headers=all_headers)


class TestKServe:
    """KServe v1: keyed noise keeps top-1 and is stable per (client, input); risk changes the policy."""

    def test_free_tier_gets_keyed_noise_that_keeps_top1(self, protected: LocalStack) -> None:
        rows = _rows(8, 1)
        free = KServeResponse.model_validate(
            _post(protected, KSERVE, {"instances": rows}, FREE_KEY).json()
        )
        full = KServeResponse.model_validate(
            _post(protected, KSERVE, {"instances": rows}, TRUSTED_KEY).json()
        )
        p, q = np.array(full.predictions), np.array(free.predictions)
        assert (p.argmax(axis=1) == q.argmax(axis=1)).all()
        assert np.abs(p - q).sum(axis=1).min() > 1e-3  # every row was perturbed
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=5e-3)

    def test_repeat_and_jitter_get_the_same_answer(self, protected: LocalStack) -> None:
        rows = _rows(4, 2)
        jittered = (np.array(rows) + 1e-7).tolist()
        answers = [
            _post(protected, KSERVE, {"instances": body}, FREE_KEY).json()["predictions"]
            for body in (rows, rows, jittered)
        ]
        assert answers[0] == answers[1] == answers[2]

    def test_pinned_suspicious_client_gets_labels_only(self, protected: LocalStack) -> None:
        with AdminClient(protected.admin_target, protected.admin_token) as admin:
            admin.set_level("key:freebie", "suspicious", reason="e2e")
            try:
                reply = _post(protected, KSERVE, {"instances": _rows(3, 3)}, FREE_KEY)
            finally:
                admin.set_level("key:freebie", None)
        predictions = np.array(KServeResponse.model_validate(reply.json()).predictions)
        assert set(np.unique(predictions)) == {0.0, 1.0}
        assert (predictions.sum(axis=1) == 1).all()


class TestOpenInference:
    """OIP v2: probabilities are rewritten, integer labels are not, the schema holds."""

    def test_outputs_rewritten_labels_kept(self, protected: LocalStack) -> None:
        rows = _rows(5, 4)
        body = {"inputs": [{"name": "x", "shape": [5, 64], "datatype": "FP64", "data": rows}]}
        free = OipResponse.model_validate(_post(protected, OIP, body, FREE_KEY).json())
        full = OipResponse.model_validate(_post(protected, OIP, body, TRUSTED_KEY).json())
        by_name = {o.name: o for o in free.outputs}
        full_by_name = {o.name: o for o in full.outputs}
        assert by_name["label"].data == full_by_name["label"].data
        p = np.array(full_by_name["probabilities"].data).reshape(5, 10)
        q = np.array(by_name["probabilities"].data).reshape(5, 10)
        assert len(by_name["probabilities"].data) == int(np.prod(by_name["probabilities"].shape))
        assert (p.argmax(axis=1) == q.argmax(axis=1)).all()
        assert not np.allclose(p, q)


class TestOpenAI:
    """OpenAI-compatible: logprobs capped and rewritten, logit_bias refused, embeddings rotated."""

    def test_top_logprobs_capped_and_answer_parses(self, protected: LocalStack) -> None:
        chat = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "top_logprobs": 5,
        }
        reply = _post(protected, "/v1/chat/completions", chat, FREE_KEY)
        assert reply.status == 200, reply.body[:300]
        completion = ChatCompletion.model_validate(reply.json())
        content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content and all(len(token.top_logprobs) <= 2 for token in content)

    def test_logit_bias_with_logprobs_is_refused_for_free(self, protected: LocalStack) -> None:
        chat = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "logit_bias": {"42": 100},
        }
        refused = _post(protected, "/v1/chat/completions", chat, FREE_KEY)
        allowed = _post(protected, "/v1/chat/completions", chat, TRUSTED_KEY)
        assert refused.status == 400
        assert refused.json()["error"]["param"] == "logit_bias"
        assert allowed.status == 200

    def test_embeddings_move_by_the_policy_cosine(self, protected: LocalStack) -> None:
        body = {"model": "m", "input": ["a cat", "a dog"]}
        free = CreateEmbeddingResponse.model_validate(
            _post(protected, "/v1/embeddings", body, FREE_KEY).json()
        )
        full = CreateEmbeddingResponse.model_validate(
            _post(protected, "/v1/embeddings", body, TRUSTED_KEY).json()
        )
        for a, b in zip(free.data, full.data, strict=True):
            u, v = np.array(a.embedding), np.array(b.embedding)
            cosine = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
            assert cosine == pytest.approx(
                1 - COSINE_CHANGE, abs=2e-4
            )  # 4-decimal rounding after the noise


class TestEncodings:
    """Gzip and chunked upstream answers are rewritten; the connection keeps working."""

    @pytest.mark.parametrize(
        "fake",
        [
            {"x-fake-gzip": "1"},
            {"x-fake-chunked": "1"},
            {"x-fake-gzip": "1", "x-fake-chunked": "1"},
        ],
    )
    def test_rewritten_and_keep_alive(self, protected: LocalStack, fake: dict[str, str]) -> None:
        rows = _rows(3, 5)
        with Client(protected.ports.listener, source="127.0.0.41") as http:
            first = http.post(KSERVE, {"instances": rows}, headers={"x-api-key": FREE_KEY, **fake})
            second = http.post(KSERVE, {"instances": rows}, headers={"x-api-key": FREE_KEY})
        for reply in (first, second):
            assert reply.status == 200
            assert reply.headers.get("content-encoding") in (None, "identity")
            if "content-length" in reply.headers:
                assert int(reply.headers["content-length"]) == len(reply.body)
        assert first.json() == second.json()  # the same rewrite whatever the upstream's framing
