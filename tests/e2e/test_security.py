"""Security through the real Envoy (envoy/envoy.yaml): who a client is, what leaks, what is refused.

One stack for the module: a capture upstream (it records every request it receives, headers and
body, and answers like a KServe model), the guard with a keys file and debug logs, and Envoy.

- A spoofed ``x-forwarded-for`` does not change identity: Envoy trusts no hop of it, so
  anonymous clients are keyed by the TCP peer, and different spoofed headers share one limit.
- A raw API key reaches neither the upstream (headers or body), nor the guard's logs, nor
  ``/metrics``, nor Envoy's access log, on allowed and refused requests alike.
- Forged, tampered, foreign and replayed proofs are refused with a new challenge and counted.
- The admin API refuses every call without its bearer token (and is not routed by Envoy).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extauthz._proto.v1 import admin_pb2, admin_pb2_grpc
from extauthz.challenge import passes, pow
from extauthz.challenge.gate import binding_of
from extauthz.core.identity import Identity
from extauthz.demo import stack
from extauthz.demo.client import Client, Reply
from extauthz.demo.local import LocalStack
from extauthz.keys import KeyRing, b64url, b64url_decode
from tests.e2e.conftest import require_envoy

pytestmark = pytest.mark.envoy

KSERVE = "/v1/models/m:predict"
ROW = [[0.5, 1.5, 2.5]]
# Raw API keys, distinctive enough that any copy of them in a log or header is found.
RAW_KEY = "sk-e2e-RAWKEY-" + secrets.token_hex(12)
UNKNOWN_RAW_KEY = "sk-e2e-UNKNOWN-" + secrets.token_hex(12)
ANONYMOUS_PER_MINUTE = 5
KEY_ID = "k1"

POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: alice, tier: free, sha256: {hashlib.sha256(RAW_KEY.encode()).hexdigest()}}}
tiers:
  anonymous:
    max_instances: 4
    limits: [{{name: per-minute, unit: requests, rate: {ANONYMOUS_PER_MINUTE}, per: minute}}]
  free:
    max_instances: 4
    output: {{policy: round, decimals: 3}}
challenge:
  difficulty: {{normal: 8, elevated: 8, suspicious: 8, abusive: 8}}
  bits_per_doubling: 0
"""

# The upstream: records each request (path, headers, body) as a JSON line, answers KServe v1.
CAPTURE_UPSTREAM = """
import json, sys
from aiohttp import web

LOG = sys.argv[2]


async def record(request):
    body = await request.read()
    headers = {name.lower(): value for name, value in request.headers.items()}
    entry = {"path": request.path, "headers": headers, "body": body.decode("latin-1")}
    with open(LOG, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\\n")
    if request.path.endswith(":predict"):
        rows = len(json.loads(body)["instances"])
        return web.json_response({"predictions": [[0.123456, 0.876544]] * rows})
    return web.json_response({"ok": True})


async def ready(_):
    return web.json_response({"ready": True})


app = web.Application()
app.router.add_get("/v2/health/ready", ready)
app.router.add_route("*", "/{tail:.*}", record)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


class SecureStack:
    """The running stack and what the tests read from it."""

    def __init__(self, local: LocalStack, capture: Path) -> None:
        self.local = local
        self.capture = capture
        self.port = local.ports.listener

    def received(self) -> list[dict[str, Any]]:
        """Every request the upstream received, oldest first."""
        return [json.loads(line) for line in self.capture.read_text("utf-8").splitlines()]

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.local.guard_http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    def counter(self, family: str, **labels: str) -> float:
        """The sum of ``family``'s ``_total`` samples carrying ``labels``, from a scrape of the
        guard's ``/metrics``."""
        return sum(
            sample.value
            for metric in text_string_to_metric_families(self.metrics_text())
            if metric.name == family
            for sample in metric.samples
            if sample.name == f"{family}_total" and labels.items() <= sample.labels.items()
        )

    def guard_log(self) -> str:
        assert self.local.guard is not None
        return self.local.guard.output()

    def envoy_log(self) -> str:
        assert self.local.envoy is not None
        return self.local.envoy.output()

    def pin(self, client_id: str, level: str | None) -> None:
        with grpc.insecure_channel(self.local.admin_target) as channel:
            admin_pb2_grpc.AdminStub(channel).SetClientLevel(
                admin_pb2.SetClientLevelRequest(client_id=client_id, level=level or ""),
                metadata=(("authorization", f"Bearer {self.local.admin_token}"),),
                timeout=10,
            )


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    require_envoy()
    workdir = tmp_path_factory.mktemp("security")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump({"current": KEY_ID, "keys": {KEY_ID: secrets.token_hex(32)}}))
    script = workdir / "capture_upstream.py"
    script.write_text(CAPTURE_UPSTREAM)
    capture = workdir / "received.jsonl"
    capture.write_text("")
    local = LocalStack(
        policy=policy,
        workdir=workdir,
        upstream=[sys.executable, str(script), "{port}", str(capture)],
        guard_args=["--keys-file", str(keys), "--log-level", "debug"],
    )
    with local:
        yield SecureStack(local, capture)


def _post(secure: SecureStack, source: str, headers: dict[str, str], path: str = KSERVE) -> Reply:
    with Client(secure.port, source=source) as http:
        return http.post(path, {"instances": ROW}, headers=headers)


class TestForwardedFor:
    """Anonymous clients are the TCP peer Envoy saw; x-forwarded-for from a client is not trusted."""

    def test_reference_config_trusts_no_forwarded_hop(self) -> None:
        config = yaml.safe_load(stack.ENVOY_YAML.read_text())
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        settings = manager["typed_config"]
        assert settings["use_remote_address"] is True
        assert settings.get("xff_num_trusted_hops", 0) == 0

    def test_spoofed_headers_share_one_identity_and_limit(self, secure: SecureStack) -> None:
        source = "127.0.0.71"
        spoofs = [
            {"x-forwarded-for": "203.0.113.1"},
            {"x-forwarded-for": "198.51.100.7, 203.0.113.9", "x-real-ip": "198.51.100.7"},
            {"x-forwarded-for": "10.0.0.1", "x-envoy-external-address": "10.0.0.1"},
            {"x-forwarded-for": "192.0.2.44", "forwarded": "for=192.0.2.44"},
            {"x-forwarded-for": "2001:db8::1, 127.0.0.72"},
            {"x-forwarded-for": "127.0.0.72"},  # even another real client's address
        ]
        start = len(secure.received())
        replies = [_post(secure, source, spoof) for spoof in spoofs]
        other_peer = _post(secure, "127.0.0.72", {"x-forwarded-for": "203.0.113.1"})
        received = secure.received()[start:]
        # One identity, one budget: the last spoof is one request too many for the same client.
        assert [r.status for r in replies] == [200] * ANONYMOUS_PER_MINUTE + [429]
        assert replies[-1].json()["error"] == "rate_limited"
        assert other_peer.status == 200  # another TCP peer is another client
        clients = [r["headers"]["x-extauthz-client"] for r in received]
        assert clients == [f"ip:{source}"] * ANONYMOUS_PER_MINUTE + ["ip:127.0.0.72"]

    def test_client_cannot_send_the_guards_headers(self, secure: SecureStack) -> None:
        start = len(secure.received())
        forged = {"x-extauthz-client": "key:alice", "x-extauthz-tier": "trusted"}
        reply = _post(secure, "127.0.0.73", {**forged, "x-extauthz-risk": "normal"})
        headers = secure.received()[start]["headers"]
        assert reply.status == 200
        assert (headers["x-extauthz-client"], headers["x-extauthz-tier"]) == (
            "ip:127.0.0.73",
            "anonymous",
        )


class TestRawKeyNeverLeaks:
    """The raw API key is read by the guard and then gone: not upstream, not logged, not a label."""

    def test_raw_key_absent_everywhere(self, secure: SecureStack) -> None:
        start = len(secure.received())
        key = {"x-api-key": RAW_KEY}
        with Client(secure.port, source="127.0.0.74") as http:
            replies = {
                "model": http.post(KSERVE, {"instances": ROW}, headers=key),
                "other": http.request("GET", "/health", headers=key),
                "too_big": http.post(KSERVE, {"instances": ROW * 9}, headers=key),
                "unknown": http.post(
                    KSERVE, {"instances": ROW}, headers={"x-api-key": UNKNOWN_RAW_KEY}
                ),
            }
        secure.pin("key:alice", "suspicious")
        try:
            replies["challenged"] = _post(secure, "127.0.0.74", key)
        finally:
            secure.pin("key:alice", None)
        received = secure.received()[start:]
        assert {name: r.status for name, r in replies.items()} == {
            "model": 200,
            "other": 200,
            "too_big": 413,
            "unknown": 401,
            "challenged": 401,
        }
        # The upstream got both allowed requests, with the opaque id in place of the key.
        assert [r["path"] for r in received] == [KSERVE, "/health"]
        assert {r["headers"]["x-extauthz-client"] for r in received} == {"key:alice"}
        places = {
            "upstream": json.dumps(received),
            "guard log": secure.guard_log(),
            "metrics": secure.metrics_text(),
            "envoy log": secure.envoy_log(),
            "answers": json.dumps(
                {n: [dict(r.headers), r.body.decode("latin-1")] for n, r in replies.items()}
            ),
        }
        assert "key:alice" in places["guard log"]  # the log was captured and names the client
        for raw in (RAW_KEY, UNKNOWN_RAW_KEY):
            forms = {raw, base64.b64encode(raw.encode()).decode(), b64url(raw.encode())}
            leaks = [place for place, text in places.items() if any(f in text for f in forms)]
            assert leaks == [], f"a raw API key appears in: {leaks}"


_CHALLENGED = (f"127.0.1.{i}" for i in itertools.count(1))


def _challenge(reply: Reply) -> tuple[str, int]:
    assert reply.status == 401
    challenge = reply.json()["challenge"]
    return str(challenge["token"]), int(challenge["difficulty"])


def _forged_ring() -> KeyRing:
    """The guard's key id with another secret: what a forger without the keys file has."""
    return KeyRing.single(secrets.token_bytes(32), KEY_ID)


class TestProofsThroughEnvoy:
    """Forged, tampered, foreign and replayed proofs get a new challenge and are counted."""

    @pytest.fixture
    def challenged(self, secure: SecureStack) -> Iterator[tuple[str, str]]:
        """Two fresh anonymous clients pinned suspicious, unpinned afterwards."""
        sources = (next(_CHALLENGED), next(_CHALLENGED))
        for source in sources:
            secure.pin(f"ip:{source}", "suspicious")
        try:
            yield sources
        finally:
            for source in sources:
                secure.pin(f"ip:{source}", None)

    def _refused(
        self, secure: SecureStack, source: str, headers: dict[str, str], outcome: str
    ) -> None:
        before = secure.counter("extauthz_challenges", outcome=outcome)
        reply = _post(secure, source, headers)
        assert reply.status == 401 and "challenge" in reply.json()
        assert secure.counter("extauthz_challenges", outcome=outcome) == before + 1

    def _pass_of(self, secure: SecureStack, source: str) -> tuple[str, str]:
        """Solve as ``source``; return (the pass granted, the solution used)."""
        token, difficulty = _challenge(_post(secure, source, {}))
        solution = f"{token}:{pow.solve(token, difficulty)}"
        granted = _post(secure, source, {"x-extauthz-pow": solution})
        assert granted.status == 200
        return granted.headers[passes.HEADER], solution

    def test_forged_pass(self, secure: SecureStack, challenged: tuple[str, str]) -> None:
        source = challenged[0]
        forged = passes.issue_pass(
            _forged_ring().derive("pass"),
            binding=binding_of(Identity(f"ip:{source}", "anonymous", "anonymous")),
            ttl_s=600,
            budget=10**6,
            now=time.time(),
            rng_bytes=secrets.token_bytes(16),
        )
        self._refused(secure, source, {"x-extauthz-pass": forged}, "pass_bad_signature")

    def test_tampered_pass(self, secure: SecureStack, challenged: tuple[str, str]) -> None:
        source = challenged[0]
        token, _ = self._pass_of(secure, source)
        version, kid, body, mac = token.split(".")
        claims = json.loads(b64url_decode(body) or b"{}")
        claims["n"] = 10**6  # a bigger budget, under the old MAC
        inflated = ".".join([version, kid, b64url(json.dumps(claims).encode()), mac])
        self._refused(secure, source, {"x-extauthz-pass": inflated}, "pass_bad_signature")
        cookie = {"cookie": f"{passes.COOKIE}={inflated}"}
        self._refused(secure, source, cookie, "pass_bad_signature")

    def test_pass_of_another_client(self, secure: SecureStack, challenged: tuple[str, str]) -> None:
        owner, thief = challenged
        token, _ = self._pass_of(secure, owner)
        self._refused(secure, thief, {"x-extauthz-pass": token}, "pass_wrong_client")
        assert _post(secure, owner, {"x-extauthz-pass": token}).status == 200  # still the owner's

    def test_replayed_and_foreign_solutions(
        self, secure: SecureStack, challenged: tuple[str, str]
    ) -> None:
        owner, thief = challenged
        _, solution = self._pass_of(secure, owner)
        self._refused(secure, owner, {"x-extauthz-pow": solution}, "replayed")
        token, difficulty = _challenge(_post(secure, owner, {}))
        fresh = f"{token}:{pow.solve(token, difficulty)}"
        self._refused(secure, thief, {"x-extauthz-pow": fresh}, "wrong_client")


_ADMIN_CALLS = {
    "GetClient": admin_pb2.GetClientRequest(client_id="ip:127.0.0.90"),
    "ListClients": admin_pb2.ListClientsRequest(page_size=10),
    "ResetClient": admin_pb2.ResetClientRequest(client_id="ip:127.0.0.90"),
    "SetClientLevel": admin_pb2.SetClientLevelRequest(client_id="ip:127.0.0.90", blocked=True),
    "ExportEvidence": admin_pb2.ExportEvidenceRequest(),
    "EraseEvidence": admin_pb2.EraseEvidenceRequest(client_id="ip:127.0.0.90"),
}


class TestAdminCredential:
    """Every admin method refuses a caller without the exact bearer token; refused calls do nothing."""

    def test_every_method_refuses_without_the_token(self, secure: SecureStack) -> None:
        token = secure.local.admin_token
        wrong = [
            (),
            (("authorization", "Bearer "),),
            (("authorization", "Bearer not-the-token"),),
            (("authorization", f"Bearer {token[:-1]}"),),
            (("authorization", f"Bearer {token}x"),),
            (("authorization", f"Basic {token}"),),
            (("authorization", token),),
        ]
        before = secure.counter("extauthz_admin_calls", result="unauthenticated")
        codes: dict[str, set[grpc.StatusCode]] = {}
        with grpc.insecure_channel(secure.local.admin_target) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            for method, request in _ADMIN_CALLS.items():
                for metadata in wrong:
                    try:
                        getattr(stub, method)(request, metadata=metadata, timeout=10)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        code = exc.code()
                    codes.setdefault(method, set()).add(code)
        assert codes == dict.fromkeys(_ADMIN_CALLS, {grpc.StatusCode.UNAUTHENTICATED})
        refused = len(_ADMIN_CALLS) * len(wrong)
        assert secure.counter("extauthz_admin_calls", result="unauthenticated") == before + refused
        # The refused SetClientLevel blocked no one.
        assert _post(secure, "127.0.0.90", {}).status == 200

    def test_admin_api_is_not_routed_through_envoy(self, secure: SecureStack) -> None:
        start = len(secure.received())
        with Client(secure.port, source="127.0.0.91") as http:
            reply = http.request(
                "POST",
                "/extauthz.v1.Admin/SetClientLevel",
                body=b"",
                headers={
                    "content-type": "application/grpc",
                    "authorization": f"Bearer {secure.local.admin_token}",
                },
            )
        # Envoy sends it to the model upstream like any other path, never to the guard.
        assert reply.status == 200
        assert [r["path"] for r in secure.received()[start:]] == [
            "/extauthz.v1.Admin/SetClientLevel"
        ]
