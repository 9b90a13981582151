"""Envoy's access log (envoy/envoy.yaml): each request's line names the client, tier, risk and
action the guard decided, from Check's and ext_proc's dynamic metadata, allowed or refused."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from extauthz.demo.client import Client
from tests.e2e.conftest import E2E, FREE_KEY, LEAKED_KEY

KSERVE = "/v1/models/digits:predict"
# Sources used by no other e2e test, so each line is found by its address alone.
ALLOWED_SOURCE = "127.0.0.61"
DENIED_SOURCE = "127.0.0.62"
UNKNOWN_SOURCE = "127.0.0.63"
LATE_SOURCE = "127.0.0.64"


def _rows(n: int) -> list[list[float]]:
    return np.random.default_rng(61).random((n, 64)).round(4).tolist()


def _line_from(e2e: E2E, source: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Wait for the access log line of the one request sent from ``source``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [
            line
            for line in e2e.access_log()
            if str(line.get("downstream_remote_address", "")).startswith(source + ":")
        ]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.1)
    raise AssertionError(f"no access log line from {source}")


class TestAccessLog:
    """The reference access log carries the guard's verdict for allowed and refused requests."""

    def test_allowed_request_shows_check_and_ext_proc_verdicts(self, e2e: E2E) -> None:
        with Client(e2e.port, source=ALLOWED_SOURCE) as http:
            reply = http.post(KSERVE, {"instances": _rows(2)}, headers={"x-api-key": FREE_KEY})
        assert reply.status == 200
        line = _line_from(e2e, ALLOWED_SOURCE)
        assert (line["method"], line["path"], line["response_code"]) == ("POST", KSERVE, 200)
        assert line["upstream_host"].startswith("127.0.0.1:")
        for side in ("authz", "proc"):
            assert line[f"{side}_client"] == "key:freebie", line
            assert line[f"{side}_tier"] == "free", line
            assert line[f"{side}_risk"] == "normal", line
            assert line[f"{side}_level"] == 0, line
            assert line[f"{side}_action"] == "allow", line
        assert isinstance(line["duration_ms"], int)
        assert isinstance(line["authz_duration_ms"], int)
        assert line["request_id"]
        assert FREE_KEY not in json.dumps(line)

    def test_deny_listed_key_shows_the_block(self, e2e: E2E) -> None:
        with Client(e2e.port, source=DENIED_SOURCE) as http:
            reply = http.post(KSERVE, {"instances": _rows(1)}, headers={"x-api-key": LEAKED_KEY})
        assert reply.status == 403
        line = _line_from(e2e, DENIED_SOURCE)
        assert line["response_code"] == 403
        assert line["authz_client"] == "key:leaky"
        assert line["authz_tier"] == "free"
        assert line["authz_risk"] == "abusive"
        assert line["authz_action"] == "block"
        assert line["authz_reasons"] == "deny_list"
        # Check refused it, so ext_proc never ran and the model was never called.
        assert line["proc_client"] is None
        assert line["upstream_host"] is None
        assert LEAKED_KEY not in json.dumps(line)

    def test_unknown_key_shows_an_opaque_client(self, e2e: E2E) -> None:
        raw = "e2e-never-issued-key-61"
        with Client(e2e.port, source=UNKNOWN_SOURCE) as http:
            reply = http.post(KSERVE, {"instances": _rows(1)}, headers={"x-api-key": raw})
        assert reply.status == 401
        line = _line_from(e2e, UNKNOWN_SOURCE)
        assert line["authz_action"] == "block"
        assert line["authz_reasons"] == "invalid_api_key"
        assert line["authz_client"].startswith("key:")
        assert raw not in json.dumps(line)

    def test_late_refusal_shows_in_details_and_matches_the_audit_log(self, e2e: E2E) -> None:
        """ext_proc refuses an oversized batch after its allowing verdict: the access line's
        response_code_details names the reason, and its request_id finds the guard's audit
        lines (Check's and ext_proc's)."""
        with Client(e2e.port, source=LATE_SOURCE) as http:
            reply = http.post(KSERVE, {"instances": _rows(17)})  # anonymous: 16 at most
        assert reply.status == 413
        line = _line_from(e2e, LATE_SOURCE)
        assert line["response_code"] == 413
        assert line["response_code_details"] == "extauthz_too_many_instances"
        assert (line["authz_action"], line["proc_action"]) == ("allow", "allow")
        assert line["upstream_host"] is None

        def audit() -> dict[str, dict[str, Any]]:
            found = {}
            for text in e2e.guard_log().splitlines():
                if line["request_id"] in text and text.startswith("{"):
                    event = json.loads(text)
                    if event.get("event") == "decision":
                        found[event["mode"]] = event
            return found

        deadline = time.monotonic() + 10.0
        while len(audit()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = audit()
        assert lines["check"]["action"] == "allow"
        assert lines["process"]["action"] == "block"
        assert lines["process"]["reasons"] == ["too_many_instances"]
        assert lines["process"]["status"] == 413
        assert lines["check"]["client"] == lines["process"]["client"] == f"ip:{LATE_SOURCE}"
