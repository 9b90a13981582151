"""Envoy's ext_authz Check: translate the CheckRequest, ask the decision core, answer."""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc
import structlog
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc

from extauthz.challenge.captcha import CaptchaWidget
from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import Decision, DecisionCore
from extauthz.core.identity import RequestInfo
from extauthz.policy.loader import Snapshot
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

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CheckResponse:
        started = time.perf_counter()
        try:
            snapshot = self._core.snapshot()
            info = request_from_check(request, snapshot)
            decision = await self._core.decide(info, snapshot=snapshot)
            decision = await self._gate.admit(decision, info.headers, snapshot)
            if decision.allowed and not (decision.limits or decision.pass_id):
                response = self._allowed.get(decision)
            else:
                response = answer(decision, info, snapshot, self._gate.widget(snapshot))
        except Exception:  # never let a message crash the handler; Envoy applies its failure mode
            metrics.ERRORS.labels("internal_error").inc()
            log.exception("check_failed")
            body = envoy.error_body("internal_error", "the guard failed to decide")
            return envoy.check_denied(503, [("content-type", "application/json")], body)
        elapsed = time.perf_counter() - started
        metrics.DECISION_SECONDS.labels("check").observe(elapsed)
        metrics.DECISIONS.labels(
            "check",
            decision.action.value,
            decision.identity.tier,
            metrics.reason_label(decision.reasons),
        ).inc()
        log_decision(
            "check",
            decision,
            request_id=info.request_id,
            path=info.path,
            route=_route_prefix(snapshot, info.path),
            status=200 if decision.allowed else decision.status,
            duration_s=elapsed,
        )
        return response


class AllowCache:
    """Reuse the CheckResponse of an allow verdict: one client's requests mostly get the same one.

    Building the headers and the metadata Struct costs more than deciding; the response is
    never mutated after it is built, so sharing it between calls is safe. Bounded: cleared
    when full, which costs one rebuild per active client.
    """

    def __init__(self, max_entries: int = 8192) -> None:
        self._max = max_entries
        self._responses: dict[Decision, auth_pb2.CheckResponse] = {}

    def get(self, decision: Decision) -> auth_pb2.CheckResponse:
        response = self._responses.get(decision)
        if response is None:
            if len(self._responses) >= self._max:
                self._responses.clear()
            response = self._responses[decision] = envoy.check_ok(decision)
        return response


def answer(
    decision: Decision, info: RequestInfo, snapshot: Snapshot, captcha: CaptchaWidget | None = None
) -> auth_pb2.CheckResponse:
    """Turn a decision into Envoy's CheckResponse (shadow mode always allows)."""
    return envoy.check_answer(
        decision,
        info.headers,
        path=info.path,
        request_id=info.request_id,
        pass_ttl_s=snapshot.policy.challenge.pass_ttl_s,
        captcha=captcha,
    )


def _route_prefix(snapshot: Snapshot, path: str) -> str:
    route = snapshot.policy.route_for(path.split("?", 1)[0])
    return route.prefix if route is not None else ""
