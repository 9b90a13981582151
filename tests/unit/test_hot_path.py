"""The per-request shortcuts of Check: each one answers exactly what the long way answers.

Kept answers (allow responses, metadata Structs, limit charges, route prefixes) and the audit
line's direct writer must never change what Envoy, the client or the log reader sees.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from extauthz.core.decision import REQUEST_PHASE, Decision, DecisionCore
from extauthz.core.identity import Identity
from extauthz.core.limiter import AppliedLimit, LimitState
from extauthz.core.risk import Action, RiskLevel
from extauthz.policy.loader import Snapshot
from extauthz.service import envoy
from extauthz.service.authz import AllowCache, RouteCache
from extauthz.store.memory import MemoryStore
from extauthz.telemetry import logs
from tests.store_contract import FakeClock

PolicyFromText = Callable[[str], Snapshot]

_POLICY = """
    version: 1
    tiers:
      anonymous:
        max_instances: 4
        limits:
          - {name: per-second, unit: requests, rate: 5, per: second}
    routes:
      - {prefix: /v1/models/, dialect: kserve_v1}
"""


def _identity(client: str = "ip:203.0.113.9") -> Identity:
    return Identity(client, "anonymous", "anonymous", address="203.0.113.9")


def _limited(remaining: int, reset_s: float, client: str = "ip:203.0.113.9") -> Decision:
    state = LimitState(True, remaining, reset_s)
    limit = AppliedLimit("per-second", "requests", "client", 5, 1.0, state)
    return Decision(Action.ALLOW, _identity(client), RiskLevel.NORMAL, limits=(limit,))


class TestAllowCache:
    """A kept allow answer equals the one built from scratch, RateLimit value included."""

    def test_each_request_gets_its_own_ratelimit_value(self) -> None:
        """Requests of one client with different budgets left get their own RateLimit field."""
        cache = AllowCache()
        for remaining, reset_s in ((4, 0.2), (3, 0.4), (2, 0.6), (4, 0.2)):
            decision = _limited(remaining, reset_s)
            assert cache.get(decision) == envoy.check_ok(decision)

    def test_model_route_answer_keeps_ratelimit_in_metadata(self) -> None:
        """On a model route the per-request RateLimit value lives in the metadata (for
        ext_proc), is right for each request, and no RateLimit field goes on the answer."""
        cache = AllowCache()
        for remaining, reset_s in ((4, 0.2), (3, 0.4), (2, 0.6), (4, 0.2)):
            decision = _limited(remaining, reset_s)
            kept = cache.get(decision, rate_limit_in_metadata=True)
            assert kept == envoy.check_ok(decision, rate_limit_in_metadata=True)
            metadata = kept.dynamic_metadata.fields
            assert metadata[envoy.RATELIMIT_KEY].string_value == (f'"per-second";r={remaining};t=1')
            assert metadata[envoy.RATELIMIT_POLICY_KEY].string_value == (
                '"per-second";q=5;w=1;qu="requests"'
            )
            added = {o.header.key for o in kept.ok_response.response_headers_to_add}
            assert not added & {"ratelimit", "ratelimit-policy"}

    def test_route_kinds_do_not_share_answers(self) -> None:
        """The same verdict off and on a model route gets its fields in headers, then metadata."""
        cache = AllowCache()
        decision = _limited(4, 0.2)
        off_route = cache.get(decision)
        on_route = cache.get(decision, rate_limit_in_metadata=True)
        assert off_route == envoy.check_ok(decision)
        assert on_route == envoy.check_ok(decision, rate_limit_in_metadata=True)
        assert envoy.RATELIMIT_KEY not in off_route.dynamic_metadata.fields
        assert [o.header.key for o in off_route.ok_response.response_headers_to_add][:2] == [
            "ratelimit-policy",
            "ratelimit",
        ]

    def test_kept_answer_is_never_changed(self) -> None:
        """Answering a later request does not rewrite an answer already handed out."""
        for in_metadata in (False, True):
            cache = AllowCache()
            first = cache.get(_limited(4, 0.2), rate_limit_in_metadata=in_metadata)
            before = first.SerializeToString()
            cache.get(_limited(1, 0.8), rate_limit_in_metadata=in_metadata)
            assert first.SerializeToString() == before

    def test_clients_and_verdicts_do_not_share_answers(self) -> None:
        """Another client, another level or another reason gets its own headers and metadata."""
        cache = AllowCache()
        base = _limited(4, 0.2)
        others = [
            _limited(4, 0.2, client="ip:198.51.100.1"),
            Decision(Action.ALLOW, base.identity, RiskLevel.ELEVATED, limits=base.limits),
            Decision(Action.ALLOW, base.identity, RiskLevel.NORMAL, ("x",), limits=base.limits),
            Decision(Action.ALLOW, base.identity, RiskLevel.NORMAL),
        ]
        cache.get(base)
        for decision in others:
            assert cache.get(decision) == envoy.check_ok(decision)

    def test_bounded(self) -> None:
        """A full cache is emptied, and still answers right."""
        cache = AllowCache(max_entries=2)
        for n in range(5):
            decision = _limited(4, 0.2, client=f"ip:10.0.0.{n}")
            assert cache.get(decision) == envoy.check_ok(decision)
        assert len(cache._responses) <= 2


class TestDecisionStruct:
    """The kept metadata Struct holds the decision's values and is copied, not shared."""

    def test_answer_owns_its_metadata(self) -> None:
        """Changing one answer's metadata leaves the next answer's untouched."""
        decision = Decision(Action.ALLOW, _identity(), RiskLevel.NORMAL, ("a",))
        first = envoy.check_ok(decision)
        first.dynamic_metadata.fields["client"].string_value = "changed"
        again = envoy.check_ok(decision)
        assert again.dynamic_metadata.fields["client"].string_value == "ip:203.0.113.9"
        assert again.dynamic_metadata.fields["reasons"].string_value == "a"


class TestRouteCache:
    """The kept route prefix is route_for's, per policy snapshot."""

    def test_matches_route_for(self, policy_from_text: PolicyFromText) -> None:
        snapshot = policy_from_text(_POLICY)
        routes = RouteCache()
        for path in ("/v1/models/m:predict?x=1", "/V1/MODELS/m", "/healthz", "/v1/models/m"):
            route = snapshot.policy.route_for(path.split("?", 1)[0])
            expected = route.prefix if route is not None else ""
            assert routes.prefix(snapshot, path) == expected

    def test_new_snapshot_forgets_old_routes(self, policy_from_text: PolicyFromText) -> None:
        """After a reload without the route, the path is no longer protected."""
        routes = RouteCache()
        assert routes.prefix(policy_from_text(_POLICY), "/v1/models/m") == "/v1/models/"
        reloaded = policy_from_text(_POLICY.replace("/v1/models/", "/v2/models/"))
        assert routes.prefix(reloaded, "/v1/models/m") == ""


class TestLimitCharges:
    """limits_for answers the same charges from its cache as when first computed."""

    def _core(self, snapshot: Snapshot, clock: FakeClock) -> DecisionCore:
        store = MemoryStore(clock=clock)
        return DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05)

    def test_repeat_calls_and_other_clients(
        self, policy_from_text: PolicyFromText, clock: FakeClock
    ) -> None:
        snapshot = policy_from_text(_POLICY)
        core = self._core(snapshot, clock)
        first = core.limits_for(_identity(), snapshot, REQUEST_PHASE, cost=1)
        again = core.limits_for(_identity(), snapshot, REQUEST_PHASE, cost=1)
        other = core.limits_for(_identity("ip:198.51.100.1"), snapshot, REQUEST_PHASE, cost=1)
        assert again == first and again is not first  # callers get their own list
        assert [charge.tag for _, charge in first] == ["c:ip:203.0.113.9"]
        assert [charge.tag for _, charge in other] == ["c:ip:198.51.100.1"]

    def test_a_reload_changes_the_charges(
        self, policy_from_text: PolicyFromText, clock: FakeClock
    ) -> None:
        snapshot = policy_from_text(_POLICY)
        core = self._core(snapshot, clock)
        before = core.limits_for(_identity(), snapshot, REQUEST_PHASE, cost=1)
        reloaded = policy_from_text(_POLICY.replace("rate: 5", "rate: 50"))
        after = core.limits_for(_identity(), reloaded, REQUEST_PHASE, cost=1)
        assert before[0][1].burst == 5 and after[0][1].burst == 50


Configure = Callable[[str, str], io.StringIO]


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """Return ``configure(level, fmt)``: logging onto a fresh buffer, which it returns.

    sys.stderr is swapped inside the test (pytest swaps its own in for each phase), and
    structlog and the root logger are put back afterwards.
    """
    handlers = logging.root.handlers[:]

    def configure(level: str, fmt: str) -> io.StringIO:
        buffer = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buffer)
        # A fresh proxy: the module's caches the configuration of its first use.
        monkeypatch.setattr(logs, "_audit", structlog.get_logger("extauthz.audit"))
        logs.configure(level, fmt)
        return buffer

    try:
        yield configure
    finally:
        logging.root.handlers[:] = handlers
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        logs._writer = None


def _log(path: str = "/v1/models/m?api_key=secret") -> None:
    decision = Decision(Action.ALLOW, _identity(), RiskLevel.NORMAL, ("a", "b"))
    logs.log_decision(
        "check", decision, request_id="r1", path=path, route="/v1/", status=200, duration_s=1e-4
    )


def _without_timestamp(line: str) -> str:
    return re.sub(r'"timestamp": "[^"]+"', '"timestamp": ""', line)


class TestAuditWriter:
    """The audit line's direct writer writes what the structlog chain would, byte for byte."""

    def test_same_text_as_structlog(self, configure: Configure) -> None:
        stderr = configure("info", "json")
        _log()
        writer, logs._writer = logs._writer, None
        try:
            _log()  # the configured structlog chain
        finally:
            logs._writer = writer
        direct, chained = stderr.getvalue().splitlines()
        assert _without_timestamp(direct) == _without_timestamp(chained)
        line = json.loads(direct)
        assert line["event"] == "decision" and line["level"] == "info"
        assert line["path"] == "/v1/models/m"  # never the query
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])

    def test_bound_secrets_are_redacted(self, configure: Configure) -> None:
        stderr = configure("info", "json")
        structlog.contextvars.bind_contextvars(token="t0ps3cret", peer={"cookie": "c", "x": 1})
        _log()
        line = json.loads(stderr.getvalue())
        assert line["token"] == "[redacted]"
        assert line["peer"] == {"cookie": "[redacted]", "x": 1}
        assert "t0ps3cret" not in stderr.getvalue()

    def test_warning_level_drops_the_line(self, configure: Configure) -> None:
        stderr = configure("warning", "json")
        _log()
        assert stderr.getvalue() == ""

    def test_capture_logs_still_sees_the_event(self, configure: Configure) -> None:
        """Tests that capture structlog events get the decision, not the stream."""
        stderr = configure("info", "json")
        with capture_logs() as events:
            _log()
        assert [e["event"] for e in events] == ["decision"]
        assert stderr.getvalue() == ""

    def test_console_format_keeps_the_chain(self, configure: Configure) -> None:
        stderr = configure("info", "console")
        _log()
        assert "decision" in stderr.getvalue() and not stderr.getvalue().startswith("{")


class _CountingStream(io.StringIO):
    """A stderr stand-in that records each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class TestOneWritePerLine:
    """Each log line is one write (text and newline): workers sharing stderr never interleave."""

    def test_every_event_is_a_single_write(self, monkeypatch: pytest.MonkeyPatch) -> None:
        stream = _CountingStream()
        monkeypatch.setattr(sys, "stderr", stream)
        logs.configure("info", "json")
        try:
            log = structlog.get_logger("extauthz.test")
            log.info("first", worker=0)
            log.info("second", worker=1)
        finally:
            monkeypatch.undo()  # the real stderr back before the loggers are rebuilt on it
            logs.configure("info", "json")
        lines = [w for w in stream.writes if w.strip()]
        assert len(lines) == 2
        assert all(w.endswith("\n") and w.count("\n") == 1 for w in lines)
        assert [json.loads(w)["event"] for w in lines] == ["first", "second"]
