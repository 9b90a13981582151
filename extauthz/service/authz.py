"""Envoy's ext_authz Check: translate the CheckRequest, ask the decision core, answer."""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc
import structlog
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from prometheus_client import Counter, Histogram

from extauthz.challenge.captcha import CaptchaWidget
from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import Decision, DecisionCore
from extauthz.core.identity import RequestInfo
from extauthz.core.limiter import rate_limit_fields
from extauthz.policy.loader import Snapshot
from extauthz.policy.model import Route
from extauthz.service import envoy
from extauthz.telemetry import metrics
from extauthz.telemetry.logs import log_decision

log = structlog.get_logger("extauthz.check")


def request_from_check(request: auth_pb2.CheckRequest, snapshot: Snapshot) -> RequestInfo:
    """Read the parts of a CheckRequest the decision core needs."""
    attributes = request.attributes
    http = attributes.request.http
    # The proto map is read in place (a copy costs more than the two lookups the core makes).
    headers: Mapping[str, str] = (
        http.headers if http.headers else envoy.header_map_to_dict(http.header_map)
    )
    jwt_payload = None
    jwt = snapshot.policy.identity.jwt
    if jwt is not None and jwt.namespace in attributes.metadata_context.filter_metadata:
        namespace = attributes.metadata_context.filter_metadata[jwt.namespace]
        if jwt.payload_key in namespace.fields:
            value = namespace.fields[jwt.payload_key]
            if value.WhichOneof("kind") == "struct_value":
                jwt_payload = envoy.struct_to_python(value.struct_value)
    return RequestInfo(
        headers=headers,
        source_address=attributes.source.address.socket_address.address,
        path=http.path or "/",
        method=http.method or "GET",
        jwt_payload=jwt_payload,
        # Envoy fills `http.id` with its internal stream id; x-request-id is the id the access
        # log, ext_proc and the upstream see, so it comes first.
        request_id=headers.get("x-request-id", "") or http.id,
    )


class AuthorizationService(auth_grpc.AuthorizationServicer):
    """``envoy.service.auth.v3.Authorization``: one unary Check per HTTP request."""

    def __init__(self, core: DecisionCore, gate: ChallengeGate) -> None:
        self._core = core
        self._gate = gate
        self._allowed = AllowCache()
        self._routes = RouteCache()
        # Labelled metric children, bound on first use (the label values are a closed set).
        self._seconds: Histogram | None = None
        self._decided: dict[tuple[str, str, str], Counter] = {}

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckResponse:
        started = time.perf_counter()
        try:
            snapshot = self._core.snapshot()
            info = request_from_check(request, snapshot)
            route = self._routes.route(snapshot, info.path)
            # The raw API key never reaches the model: on the model routes ext_proc still
            # reads it (and drops it), elsewhere Check drops it here. On the model routes
            # ext_proc also sends the RateLimit fields, Check's among them.
            model_route = route is not None
            remove = () if model_route else (snapshot.policy.identity.api_key_header,)
            decision = await self._core.decide(info, snapshot=snapshot)
            decision = await self._gate.admit(decision, info.headers, snapshot)
            if decision.allowed and not decision.granted_pass:
                response = self._allowed.get(
                    decision, remove=remove, rate_limit_in_metadata=model_route
                )
            else:
                response = answer(
                    decision,
                    info,
                    snapshot,
                    self._gate.widget(snapshot),
                    remove=remove,
                    rate_limit_in_metadata=model_route,
                )
        except Exception:  # never let a message crash the handler; Envoy applies its failure mode
            metrics.ERRORS.labels("internal_error").inc()
            log.exception("check_failed")
            body = envoy.error_body("internal_error", "the guard failed to decide")
            return envoy.check_denied(503, [("content-type", "application/json")], body)
        elapsed = time.perf_counter() - started
        if self._seconds is None:
            self._seconds = metrics.DECISION_SECONDS.labels("check")
        self._seconds.observe(elapsed)
        labels = (
            decision.action.value,
            decision.identity.tier,
            metrics.reason_label(decision.reasons),
        )
        decided = self._decided.get(labels)
        if decided is None:
            decided = self._decided[labels] = metrics.DECISIONS.labels("check", *labels)
        decided.inc()
        log_decision(
            "check",
            decision,
            request_id=info.request_id,
            path=info.path,
            route=route.prefix if route is not None else "",
            status=200 if decision.allowed else decision.status,
            duration_s=elapsed,
        )
        return response


class AllowCache:
    """Reuse the CheckResponse of an allow verdict: one client's requests mostly get the same one.

    Building the headers and the metadata Struct costs more than deciding. What changes from
    one request to the next is only the ``RateLimit`` value (units left, seconds until full),
    so the answer is kept per client, verdict, ``RateLimit-Policy``, where the fields go
    (headers, or metadata for ext_proc) and terms of use (a reload may change them), and a
    request with limits gets a copy (one C-level copy) with its own ``RateLimit`` value;
    without limits the kept answer itself is returned, never mutated after it is built.
    Bounded: cleared when full, which costs one rebuild per active client. A pass granted now
    is never cached.
    """

    def __init__(self, max_entries: int = 8192) -> None:
        self._max = max_entries
        self._responses: dict[_AllowKey, auth_pb2.CheckResponse] = {}

    def get(
        self,
        decision: Decision,
        *,
        remove: tuple[str, ...] = (),
        rate_limit_in_metadata: bool = False,
    ) -> auth_pb2.CheckResponse:
        """The allow answer of ``decision`` (which grants no pass), dropping the request
        headers named in ``remove``; ``rate_limit_in_metadata`` as in ``envoy.check_ok``."""
        fields = rate_limit_fields(decision.limits)
        terms = decision.terms
        key = (
            envoy.decision_key(decision),
            fields[0][1] if fields else "",
            remove,
            rate_limit_in_metadata,
            (terms.url, terms.version) if terms is not None else None,
        )
        response = self._responses.get(key)
        if response is None:
            if len(self._responses) >= self._max:
                self._responses.clear()
            response = self._responses[key] = envoy.check_ok(
                decision, remove=remove, rate_limit_in_metadata=rate_limit_in_metadata
            )
            return response
        if not fields:
            return response
        answer = auth_pb2.CheckResponse()
        answer.CopyFrom(response)
        if rate_limit_in_metadata:
            answer.dynamic_metadata.fields[envoy.RATELIMIT_KEY].string_value = fields[1][1]
        else:
            # check_ok puts RateLimit-Policy then RateLimit first in response_headers_to_add.
            answer.ok_response.response_headers_to_add[1].header.value = fields[1][1]
        return answer


# The decision's metadata key, the RateLimit-Policy value, the headers removed, whether the
# RateLimit fields ride in metadata, and the terms in force.
_AllowKey = tuple[tuple[object, ...], str, tuple[str, ...], bool, tuple[str, str] | None]


class RouteCache:
    """The protected route of each request path, per policy snapshot.

    ``route_for`` lowers the path and walks the routes; a service sees few distinct paths.
    Bounded (paths come from clients): cleared when full or when the policy changes.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._snapshot: Snapshot | None = None
        self._routes: dict[str, Route | None] = {}

    def route(self, snapshot: Snapshot, path: str) -> Route | None:
        """The route ``path`` (its query ignored) falls under, or None."""
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._routes = {}
        bare = path.split("?", 1)[0]  # a query that varies per request must not churn it
        routes = self._routes
        if bare in routes:
            return routes[bare]
        if len(routes) >= self._max:
            routes.clear()
        route = routes[bare] = snapshot.policy.route_for(bare)
        return route

    def prefix(self, snapshot: Snapshot, path: str) -> str:
        """The prefix of the route ``path`` falls under, or ``""``."""
        route = self.route(snapshot, path)
        return route.prefix if route is not None else ""


def answer(
    decision: Decision,
    info: RequestInfo,
    snapshot: Snapshot,
    captcha: CaptchaWidget | None = None,
    *,
    remove: tuple[str, ...] = (),
    rate_limit_in_metadata: bool = False,
) -> auth_pb2.CheckResponse:
    """Turn a decision into Envoy's CheckResponse (shadow mode always allows); an allowing
    answer drops the request headers named in ``remove`` and puts its RateLimit fields in the
    metadata when ``rate_limit_in_metadata`` (see ``envoy.check_ok``)."""
    return envoy.check_answer(
        decision,
        info.headers,
        path=info.path,
        request_id=info.request_id,
        pass_ttl_s=snapshot.policy.challenge.pass_ttl_s,
        captcha=captcha,
        remove=remove,
        rate_limit_in_metadata=rate_limit_in_metadata,
    )
