"""Response protection in the ext_proc service: hostile answers never crash a stream nor lose
the upstream's answer where the policy passes it; gRPC inference is refused or charged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from extauthz.dialects import get_dialect
from tests.integration.service_fixtures import (
    ALICE_KEY,
    FREE_MAX_INSTANCES,
    exchange,
    kserve_body,
    policy_yaml,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
    running_guard,
)

KSERVE = "/v1/models/m:predict"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


def _policy(binary: str = "refuse") -> str:
    return policy_yaml().replace(
        "  - {prefix: /v2/models/, dialect: oip_v2}",
        "  - {prefix: /v2/models/, dialect: oip_v2}\n"
        f"  - {{prefix: /inference.GRPCInferenceService/, dialect: auto, binary: {binary}}}",
    )


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=30,
)
_answers = st.one_of(
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps({"predictions": v}).encode()),
    st.builds(
        lambda rows, cut: json.dumps({"predictions": rows}).encode()[:cut],
        st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=1, max_size=3),
        st.integers(1, 60),
    ),
    st.just(b'{"predictions": [[1e308, 1e308, -1e308]]}'),
    st.just(b'{"predictions": [[0.2, 0.3, 0.5], [0.1]]}'),
)


class TestHostileAnswers:
    """Whatever the model answers, the stream ends OK and the answer is either the upstream's
    own bytes (passed) or a well-formed rewrite with a matching content-length."""

    def test_random_answers(self, tmp_path: Path) -> None:
        async def scenario() -> None:
            async with running_guard(tmp_path, _policy()) as guard:

                @settings(
                    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
                )
                @given(answer=_answers)
                def check(answer: bytes) -> None:
                    messages = [
                        proc_request_headers(KSERVE, headers={"x-api-key": ALICE_KEY}),
                        proc_request_body(kserve_body(2)),
                        proc_response_headers(200),
                        proc_response_body(answer),
                    ]
                    result = asyncio.run_coroutine_threadsafe(
                        exchange(guard.extproc, messages), loop
                    ).result(30)
                    assert result.code == grpc.StatusCode.OK
                    last = result.responses[-1]
                    assert last.HasField("response_body"), last
                    common = last.response_body.response
                    if not common.HasField("body_mutation"):
                        return  # passed: Envoy forwards the upstream's bytes untouched
                    body = common.body_mutation.body
                    get_dialect("kserve_v1").parse_response(body)  # a rewrite is well-formed
                    lengths = [
                        h.header.raw_value
                        for h in common.header_mutation.set_headers
                        if h.header.key == "content-length"
                    ]
                    assert lengths == [str(len(body)).encode()]

                loop = asyncio.get_running_loop()
                await asyncio.to_thread(check)

        asyncio.run(scenario())


class TestGrpcInference:
    """gRPC inference is refused by default, or passed and charged the tier's maximum batch."""

    async def test_refused_with_a_grpc_status(self, tmp_path: Path) -> None:
        async with running_guard(tmp_path, _policy("refuse")) as guard:
            result = await exchange(
                guard.extproc,
                [
                    proc_request_headers(
                        GRPC_PATH,
                        headers={"x-api-key": ALICE_KEY, "content-type": "application/grpc"},
                    ),
                ],
            )
        immediate = result.responses[0].immediate_response
        headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
        assert headers["grpc-status"] == b"3"

    async def test_passed_and_charged_the_maximum(self, tmp_path: Path) -> None:
        async with running_guard(tmp_path, _policy("pass")) as guard:
            result = await exchange(
                guard.extproc,
                [
                    proc_request_headers(
                        GRPC_PATH,
                        headers={"x-api-key": ALICE_KEY, "content-type": "application/grpc"},
                    ),
                ],
            )
            record = await guard.guard.store.get_client("key:alice")
        response = result.responses[0]
        assert response.HasField("request_headers")
        assert response.mode_override.request_body_mode == response.mode_override.NONE
        assert record is not None and record.instances == FREE_MAX_INSTANCES
