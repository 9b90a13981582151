"""Limits through the real Envoy: 429 with Retry-After and RateLimit fields; token quotas."""

from __future__ import annotations

from extauthz.demo.client import Client
from tests.e2e.conftest import E2E, LLM_KEY, LLM_TOKENS_PER_DAY, METERED_KEY, METERED_PER_MINUTE

KSERVE = "/v1/models/digits:predict"
ROW = [float(i % 17) for i in range(64)]


class TestRequestLimit:
    """The request over the limit gets 429 with Retry-After and the draft's RateLimit fields."""

    def test_429_with_retry_after_and_ratelimit_fields(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.30") as http:
            replies = [
                http.post(KSERVE, {"instances": [ROW]}, headers={"x-api-key": METERED_KEY})
                for _ in range(METERED_PER_MINUTE + 1)
            ]
        allowed, refused = replies[:-1], replies[-1]
        assert [r.status for r in allowed] == [200] * METERED_PER_MINUTE
        # Allowed answers tell the client what is left.
        assert [r.headers["ratelimit"] for r in allowed] == [
            f'"metered:per-minute";r={left};t={20 * (METERED_PER_MINUTE - left)}'
            for left in range(METERED_PER_MINUTE - 1, -1, -1)
        ]
        assert (
            allowed[0].headers["ratelimit-policy"] == '"metered:per-minute";q=3;w=60;qu="requests"'
        )
        assert refused.status == 429
        assert refused.headers["retry-after"] == "20"
        assert refused.headers["ratelimit"] == '"metered:per-minute";r=0;t=60'
        body = refused.json()
        assert body["error"] == "rate_limited"
        assert body["limit"]["name"] == "metered:per-minute"
        assert body["limit"]["unit"] == "requests"
        assert body["retry_after_s"] == 20


class TestTokenQuota:
    """Tokens are charged from the answer's usage; the request after the one that spent them is refused."""

    def test_token_quota_refuses_the_next_request(self, e2e: E2E) -> None:
        long_prompt = " ".join(["word"] * LLM_TOKENS_PER_DAY)  # 40 prompt tokens alone
        chat = {
            "model": "demo",
            "messages": [{"role": "user", "content": long_prompt}],
            "max_tokens": 4,
        }
        small = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        with Client(e2e.port, source="127.0.0.31") as http:
            first = http.post("/v1/chat/completions", small, headers={"x-api-key": LLM_KEY})
            spender = http.post("/v1/chat/completions", chat, headers={"x-api-key": LLM_KEY})
            refused = http.post("/v1/chat/completions", small, headers={"x-api-key": LLM_KEY})
        assert first.status == 200
        assert spender.status == 200  # served in full: usage is known only after the answer
        assert (
            spender.json()["usage"]["total_tokens"]
            > LLM_TOKENS_PER_DAY - first.json()["usage"]["total_tokens"]
        )
        assert refused.status == 429
        assert refused.json()["limit"]["unit"] == "tokens"
        assert int(refused.headers["retry-after"]) > 0
