"""RateLimit fields through the real Envoy, in both modes: every answer carries exactly one
``RateLimit-Policy`` and one ``RateLimit`` field line, describing every limit that applied (the
request limit Check or request_headers charged, the instance limit request_body charged), with
the values after the charge.

In two hops Envoy adds Check's ``response_headers_to_add`` after ext_proc's own headers, so
Check must leave its fields to ext_proc on the model routes; headers are counted as raw lines
(``getheaders()``), which a dict would fold.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from extauthz.demo.local import LocalStack
from tests.e2e.conftest import require_envoy

KSERVE = "/v1/models/digits:predict"
ROW = [float(i % 17) for i in range(64)]
MODES = ("two-hop", "single-hop")
REQUESTS_PER_HOUR = 100
INSTANCES_PER_HOUR = 4
# Per hour, so that nothing refills between the requests of a test on a slow machine.
POLICY = f"""
version: 1
mode: enforce
tiers:
  anonymous:
    max_instances: 4
    limits:
      - {{name: req, unit: requests, rate: {REQUESTS_PER_HOUR}, per: hour}}
      - {{name: inst, unit: instances, rate: {INSTANCES_PER_HOUR}, per: hour}}
"""
POLICY_FIELD = (
    f'"anonymous:req";q={REQUESTS_PER_HOUR};w=3600;qu="requests", '
    f'"anonymous:inst";q={INSTANCES_PER_HOUR};w=3600;qu="instances"'
)
SECONDS_PER_REQUEST = 3600 / REQUESTS_PER_HOUR
SECONDS_PER_INSTANCE = 3600 / INSTANCES_PER_HOUR
_MEMBER = re.compile(r'"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)')


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    lines: list[tuple[str, str]]  # every header line, as sent

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.lines if key.lower() == name]

    def limits(self) -> dict[str, tuple[int, int]]:
        """The one RateLimit field's members: name -> (remaining, seconds until full)."""
        (value,) = self.all("ratelimit")
        members = {m["name"]: (int(m["r"]), int(m["t"])) for m in _MEMBER.finditer(value)}
        assert len(members) == value.count(";r="), value
        return members


def send(port: int, source: str, method: str, path: str, body: bytes | None = None) -> Answer:
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=30.0, source_address=(source, 0)
    )
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return Answer(response.status, response.getheaders())
    finally:
        connection.close()


def batch(instances: int) -> bytes:
    return json.dumps({"instances": [ROW] * instances}).encode()


@pytest.fixture(scope="module", params=MODES)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, LocalStack]]:
    require_envoy()
    name: str = request.param
    workdir = tmp_path_factory.mktemp(f"ratelimit-{name}")
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(POLICY)
    with LocalStack(policy=policy_path, workdir=workdir, single_hop=name == "single-hop") as local:
        yield name, local


def _one_set(answer: Answer) -> None:
    assert len(answer.all("ratelimit-policy")) == 1, answer.lines
    assert len(answer.all("ratelimit")) == 1, answer.lines
    assert answer.all("ratelimit-policy") == [POLICY_FIELD]


def _full_in(seconds: float, *, units: int, per_unit: float) -> bool:
    """``seconds`` until full is what ``units`` taken just now leave (the clock moves on)."""
    expected = units * per_unit
    return expected - 60 <= seconds <= expected


class TestOneSetPerAnswer:
    """One field line each, on allowed answers and on every kind of refusal, in both modes."""

    def test_sequence(self, stack: tuple[str, LocalStack]) -> None:
        name, local = stack
        source = "127.0.3.1" if name == "two-hop" else "127.0.4.1"
        port = local.ports.listener
        off_route = send(port, source, "GET", "/debug/headers")
        allowed = send(port, source, "POST", KSERVE, batch(3))
        over = send(port, source, "POST", KSERVE, batch(3))  # 1 instance left: ext_proc's 429
        unreadable = send(port, source, "POST", KSERVE, b"{not json")
        last = send(port, source, "POST", KSERVE, batch(1))
        spent = send(port, source, "POST", KSERVE, batch(1))  # refused on the headers

        statuses = [a.status for a in (off_route, allowed, over, unreadable, last, spent)]
        assert statuses == [200, 200, 429, 400, 200, 429]
        for answer in (off_route, allowed, over, unreadable, last, spent):
            _one_set(answer)
        assert len(over.all("retry-after")) == len(spent.all("retry-after")) == 1

        req, inst = "anonymous:req", "anonymous:inst"
        limits = [a.limits() for a in (off_route, allowed, over, unreadable, last, spent)]
        assert all(list(members) == [req, inst] for members in limits)
        # The request limit loses one per request charged; the refusal on the headers (Check's
        # own in two hops) charges none.
        assert [members[req][0] for members in limits] == [99, 98, 97, 96, 95, 95]
        for members, taken in zip(limits, (1, 2, 3, 4, 5, 5), strict=True):
            assert _full_in(members[req][1], units=taken, per_unit=SECONDS_PER_REQUEST)
        # The instance limit after each charge: 3 of 4, then nothing for the refused batch
        # and the unreadable body, then the last one.
        assert [members[inst][0] for members in limits] == [4, 1, 1, 1, 0, 0]
        for members, taken in zip(limits[1:], (3, 3, 3, 4, 4), strict=True):
            assert _full_in(members[inst][1], units=taken, per_unit=SECONDS_PER_INSTANCE)
        assert limits[0][inst] == (4, 0)
