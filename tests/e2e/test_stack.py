"""End to end: HTTP through the real Envoy (envoy/envoy.yaml), the guard and the demo model."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc

from extauthz.admin_client import AdminClient
from extauthz.demo.client import Client
from tests.e2e.conftest import E2E, FREE_KEY, LEAKED_KEY, POLICY, TRUSTED_KEY

KSERVE = "/v1/models/digits:predict"
OIP = "/v2/models/digits/infer"


def _rows(n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, size=(n, 64)) + rng.random((n, 64))).round(6).tolist()


def _max_decimals(values: list[float]) -> int:
    return max(len(repr(float(v)).split(".")[1]) for v in values if "e" not in repr(float(v)))


def _wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


class TestUpstreamHeaders:
    """Allowed requests reach the model with the guard's headers, and only the guard's."""

    def test_allowed_request_carries_client_tier_and_risk(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.2") as http:
            reply = http.request("GET", "/debug/headers")
        assert reply.status == 200
        headers = reply.json()["headers"]
        assert headers["x-extauthz-client"] == "ip:127.0.0.2"
        assert headers["x-extauthz-tier"] == "anonymous"
        assert headers["x-extauthz-risk"] == "normal"

    def test_api_key_client_gets_opaque_id_and_key_tier(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.2") as http:
            headers = http.request("GET", "/debug/headers", headers={"x-api-key": FREE_KEY}).json()[
                "headers"
            ]
        assert headers["x-extauthz-client"] == "key:freebie"
        assert headers["x-extauthz-tier"] == "free"
        assert FREE_KEY not in json.dumps(
            {k: v for k, v in headers.items() if k.startswith("x-extauthz")}
        )

    def test_forged_tier_never_reaches_the_upstream(self, e2e: E2E) -> None:
        forged = {
            "x-extauthz-tier": "trusted",
            "x-extauthz-client": "key:bigco",
            "x-extauthz-risk": "normal",
        }
        with Client(e2e.port, source="127.0.0.11") as http:
            headers = http.request("GET", "/debug/headers", headers=forged).json()["headers"]
            reply = http.post(KSERVE, {"instances": _rows(1)}, headers=forged)
        assert headers["x-extauthz-tier"] == "anonymous"
        assert headers["x-extauthz-client"] == "ip:127.0.0.11"
        assert reply.status == 200
        assert _max_decimals(reply.json()["predictions"][0]) <= 2  # served as anonymous
        assert _wait_for(lambda: "ip:127.0.0.11" in e2e.model_log())
        model_lines = [line for line in e2e.model_log().splitlines() if "ip:127.0.0.11" in line]
        assert model_lines and all("trusted" not in line for line in model_lines)


class TestIdentity:
    """Check and ext_proc key anonymous clients by the address Envoy computed."""

    def test_two_addresses_get_two_ids_in_check_and_in_ext_proc(self, e2e: E2E) -> None:
        for source in ("127.0.0.2", "127.0.0.3"):
            with Client(e2e.port, source=source) as http:
                assert http.post(KSERVE, {"instances": _rows(1)}).status == 200

        def lines_for(source: str) -> list[dict[str, Any]]:
            return [
                line
                for line in e2e.access_log()
                if line.get("downstream_remote_address", "").startswith(source + ":")
                and line.get("path", "").startswith("/v1/models/")
            ]

        assert _wait_for(lambda: lines_for("127.0.0.2") and lines_for("127.0.0.3"))
        for source in ("127.0.0.2", "127.0.0.3"):
            line = lines_for(source)[-1]
            assert line["authz_client"] == f"ip:{source}", line
            assert line["proc_client"] == f"ip:{source}", line

    def test_spoofed_x_forwarded_for_does_not_change_identity(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.12") as http:
            headers = http.request(
                "GET", "/debug/headers", headers={"x-forwarded-for": "203.0.113.9"}
            ).json()["headers"]
        assert headers["x-extauthz-client"] == "ip:127.0.0.12"


class TestRefusals:
    """Refusals come from the guard with a JSON body that says why."""

    def test_deny_listed_key_gets_403_json(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.2") as http:
            reply = http.post(KSERVE, {"instances": _rows(1)}, headers={"x-api-key": LEAKED_KEY})
        assert reply.status == 403
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["error"] == "deny_list"

    def test_unknown_key_gets_401(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.2") as http:
            reply = http.post(KSERVE, {"instances": _rows(1)}, headers={"x-api-key": "made-up"})
        assert reply.status == 401
        assert reply.json()["error"] == "invalid_api_key"
        assert "www-authenticate" in reply.headers

    def test_batch_over_the_tier_cap_gets_413(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.13") as http:
            reply = http.post(KSERVE, {"instances": _rows(17)})
        assert reply.status == 413
        assert reply.json()["error"] == "too_many_instances"

    def test_malformed_body_gets_400_and_the_next_request_works(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.14") as http:
            bad = http.post(
                KSERVE, b'{"instances": [[1, 2,', headers={"content-type": "application/json"}
            )
        with Client(e2e.port, source="127.0.0.14") as http:
            good = http.post(KSERVE, {"instances": _rows(1)})
        assert bad.status == 400
        assert bad.json()["error"] == "body_parse_error"
        assert good.status == 200


class TestAdmin:
    """The admin API refuses calls without its credential; with it, a pin takes effect at once."""

    def test_admin_without_credential_is_refused(self, e2e: E2E) -> None:
        with (
            AdminClient(e2e.local.admin_target, None) as admin,
            pytest.raises(grpc.RpcError) as info,
        ):
            admin.list_clients()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with (
            AdminClient(e2e.local.admin_target, "wrong-token") as admin,
            pytest.raises(grpc.RpcError) as info,
        ):
            admin.set_level("ip:127.0.0.15", "abusive")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def test_pin_abusive_blocks_the_client(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.15") as http:
            assert http.post(KSERVE, {"instances": _rows(1)}).status == 200
            with AdminClient(e2e.local.admin_target, e2e.local.admin_token) as admin:
                pinned = admin.set_level("ip:127.0.0.15", "abusive", reason="e2e")
            assert pinned["effective_level"] == "abusive"
            assert pinned["action"] == "block"
            blocked = http.post(KSERVE, {"instances": _rows(1)})
            other = Client(e2e.port, source="127.0.0.16")
            try:
                unaffected = other.post(KSERVE, {"instances": _rows(1)})
            finally:
                other.close()
            with AdminClient(e2e.local.admin_target, e2e.local.admin_token) as admin:
                admin.reset("ip:127.0.0.15")
            after_reset = http.post(KSERVE, {"instances": _rows(1)})
        assert blocked.status == 403
        assert blocked.json()["error"] == "pinned_abusive"
        assert unaffected.status == 200
        assert after_reset.status == 200


class TestBodies:
    """Bodies: large batches pass, rewritten answers keep a correct content-length on keep-alive."""

    def test_two_megabyte_batch_passes(self, e2e: E2E) -> None:
        rows = _rows(3500, seed=1)
        body = json.dumps({"instances": rows}).encode()
        assert len(body) > 2_000_000
        with Client(e2e.port, source="127.0.0.2") as http:
            reply = http.post(
                KSERVE, body, headers={"content-type": "application/json", "x-api-key": TRUSTED_KEY}
            )
        assert reply.status == 200, reply.body[:300]
        assert len(reply.json()["predictions"]) == 3500
        with AdminClient(e2e.local.admin_target, e2e.local.admin_token) as admin:
            assert int(admin.get_client("key:bigco")["instances"]) >= 3500

    def test_rewritten_body_has_correct_length_and_keep_alive_works(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.17") as http:
            first = http.post(KSERVE, {"instances": _rows(4)})
            sock = http._connection.sock
            second = http.post(
                OIP,
                {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP64", "data": _rows(2)}]},
            )
            assert http._connection.sock is sock  # the same connection served both
        for reply in (first, second):
            assert reply.status == 200
            assert int(reply.headers["content-length"]) == len(reply.body)
        assert all(_max_decimals(p) <= 2 for p in first.json()["predictions"])
        probabilities = next(o for o in second.json()["outputs"] if o["name"] == "probabilities")
        assert _max_decimals(probabilities["data"]) <= 2

    def test_trusted_tier_gets_full_precision(self, e2e: E2E) -> None:
        with Client(e2e.port, source="127.0.0.2") as http:
            reply = http.post(KSERVE, {"instances": _rows(2)}, headers={"x-api-key": TRUSTED_KEY})
        assert reply.status == 200
        assert _max_decimals(reply.json()["predictions"][0]) > 3

    def test_gzip_request_body_is_counted(self, e2e: E2E) -> None:
        body = gzip.compress(json.dumps({"instances": _rows(5)}).encode())
        with Client(e2e.port, source="127.0.0.18") as http:
            reply = http.post(
                KSERVE,
                body,
                headers={"content-type": "application/json", "content-encoding": "gzip"},
            )
        # The demo model does not read gzip bodies, so the answer is its 400; the guard counted first.
        assert reply.status in (200, 400)
        with AdminClient(e2e.local.admin_target, e2e.local.admin_token) as admin:
            assert int(admin.get_client("ip:127.0.0.18")["instances"]) == 5


class TestResilience:
    """The guard survives malformed and out-of-order ext_proc streams and keeps serving."""

    def test_out_of_order_and_malformed_streams(self, e2e: E2E) -> None:
        def headers(path: str) -> proc_pb2.ProcessingRequest:
            return proc_pb2.ProcessingRequest(
                request_headers=proc_pb2.HttpHeaders(
                    headers=base_pb2.HeaderMap(
                        headers=[
                            base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
                            base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                            base_pb2.HeaderValue(key="x-bad", raw_value=b"\xff\xfe"),
                        ]
                    )
                )
            )

        streams = [
            [
                proc_pb2.ProcessingRequest(
                    response_body=proc_pb2.HttpBody(body=b"{}", end_of_stream=True)
                ),
                headers(KSERVE),
                headers(KSERVE),
                proc_pb2.ProcessingRequest(
                    request_body=proc_pb2.HttpBody(body=b"\x00garbage", end_of_stream=True)
                ),
            ],
            [
                proc_pb2.ProcessingRequest(),
                proc_pb2.ProcessingRequest(response_trailers=proc_pb2.HttpTrailers()),
            ],
        ]

        async def run(
            messages: list[proc_pb2.ProcessingRequest],
        ) -> list[proc_pb2.ProcessingResponse]:
            async with grpc.aio.insecure_channel(e2e.local.admin_target) as channel:
                call = proc_grpc.ExternalProcessorStub(channel).Process(iter(messages), timeout=5)
                return [response async for response in call]

        for messages in streams:
            responses = asyncio.run(run(messages))
            assert len(responses) <= len(messages)
        with Client(e2e.port, source="127.0.0.2") as http:
            assert http.post(KSERVE, {"instances": _rows(1)}).status == 200


class TestPolicyReload:
    """A valid policy edit applies without a restart; an invalid one keeps the old policy."""

    def test_valid_edit_applies_and_invalid_edit_is_kept_out(self, e2e: E2E) -> None:
        def probe() -> int:
            with Client(e2e.port, source="127.0.0.19") as http:
                return _max_decimals(
                    http.post(KSERVE, {"instances": _rows(3)}).json()["predictions"][0]
                )

        try:
            assert probe() <= 2
            e2e.policy_path.write_text(POLICY.replace("decimals: 2", "decimals: 1"))
            assert _wait_for(lambda: probe() <= 1 and "policy_reloaded" in e2e.guard_log())
            e2e.policy_path.write_text(POLICY.replace("max_instances: 16", "max_instances: -5"))
            assert _wait_for(lambda: "policy_reload_failed" in e2e.guard_log())
            assert probe() <= 1  # the edited, valid policy still serves
            with Client(e2e.port, source="127.0.0.19") as http:
                assert http.post(KSERVE, {"instances": _rows(3)}).status == 200
            metrics_url = f"http://127.0.0.1:{e2e.local.guard_http_port}/metrics"
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                text = response.read().decode()
            errors = [
                line
                for line in text.splitlines()
                if line.startswith("extauthz_policy_reload_errors_total")
            ]
            assert errors and float(errors[0].split()[-1]) >= 1
        finally:
            reloads = e2e.guard_log().count("policy_reloaded")
            e2e.policy_path.write_text(POLICY)
            assert _wait_for(lambda: e2e.guard_log().count("policy_reloaded") > reloads)


class TestSizeLimits:
    """Envoy's buffers and the guard's limits are sized together: over 8 MiB is a clear 413."""

    def test_body_over_the_guard_limit_but_inside_envoys_buffer_gets_413_json(
        self, e2e: E2E
    ) -> None:
        row = json.dumps(_rows(1)[0])
        count = 9 * 1024 * 1024 // len(row) + 1
        body = ('{"instances": [' + ",".join([row] * count) + "]}").encode()
        assert 8 * 1024 * 1024 < len(body) < 10 * 1024 * 1024
        with Client(e2e.port, source="127.0.0.20") as http:
            reply = http.post(
                KSERVE, body, headers={"content-type": "application/json", "x-api-key": TRUSTED_KEY}
            )
        assert reply.status == 413
        assert reply.json()["error"] == "body_too_large"
