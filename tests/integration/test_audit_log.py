"""The audit log: one ``decision`` line per Check and per ext_proc stream, allows and refusals
alike, with the fields operators filter on, and never a raw API key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from structlog.testing import capture_logs

from extauthz.telemetry.logs import AUDIT_EVENT
from tests.integration.service_fixtures import (
    ALICE_KEY,
    MALLORY_KEY,
    UNKNOWN_KEY,
    RunningGuard,
    check_request,
    exchange,
    kserve_body,
    policy_yaml,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
    running_guard,
)

FIELDS = {
    "mode",
    "request_id",
    "path",
    "route",
    "client",
    "tier",
    "action",
    "risk",
    "risk_level",
    "reasons",
    "instances",
    "status",
    "enforced",
    "duration_ms",
    "terms",
}
# A query that carries the key: the line keeps the path without its query.
KEYED_PATH = f"/v1/models/m:predict?api_key={ALICE_KEY}"


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[RunningGuard]:
    async with running_guard(tmp_path) as running:
        yield running


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as events:
        yield events


def _decisions(events: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    lines = [e for e in events if e["event"] == AUDIT_EVENT and e["mode"] == mode]
    for line in lines:
        assert set(line) >= FIELDS, set(line) ^ FIELDS
        assert line["log_level"] == "info"  # the audit log keeps allows and refusals alike
    return lines


def _no_raw_keys(events: list[dict[str, Any]]) -> None:
    text = json.dumps(events, default=str)
    for key in (ALICE_KEY, MALLORY_KEY, UNKNOWN_KEY):
        assert key not in text


class TestCheckLine:
    """Each Check writes one line with the opaque client, the verdict and what was answered."""

    async def test_allow_and_refusals_each_leave_one_line(
        self, guarded: RunningGuard, captured: list[dict[str, Any]]
    ) -> None:
        await guarded.authz.Check(
            check_request({"x-api-key": ALICE_KEY}, path=KEYED_PATH, request_id="req-allow")
        )
        await guarded.authz.Check(check_request({"x-api-key": MALLORY_KEY}, request_id="req-deny"))
        await guarded.authz.Check(check_request({"x-api-key": UNKNOWN_KEY}, request_id="req-bad"))
        allow, deny, bad = _decisions(captured, "check")
        assert allow["request_id"] == "req-allow"
        assert allow["path"] == "/v1/models/m:predict"
        assert allow["route"] == "/v1/models/"
        assert (allow["client"], allow["tier"], allow["action"]) == ("key:alice", "free", "allow")
        assert (allow["risk"], allow["risk_level"], allow["status"]) == ("normal", 0, 200)
        assert allow["reasons"] == [] and allow["instances"] == 0 and allow["enforced"] is True
        assert 0 <= allow["duration_ms"] < 5_000
        assert (deny["client"], deny["action"], deny["status"]) == ("key:mallory", "block", 403)
        assert deny["reasons"] == ["deny_list"]
        assert deny["risk"] == "abusive"
        assert bad["action"] == "block" and bad["status"] == 401
        assert bad["reasons"] == ["invalid_api_key"]
        assert bad["client"].startswith("key:") and len(bad["client"]) == len("key:") + 16
        _no_raw_keys(captured)

    async def test_shadow_mode_logs_the_would_be_refusal_as_served(self, tmp_path: Path) -> None:
        async with running_guard(tmp_path, policy_yaml(mode="shadow")) as guarded:
            with capture_logs() as events:
                await guarded.authz.Check(check_request({"x-api-key": MALLORY_KEY}))
        (line,) = _decisions(events, "check")
        assert (line["action"], line["enforced"], line["status"]) == ("block", False, 200)


class TestProcessLine:
    """Each ext_proc stream that reached a verdict writes one line when it ends."""

    async def test_allowed_stream_logs_instances_and_the_upstream_status(
        self, guarded: RunningGuard, captured: list[dict[str, Any]]
    ) -> None:
        result = await exchange(
            guarded.extproc,
            [
                proc_request_headers(
                    KEYED_PATH, headers={"x-api-key": ALICE_KEY, "x-request-id": "req-proc"}
                ),
                proc_request_body(kserve_body(3)),
                proc_response_headers(201),
                proc_response_body(b'{"predictions": [[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]}'),
            ],
        )
        assert len(result.responses) == 4
        (line,) = _decisions(captured, "process")
        assert line["request_id"] == "req-proc"
        assert (line["path"], line["route"]) == ("/v1/models/m:predict", "/v1/models/")
        assert (line["client"], line["tier"], line["action"]) == ("key:alice", "free", "allow")
        assert (line["instances"], line["status"]) == (3, 201)
        assert line["duration_ms"] > 0
        _no_raw_keys(captured)

    async def test_refused_streams_log_the_refusal(
        self, guarded: RunningGuard, captured: list[dict[str, Any]]
    ) -> None:
        await exchange(guarded.extproc, [proc_request_headers(headers={"x-api-key": MALLORY_KEY})])
        # An allowed verdict, then a body the guard cannot read (policy body fail mode: deny).
        await exchange(
            guarded.extproc,
            [proc_request_headers(headers={"x-api-key": ALICE_KEY}), proc_request_body(b"{oops")],
        )
        denied, unreadable = _decisions(captured, "process")
        assert (denied["client"], denied["action"], denied["status"]) == (
            "key:mallory",
            "block",
            403,
        )
        assert denied["reasons"] == ["deny_list"]
        assert (unreadable["client"], unreadable["action"]) == ("key:alice", "block")
        assert unreadable["status"] == 400
        assert unreadable["reasons"][0] == "body_parse_error"
        _no_raw_keys(captured)

    async def test_two_hop_streams_off_the_model_routes_write_no_line(
        self, guarded: RunningGuard, captured: list[dict[str, Any]]
    ) -> None:
        """Check already logged the decision; ext_proc only passes the stream through."""
        verdict = struct_pb2.Struct()
        verdict.update({"client": "ip:127.0.0.1", "tier": "anonymous", "risk": "normal",
                        "level": 0, "action": "allow"})  # fmt: skip
        await exchange(guarded.extproc, [proc_request_headers("/healthz", check_metadata=verdict)])
        assert _decisions(captured, "process") == []

    async def test_single_hop_streams_off_the_model_routes_write_one_line(
        self, guarded: RunningGuard, captured: list[dict[str, Any]]
    ) -> None:
        """Without Check's metadata ext_proc decides, so it writes the audit line."""
        await exchange(guarded.extproc, [proc_request_headers("/healthz")])
        lines = _decisions(captured, "process")
        assert len(lines) == 1 and lines[0]["action"] == "allow"
