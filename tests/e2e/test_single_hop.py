"""One suite of decision tests, run through the real Envoy in both modes: two hops
(``envoy/envoy.yaml``: ext_authz Check, then ext_proc) and single hop
(``envoy/envoy-single-hop.yaml``: ext_proc alone, deciding on request_headers).

Both modes must answer every request the same way; single hop must do it with one gRPC call
per request, and both must skip the response body where the tier needs nothing from it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extauthz.admin_client import AdminClient
from extauthz.challenge.client import ChallengeSession
from extauthz.demo import stack
from extauthz.demo.client import Client
from extauthz.demo.local import LocalStack
from tests.e2e.conftest import require_envoy

KSERVE = "/v1/models/digits:predict"
FREE_KEY = "single-hop-free-key"
TRUSTED_KEY = "single-hop-trusted-key"
LEAKED_KEY = "single-hop-leaked-key"
ANONYMOUS_PER_MINUTE = 5
MODES = ("two-hop", "single-hop")
JSON = {"content-type": "application/json"}
# urllib honours http_proxy; loopback calls must never go through one.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# Detection stays off (the default) and no tier is watermarked, so the trusted tier's answers
# need nothing from the guard: its response phases are skipped.
POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: freebie, tier: free, sha256: {_digest(FREE_KEY)}}}
    - {{name: bigco, tier: trusted, sha256: {_digest(TRUSTED_KEY)}}}
    - {{name: leaky, tier: free, sha256: {_digest(LEAKED_KEY)}}}
tiers:
  anonymous:
    max_instances: 16
    output: {{policy: round, decimals: 2}}
    limits: [{{name: per-minute, unit: requests, rate: {ANONYMOUS_PER_MINUTE}, per: minute}}]
  free: {{max_instances: 64, output: {{policy: round, decimals: 3}}}}
  trusted: {{max_instances: 20000, output: {{policy: passthrough}}}}
deny:
  key_sha256: [{_digest(LEAKED_KEY)}]
challenge: {{pass_budget: 20}}
"""


def _rows(n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, size=(n, 64)) + rng.random((n, 64))).round(6).tolist()


def _max_decimals(values: list[float]) -> int:
    return max(len(repr(float(v)).split(".")[1]) for v in values if "e" not in repr(float(v)))


class Mode:
    """One running stack in one mode, with the counters the tests read."""

    def __init__(self, name: str, local: LocalStack) -> None:
        self.name = name
        self.local = local
        self.port = local.ports.listener
        # Each mode has its own guard, but addresses are kept apart anyway for readability.
        self.net = "127.0.1" if name == "two-hop" else "127.0.2"

    def source(self, host: int) -> str:
        return f"{self.net}.{host}"

    def guard_samples(self, name: str, **labels: str) -> float:
        """Sum the guard's /metrics samples called ``name`` whose labels include ``labels``."""
        url = f"http://127.0.0.1:{self.local.guard_http_port}/metrics"
        with _DIRECT.open(url, timeout=5.0) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def grpc_calls(self) -> int:
        """Envoy's count of requests to the guard's cluster: one per Check, one per stream."""
        url = (
            f"http://127.0.0.1:{self.local.ports.admin}/stats"
            "?filter=^cluster\\.extauthz\\.upstream_rq_total$"
        )
        with _DIRECT.open(url, timeout=5.0) as response:
            text = response.read().decode().strip()
        return int(text.rsplit(":", 1)[1]) if text else 0

    def pin(self, client: str, level: str | None) -> None:
        with AdminClient(self.local.admin_target, self.local.admin_token) as admin:
            admin.set_level(client, level, reason="e2e single hop")


@pytest.fixture(scope="module", params=MODES)
def mode(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mode]:
    require_envoy()
    name: str = request.param
    workdir = tmp_path_factory.mktemp(f"e2e-{name}")
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(POLICY)
    local = LocalStack(policy=policy_path, workdir=workdir, single_hop=name == "single-hop")
    with local:
        yield Mode(name, local)


class TestAllow:
    """Allowed requests reach the model with the guard's headers, never the client's forgeries."""

    def test_upstream_gets_client_tier_and_risk(self, mode: Mode) -> None:
        with Client(mode.port, source=mode.source(2)) as http:
            reply = http.request("GET", "/debug/headers")
            anonymous = reply.json()["headers"]
            keyed = http.request("GET", "/debug/headers", headers={"x-api-key": FREE_KEY}).json()[
                "headers"
            ]
        assert anonymous["x-extauthz-client"] == f"ip:{mode.source(2)}"
        assert anonymous["x-extauthz-tier"] == "anonymous"
        assert anonymous["x-extauthz-risk"] == "normal"
        # Off the model routes too, the answer tells the client its remaining budget.
        assert reply.headers["ratelimit"].startswith('"anonymous:per-minute";r=4')
        assert (keyed["x-extauthz-client"], keyed["x-extauthz-tier"]) == ("key:freebie", "free")

    def test_forged_tier_is_stripped(self, mode: Mode) -> None:
        forged = {"x-extauthz-tier": "trusted", "x-extauthz-client": "key:bigco"}
        with Client(mode.port, source=mode.source(3)) as http:
            headers = http.request("GET", "/debug/headers", headers=forged).json()["headers"]
            reply = http.post(KSERVE, {"instances": _rows(1)}, headers=forged)
        assert headers["x-extauthz-tier"] == "anonymous"
        assert headers["x-extauthz-client"] == f"ip:{mode.source(3)}"
        assert reply.status == 200
        assert _max_decimals(reply.json()["predictions"][0]) <= 2  # served as anonymous


class TestRefusals:
    """Refusals carry the same status, headers and JSON in both modes."""

    @pytest.mark.parametrize("path", [KSERVE, "/debug/headers"])
    def test_deny_listed_key_gets_403_json(self, mode: Mode, path: str) -> None:
        with Client(mode.port, source=mode.source(4)) as http:
            reply = http.post(path, {"instances": _rows(1)}, headers={"x-api-key": LEAKED_KEY})
        assert reply.status == 403
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["error"] == "deny_list"
        assert reply.json()["action"] == "block"

    def test_anonymous_over_the_limit_gets_429(self, mode: Mode) -> None:
        with Client(mode.port, source=mode.source(5)) as http:
            replies = [
                http.post(KSERVE, {"instances": _rows(1)}) for _ in range(ANONYMOUS_PER_MINUTE + 1)
            ]
        allowed, refused = replies[:-1], replies[-1]
        assert [r.status for r in allowed] == [200] * ANONYMOUS_PER_MINUTE
        assert allowed[0].headers["ratelimit"].startswith('"anonymous:per-minute";r=4')
        assert refused.status == 429
        assert int(refused.headers["retry-after"]) > 0
        assert refused.headers["ratelimit"].startswith('"anonymous:per-minute";r=0')
        assert "ratelimit-policy" in refused.headers
        assert refused.json()["error"] == "rate_limited"
        assert refused.json()["limit"]["unit"] == "requests"

    def test_body_over_the_guard_limit_gets_413(self, mode: Mode) -> None:
        row = json.dumps(_rows(1)[0])
        count = 9 * 1024 * 1024 // len(row) + 1
        body = ('{"instances": [' + ",".join([row] * count) + "]}").encode()
        assert 8 * 1024 * 1024 < len(body) < 10 * 1024 * 1024
        with Client(mode.port, source=mode.source(6)) as http:
            reply = http.post(KSERVE, body, headers={**JSON, "x-api-key": TRUSTED_KEY})
        assert reply.status == 413
        assert reply.json()["error"] == "body_too_large"


class TestChallenge:
    """A client pinned suspicious is challenged (401), solves the proof of work and gets in."""

    def test_challenge_solved_with_the_session_helper(self, mode: Mode) -> None:
        source = mode.source(7)
        mode.pin(f"ip:{source}", "suspicious")
        try:
            with Client(mode.port, source=source) as http:
                first = http.post(KSERVE, {"instances": _rows(1)})
            session = ChallengeSession("127.0.0.1", mode.port, source_address=source)
            with session:
                answers = [
                    session.request(
                        "POST",
                        KSERVE,
                        body=json.dumps({"instances": _rows(1)}).encode(),
                        headers=JSON,
                    )
                    for _ in range(2)
                ]
        finally:
            mode.pin(f"ip:{source}", None)
        assert first.status == 401
        assert first.headers["www-authenticate"].startswith("ExtauthzPoW")
        assert first.json()["challenge"]["scheme"] == "ExtauthzPoW"
        assert [a.status for a in answers] == [200, 200]
        assert session.solved == 1  # the pass granted with the first answer covered the second
        assert session.pass_token


class TestRewrite:
    """Model answers are rewritten by tier in both modes."""

    def test_decimals_are_capped_by_tier(self, mode: Mode) -> None:
        with Client(mode.port, source=mode.source(8)) as http:
            anonymous = http.post(KSERVE, {"instances": _rows(2)})
            free = http.post(KSERVE, {"instances": _rows(2)}, headers={"x-api-key": FREE_KEY})
            trusted = http.post(KSERVE, {"instances": _rows(2)}, headers={"x-api-key": TRUSTED_KEY})
        assert _max_decimals(anonymous.json()["predictions"][0]) <= 2
        assert _max_decimals(free.json()["predictions"][0]) <= 3
        assert _max_decimals(trusted.json()["predictions"][0]) > 3  # passthrough
        assert int(anonymous.headers["content-length"]) == len(anonymous.body)


class TestHops:
    """Single hop calls the guard once per request (no Check); two hops call it twice."""

    def test_grpc_calls_per_model_request(self, mode: Mode) -> None:
        check_before = mode.guard_samples("extauthz_decisions_total", path="check")
        proc_before = mode.guard_samples("extauthz_decisions_total", path="ext_proc")
        calls_before = mode.grpc_calls()
        with Client(mode.port, source=mode.source(9)) as http:
            replies = [
                http.post(KSERVE, {"instances": _rows(1)}, headers={"x-api-key": FREE_KEY})
                for _ in range(3)
            ]
        assert [r.status for r in replies] == [200] * 3
        checks = mode.guard_samples("extauthz_decisions_total", path="check") - check_before
        procs = mode.guard_samples("extauthz_decisions_total", path="ext_proc") - proc_before
        calls = mode.grpc_calls() - calls_before
        assert procs == 3
        if mode.name == "single-hop":
            assert (checks, calls) == (0, 3)
        else:
            assert (checks, calls) == (3, 6)

    def test_requests_are_charged_once(self, mode: Mode) -> None:
        # The anonymous limit is 5 a minute: charged twice, the 3rd request would be refused.
        with Client(mode.port, source=mode.source(10)) as http:
            statuses = [http.post(KSERVE, {"instances": _rows(1)}).status for _ in range(5)]
        assert statuses == [200] * 5


class TestPhases:
    """The response phases are skipped where the tier rewrites, marks and detects nothing."""

    def _phase_count(self, mode: Mode, phase: str) -> float:
        return mode.guard_samples("extauthz_decision_seconds_count", path=f"ext_proc_{phase}")

    def test_passthrough_tier_skips_the_response(self, mode: Mode) -> None:
        before = {p: self._phase_count(mode, p) for p in ("response_headers", "response_body")}
        with Client(mode.port, source=mode.source(11)) as http:
            trusted = http.post(KSERVE, {"instances": _rows(2)}, headers={"x-api-key": TRUSTED_KEY})
        skipped = {p: self._phase_count(mode, p) - before[p] for p in before}
        with Client(mode.port, source=mode.source(11)) as http:
            free = http.post(KSERVE, {"instances": _rows(2)}, headers={"x-api-key": FREE_KEY})
        processed = {p: self._phase_count(mode, p) - before[p] - skipped[p] for p in before}
        assert trusted.status == free.status == 200
        assert skipped == {"response_headers": 0, "response_body": 0}
        assert processed == {"response_headers": 1, "response_body": 1}
        assert int(trusted.headers["content-length"]) == len(trusted.body)


# --- the config file itself ---------------------------------------------------------------------

PORTS = stack.Ports(listener=18080, admin=19901, guard=19191, model=18081)
EXT_PROC = "envoy.filters.http.ext_proc"


def _single_hop() -> dict[str, Any]:
    tree = yaml.safe_load(stack.render_envoy_config(PORTS, source=stack.ENVOY_SINGLE_HOP_YAML))
    assert isinstance(tree, dict)
    return tree


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]  # type: ignore[no-any-return]


class TestSingleHopConfig:
    """envoy/envoy-single-hop.yaml: Envoy accepts it; ext_proc alone, bodies only where parsed."""

    def test_envoy_validates_it(self, tmp_path: Path) -> None:
        require_envoy()
        text = stack.render_envoy_config(PORTS, source=stack.ENVOY_SINGLE_HOP_YAML)
        stack.validate_envoy_config(text, workdir=tmp_path)

    def test_no_ext_authz_and_ext_proc_can_skip_phases(self) -> None:
        filters = _hcm(_single_hop())["http_filters"]
        names = [f["name"] for f in filters]
        assert "envoy.filters.http.ext_authz" not in names
        assert names.index("envoy.filters.http.header_mutation") < names.index(EXT_PROC)
        (ext_proc,) = [f["typed_config"] for f in filters if f["name"] == EXT_PROC]
        assert ext_proc["allow_mode_override"] is True
        assert "source.address" in ext_proc["request_attributes"]
        forwarded = ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"]
        # Forwarding it would make the guard believe Check had already decided.
        assert "envoy.filters.http.ext_authz" not in forwarded
        removed = {
            m["remove"]
            for f in filters
            if f["name"] == "envoy.filters.http.header_mutation"
            for m in f["typed_config"]["mutations"]["request_mutations"]
        }
        assert {"x-extauthz-client", "x-extauthz-tier", "x-extauthz-risk"} <= removed

    def test_bodies_are_buffered_only_on_parsed_routes(self) -> None:
        hcm = _hcm(_single_hop())
        (ext_proc,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == EXT_PROC]
        assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        for route in vhost["routes"]:
            per_route = route.get("typed_per_filter_config", {}).get(EXT_PROC)
            assert per_route is None or "disabled" not in per_route  # every route is guarded
            if route["name"] in ("model_v1", "model_v2", "openai"):
                assert per_route is None  # the filter's BUFFERED bodies
            else:
                mode = per_route["overrides"]["processing_mode"]
                assert (mode["request_body_mode"], mode["response_body_mode"]) == ("NONE", "NONE")
