"""Terms of use through the real Envoy, in both modes (two hops and single hop).

Every answer that passes through the guard names the terms (``Link: <url>;
rel="terms-of-service"`` and ``x-extauthz-terms-version``), refusals repeat them in their JSON
bodies, a tier that requires acceptance refuses an identity without it (403
``terms_not_accepted``) and admits it once its acceptance is on record, a version bump with a
grace period admits the previous version until the grace ends, and the evidence ledger, the
admin view and ``extauthz verify`` name the version the client had accepted.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from extauthz.admin_client import AdminClient
from extauthz.demo.local import LocalStack
from tests.e2e.conftest import json_lines, require_envoy

KSERVE = "/v1/models/digits:predict"
TERMS_URL = "https://models.example.test/terms"
SIGNED_KEY = "terms-signed-key"  # accepted version 2 from the start
LATE_KEY = "terms-late-key"  # accepts only when a test records it
FREE_KEY = "terms-free-key"  # a tier that does not require acceptance
WATCHED_KEY = "terms-watched-key"  # pinned suspicious: challenged (401)
LEAKED_KEY = "terms-leaked-key"  # deny-listed (403)
ANONYMOUS_PER_MINUTE = 2
MODES = ("two-hop", "single-hop")
REVISION = iter(range(1, 1_000_000))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def policy_text(
    *,
    revision: int,
    version: str = "2",
    late_accepts: str | None = None,
    grace: tuple[str, float] | None = None,
) -> str:
    """The test policy; ``revision`` rides in the terms URL's query so a test can wait for
    the guard to serve exactly this file."""
    late = f", terms_version: '{late_accepts}'" if late_accepts else ""
    grace_text = ""
    if grace is not None:
        until = datetime.fromtimestamp(grace[1], UTC).isoformat()
        grace_text = f"\n  grace: {{previous: '{grace[0]}', until: '{until}'}}"
    return f"""
version: 1
terms:
  url: {TERMS_URL}?rev={revision}
  version: '{version}'{grace_text}
  accepted_from: {{api_key: true, header: x-extauthz-terms-accepted}}
identity:
  api_keys:
    - {{name: signed, tier: pro, sha256: {_digest(SIGNED_KEY)}, terms_version: '2'}}
    - {{name: late, tier: pro, sha256: {_digest(LATE_KEY)}{late}}}
    - {{name: freebie, tier: free, sha256: {_digest(FREE_KEY)}}}
    - {{name: watched, tier: free, sha256: {_digest(WATCHED_KEY)}}}
    - {{name: leaky, tier: free, sha256: {_digest(LEAKED_KEY)}}}
tiers:
  anonymous:
    max_instances: 16
    limits: [{{name: per-minute, unit: requests, rate: {ANONYMOUS_PER_MINUTE}, per: minute}}]
  free: {{max_instances: 64}}
  pro:
    max_instances: 64
    require_terms: true
    watermark: {{label_rate: 0.5}}
deny:
  key_sha256: [{_digest(LEAKED_KEY)}]
"""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def terms_links(self) -> list[str]:
        """The terms-of-service links, one per Link field value."""
        values = [part.strip() for v in self.all("link") for part in v.split(",")]
        return [v for v in values if 'rel="terms-of-service"' in v]


class Mode:
    """One running stack in one mode, and how to change its policy."""

    def __init__(self, name: str, local: LocalStack, policy_path: Path) -> None:
        self.name = name
        self.local = local
        self.policy_path = policy_path
        self.net = "127.0.3" if name == "two-hop" else "127.0.4"
        self.revision = 0

    def send(
        self,
        path: str,
        *,
        key: str = "",
        host: int = 1,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request from ``<net>.<host>``, every response header kept (duplicates too)."""
        connection = http.client.HTTPConnection(
            "127.0.0.1",
            self.local.ports.listener,
            timeout=30.0,
            source_address=(f"{self.net}.{host}", 0),
        )
        all_headers = dict(headers or {})
        if key:
            all_headers["x-api-key"] = key
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            all_headers.setdefault("content-type", "application/json")
        try:
            connection.request("POST" if data else "GET", path, body=data, headers=all_headers)
            response = connection.getresponse()
            return Answer(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def apply(self, **changes: Any) -> None:
        """Write a policy and wait (bounded) until the guard serves it."""
        self.revision = next(REVISION)
        self.policy_path.write_text(policy_text(revision=self.revision, **changes))
        wanted = f"<{TERMS_URL}?rev={self.revision}>"
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            answer = self.send("/debug/headers", key=FREE_KEY, host=250)
            if answer.terms_links and answer.terms_links[0].startswith(wanted):
                return
            time.sleep(0.1)
        raise AssertionError(f"the guard did not load policy revision {self.revision}")

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's access log lines (JSON), oldest first."""
        assert self.local.envoy is not None
        return json_lines(self.local.envoy.output())

    def logged_terms(self, client: str, field: str, timeout_s: float = 10.0) -> str:
        """The ``field`` of the newest admitted access log line of ``client`` (Envoy writes
        lines when requests end, so it is polled, bounded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = [
                line
                for line in self.access_log()
                if line.get("proc_client") == client and line.get("response_code") == 200
            ]
            if lines:
                return str(lines[-1][field])
            time.sleep(0.1)
        raise AssertionError(f"no access log line for {client}")

    def admin(self) -> AdminClient:
        return AdminClient(self.local.admin_target, self.local.admin_token)


@pytest.fixture(scope="module", params=MODES)
def mode(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mode]:
    require_envoy()
    name: str = request.param
    workdir = tmp_path_factory.mktemp(f"terms-{name}")
    (workdir / "keys.yaml").write_text("current: t1\nkeys: {t1: e2e-terms-deployment-key-0123}\n")
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(policy_text(revision=0))
    local = LocalStack(
        policy=policy_path,
        workdir=workdir,
        single_hop=name == "single-hop",
        guard_args=["--keys-file", str(workdir / "keys.yaml")],
    )
    with local:
        yield Mode(name, local, policy_path)


def _rows(n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 64)).astype(float).tolist()


def _assert_notice(answer: Answer, mode: Mode, version: str = "2") -> None:
    """Exactly one terms link (this policy's) and the version header."""
    assert answer.terms_links == [f'<{TERMS_URL}?rev={mode.revision}>; rel="terms-of-service"'], (
        answer.headers
    )
    assert answer.all("x-extauthz-terms-version") == [version], answer.headers


def _assert_body_terms(answer: Answer, mode: Mode, version: str = "2") -> dict[str, Any]:
    terms: dict[str, Any] = answer.json()["terms"]
    assert terms["url"] == f"{TERMS_URL}?rev={mode.revision}"
    assert terms["version"] == version
    return terms


class TestNotice:
    """Every answer through the guard carries the notice, allowed or refused, once."""

    def test_allowed_answers_carry_link_and_version(self, mode: Mode) -> None:
        mode.apply()
        model = mode.send(KSERVE, key=FREE_KEY, body={"instances": _rows(2)})
        other = mode.send("/debug/headers", key=FREE_KEY)
        assert model.status == 200 and other.status == 200
        _assert_notice(model, mode)
        _assert_notice(other, mode)

    def test_throttled_answer_repeats_the_terms(self, mode: Mode) -> None:
        mode.apply()
        answers = [mode.send(KSERVE, host=11, body={"instances": _rows(1)}) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 429]
        _assert_notice(answers[0], mode)
        _assert_notice(answers[2], mode)
        assert answers[2].json()["error"] == "rate_limited"
        _assert_body_terms(answers[2], mode)

    def test_challenge_and_block_repeat_the_terms(self, mode: Mode) -> None:
        mode.apply()
        with mode.admin() as admin:
            admin.set_level("key:watched", "suspicious", reason="e2e terms")
        challenged = mode.send(KSERVE, key=WATCHED_KEY, body={"instances": _rows(1)})
        blocked = mode.send(KSERVE, key=LEAKED_KEY, body={"instances": _rows(1)})
        assert (challenged.status, challenged.json()["error"]) == (401, "challenge_required")
        assert (blocked.status, blocked.json()["error"]) == (403, "deny_list")
        for answer in (challenged, blocked):
            _assert_notice(answer, mode)
            _assert_body_terms(answer, mode)

    def test_body_refused_by_ext_proc_carries_the_notice(self, mode: Mode) -> None:
        mode.apply()
        answer = mode.send(KSERVE, key=FREE_KEY, body=b"{not json")
        assert answer.status == 400
        _assert_notice(answer, mode)
        _assert_body_terms(answer, mode)


class TestAcceptance:
    """A tier requiring the terms admits only identities that accepted them."""

    def test_refused_without_acceptance_then_admitted_after(self, mode: Mode) -> None:
        mode.apply()
        refused = mode.send(KSERVE, key=LATE_KEY, body={"instances": _rows(1)})
        assert refused.status == 403
        document = refused.json()
        assert document["error"] == "terms_not_accepted"
        assert "version 2" in document["message"] and TERMS_URL in document["message"]
        terms = _assert_body_terms(refused, mode)
        assert terms["accepted"] is None
        _assert_notice(refused, mode)
        # A client cannot vouch for itself: Envoy strips the signup flow's header.
        forged = mode.send(
            KSERVE,
            key=LATE_KEY,
            body={"instances": _rows(1)},
            headers={"x-extauthz-terms-accepted": "2"},
        )
        assert forged.status == 403
        # The signup flow records the acceptance on the key: the next request is admitted.
        mode.apply(late_accepts="2")
        admitted = mode.send(KSERVE, key=LATE_KEY, body={"instances": _rows(1)})
        assert admitted.status == 200
        _assert_notice(admitted, mode)
        # The access log names the version each request came with (from dynamic metadata).
        field = "authz_terms" if mode.name == "two-hop" else "proc_terms"
        assert mode.logged_terms("key:late", field) == "2"
        with mode.admin() as admin:
            view = admin.get_client("key:late")
        assert view["terms_version"] == "2"
        assert view["terms_accepted"] == "2"
        assert view["terms_required"] is True
        assert view["terms_admitted"] is True

    def test_grace_admits_the_previous_version_until_it_ends(self, mode: Mode) -> None:
        until = time.time() + 6.0
        mode.apply(version="3", grace=("2", until))
        inside = mode.send(KSERVE, key=SIGNED_KEY, body={"instances": _rows(1)})
        assert time.time() < until, "the policy reload took longer than the grace"
        assert inside.status == 200
        _assert_notice(inside, mode, version="3")
        time.sleep(max(0.0, until - time.time()) + 0.2)
        after = mode.send(KSERVE, key=SIGNED_KEY, body={"instances": _rows(1)})
        assert after.status == 403
        assert after.json()["error"] == "terms_not_accepted"
        terms = _assert_body_terms(after, mode, version="3")
        assert (terms["accepted"], terms["previous"]) == ("2", "2")
        _assert_notice(after, mode, version="3")


class TestEvidence:
    """Marked answers are recorded with the terms version accepted; verify prints it."""

    def test_ledger_and_verify_name_the_terms_version(self, mode: Mode, tmp_path: Path) -> None:
        mode.apply()
        answer = mode.send(KSERVE, key=SIGNED_KEY, body={"instances": _rows(32, seed=5)})
        assert answer.status == 200
        with mode.admin() as admin:
            lines = admin.export_evidence("key:signed")
        records = [json.loads(line) for line in lines]
        assert len(records) >= 4  # label_rate 0.5 of 32 inputs
        assert {r["terms_version"] for r in records} == {"2"}
        evidence = tmp_path / "ledger.jsonl"
        evidence.write_text("\n".join(lines) + "\n")
        # A perfect clone: it answers every ledger input with the served (marked) label.
        predictions = tmp_path / "suspect.jsonl"
        predictions.write_text(
            "".join(json.dumps(np.eye(10)[r["served_label"]].tolist()) + "\n" for r in records)
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "extauthz",
                "verify",
                "--evidence",
                str(evidence),
                "--keys-file",
                str(mode.local.workdir / "keys.yaml"),
                "--predictions",
                str(predictions),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert f"terms of use accepted when served: 2 ({len(records)})" in result.stdout
        verdict = result.stdout.strip().splitlines()[-1]
        assert verdict.startswith("combined p-value")
        assert verdict.endswith(f"terms of use accepted: 2 ({len(records)})")
