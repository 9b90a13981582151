"""Envoy's ext_authz Check, health, reflection and the HTTP port, against a guard started in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.service_fixtures import (
    ALICE_KEY,
    BOB_KEY,
    MALLORY_KEY,
    UNKNOWN_KEY,
    RunningGuard,
    check_request,
    counter,
    header_options,
    http_get,
    option_value,
    policy_yaml,
    running_guard,
)

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[RunningGuard]:
    async with running_guard(tmp_path) as running:
        yield running


def _metadata(response: external_auth_pb2.CheckResponse) -> dict[str, object]:
    metadata: dict[str, object] = json_format.MessageToDict(response.dynamic_metadata)
    return metadata


def _denied_body(response: external_auth_pb2.CheckResponse) -> dict[str, object]:
    document: dict[str, object] = json.loads(response.denied_response.body)
    return document


class TestCheckAllow:
    """An allowed request carries the client's id, tier and risk upstream and the verdict as metadata."""

    async def test_allow_sets_upstream_headers_with_overwrite(self, guarded: RunningGuard) -> None:
        response = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert response.status.code == code_pb2.OK
        assert response.HasField("ok_response")
        options = header_options(response.ok_response.headers)
        assert set(options) >= {"x-extauthz-client", "x-extauthz-tier", "x-extauthz-risk"}
        assert option_value(options["x-extauthz-client"]) == "key:alice"
        assert option_value(options["x-extauthz-tier"]) == "free"
        assert option_value(options["x-extauthz-risk"]) == "normal"
        assert all(option.append_action == OVERWRITE for option in options.values())

    async def test_allow_emits_decision_metadata(self, guarded: RunningGuard) -> None:
        response = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        metadata = _metadata(response)
        assert {"client", "tier", "risk", "level", "action", "reasons"} <= set(metadata)
        assert metadata["client"] == "key:alice"
        assert metadata["tier"] == "free"
        assert metadata["risk"] == "normal"
        assert metadata["level"] == 0
        assert metadata["action"] == "allow"
        assert metadata["reasons"] == ""

    async def test_raw_api_key_never_appears_in_the_answer(self, guarded: RunningGuard) -> None:
        for key in (ALICE_KEY, UNKNOWN_KEY, MALLORY_KEY):
            response = await guarded.authz.Check(check_request({"x-api-key": key}))
            assert key.encode() not in response.SerializeToString()
            assert key not in json_format.MessageToJson(response)

    async def test_check_charges_one_request(self, guarded: RunningGuard) -> None:
        for _ in range(3):
            await guarded.authz.Check(check_request({"x-api-key": BOB_KEY}))
        record = await guarded.guard.store.get_client("key:bob")
        assert record is not None
        assert (record.requests, record.instances, record.tier) == (3, 0, "trusted")


class TestCheckRefusals:
    """Deny list, unknown keys and throttling are refused with the matching status and a JSON body."""

    async def test_deny_list_gets_403_json(self, guarded: RunningGuard) -> None:
        response = await guarded.authz.Check(check_request({"x-api-key": MALLORY_KEY}))
        assert response.status.code == code_pb2.PERMISSION_DENIED
        assert response.denied_response.status.code == 403
        options = header_options(response.denied_response.headers)
        assert option_value(options["content-type"]) == "application/json"
        body = _denied_body(response)
        assert body["error"] == "deny_list"
        assert body["action"] == "block"
        assert _metadata(response)["action"] == "block"

    async def test_unknown_key_gets_401_with_www_authenticate(self, guarded: RunningGuard) -> None:
        response = await guarded.authz.Check(check_request({"x-api-key": UNKNOWN_KEY}))
        assert response.denied_response.status.code == 401
        options = header_options(response.denied_response.headers)
        assert "www-authenticate" in options
        assert 'realm="extauthz"' in option_value(options["www-authenticate"])
        assert _denied_body(response)["error"] == "invalid_api_key"

    async def test_request_id_is_echoed_in_the_refusal(self, guarded: RunningGuard) -> None:
        response = await guarded.authz.Check(
            check_request({"x-api-key": MALLORY_KEY}, request_id="req-77")
        )
        assert _denied_body(response)["request_id"] == "req-77"

    async def test_throttle_level_gets_429_with_retry_after(self, tmp_path: Path) -> None:
        text = policy_yaml(levels={"elevated": "throttle"}, retry_after_s=17)
        async with running_guard(tmp_path, text) as running:
            await running.guard.store.set_level(
                "key:alice",
                level="elevated",
                blocked=False,
                reason="test",
                now=running.clock(),
                ttl_s=None,
            )
            response = await running.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert response.denied_response.status.code == 429
        options = header_options(response.denied_response.headers)
        assert option_value(options["retry-after"]) == "17"
        body = _denied_body(response)
        assert body["action"] == "throttle"
        assert body["retry_after_s"] == 17

    async def test_shadow_mode_allows_a_deny_listed_client(self, tmp_path: Path) -> None:
        async with running_guard(tmp_path, policy_yaml(mode="shadow")) as running:
            response = await running.authz.Check(check_request({"x-api-key": MALLORY_KEY}))
        assert response.status.code == code_pb2.OK
        assert response.HasField("ok_response")
        metadata = _metadata(response)
        assert metadata["action"] == "block"  # the verdict is still reported
        assert metadata["enforced"] is False


class TestCheckIdentity:
    """Anonymous clients are told apart by the source address Envoy computed."""

    async def test_two_addresses_are_two_clients(self, guarded: RunningGuard) -> None:
        first = await guarded.authz.Check(check_request(address="192.0.2.10"))
        second = await guarded.authz.Check(check_request(address="192.0.2.11"))
        client_a = _metadata(first)["client"]
        client_b = _metadata(second)["client"]
        assert client_a != client_b
        assert _metadata(first)["tier"] == "anonymous"
        assert await guarded.guard.store.get_client(str(client_a)) is not None
        assert await guarded.guard.store.get_client(str(client_b)) is not None

    async def test_port_does_not_split_a_client(self, guarded: RunningGuard) -> None:
        first = await guarded.authz.Check(check_request(address="192.0.2.10", port=1000))
        second = await guarded.authz.Check(check_request(address="192.0.2.10", port=2000))
        assert _metadata(first)["client"] == _metadata(second)["client"]

    async def test_empty_check_request_is_answered(self, guarded: RunningGuard) -> None:
        response = await guarded.authz.Check(external_auth_pb2.CheckRequest())
        assert response.HasField("ok_response") or response.HasField("denied_response")
        assert response.status.code in (code_pb2.OK, code_pb2.PERMISSION_DENIED)


class TestHealthAndReflection:
    """grpc.health.v1 reports SERVING for the server and for Check; reflection lists the services."""

    @pytest.mark.parametrize("service", ["", "envoy.service.auth.v3.Authorization"])
    async def test_health_serving(self, guarded: RunningGuard, service: str) -> None:
        stub = health_pb2_grpc.HealthStub(guarded.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def test_health_unknown_service_not_found(self, guarded: RunningGuard) -> None:
        stub = health_pb2_grpc.HealthStub(guarded.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    async def test_reflection_lists_services(self, guarded: RunningGuard) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: set[str] = set()
        async for reply in stub.ServerReflectionInfo(ask()):
            names.update(service.name for service in reply.list_services_response.service)
        assert {
            "envoy.service.auth.v3.Authorization",
            "envoy.service.ext_proc.v3.ExternalProcessor",
            "extauthz.v1.Admin",
            "grpc.health.v1.Health",
        } <= names


class TestHttpPort:
    """The HTTP port serves /metrics, /healthz and /readyz, and /readyz turns 503 while draining."""

    async def test_metrics_healthz_readyz(self, guarded: RunningGuard) -> None:
        await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        status, text = await http_get(guarded.http_url("/metrics"))
        assert status == 200
        assert "extauthz_decisions_total" in text
        assert ALICE_KEY not in text
        status, text = await http_get(guarded.http_url("/healthz"))
        assert (status, json.loads(text)["status"]) == (200, "ok")
        status, text = await http_get(guarded.http_url("/readyz"))
        assert status == 200
        assert json.loads(text) == {"status": "ready", "store": "ok"}

    async def test_check_counts_decisions(self, guarded: RunningGuard) -> None:
        labels = {"path": "check", "action": "block", "tier": "free", "reason": "deny_list"}
        before = counter("extauthz_decisions_total", **labels)
        await guarded.authz.Check(check_request({"x-api-key": MALLORY_KEY}))
        assert counter("extauthz_decisions_total", **labels) == before + 1

    async def test_readyz_503_when_draining(self, guarded: RunningGuard) -> None:
        guarded.guard.readiness.start_draining()
        status, text = await http_get(guarded.http_url("/readyz"))
        assert status == 503
        assert json.loads(text)["status"] == "draining"
        status, _ = await http_get(guarded.http_url("/healthz"))
        assert status == 200  # alive while draining
        await guarded.guard.stop(grace_s=1.0)

    async def test_stop_drains_before_closing(self, tmp_path: Path) -> None:
        async with running_guard(tmp_path, drain_s=0.5) as running:
            stopping = asyncio.create_task(running.guard.stop(grace_s=1.0))
            await asyncio.sleep(0.15)
            status, _ = await http_get(running.http_url("/readyz"))
            health = await health_pb2_grpc.HealthStub(running.channel).Check(
                health_pb2.HealthCheckRequest(service="")
            )
            # Check keeps answering during the drain window.
            response = await running.authz.Check(check_request({"x-api-key": ALICE_KEY}))
            await stopping
        assert status == 503
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert response.HasField("ok_response")
