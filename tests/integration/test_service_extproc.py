"""Envoy's ext_proc Process, one bidi stream per HTTP request, against a guard started in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from google.protobuf import json_format, struct_pb2

from extauthz.challenge.pow import solve
from tests.integration.service_fixtures import (
    ALICE_KEY,
    ANONYMOUS_MAX_INSTANCES,
    BOB_KEY,
    FREE_MAX_INSTANCES,
    MALLORY_KEY,
    UNKNOWN_KEY,
    ProcStream,
    RunningGuard,
    check_request,
    counter,
    gzip_bytes,
    header_options,
    kserve_body,
    option_value,
    policy_yaml,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
    running_guard,
)

MODE = processing_mode_pb2.ProcessingMode
CONTINUE = proc_pb2.CommonResponse.CONTINUE
ANON_CLIENT = "ip:127.0.0.2"


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[RunningGuard]:
    async with running_guard(tmp_path) as running:
        yield running


def _immediate_json(response: proc_pb2.ProcessingResponse) -> dict[str, object]:
    assert response.HasField("immediate_response"), response
    document: dict[str, object] = json.loads(response.immediate_response.body)
    return document


async def _open(
    guarded: RunningGuard, **kwargs: object
) -> tuple[ProcStream, proc_pb2.ProcessingResponse]:
    """Open a stream and send request_headers; return the stream and the answer."""
    stream = ProcStream(guarded.extproc)
    answer = await stream.send(proc_request_headers(**kwargs))  # type: ignore[arg-type]
    return stream, answer


def _check_verdict(client: str = ANON_CLIENT, tier: str = "anonymous") -> struct_pb2.Struct:
    """Check's allowing verdict, as Envoy forwards it to ext_proc in two-hop mode."""
    verdict = struct_pb2.Struct()
    verdict.update(
        {"client": client, "tier": tier, "risk": "normal", "level": 0, "action": "allow"}
    )
    return verdict


class TestRequestHeaders:
    """request_headers: unknown paths are skipped; model routes get identity headers and metadata."""

    async def test_unknown_path_skips_the_rest(self, guarded: RunningGuard) -> None:
        # Two hops: Check decided this request already.
        stream, answer = await _open(
            guarded, path="/static/logo.png", check_metadata=_check_verdict()
        )
        assert answer.WhichOneof("response") == "request_headers"
        mode = answer.mode_override
        assert mode.request_body_mode == MODE.NONE
        assert mode.response_header_mode == MODE.SKIP
        assert mode.response_body_mode == MODE.NONE
        assert await stream.finish() == grpc.StatusCode.OK
        assert await guarded.guard.store.get_client(ANON_CLIENT) is None  # nothing charged

    async def test_model_route_continues_with_identity_headers(self, guarded: RunningGuard) -> None:
        stream, answer = await _open(guarded)
        common = answer.request_headers.response
        assert common.status == CONTINUE
        assert not answer.HasField("mode_override")
        options = header_options(common.header_mutation.set_headers)
        assert option_value(options["x-extauthz-client"]) == ANON_CLIENT
        assert option_value(options["x-extauthz-tier"]) == "anonymous"
        assert option_value(options["x-extauthz-risk"]) == "normal"
        assert "accept-encoding" in common.header_mutation.remove_headers
        metadata = json_format.MessageToDict(answer.dynamic_metadata)
        assert metadata["extauthz"]["client"] == ANON_CLIENT
        assert metadata["extauthz"]["action"] == "allow"
        assert {"tier", "risk", "level", "reasons"} <= set(metadata["extauthz"])
        assert await stream.finish() == grpc.StatusCode.OK

    async def test_raw_key_not_in_headers_or_metadata(self, guarded: RunningGuard) -> None:
        stream, answer = await _open(guarded, headers={"x-api-key": ALICE_KEY})
        assert ALICE_KEY.encode() not in answer.SerializeToString()
        options = header_options(answer.request_headers.response.header_mutation.set_headers)
        assert option_value(options["x-extauthz-client"]) == "key:alice"
        await stream.finish()

    async def test_uppercase_path_is_still_protected(self, guarded: RunningGuard) -> None:
        stream, answer = await _open(guarded, path="/V1/Models/m:predict")
        assert not answer.HasField("mode_override")
        assert answer.request_headers.response.header_mutation.set_headers
        await stream.finish()


class TestRequestBody:
    """request_body: instances are counted and charged; unreadable bodies are refused or charged max."""

    async def test_batch_is_counted(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded)
        answer = await stream.send(proc_request_body(kserve_body(3)))
        assert answer.request_body.response.status == CONTINUE
        assert await stream.finish() == grpc.StatusCode.OK
        record = await guarded.guard.store.get_client(ANON_CLIENT)
        assert record is not None
        assert (record.requests, record.instances) == (1, 3)

    async def test_instances_accumulate_across_requests(self, guarded: RunningGuard) -> None:
        for size in (2, 4):
            stream, _ = await _open(guarded)
            await stream.send(proc_request_body(kserve_body(size)))
            await stream.finish()
        record = await guarded.guard.store.get_client(ANON_CLIENT)
        assert record is not None
        assert record.instances == 6

    async def test_batch_over_tier_max_gets_413(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded)
        answer = await stream.send(proc_request_body(kserve_body(ANONYMOUS_MAX_INSTANCES + 1)))
        assert answer.immediate_response.status.code == 413
        assert _immediate_json(answer)["error"] == "too_many_instances"
        options = header_options(answer.immediate_response.headers.set_headers)
        assert option_value(options["content-type"]) == "application/json"
        assert await stream.finish() == grpc.StatusCode.OK

    async def test_keyed_tier_has_its_own_max(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded, headers={"x-api-key": ALICE_KEY})
        answer = await stream.send(proc_request_body(kserve_body(FREE_MAX_INSTANCES)))
        assert answer.request_body.response.status == CONTINUE
        await stream.finish()
        record = await guarded.guard.store.get_client("key:alice")
        assert record is not None and record.instances == FREE_MAX_INSTANCES

    async def test_malformed_json_denied_with_400(self, guarded: RunningGuard) -> None:
        before = counter("extauthz_errors_total", reason="body_parse_error")
        stream, _ = await _open(guarded)
        answer = await stream.send(proc_request_body(b'{"instances": [[1, 2'))
        assert answer.immediate_response.status.code == 400
        assert _immediate_json(answer)["error"] == "body_parse_error"
        assert counter("extauthz_errors_total", reason="body_parse_error") == before + 1
        await stream.finish()

    async def test_malformed_json_charged_max_under_charge_max(self, tmp_path: Path) -> None:
        async with running_guard(tmp_path, policy_yaml(body_fail_mode="charge_max")) as running:
            stream, _ = await _open(running)
            answer = await stream.send(proc_request_body(b"not json at all"))
            assert answer.request_body.response.status == CONTINUE
            await stream.finish()
            record = await running.guard.store.get_client(ANON_CLIENT)
        assert record is not None
        assert record.instances == ANONYMOUS_MAX_INSTANCES

    async def test_gzip_body_is_decoded_and_counted(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded, headers={"content-encoding": "gzip"})
        answer = await stream.send(proc_request_body(gzip_bytes(kserve_body(3))))
        assert answer.request_body.response.status == CONTINUE
        await stream.finish()
        record = await guarded.guard.store.get_client(ANON_CLIENT)
        assert record is not None and record.instances == 3

    async def test_gzip_batch_over_max_is_refused(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded, headers={"content-encoding": "gzip"})
        answer = await stream.send(
            proc_request_body(gzip_bytes(kserve_body(ANONYMOUS_MAX_INSTANCES * 4)))
        )
        assert answer.immediate_response.status.code == 413
        await stream.finish()

    async def test_unknown_encoding_gets_415(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded, headers={"content-encoding": "br"})
        answer = await stream.send(proc_request_body(b"\x8b\x02\x80{}\x03"))
        assert answer.immediate_response.status.code == 415
        assert _immediate_json(answer)["error"] == "unsupported_encoding"
        await stream.finish()

    async def test_corrupt_gzip_gets_400(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded, headers={"content-encoding": "gzip"})
        answer = await stream.send(proc_request_body(gzip_bytes(kserve_body(2))[:-12]))
        assert answer.immediate_response.status.code == 400
        await stream.finish()


class TestResponse:
    """response_headers/response_body: JSON 200 answers are rounded by tier; others pass through."""

    async def _through_request(self, guarded: RunningGuard, **kwargs: object) -> ProcStream:
        stream, _ = await _open(guarded, **kwargs)
        await stream.send(proc_request_body(kserve_body(1)))
        return stream

    async def test_floats_are_rounded_with_matching_content_length(
        self, guarded: RunningGuard
    ) -> None:
        stream = await self._through_request(guarded)
        headers_answer = await stream.send(proc_response_headers(extra={"content-length": "60"}))
        assert headers_answer.response_headers.response.status == CONTINUE
        assert not headers_answer.HasField("mode_override")
        original = b'{"predictions":[[0.123456,0.876544]],"model":"m"}'
        answer = await stream.send(proc_response_body(original))
        common = answer.response_body.response
        new_body = common.body_mutation.body
        assert json.loads(new_body) == {"predictions": [[0.12, 0.88]], "model": "m"}
        options = header_options(common.header_mutation.set_headers)
        assert option_value(options["content-length"]) == str(len(new_body))
        assert await stream.finish() == grpc.StatusCode.OK

    async def test_rewrite_is_counted(self, guarded: RunningGuard) -> None:
        labels = {"dialect": "kserve_v1", "policy": "round"}
        before = counter("extauthz_body_rewrites_total", **labels)
        stream = await self._through_request(guarded)
        await stream.send(proc_response_headers())
        await stream.send(proc_response_body(b'{"predictions":[0.5555]}'))
        await stream.finish()
        assert counter("extauthz_body_rewrites_total", **labels) == before + 1

    async def test_passthrough_tier_skips_the_response_body(self, guarded: RunningGuard) -> None:
        stream = await self._through_request(guarded, headers={"x-api-key": BOB_KEY})
        answer = await stream.send(proc_response_headers())
        assert answer.WhichOneof("response") == "response_headers"
        assert answer.mode_override.response_body_mode == MODE.NONE
        await stream.finish()

    @pytest.mark.parametrize(
        ("status", "content_type"),
        [(500, "application/json"), (200, "text/plain"), (404, "text/html")],
    )
    async def test_non_200_or_non_json_not_rewritten(
        self, guarded: RunningGuard, status: int, content_type: str
    ) -> None:
        stream = await self._through_request(guarded)
        answer = await stream.send(proc_response_headers(status, content_type=content_type))
        assert answer.mode_override.response_body_mode == MODE.NONE
        # If Envoy still sent the body, it passes through unchanged.
        body_answer = await stream.send(proc_response_body(b'{"predictions":[0.123456]}'))
        assert not body_answer.response_body.response.HasField("body_mutation")
        await stream.finish()

    async def test_unparsable_model_answer_passes_through(self, guarded: RunningGuard) -> None:
        stream = await self._through_request(guarded)
        await stream.send(proc_response_headers())
        answer = await stream.send(proc_response_body(b"<html>oops</html>"))
        assert answer.response_body.response.status == CONTINUE
        assert not answer.response_body.response.HasField("body_mutation")
        await stream.finish()


class TestCheckThenExtProc:
    """With Check's verdict in metadata, ext_proc does not charge the request again and reuses the level."""

    async def test_two_hop_charges_one_request(self, guarded: RunningGuard) -> None:
        check = await guarded.authz.Check(
            check_request({"x-api-key": ALICE_KEY}, address="127.0.0.2")
        )
        verdict: struct_pb2.Struct = check.dynamic_metadata
        after_check = await guarded.guard.store.get_client("key:alice")
        assert after_check is not None and after_check.requests == 1
        stream, answer = await _open(
            guarded, headers={"x-api-key": ALICE_KEY}, check_metadata=verdict
        )
        assert answer.request_headers.response.status == CONTINUE
        await stream.send(proc_request_body(kserve_body(5)))
        await stream.finish()
        record = await guarded.guard.store.get_client("key:alice")
        assert record is not None
        assert (record.requests, record.instances) == (1, 5)

    async def test_two_hop_reuses_the_level(self, guarded: RunningGuard) -> None:
        verdict = struct_pb2.Struct()
        verdict.update(
            {
                "client": "key:alice",
                "tier": "free",
                "risk": "elevated",
                "level": 1,
                "action": "allow",
                "reasons": "pinned_elevated",
            }
        )
        stream, answer = await _open(
            guarded, headers={"x-api-key": ALICE_KEY}, check_metadata=verdict
        )
        options = header_options(answer.request_headers.response.header_mutation.set_headers)
        assert option_value(options["x-extauthz-risk"]) == "elevated"
        metadata = json_format.MessageToDict(answer.dynamic_metadata)["extauthz"]
        assert (metadata["risk"], metadata["reasons"]) == ("elevated", "pinned_elevated")
        await stream.finish()
        assert (
            await guarded.guard.store.get_client("key:alice") is None
        )  # request_headers charged nothing

    @pytest.mark.parametrize(
        ("action", "status"), [("block", 403), ("throttle", 429), ("challenge", 401)]
    )
    async def test_forwarded_refusal_keeps_its_status(
        self, guarded: RunningGuard, action: str, status: int
    ) -> None:
        verdict = struct_pb2.Struct()
        verdict.update(
            {
                "client": ANON_CLIENT,
                "tier": "anonymous",
                "risk": "abusive",
                "level": 3,
                "action": action,
                "reasons": "",
                "enforced": True,
            }
        )
        stream, answer = await _open(guarded, check_metadata=verdict)
        assert answer.immediate_response.status.code == status
        assert _immediate_json(answer)["action"] == action
        if action == "throttle":
            options = header_options(answer.immediate_response.headers.set_headers)
            assert int(option_value(options["retry-after"])) > 0
        await stream.finish()

    async def test_forwarded_shadow_refusal_is_allowed(self, guarded: RunningGuard) -> None:
        verdict = struct_pb2.Struct()
        verdict.update(
            {
                "client": ANON_CLIENT,
                "tier": "anonymous",
                "risk": "abusive",
                "level": 3,
                "action": "block",
                "reasons": "deny_list",
                "enforced": False,
            }
        )
        stream, answer = await _open(guarded, check_metadata=verdict)
        assert answer.request_headers.response.status == CONTINUE
        await stream.finish()

    async def test_single_hop_blocks_a_pinned_abusive_client(self, guarded: RunningGuard) -> None:
        await guarded.guard.store.set_level(
            ANON_CLIENT,
            level="abusive",
            blocked=False,
            reason="test",
            now=guarded.clock(),
            ttl_s=None,
        )
        before = counter("extauthz_extproc_streams_total", outcome="immediate")
        stream, answer = await _open(guarded)
        assert answer.immediate_response.status.code == 403
        assert _immediate_json(answer)["action"] == "block"
        assert json_format.MessageToDict(answer.dynamic_metadata)["extauthz"]["risk"] == "abusive"
        assert await stream.finish() == grpc.StatusCode.OK
        assert counter("extauthz_extproc_streams_total", outcome="immediate") == before + 1

    async def test_single_hop_charges_the_request(self, guarded: RunningGuard) -> None:
        stream, _ = await _open(guarded)
        await stream.send(proc_request_body(kserve_body(2)))
        await stream.finish()
        record = await guarded.guard.store.get_client(ANON_CLIENT)
        assert record is not None and record.requests == 1


def _denied(check: object) -> tuple[int, dict[str, str], bytes]:
    """Check's denied_response as (status, headers, body)."""
    denied = check.denied_response  # type: ignore[attr-defined]
    headers = {k: option_value(v) for k, v in header_options(denied.headers).items()}
    return int(denied.status.code), headers, denied.body.encode()


def _immediate(answer: proc_pb2.ProcessingResponse) -> tuple[int, dict[str, str], bytes]:
    """ext_proc's ImmediateResponse as (status, headers, body)."""
    assert answer.HasField("immediate_response"), answer
    immediate = answer.immediate_response
    headers = {k: option_value(v) for k, v in header_options(immediate.headers.set_headers).items()}
    return int(immediate.status.code), headers, immediate.body


async def _pin(guarded: RunningGuard, client: str, level: str) -> None:
    await guarded.guard.store.set_level(
        client, level=level, blocked=False, reason="test", now=guarded.clock(), ttl_s=None
    )


class TestSingleHopAnswers:
    """Without Check's metadata, request_headers answers exactly what Check would have answered."""

    @pytest.mark.parametrize(
        ("headers", "status"),
        [({"x-api-key": MALLORY_KEY}, 403), ({"x-api-key": UNKNOWN_KEY}, 401)],
        ids=["deny_listed", "unknown_key"],
    )
    async def test_refusal_is_checks_own(
        self, guarded: RunningGuard, headers: dict[str, str], status: int
    ) -> None:
        check = await guarded.authz.Check(check_request(headers, address="127.0.0.2"))
        stream, answer = await _open(guarded, headers=headers)
        assert await stream.finish() == grpc.StatusCode.OK
        assert _immediate(answer) == _denied(check)
        assert _immediate(answer)[0] == status
        metadata = json_format.MessageToDict(answer.dynamic_metadata)["extauthz"]
        assert metadata["action"] == "block"

    async def test_throttle_carries_retry_after_and_ratelimit_fields(self, tmp_path: Path) -> None:
        metered = policy_yaml().replace(
            "  anonymous:\n",
            "  anonymous:\n    limits: [{name: per-minute, unit: requests, rate: 2, per: minute}]\n",
        )
        async with running_guard(tmp_path, metered) as running:
            answers = []
            for _ in range(3):
                stream, answer = await _open(running)
                answers.append(answer)
                await stream.finish()
        assert [a.WhichOneof("response") for a in answers[:2]] == ["request_headers"] * 2
        status, headers, body = _immediate(answers[2])
        assert status == 429
        assert int(headers["retry-after"]) > 0
        assert headers["ratelimit"].startswith('"anonymous:per-minute";r=0')
        assert "ratelimit-policy" in headers
        assert json.loads(body)["error"] == "rate_limited"

    async def test_challenge_then_solution_then_pass(self, guarded: RunningGuard) -> None:
        await _pin(guarded, ANON_CLIENT, "suspicious")
        stream, answer = await _open(guarded)
        await stream.finish()
        status, headers, body = _immediate(answer)
        assert status == 401
        assert headers["www-authenticate"].startswith("ExtauthzPoW")
        challenge = json.loads(body)["challenge"]
        solution = f"{challenge['token']}:{solve(challenge['token'], challenge['difficulty'])}"

        stream, answer = await _open(guarded, headers={"x-extauthz-pow": solution})
        assert answer.request_headers.response.status == CONTINUE
        await stream.send(proc_request_body(kserve_body(1)))
        granted = await stream.send(proc_response_headers())
        await stream.finish()
        options = header_options(granted.response_headers.response.header_mutation.set_headers)
        token = option_value(options["x-extauthz-pass"])
        assert "extauthz_pass=" in option_value(options["set-cookie"])

        stream, answer = await _open(guarded, headers={"x-extauthz-pass": token})
        assert answer.request_headers.response.status == CONTINUE
        await stream.finish()

    async def test_browser_gets_the_challenge_page(self, guarded: RunningGuard) -> None:
        await _pin(guarded, ANON_CLIENT, "suspicious")
        stream, answer = await _open(guarded, headers={"accept": "text/html"})
        await stream.finish()
        status, headers, body = _immediate(answer)
        assert status == 401
        assert headers["content-type"].startswith("text/html")
        assert "content-security-policy" in headers
        assert b"<html" in body.lower()


class TestSingleHopOffModelRoutes:
    """Without Check, paths off the model routes are still decided and charged, headers only."""

    async def test_decided_charged_and_headers_only(self, guarded: RunningGuard) -> None:
        stream, answer = await _open(guarded, path="/static/logo.png")
        common = answer.request_headers.response
        options = header_options(common.header_mutation.set_headers)
        assert option_value(options["x-extauthz-client"]) == ANON_CLIENT
        assert "accept-encoding" not in common.header_mutation.remove_headers
        mode = answer.mode_override
        assert (mode.request_body_mode, mode.response_body_mode) == (MODE.NONE, MODE.NONE)
        assert mode.response_header_mode == MODE.SKIP  # no limit, no pass: nothing to add
        assert await stream.finish() == grpc.StatusCode.OK
        record = await guarded.guard.store.get_client(ANON_CLIENT)
        assert record is not None and (record.requests, record.instances) == (1, 0)

    async def test_deny_listed_key_is_refused_off_the_model_routes(
        self, guarded: RunningGuard
    ) -> None:
        stream, answer = await _open(
            guarded, path="/static/logo.png", headers={"x-api-key": MALLORY_KEY}
        )
        await stream.finish()
        assert _immediate(answer)[0] == 403


def _with_trusted(extra: str) -> str:
    """The test policy with ``extra`` lines added to the passthrough tier."""
    return policy_yaml().replace(
        "    output: {policy: passthrough}\n", f"    output: {{policy: passthrough}}\n{extra}"
    )


class TestPhases:
    """request_headers skips the response body when the tier can never need it."""

    async def test_passthrough_tier_skips_the_response(self, guarded: RunningGuard) -> None:
        stream, answer = await _open(guarded, headers={"x-api-key": BOB_KEY})
        mode = answer.mode_override
        assert answer.HasField("mode_override")
        assert mode.request_body_mode == MODE.BUFFERED  # instances are still counted
        assert mode.response_header_mode == MODE.SKIP
        assert mode.response_body_mode == MODE.NONE
        await stream.send(proc_request_body(kserve_body(2)))
        await stream.finish()
        record = await guarded.guard.store.get_client("key:bob")
        assert record is not None and record.instances == 2

    async def test_configured_request_body_mode_is_kept(self, guarded: RunningGuard) -> None:
        message = proc_request_headers(headers={"x-api-key": BOB_KEY})
        message.protocol_config.request_body_mode = MODE.STREAMED
        stream = ProcStream(guarded.extproc)
        answer = await stream.send(message)
        await stream.finish()
        assert answer.mode_override.request_body_mode == MODE.STREAMED

    async def test_limits_keep_the_response_headers(self, tmp_path: Path) -> None:
        policy = _with_trusted(
            "    limits: [{name: per-minute, unit: requests, rate: 100, per: minute}]\n"
        )
        async with running_guard(tmp_path, policy) as running:
            stream, answer = await _open(running, headers={"x-api-key": BOB_KEY})
            assert answer.mode_override.response_header_mode == MODE.SEND
            assert answer.mode_override.response_body_mode == MODE.NONE
            await stream.send(proc_request_body(kserve_body(1)))
            reply = await stream.send(proc_response_headers())
            await stream.finish()
        options = header_options(reply.response_headers.response.header_mutation.set_headers)
        assert option_value(options["ratelimit"]).startswith('"trusted:per-minute";r=99')

    @pytest.mark.parametrize(
        "extra",
        [
            "    watermark: {label_rate: 0.1}\n",
            "    limits: [{name: tokens, unit: tokens, rate: 1000, per: day}]\n",
        ],
        ids=["watermark", "token_limit"],
    )
    async def test_needed_response_body_is_not_skipped(self, tmp_path: Path, extra: str) -> None:
        policy = _with_trusted(extra)
        if "tokens" in extra:
            policy = policy.replace(
                "routes:\n", "routes:\n  - {prefix: /v1/chat/completions, dialect: openai}\n"
            )
        async with running_guard(tmp_path, policy) as running:
            path = "/v1/chat/completions" if "tokens" in extra else "/v1/models/m:predict"
            stream, answer = await _open(running, path=path, headers={"x-api-key": BOB_KEY})
            await stream.finish()
        assert not answer.HasField("mode_override")

    async def test_detection_keeps_the_response_body(self, tmp_path: Path) -> None:
        policy = _with_trusted("") + "detection: {enabled: true}\n"
        async with running_guard(tmp_path, policy) as running:
            stream, answer = await _open(running, headers={"x-api-key": BOB_KEY})
            await stream.finish()
        assert not answer.HasField("mode_override")
