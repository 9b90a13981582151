"""Hostile input is answered and counted: each refusal moves the metric of its own reason.

Every case scrapes the Prometheus registry (``extauthz.telemetry.metrics.REGISTRY``) before
and after and asserts which samples moved, and by how much: the reason a refusal names
(``details`` of an ImmediateResponse, ``error`` of a Check denial) is the label that moved,
and no other error reason moved with it. Compressed bodies cover what the guard decodes
(gzip and x-gzip, several gzip members, deflate with and without the zlib wrapper) and what it
refuses (br, zstd, stacked or unknown codings, bombs, truncated or trailing bytes).

One guard serves the module on its own event loop (``GuardOnLoop``), so that hypothesis
drives it from synchronous tests; each case uses its own client so cases do not share state.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import json
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from extauthz.challenge import passes, pow
from extauthz.challenge.gate import binding_of
from extauthz.core.identity import Identity
from extauthz.keys import KeyRing, b64url, b64url_decode
from extauthz.telemetry import metrics
from tests.integration.service_fixtures import (
    ALICE_KEY,
    BOB_KEY,
    MALLORY_KEY,
    UNKNOWN_KEY,
    Exchange,
    RunningGuard,
    check_request,
    exchange,
    kserve_body,
    proc_request_body,
    proc_request_headers,
    proc_response_body,
    proc_response_headers,
    running_guard,
    sha256_hex,
)
from tests.integration.test_hostile_extproc import GuardOnLoop

_T = TypeVar("_T")

METER_KEY = "meter-raw-secret-key-0005"  # tier metered: 2 requests a minute
BULK_KEY = "bulk-raw-secret-key-0006"  # tier bulk: 6 instances a minute
ROAMER_KEY = "roamer-raw-secret-key-0007"  # tier free, challenged from two addresses
CAPPED_KEY = "capped-raw-secret-key-0008"  # tier metered, challenged

ANONYMOUS_MAX = 4
FREE_MAX = 8
MAX_BODY = 8 * 1024 * 1024  # the guard's default --max-message-bytes
CHALLENGE_TTL_S = 60
PASS_TTL_S = 120
PASS_BUDGET = 3
KSERVE = "/v1/models/m:predict"
OIP = "/v2/models/m/infer"
CHAT = "/v1/chat/completions"

POLICY = f"""\
version: 1
mode: enforce
identity:
  api_key_header: x-api-key
  api_keys:
    - {{name: alice, sha256: {sha256_hex(ALICE_KEY)}, tier: free}}
    - {{name: bob, sha256: {sha256_hex(BOB_KEY)}, tier: trusted}}
    - {{name: mallory, sha256: {sha256_hex(MALLORY_KEY)}, tier: free}}
    - {{name: meter, sha256: {sha256_hex(METER_KEY)}, tier: metered}}
    - {{name: bulk, sha256: {sha256_hex(BULK_KEY)}, tier: bulk}}
    - {{name: roamer, sha256: {sha256_hex(ROAMER_KEY)}, tier: free}}
    - {{name: capped, sha256: {sha256_hex(CAPPED_KEY)}, tier: metered}}
  unknown_key: deny
  anonymous_tier: anonymous
tiers:
  anonymous:
    max_instances: {ANONYMOUS_MAX}
    output: {{policy: round, decimals: 2}}
    llm: {{logit_bias_with_logprobs: refuse}}
  free:
    max_instances: {FREE_MAX}
    output: {{policy: round, decimals: 2}}
  trusted:
    max_instances: 1024
    output: {{policy: passthrough}}
  metered:
    max_instances: 4
    limits: [{{name: per-minute, unit: requests, rate: 2, per: minute}}]
  bulk:
    max_instances: 4
    limits: [{{name: batch, unit: instances, rate: 6, per: minute}}]
levels: {{normal: allow, elevated: allow, suspicious: challenge, abusive: block}}
deny:
  clients: [key:mallory]
routes:
  - {{prefix: /v1/models/, dialect: kserve_v1}}
  - {{prefix: /v2/models/, dialect: oip_v2}}
  - {{prefix: {CHAT}, dialect: openai}}
challenge:
  difficulty: {{normal: 4, elevated: 4, suspicious: 6, abusive: 8}}
  bits_per_doubling: 0
  ttl_s: {CHALLENGE_TTL_S}
  pass_ttl_s: {PASS_TTL_S}
  pass_budget: {PASS_BUDGET}
  bind_address: true
fail_modes:
  store: fail_open
  body: deny
"""

HOSTILE = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardOnLoop]:
    """One guard with ``POLICY`` for the module, on its own loop."""
    tmp_path: Path = tmp_path_factory.mktemp("reasons")
    with asyncio.Runner() as runner:
        context = running_guard(tmp_path, POLICY)
        running = runner.run(context.__aenter__())
        try:
            yield GuardOnLoop(runner, running)
        finally:
            runner.run(context.__aexit__(None, None, None))


# --- scraping the registry ---------------------------------------------------------------------

# The counters a refusal or a rejected message moves.
_FAMILIES = frozenset(
    {
        "extauthz_errors",
        "extauthz_decisions",
        "extauthz_challenges",
        "extauthz_request_rules",
        "extauthz_rate_limited",
        "extauthz_instances",
        "extauthz_extproc_streams",
    }
)
_Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape() -> dict[_Sample, float]:
    """Every ``_total`` sample of the counters in ``_FAMILIES``, keyed by name and labels."""
    samples: dict[_Sample, float] = {}
    for family in metrics.REGISTRY.collect():
        if family.name not in _FAMILIES:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@dataclass(frozen=True, slots=True)
class Moved:
    """What moved between two scrapes: sample -> increase."""

    deltas: Mapping[_Sample, float]

    @classmethod
    def between(cls, before: Mapping[_Sample, float], after: Mapping[_Sample, float]) -> Moved:
        return cls(
            {
                key: value - before.get(key, 0.0)
                for key, value in after.items()
                if value != before.get(key, 0.0)
            }
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        """Increases of counter ``name`` by the value of ``label`` (other labels summed)."""
        out: dict[str, float] = {}
        for (sample, labels), delta in self.deltas.items():
            if sample == name:
                value = dict(labels)[label]
                out[value] = out.get(value, 0.0) + delta
        return out

    @property
    def errors(self) -> dict[str, float]:
        return self.by("extauthz_errors_total", "reason")

    @property
    def challenges(self) -> dict[str, float]:
        return self.by("extauthz_challenges_total", "outcome")

    def decisions(self, path: str) -> dict[tuple[str, str, str], float]:
        """Increases of ``extauthz_decisions_total`` on ``path`` by (action, tier, reason)."""
        out: dict[tuple[str, str, str], float] = {}
        for (sample, labels), delta in self.deltas.items():
            found = dict(labels)
            if sample == "extauthz_decisions_total" and found["path"] == path:
                out[(found["action"], found["tier"], found["reason"])] = delta
        return out

    def instances(self) -> dict[str, float]:
        return self.by("extauthz_instances_total", "tier")


def observe(
    guard: GuardOnLoop, scenario: Callable[[RunningGuard], Awaitable[_T]]
) -> tuple[_T, Moved]:
    """Run ``scenario`` on the guard; return its result and what moved in the registry."""
    before = scrape()
    result = guard.run(scenario)
    return result, Moved.between(before, scrape())


# --- building requests -------------------------------------------------------------------------

_SOURCES = (f"10.{i // 250}.{i % 250}.9" for i in itertools.count(1))


def fresh_source() -> str:
    """A client address no other case has used."""
    return next(_SOURCES)


def immediate_of(result: Exchange) -> proc_pb2.ImmediateResponse | None:
    for response in result.responses:
        if response.HasField("immediate_response"):
            return response.immediate_response
    return None


def body_stream(
    body: bytes,
    *,
    path: str = KSERVE,
    headers: Mapping[str, str | bytes] | None = None,
    source: str | None = None,
) -> list[proc_pb2.ProcessingRequest]:
    """A single-hop request: request_headers (from a fresh address) then the whole body."""
    return [
        proc_request_headers(path, headers=headers, source=f"{source or fresh_source()}:4000"),
        proc_request_body(body),
    ]


def gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(part, mtime=0) for part in parts)


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(6, zlib.DEFLATED, -15)
    return encoder.compress(data) + encoder.flush()


def oip_binary_body() -> tuple[bytes, str]:
    """An Open Inference body with its tensor as raw bytes after the JSON header."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    return header + bytes(8), str(len(header))


BOMB = gzip.compress(b"0" * (MAX_BODY + 1024), mtime=0)  # about 9 KB that inflate past the limit
DEFLATE_BOMB = zlib.compress(b"0" * (MAX_BODY + 1024))
CHAT_BODY = json.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"50256": 5},
    }
).encode()


@dataclass(frozen=True, slots=True)
class BodyCase:
    """One unreadable or refused request body and the answer and error reason it must get."""

    body: bytes
    status: int
    reason: str
    headers: Mapping[str, str | bytes] | None = None
    path: str = KSERVE


_BINARY, _BINARY_LENGTH = oip_binary_body()
_VALID = kserve_body(2)

BODY_CASES: dict[str, BodyCase] = {
    "not_json": BodyCase(b"{nope", 400, "body_parse_error"),
    "invalid_utf8": BodyCase(b'{"instances":[["\xff\xfe"]]}', 400, "body_parse_error"),
    "nan": BodyCase(b'{"instances":[[NaN]]}', 400, "invalid_input"),
    "ragged": BodyCase(b'{"instances":[[1,2],[3]]}', 400, "invalid_input"),
    "empty_batch": BodyCase(b'{"instances":[]}', 400, "invalid_input"),
    "empty_body": BodyCase(b"", 400, "body_parse_error"),
    "batch_over_tier_max": BodyCase(kserve_body(ANONYMOUS_MAX + 1), 413, "too_many_instances"),
    "giant_batch": BodyCase(kserve_body(20_000, width=1), 413, "too_many_instances"),
    "over_body_limit": BodyCase(b" " * (MAX_BODY + 1), 413, "body_too_large"),
    "gzip_bomb": BodyCase(BOMB, 413, "body_too_large", {"content-encoding": "gzip"}),
    "deflate_bomb": BodyCase(DEFLATE_BOMB, 413, "body_too_large", {"content-encoding": "deflate"}),
    "br": BodyCase(b"\x1b\x00\x00", 415, "unsupported_encoding", {"content-encoding": "br"}),
    "zstd": BodyCase(
        b"\x28\xb5\x2f\xfd\x00\x00", 415, "unsupported_encoding", {"content-encoding": "zstd"}
    ),
    "compress": BodyCase(_VALID, 415, "unsupported_encoding", {"content-encoding": "compress"}),
    "stacked_codings": BodyCase(
        gzip_members(_VALID), 415, "unsupported_encoding", {"content-encoding": "gzip, gzip"}
    ),
    "not_gzip": BodyCase(_VALID, 400, "body_decode_error", {"content-encoding": "gzip"}),
    "truncated_gzip": BodyCase(
        gzip_members(_VALID)[:-12], 400, "body_decode_error", {"content-encoding": "gzip"}
    ),
    "gzip_then_junk": BodyCase(
        gzip_members(_VALID) + b"junk", 400, "body_decode_error", {"content-encoding": "gzip"}
    ),
    "too_many_gzip_members": BodyCase(
        gzip_members(*([b" "] * 40), _VALID), 400, "body_decode_error", {"content-encoding": "gzip"}
    ),
    "deflate_then_junk": BodyCase(
        zlib.compress(_VALID) + b"junk", 400, "body_decode_error", {"content-encoding": "deflate"}
    ),
    "gzip_labelled_deflate": BodyCase(
        gzip_members(_VALID), 400, "body_decode_error", {"content-encoding": "deflate"}
    ),
    "gzip_hiding_a_big_batch": BodyCase(
        gzip_members(kserve_body(50)), 413, "too_many_instances", {"content-encoding": "gzip"}
    ),
    "oip_binary_tensors": BodyCase(
        _BINARY, 415, "binary_refused", {"inference-header-content-length": _BINARY_LENGTH}, OIP
    ),
    "oip_binary_output": BodyCase(
        b'{"inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[1]}],'
        b'"parameters":{"binary_data_output":true}}',
        415,
        "unsupported_media",
        path=OIP,
    ),
}


class TestRefusedBodies:
    """Each unreadable body on a model route gets its 4xx and moves its reason, and only it."""

    @pytest.mark.parametrize("name", sorted(BODY_CASES))
    def test_refused_and_counted(self, guard: GuardOnLoop, name: str) -> None:
        case = BODY_CASES[name]
        messages = body_stream(case.body, path=case.path, headers=case.headers)
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        assert result.code == grpc.StatusCode.OK
        answer = immediate_of(result)
        assert answer is not None, f"{name} was let through"
        assert (answer.status.code, answer.details) == (case.status, f"extauthz_{case.reason}")
        assert json.loads(answer.body)["error"] == case.reason
        assert moved.errors == {case.reason: 1}
        assert moved.by("extauthz_extproc_streams_total", "outcome") == {"immediate": 1}
        assert moved.instances() == {}  # refused, so nothing was counted as served


@dataclass(frozen=True, slots=True)
class Encoded:
    """A readable body in some content-encoding and the instances it carries."""

    body: bytes
    encoding: str
    instances: int


_PLAIN = kserve_body(3)
ACCEPTED: dict[str, Encoded] = {
    "identity": Encoded(_PLAIN, "identity", 3),
    "gzip": Encoded(gzip_members(_PLAIN), "gzip", 3),
    "x_gzip_upper_case": Encoded(gzip_members(_PLAIN), " X-GZIP ", 3),
    "zlib_deflate": Encoded(zlib.compress(_PLAIN), "deflate", 3),
    "raw_deflate": Encoded(raw_deflate(_PLAIN), "deflate", 3),
    # One JSON document cut across two gzip members: a decoder reads both, so the guard counts both.
    "two_gzip_members": Encoded(gzip_members(_PLAIN[:20], _PLAIN[20:]), "gzip", 3),
}


class TestDecodedBodies:
    """Compressed bodies the guard can read are decoded and counted, never waved through."""

    @pytest.mark.parametrize("name", sorted(ACCEPTED))
    def test_decoded_and_counted(self, guard: GuardOnLoop, name: str) -> None:
        case = ACCEPTED[name]
        messages = body_stream(case.body, headers={"content-encoding": case.encoding})
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        assert result.code == grpc.StatusCode.OK
        assert immediate_of(result) is None
        assert [r.WhichOneof("response") for r in result.responses] == [
            "request_headers",
            "request_body",
        ]
        assert moved.instances() == {"anonymous": case.instances}
        assert moved.errors == {}


class TestStreamShapes:
    """Out-of-order, empty and mismatched messages are passed on and counted by reason."""

    def test_duplicate_request_body_is_out_of_order(self, guard: GuardOnLoop) -> None:
        messages = [*body_stream(kserve_body(1)), proc_request_body(kserve_body(4))]
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        assert len(result.responses) == 3
        assert moved.errors == {"out_of_order": 1}
        assert moved.instances() == {"anonymous": 1}  # the duplicate is not counted twice

    def test_empty_message(self, guard: GuardOnLoop) -> None:
        messages = [proc_pb2.ProcessingRequest(), *body_stream(kserve_body(1))]
        _, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        assert moved.errors == {"empty_message": 1}

    def test_identity_mismatch_with_checks_verdict(self, guard: GuardOnLoop) -> None:
        verdict = struct_pb2.Struct()
        verdict.update({"client": "key:alice", "tier": "free", "risk": "normal", "action": "allow"})
        messages = [
            proc_request_headers(KSERVE, source=f"{fresh_source()}:1", check_metadata=verdict),
            proc_request_body(kserve_body(1)),
        ]
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        assert immediate_of(result) is None
        assert moved.errors == {"identity_mismatch": 1}

    def test_invalid_utf8_key_is_an_unknown_key(self, guard: GuardOnLoop) -> None:
        messages = body_stream(kserve_body(1), headers={"x-api-key": b"\xffkey\xfe\xc0"})
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        answer = immediate_of(result)
        assert answer is not None
        assert (answer.status.code, answer.details) == (401, "extauthz_invalid_api_key")
        assert moved.decisions("ext_proc") == {("block", "anonymous", "invalid_api_key"): 1}
        assert moved.errors == {}

    def test_invalid_utf8_encoding_is_unsupported(self, guard: GuardOnLoop) -> None:
        messages = body_stream(kserve_body(1), headers={"content-encoding": b"gz\xffip"})
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        answer = immediate_of(result)
        assert answer is not None and answer.status.code == 415
        assert moved.errors == {"unsupported_encoding": 1}

    def test_grpc_inference_refused(self, guard: GuardOnLoop) -> None:
        messages = [
            proc_request_headers(
                OIP, headers={"content-type": "application/grpc"}, source=f"{fresh_source()}:1"
            )
        ]
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        answer = immediate_of(result)
        assert answer is not None and answer.details == "extauthz_grpc_refused"
        assert moved.errors == {"grpc_refused": 1}

    @pytest.mark.parametrize(
        ("encoding", "body", "reason"),
        [
            ("", b"{not json", "response_body_parse_error"),
            ("br", b"\x1b\x00", "response_unsupported_encoding"),
            ("gzip", b"not gzip at all", "response_body_decode_error"),
            ("gzip", gzip.compress(b"0" * (MAX_BODY + 1), mtime=0), "response_body_too_large"),
        ],
        ids=["junk", "br", "bad_gzip", "gzip_bomb"],
    )
    def test_unreadable_answer_passes_unchanged_and_counted(
        self, guard: GuardOnLoop, encoding: str, body: bytes, reason: str
    ) -> None:
        extra = {"content-encoding": encoding} if encoding else None
        messages = [
            *body_stream(kserve_body(1)),
            proc_response_headers(extra=extra),
            proc_response_body(body),
        ]
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        last = result.responses[-1]
        assert last.WhichOneof("response") == "response_body"
        assert not last.response_body.response.HasField("body_mutation")  # passed as it came
        assert moved.errors == {reason: 1}


class TestLlmAndLimits:
    """Request rules and instance limits in ext_proc refuse with their own counters."""

    def test_logit_bias_with_logprobs_refused(self, guard: GuardOnLoop) -> None:
        messages = body_stream(CHAT_BODY, path=CHAT)
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        answer = immediate_of(result)
        assert answer is not None
        assert (answer.status.code, answer.details) == (400, "extauthz_request_rule")
        assert moved.by("extauthz_request_rules_total", "rule") == {"logit_bias_refused": 1}
        assert moved.errors == {}

    def test_instance_limit_throttles_the_second_batch(self, guard: GuardOnLoop) -> None:
        source = fresh_source()

        async def two_batches(g: RunningGuard) -> list[Exchange]:
            return [
                await exchange(
                    g.extproc,
                    body_stream(kserve_body(4), headers={"x-api-key": BULK_KEY}, source=source),
                )
                for _ in range(2)
            ]

        result, moved = observe(guard, two_batches)
        first, second = (immediate_of(r) for r in result)
        assert first is None
        assert second is not None
        assert (second.status.code, second.details) == (429, "extauthz_rate_limited")
        assert moved.decisions("ext_proc")[("throttle", "bulk", "rate_limited")] == 1
        assert moved.by("extauthz_rate_limited_total", "unit") == {"instances": 1}
        assert moved.instances() == {"bulk": 8}  # both batches were counted
        assert moved.errors == {}


# --- Check: decisions and challenges -------------------------------------------------------------


def denial_of(response: external_auth_pb2.CheckResponse) -> tuple[int, str]:
    """(HTTP status, ``error`` of the body) of a Check denial."""
    denied = response.denied_response
    return denied.status.code, json.loads(denied.body)["error"]


def granted_pass(response: external_auth_pb2.CheckResponse) -> str:
    for option in response.ok_response.response_headers_to_add:
        if option.header.key.lower() == passes.HEADER:
            return str(option.header.value)
    return ""


async def pin(g: RunningGuard, client_id: str, level: str | None, *, blocked: bool = False) -> None:
    await g.guard.store.set_level(
        client_id, level=level, blocked=blocked, reason="test", now=g.clock.now, ttl_s=None
    )


async def suspicious_source(g: RunningGuard) -> str:
    """A fresh anonymous client pinned suspicious (so it is challenged)."""
    address = fresh_source()
    await pin(g, f"ip:{address}", "suspicious")
    return address


async def challenge_for(
    g: RunningGuard, address: str, headers: Mapping[str, str] | None = None
) -> tuple[str, int]:
    """Ask for a challenge as this client: (token, difficulty)."""
    response = await g.authz.Check(check_request(headers, address=address))
    assert denial_of(response) == (401, "challenge_required")
    challenge = json.loads(response.denied_response.body)["challenge"]
    return str(challenge["token"]), int(challenge["difficulty"])


async def solution_for(
    g: RunningGuard, address: str, headers: Mapping[str, str] | None = None
) -> str:
    """A valid ``x-extauthz-pow`` value for a fresh challenge of this client."""
    token, difficulty = await challenge_for(g, address, headers)
    return f"{token}:{pow.solve(token, difficulty)}"


async def pass_for(g: RunningGuard, address: str, headers: Mapping[str, str] | None = None) -> str:
    """Solve a challenge as this client and return the pass it is granted."""
    solution = await solution_for(g, address, headers)
    granted = await g.authz.Check(
        check_request({**(headers or {}), "x-extauthz-pow": solution}, address=address)
    )
    token = granted_pass(granted)
    assert granted.HasField("ok_response") and token
    return token


def weak_solution(token: str, difficulty: int) -> str:
    """``<token>:<nonce>`` with a nonce that does not meet ``difficulty``."""
    for nonce in range(1000):
        header = f"{token}:{nonce}"
        if pow.leading_zero_bits(hashlib.sha256(header.encode()).digest()) < difficulty:
            return header
    raise AssertionError("every nonce met the difficulty")


def forged_ring() -> KeyRing:
    """A ring with the guard's key id ("ephemeral", a random ring's) but another secret."""
    return KeyRing.random()


def tampered(token: str, **claims: object) -> str:
    """``token`` with some claims changed and the old MAC kept."""
    version, kid, body, mac = token.split(".")
    decoded = b64url_decode(body)
    assert decoded is not None
    document = json.loads(decoded)
    document.update(claims)
    return ".".join([version, kid, b64url(json.dumps(document).encode()), mac])


class TestCheckRefusals:
    """Each Check refusal moves extauthz_decisions_total under its own reason, once."""

    def _check(
        self, guard: GuardOnLoop, headers: Mapping[str, str], address: str
    ) -> tuple[external_auth_pb2.CheckResponse, Moved]:
        return observe(guard, lambda g: g.authz.Check(check_request(headers, address=address)))

    def test_unknown_api_key(self, guard: GuardOnLoop) -> None:
        response, moved = self._check(guard, {"x-api-key": UNKNOWN_KEY}, fresh_source())
        assert denial_of(response) == (401, "invalid_api_key")
        assert moved.decisions("check") == {("block", "anonymous", "invalid_api_key"): 1}
        assert moved.errors == {}

    def test_deny_list(self, guard: GuardOnLoop) -> None:
        response, moved = self._check(guard, {"x-api-key": MALLORY_KEY}, fresh_source())
        assert denial_of(response) == (403, "deny_list")
        assert moved.decisions("check") == {("block", "free", "deny_list"): 1}

    def test_operator_block(self, guard: GuardOnLoop) -> None:
        address = fresh_source()
        guard.run(lambda g: pin(g, f"ip:{address}", None, blocked=True))
        response, moved = self._check(guard, {}, address)
        assert denial_of(response) == (403, "operator_block")
        assert moved.decisions("check") == {("block", "anonymous", "operator_block"): 1}

    def test_pinned_abusive(self, guard: GuardOnLoop) -> None:
        address = fresh_source()
        guard.run(lambda g: pin(g, f"ip:{address}", "abusive"))
        response, moved = self._check(guard, {}, address)
        assert denial_of(response) == (403, "pinned_abusive")
        assert moved.decisions("check") == {("block", "anonymous", "pinned"): 1}

    def test_request_limit(self, guard: GuardOnLoop) -> None:
        address = fresh_source()

        async def three(g: RunningGuard) -> list[external_auth_pb2.CheckResponse]:
            request = check_request({"x-api-key": METER_KEY}, address=address)
            return [await g.authz.Check(request) for _ in range(3)]

        responses, moved = observe(guard, three)
        assert [r.HasField("ok_response") for r in responses] == [True, True, False]
        assert denial_of(responses[2]) == (429, "rate_limited")
        assert moved.decisions("check") == {
            ("allow", "metered", "none"): 2,
            ("throttle", "metered", "rate_limited"): 1,
        }
        assert moved.by("extauthz_rate_limited_total", "unit") == {"requests": 1}

    def test_challenge_required(self, guard: GuardOnLoop) -> None:
        address = guard.run(suspicious_source)
        response, moved = self._check(guard, {}, address)
        assert denial_of(response) == (401, "challenge_required")
        assert moved.decisions("check") == {("challenge", "anonymous", "challenge_required"): 1}
        assert moved.challenges == {"issued": 1}


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a challenged client sends: its headers and its address."""

    headers: dict[str, str]
    address: str
    tier: str = "anonymous"


async def _malformed_solution(g: RunningGuard) -> Attempt:
    return Attempt({"x-extauthz-pow": "c1.not-a-token:12"}, await suspicious_source(g))


async def _forged_solution(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    binding = binding_of(Identity(f"ip:{address}", "anonymous", "anonymous"))
    forged = pow.issue(
        forged_ring().derive("challenge"),
        binding=binding,
        difficulty=1,
        now=g.clock.now,
        ttl_s=60,
        rng_bytes=bytes(16),
    )
    return Attempt({"x-extauthz-pow": f"{forged.token}:{pow.solve(forged.token, 1)}"}, address)


async def _lowered_difficulty(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    token, _ = await challenge_for(g, address)
    easy = tampered(token, d=0)
    return Attempt({"x-extauthz-pow": f"{easy}:0"}, address)


async def _expired_solution(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    solution = await solution_for(g, address)
    g.clock.now += CHALLENGE_TTL_S + 1
    return Attempt({"x-extauthz-pow": solution}, address)


async def _foreign_solution(g: RunningGuard) -> Attempt:
    solution = await solution_for(g, await suspicious_source(g))
    return Attempt({"x-extauthz-pow": solution}, await suspicious_source(g))


async def _weak_solution(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    token, difficulty = await challenge_for(g, address)
    return Attempt({"x-extauthz-pow": weak_solution(token, difficulty)}, address)


async def _replayed_solution(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    solution = await solution_for(g, address)
    first = await g.authz.Check(check_request({"x-extauthz-pow": solution}, address=address))
    assert first.HasField("ok_response")
    return Attempt({"x-extauthz-pow": solution}, address)


async def _malformed_pass(g: RunningGuard) -> Attempt:
    return Attempt({"x-extauthz-pass": "p1.x.y"}, await suspicious_source(g))


async def _forged_pass(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    token = passes.issue_pass(
        forged_ring().derive("pass"),
        binding=binding_of(Identity(f"ip:{address}", "anonymous", "anonymous")),
        address=address,
        ttl_s=600,
        budget=10**6,
        now=g.clock.now,
        rng_bytes=bytes(16),
    )
    return Attempt({"x-extauthz-pass": token}, address)


async def _inflated_pass(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    token = await pass_for(g, address)
    return Attempt({"x-extauthz-pass": tampered(token, n=10**6)}, address)


async def _challenge_as_pass(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    token, _ = await challenge_for(g, address)
    return Attempt({"x-extauthz-pass": token}, address)


async def _expired_pass(g: RunningGuard) -> Attempt:
    address = await suspicious_source(g)
    token = await pass_for(g, address)
    g.clock.now += PASS_TTL_S + 1
    return Attempt({"x-extauthz-pass": token}, address)


async def _foreign_pass(g: RunningGuard) -> Attempt:
    token = await pass_for(g, await suspicious_source(g))
    return Attempt({"x-extauthz-pass": token}, await suspicious_source(g))


async def _pass_from_another_address(g: RunningGuard) -> Attempt:
    # One API key, two addresses: with bind_address the pass stays where it was granted.
    await pin(g, "key:roamer", "suspicious")
    key = {"x-api-key": ROAMER_KEY}
    token = await pass_for(g, fresh_source(), key)
    return Attempt({**key, "x-extauthz-pass": token}, fresh_source(), tier="free")


async def _keyed_pass_without_the_key(g: RunningGuard) -> Attempt:
    # The pass of key:roamer, shown from the same address without the key: another client.
    await pin(g, "key:roamer", "suspicious")
    address = fresh_source()
    await pin(g, f"ip:{address}", "suspicious")
    token = await pass_for(g, address, {"x-api-key": ROAMER_KEY})
    return Attempt({"x-extauthz-pass": token}, address)


# Each forged, replayed, stale or foreign proof: the outcome it is counted under.
REFUSED_PROOFS: dict[str, tuple[Callable[[RunningGuard], Awaitable[Attempt]], str]] = {
    "malformed_solution": (_malformed_solution, "malformed"),
    "forged_solution": (_forged_solution, "bad_signature"),
    "lowered_difficulty": (_lowered_difficulty, "bad_signature"),
    "expired_solution": (_expired_solution, "expired"),
    "foreign_solution": (_foreign_solution, "wrong_client"),
    "weak_solution": (_weak_solution, "insufficient_work"),
    "replayed_solution": (_replayed_solution, "replayed"),
    "malformed_pass": (_malformed_pass, "pass_malformed"),
    "forged_pass": (_forged_pass, "pass_bad_signature"),
    "inflated_pass": (_inflated_pass, "pass_bad_signature"),
    "challenge_as_pass": (_challenge_as_pass, "pass_malformed"),
    "expired_pass": (_expired_pass, "pass_expired"),
    "foreign_pass": (_foreign_pass, "pass_wrong_client"),
    "pass_from_another_address": (_pass_from_another_address, "pass_wrong_address"),
    "keyed_pass_without_the_key": (_keyed_pass_without_the_key, "pass_wrong_client"),
}


class TestChallengeOutcomes:
    """Refused proofs get a new challenge and move their own outcome; good ones admit."""

    @pytest.mark.parametrize("name", sorted(REFUSED_PROOFS))
    def test_refused_proof(self, guard: GuardOnLoop, name: str) -> None:
        prepare, outcome = REFUSED_PROOFS[name]
        attempt = guard.run(prepare)
        response, moved = observe(
            guard,
            lambda g: g.authz.Check(check_request(attempt.headers, address=attempt.address)),
        )
        assert denial_of(response) == (401, "challenge_required")
        assert moved.challenges == {outcome: 1, "issued": 1}
        assert moved.decisions("check") == {("challenge", attempt.tier, "challenge_required"): 1}

    def test_solution_and_pass_admit(self, guard: GuardOnLoop) -> None:
        address = guard.run(suspicious_source)
        solution = guard.run(lambda g: solution_for(g, address))
        solved, moved_solved = observe(
            guard,
            lambda g: g.authz.Check(check_request({"x-extauthz-pow": solution}, address=address)),
        )
        token = granted_pass(solved)
        shown, moved_shown = observe(
            guard,
            lambda g: g.authz.Check(check_request({"x-extauthz-pass": token}, address=address)),
        )
        assert solved.HasField("ok_response") and shown.HasField("ok_response")
        assert moved_solved.challenges == {"solved": 1}
        assert moved_shown.challenges == {"pass_ok": 1}

    def test_a_pass_does_not_lift_a_request_limit(self, guard: GuardOnLoop) -> None:
        # metered: 2 requests a minute; the challenge and the solution spend them.
        key = {"x-api-key": CAPPED_KEY}
        address = fresh_source()
        guard.run(lambda g: pin(g, "key:capped", "suspicious"))
        token = guard.run(lambda g: pass_for(g, address, key))
        response, moved = observe(
            guard,
            lambda g: g.authz.Check(
                check_request({**key, "x-extauthz-pass": token}, address=address)
            ),
        )
        assert denial_of(response) == (429, "rate_limited")
        assert moved.decisions("check") == {("throttle", "metered", "rate_limited"): 1}
        assert moved.by("extauthz_rate_limited_total", "unit") == {"requests": 1}
        assert moved.challenges == {}  # the pass was not even read, nor a challenge issued

    def test_pass_budget_spent_in_ext_proc(self, guard: GuardOnLoop) -> None:
        address = guard.run(suspicious_source)
        token = guard.run(lambda g: pass_for(g, address))
        messages = body_stream(
            kserve_body(PASS_BUDGET + 1), headers={"x-extauthz-pass": token}, source=address
        )
        result, moved = observe(guard, lambda g: exchange(g.extproc, messages))
        answer = immediate_of(result)
        assert answer is not None
        assert (answer.status.code, answer.details) == (401, "extauthz_challenge")
        assert moved.challenges == {"pass_ok": 1, "pass_budget_exhausted": 1, "issued": 1}
        assert moved.errors == {}


# --- the properties -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expect:
    """What the guard must do with a body: count ``instances``, or refuse with ``status`` and
    ``reason``; all None when the test cannot tell (then: refused and counted, or counted)."""

    instances: int | None = None
    status: int | None = None
    reason: str | None = None


_TIER_MAX = {None: ANONYMOUS_MAX, ALICE_KEY: FREE_MAX, BOB_KEY: 1024}
_TIERS = {None: "anonymous", ALICE_KEY: "free", BOB_KEY: "trusted"}
_UNSUPPORTED = ("br", "zstd", "compress", "gzip, br", "identity, gzip", "x-unknown")


@st.composite
def _payloads(draw: st.DrawFn, tier_max: int) -> tuple[bytes, Expect]:
    if draw(st.booleans()):
        instances = draw(st.integers(1, 12))
        body = kserve_body(instances, width=draw(st.integers(1, 4)))
        if instances > tier_max:
            return body, Expect(status=413, reason="too_many_instances")
        return body, Expect(instances=instances)
    junk = draw(
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from(
                [b"", b"{}", b"[]", b"null", b'{"instances":null}', b'{"instances":[[]]}']
            ),
        )
    )
    return junk, Expect()


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` split at ``points`` (positions, any order)."""
    edges = [0, *sorted({min(p, len(data)) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@st.composite
def _encoded(draw: st.DrawFn, payload: bytes, expect: Expect) -> tuple[str, bytes, Expect]:
    """Encode ``payload`` as some content-encoding, maybe corrupted, with what must follow."""
    kind = draw(st.sampled_from(["identity", "gzip", "zlib", "raw", "unsupported", "bomb"]))
    if kind == "identity":
        return draw(st.sampled_from(["", "identity", "Identity "])), payload, expect
    if kind == "unsupported":
        return (
            draw(st.sampled_from(_UNSUPPORTED)),
            payload,
            Expect(status=415, reason="unsupported_encoding"),
        )
    if kind == "bomb":
        return "gzip", BOMB, Expect(status=413, reason="body_too_large")
    if kind == "gzip":
        points = draw(st.lists(st.integers(0, len(payload)), max_size=3))
        encoding = draw(st.sampled_from(["gzip", "x-gzip", "GZIP"]))
        body = gzip_members(*_cut(payload, points))
    else:
        encoding = "deflate"
        body = zlib.compress(payload) if kind == "zlib" else raw_deflate(payload)
    corruption = draw(st.sampled_from(["none", "none", "truncate", "append"]))
    if corruption == "truncate":
        body = body[: -draw(st.integers(1, 8))]
        expect = Expect(status=400, reason="body_decode_error")
    elif corruption == "append":
        body += draw(st.binary(min_size=1, max_size=16))
        expect = Expect(status=400, reason="body_decode_error")
    return encoding, body, expect


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str | None, str, bytes, Expect]:
    key = draw(st.sampled_from([None, ALICE_KEY, BOB_KEY]))
    payload, expect = draw(_payloads(_TIER_MAX[key]))
    encoding, body, expect = draw(_encoded(payload, expect))
    return key, encoding, body, expect


def _check_metadata(response: external_auth_pb2.CheckResponse) -> dict[str, object]:
    document: dict[str, object] = json_format.MessageToDict(response.dynamic_metadata)
    return document


class TestProperties:
    """Whatever body, encoding or CheckRequest comes, the answer is counted by its reason."""

    @HOSTILE
    @given(request=_requests())
    def test_bodies_are_counted_or_refused_by_reason(
        self, guard: GuardOnLoop, request: tuple[str | None, str, bytes, Expect]
    ) -> None:
        key, encoding, body, expect = request
        headers: dict[str, str | bytes] = {"content-encoding": encoding}
        if key is not None:
            headers["x-api-key"] = key
        result, moved = observe(
            guard, lambda g: exchange(g.extproc, body_stream(body, headers=headers))
        )
        assert result.code == grpc.StatusCode.OK
        assert "internal_error" not in moved.errors
        answer = immediate_of(result)
        if answer is None:
            counted = moved.instances().get(_TIERS[key], 0)
            event("counted")
            assert counted > 0, "a body went on uncounted"
            assert expect.status is None, f"expected {expect.status} {expect.reason}"
            assert expect.instances in (None, counted)
            return
        reason = answer.details.removeprefix("extauthz_")
        event(f"refused: {reason}")
        assert 400 <= answer.status.code < 500
        assert moved.errors == {reason: 1}, "a refusal must move its own reason, once"
        assert moved.instances() == {}
        assert expect.instances is None, f"a readable body was refused: {reason}"
        if expect.status is not None:
            assert (answer.status.code, reason) == (expect.status, expect.reason)

    @HOSTILE
    @given(
        key=st.sampled_from(["", ALICE_KEY, BOB_KEY, MALLORY_KEY, UNKNOWN_KEY, "\u00e9\u00ff"]),
        source=st.sampled_from(["suspicious", "abusive", "blocked", "fresh"]),
        proof=st.sampled_from(
            [
                {},
                {"x-extauthz-pow": "a:1"},
                {"x-extauthz-pass": "p1.k.e.y"},
                {"cookie": "extauthz_pass=;;"},
            ]
        ),
    )
    def test_every_check_verdict_is_counted_by_reason(
        self, guard: GuardOnLoop, key: str, source: str, proof: dict[str, str]
    ) -> None:
        address = fresh_source()
        if source != "fresh":
            level = None if source == "blocked" else source
            guard.run(lambda g: pin(g, f"ip:{address}", level, blocked=source == "blocked"))
        headers = {**proof, **({"x-api-key": key} if key else {})}
        response, moved = observe(
            guard, lambda g: g.authz.Check(check_request(headers, address=address))
        )
        verdict = _check_metadata(response)
        reasons = [r for r in str(verdict["reasons"]).split(",") if r]
        label = metrics.reason_label(reasons)
        assert moved.decisions("check") == {
            (str(verdict["action"]), str(verdict["tier"]), label): 1
        }
        assert moved.errors == {}
        if response.HasField("denied_response"):
            assert denial_of(response)[1] == reasons[0]
        if verdict["action"] == "challenge":
            # A proof sent is read and refused under some outcome; then a new challenge goes out.
            read = int("x-extauthz-pow" in proof or "x-extauthz-pass" in proof)
            assert moved.challenges.get("issued") == 1
            assert sum(moved.challenges.values()) == 1 + read


class TestExposition:
    """The reasons reach ``/metrics``: what a Prometheus scrape sees moves as the registry does."""

    async def _scrape(self, url: str) -> dict[str, float]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
        return {
            sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "extauthz_errors"
            for sample in family.samples
            if sample.name == "extauthz_errors_total"
        }

    def test_http_scrape_moves_per_reason(self, guard: GuardOnLoop) -> None:
        cases = {
            "body_parse_error": body_stream(b"{nope"),
            "unsupported_encoding": body_stream(_VALID, headers={"content-encoding": "zstd"}),
            "body_too_large": body_stream(BOMB, headers={"content-encoding": "gzip"}),
        }

        async def run(g: RunningGuard) -> dict[str, float]:
            url = g.http_url("/metrics")
            moved: dict[str, float] = {}
            for reason, messages in cases.items():
                before = await self._scrape(url)
                await exchange(g.extproc, messages)
                after = await self._scrape(url)
                moved[reason] = after.get(reason, 0.0) - before.get(reason, 0.0)
            return moved

        assert guard.run(run) == dict.fromkeys(cases, 1.0)
