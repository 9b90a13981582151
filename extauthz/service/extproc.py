"""Envoy's ext_proc Process: the per-request stream state machine.

request_headers  -> identity, route, and (without a Check verdict in metadata) the full decision,
                    challenges included (single hop, on every route); a refusal is Check's own
                    answer as an ImmediateResponse; the response phases are dropped when the
                    tier can never need them (mode_override)
request_body     -> parse model inputs by dialect, apply LLM request rules, count instances,
                    charge them to the limits and to the client's pass
response_headers -> RateLimit fields (in two hops Check's, left in its metadata, merged with
                    the limits charged here: one set per answer), a granted pass and (single
                    hop) the terms of use notice for the client; skip the body when nothing
                    needs it
response_body    -> charge tokens, hand the answer to the detectors, apply the output pipeline
                    and the watermarks, record marked answers, re-serialize with a correct
                    content-length

Streams the guard does not understand (unknown paths, out-of-order or duplicated messages) pass
through; on a protected route a body the guard cannot read is refused or charged by policy.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import orjson
import structlog
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from google.protobuf import struct_pb2
from prometheus_client import Histogram

from extauthz.challenge.gate import ChallengeGate
from extauthz.core.decision import Decision, DecisionCore
from extauthz.core.identity import Identity, RequestInfo, identify
from extauthz.core.limiter import ChargeMode, merge_rate_limit_fields, rate_limit_fields
from extauthz.core.risk import Action, RiskLevel
from extauthz.detect.features import numeric_matrix
from extauthz.detect.pipeline import DetectionPipeline
from extauthz.dialects import Dialect, DialectError, detect_dialect, dialect_for_route
from extauthz.dialects.base import ParsedRequest
from extauthz.dialects.oip_v2 import is_binary_response
from extauthz.dialects.openai import token_usage
from extauthz.evidence.ledger import EvidenceRecord, Ledger
from extauthz.keys import KeyRing
from extauthz.policy.loader import Snapshot
from extauthz.policy.model import Route
from extauthz.protect.llm_rules import apply_llm_rules
from extauthz.protect.pipeline import Marks, RequestKey, quantum_of, request_key, rewrite_response
from extauthz.protect.watermark import LabelMarks, watermark_rows
from extauthz.service import envoy
from extauthz.service.authz import RouteCache
from extauthz.telemetry import metrics
from extauthz.telemetry.logs import log_decision

log = structlog.get_logger("extauthz.ext_proc")

_MODE = mode_pb2.ProcessingMode
# Tell Envoy to send nothing more for this request: used on streams that need no processing.
_SKIP_REST = _MODE(
    request_body_mode=_MODE.NONE,
    response_header_mode=_MODE.SKIP,
    response_body_mode=_MODE.NONE,
    request_trailer_mode=_MODE.SKIP,
    response_trailer_mode=_MODE.SKIP,
)
_SKIP_RESPONSE_BODY = _MODE(response_body_mode=_MODE.NONE, response_trailer_mode=_MODE.SKIP)


def _headers_only(*, respond: bool) -> mode_pb2.ProcessingMode:
    """No bodies; the response headers only when ``respond`` (something rides on them)."""
    return _MODE(
        request_header_mode=_MODE.SEND,
        request_body_mode=_MODE.NONE,
        request_trailer_mode=_MODE.SKIP,
        response_header_mode=_MODE.SEND if respond else _MODE.SKIP,
        response_body_mode=_MODE.NONE,
        response_trailer_mode=_MODE.SKIP,
    )


def _request_body_mode(message: proc_pb2.ProcessingRequest) -> int:
    """The request body mode this route was configured with (Envoy sends it on the first
    message), so a mode override keeps it; BUFFERED, as in ``envoy/``, when Envoy did not say."""
    if message.HasField("protocol_config"):
        return int(message.protocol_config.request_body_mode)
    return int(_MODE.BUFFERED)


_INSTANCE_PHASE = {"instances": ChargeMode.CHARGE}
_TOKEN_PHASE = {"tokens": ChargeMode.FORCE}
_JSON_HEADERS = [("content-type", "application/json"), ("cache-control", "no-store")]


class BodyError(Exception):
    """A body the guard cannot read; ``code`` is the metric reason, ``status`` the HTTP answer."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(slots=True)
class _StreamState:
    snapshot: Snapshot | None = None
    route: Route | None = None
    dialect: Dialect | None = None
    identity: Identity | None = None
    level: RiskLevel = RiskLevel.NORMAL
    request_id: str = ""
    seen_request_headers: bool = False
    instances: int = 0
    request_encoding: str = ""
    response_status: int = 0
    response_encoding: str = ""
    rewrite: bool = False
    count_tokens: bool = False
    decision: Decision | None = None
    request_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    request_key: RequestKey | None = None
    binary: bool = False
    parsed_request: ParsedRequest | None = None
    detect: bool = False
    done: bool = False
    # No Check ran before this stream: the answer's client headers (terms notice) come from here.
    single_hop: bool = False
    # Two hops: Check's RateLimit fields, sent here in one set with the limits charged here.
    check_rate_limit: tuple[tuple[str, str], ...] = ()
    # For the audit line: the guard's own time, and the status and code of an immediate answer.
    busy_s: float = 0.0
    answered_status: int = 0
    refusal: str = ""


class ExternalProcessorService(proc_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one bidi stream per HTTP request."""

    def __init__(
        self,
        core: DecisionCore,
        gate: ChallengeGate,
        *,
        max_body_bytes: int,
        noise_key: bytes,
        detection: DetectionPipeline | None = None,
        watermark_keys: KeyRing | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``noise_key`` keys the noise of output policies: the same on every replica."""
        self._core = core
        self._max_body_bytes = max_body_bytes
        self._noise_key = noise_key
        self._gate = gate
        self._detection = detection
        self._watermark_keys = watermark_keys
        self._ledger = ledger
        self._clock = clock
        self._routes = RouteCache()
        # Labelled metric children, bound on first use (the label values are a closed set).
        self._seconds: dict[str, Histogram] = {}

    async def Process(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[proc_pb2.ProcessingResponse]:
        state = _StreamState()
        outcome = "passthrough"
        try:
            async for message in request_iterator:
                response = await self._handle(message, state)
                if response is None:
                    continue
                if response.HasField("immediate_response"):
                    outcome = "immediate"
                    immediate = response.immediate_response
                    state.answered_status = int(immediate.status.code)
                    state.refusal = immediate.details.removeprefix("extauthz_")
                elif state.route is not None or state.decision is not None:
                    outcome = "complete"
                yield response
                if state.done:
                    break
        except Exception:
            outcome = "aborted"
            raise
        finally:
            metrics.STREAMS.labels(outcome).inc()
            if state.decision is not None:
                _log_stream(state)

    async def _handle(
        self, message: proc_pb2.ProcessingRequest, state: _StreamState
    ) -> proc_pb2.ProcessingResponse | None:
        phase = message.WhichOneof("request")
        if phase is None:
            metrics.ERRORS.labels("empty_message").inc()
            return None
        started = time.perf_counter()
        try:
            if phase == "request_headers":
                return await self._request_headers(message, state)
            if phase == "request_body":
                return await self._request_body(message.request_body, state)
            if phase == "response_headers":
                return self._response_headers(message.response_headers, state)
            if phase == "response_body":
                return await self._response_body(message.response_body, state)
            return envoy.continue_response(phase)
        except Exception:
            metrics.ERRORS.labels("internal_error").inc()
            log.exception("ext_proc_failed", phase=phase, request_id=state.request_id)
            if phase.startswith("request") and state.route is not None:
                state.done = True
                terms = state.snapshot.policy.terms if state.snapshot is not None else None
                body = envoy.error_body(
                    "internal_error",
                    "the guard failed to process this request",
                    request_id=state.request_id,
                    terms=terms,
                )
                return envoy.immediate(
                    500,
                    [*_JSON_HEADERS, *_rate_limit(state), *_notice(state)],
                    body,
                    details="extauthz_internal_error",
                )
            return envoy.continue_response(phase)
        finally:
            elapsed = time.perf_counter() - started
            state.busy_s += elapsed
            seconds = self._seconds.get(phase)
            if seconds is None:
                seconds = metrics.DECISION_SECONDS.labels(f"ext_proc_{phase}")
                self._seconds[phase] = seconds
            seconds.observe(elapsed)

    # --- request_headers ------------------------------------------------------------------------

    async def _request_headers(
        self, message: proc_pb2.ProcessingRequest, state: _StreamState
    ) -> proc_pb2.ProcessingResponse:
        if state.seen_request_headers:
            metrics.ERRORS.labels("out_of_order").inc()
            return envoy.continue_response("request_headers")
        state.seen_request_headers = True
        snapshot = self._core.snapshot()
        state.snapshot = snapshot
        headers = envoy.header_map_to_dict(message.request_headers.headers)
        path = headers.get(":path", "/")
        state.request_id = headers.get("x-request-id", "")
        state.request_encoding = headers.get("content-encoding", "")
        route = self._routes.route(snapshot, path)
        check = _check_verdict(message)
        if route is None and check is not None:
            # Two hops, off the model routes: Check has decided, nothing is left to do here.
            state.done = True
            return envoy.continue_response("request_headers", mode_override=_SKIP_REST)
        state.route = route
        state.request_headers = headers
        info = RequestInfo(
            headers=headers,
            source_address=_attribute(message, "source.address"),
            path=path,
            method=headers.get(":method", "GET"),
            jwt_payload=_jwt_payload(message, snapshot),
            request_id=state.request_id,
        )
        if check is None:
            # Single hop: no Check ran before this filter (its metadata is absent), so decide
            # here with the same core and gate; the request is charged here, once.
            state.single_hop = True
            decision = await self._core.decide(info, snapshot=snapshot)
            decision = await self._gate.admit(decision, headers, snapshot)
        else:
            # Two hops: Check charged the request; reuse its verdict, charge nothing here.
            state.check_rate_limit = check.rate_limit
            identity = identify(info, snapshot)
            if identity.client_id != check.identity.client_id:
                metrics.ERRORS.labels("identity_mismatch").inc()
            decision = self._core.verdict(
                check.action, identity, check.level, check.reasons, snapshot
            )
            # Check decided whether to enforce; a policy reload in between must not change that.
            decision = dataclasses.replace(decision, enforced=check.enforced, pass_id=check.pass_id)
        state.identity = decision.identity
        state.level = decision.level
        state.decision = decision
        _count_decision(decision)
        if not decision.allowed:
            state.done = True
            return self._refusal(decision, state, with_metadata=True)
        metadata = {envoy.EXT_PROC_NAMESPACE: envoy.decision_struct(decision)}
        # The raw API key stops here: the model sees x-extauthz-client instead.
        key_header = snapshot.policy.identity.api_key_header
        if route is None:
            # Single hop off the model routes: what Check does there (headers and metadata),
            # then only the response headers, and those only to carry RateLimit fields, a pass
            # or the terms of use.
            respond = bool(decision.limits or decision.granted_pass or decision.terms)
            state.done = not respond
            return envoy.continue_response(
                "request_headers",
                mutation=envoy.header_mutation(
                    envoy.upstream_headers(decision), remove=[key_header]
                ),
                metadata=metadata,
                mode_override=_headers_only(respond=respond),
            )
        state.dialect = dialect_for_route(route) or detect_dialect(path)
        if headers.get("content-type", "").startswith("application/grpc"):
            return await self._grpc_request(state, metadata)
        mutation = envoy.header_mutation(
            envoy.upstream_headers(decision),
            # Ask the model for an identity-encoded answer so the guard can rewrite it.
            remove=["accept-encoding", key_header],
        )
        return envoy.continue_response(
            "request_headers",
            mutation=mutation,
            metadata=metadata,
            mode_override=self._response_phases(message, state),
        )

    def _response_phases(
        self, message: proc_pb2.ProcessingRequest, state: _StreamState
    ) -> mode_pb2.ProcessingMode | None:
        """Skip the response body when this route and tier can never need it: no output step,
        no watermark, no token limit to charge and no detector to feed; skip the response
        headers too when no RateLimit field or pass rides on them. None keeps the configured
        mode (the body is needed, or Envoy decides per answer in response_headers)."""
        assert state.snapshot is not None and state.identity is not None
        assert state.decision is not None
        policy = state.snapshot.policy
        tier = policy.tier(state.identity.tier)
        marked = self._watermark_keys is not None and (
            tier.watermark.rate_for(state.level) > 0 or tier.watermark.soft
        )
        tokens = (
            state.dialect is not None
            and state.dialect.name == "openai"
            and any(limit.unit == "tokens" for limit in tier.limits)
        )
        detect = self._detection is not None and policy.detection.enabled
        if tier.output_for(state.level) or marked or tokens or detect:
            return None
        respond = bool(
            tier.limits
            or state.decision.limits
            or state.check_rate_limit
            or state.decision.granted_pass
            or (state.single_hop and state.decision.terms)
        )
        return _MODE(
            request_header_mode=_MODE.SEND,
            request_body_mode=_request_body_mode(message),
            request_trailer_mode=_MODE.SKIP,
            response_header_mode=_MODE.SEND if respond else _MODE.SKIP,
            response_body_mode=_MODE.NONE,
            response_trailer_mode=_MODE.SKIP,
        )

    async def _grpc_request(
        self, state: _StreamState, metadata: dict[str, struct_pb2.Struct]
    ) -> proc_pb2.ProcessingResponse:
        """Open Inference over gRPC: refused, or passed unrewritten and charged the tier's
        maximum batch (the guard does not read protobuf tensors, and never passes uncounted);
        the answer's headers are then seen only to add the RateLimit fields."""
        assert state.route is not None and state.identity is not None and state.snapshot is not None
        state.done = True
        if state.route.binary == "refuse":
            metrics.ERRORS.labels("grpc_refused").inc()
            # gRPC clients read grpc-status, not the HTTP status.
            grpc_headers = [
                ("content-type", "application/grpc"),
                ("grpc-status", "3"),
                ("grpc-message", "gRPC inference is not accepted on this route"),
                *_rate_limit(state),
                *_notice(state),
            ]
            return envoy.immediate(200, grpc_headers, b"", details="extauthz_grpc_refused")
        tier = state.snapshot.policy.tier(state.identity.tier)
        instances = tier.max_instances
        metrics.INSTANCES.labels(state.identity.tier).inc(instances)
        limits = self._core.limits_for(
            state.identity, state.snapshot, _INSTANCE_PHASE, cost=instances
        )
        charged = await self._core.charge(
            state.identity, requests=0, instances=instances, limits=limits, snapshot=state.snapshot
        )
        if charged.record is not None and state.decision is not None and limits:
            decision = self._core.apply_limits(
                state.decision, limits, charged.record, state.snapshot
            )
            state.decision = _merge_limits(state.decision, decision)
            if not decision.allowed:
                grpc_headers = [
                    ("content-type", "application/grpc"),
                    ("grpc-status", "8"),
                    ("grpc-message", "rate limited"),
                    ("retry-after", str(decision.retry_after_s)),
                    *_rate_limit(state),
                    *_notice(state),
                ]
                return envoy.immediate(200, grpc_headers, b"", details="extauthz_rate_limited")
        mutation = envoy.header_mutation(
            envoy.upstream_headers(state.decision) if state.decision else (),
            remove=[state.snapshot.policy.identity.api_key_header],
        )
        granted = state.decision is not None and bool(state.decision.granted_pass)
        respond = bool(_rate_limit(state) or _notice(state) or granted)
        state.done = not respond
        return envoy.continue_response(
            "request_headers",
            mutation=mutation,
            metadata=metadata,
            mode_override=_headers_only(respond=True) if respond else _SKIP_REST,
        )

    # --- request_body ---------------------------------------------------------------------------

    async def _request_body(
        self, body: proc_pb2.HttpBody, state: _StreamState
    ) -> proc_pb2.ProcessingResponse:
        if (
            state.route is None
            or state.identity is None
            or state.snapshot is None
            or state.instances
        ):
            if state.instances:
                metrics.ERRORS.labels("out_of_order").inc()
            return envoy.continue_response("request_body")
        policy = state.snapshot.policy
        tier = policy.tier(state.identity.tier)
        dialect = state.dialect
        try:
            raw = self._decode(body.body, encoding=state.request_encoding)
            if dialect is None:
                raise BodyError(
                    "unsupported_media", "this route's model API could not be recognised", 415
                )
            parsed = dialect.parse_request(
                raw, max_instances=tier.max_instances, headers=state.request_headers
            )
            instances = parsed.instances
            if parsed.binary and state.route.binary == "refuse":
                raise BodyError(
                    "binary_refused", "binary tensor data is not accepted on this route", 415
                )
        except (BodyError, DialectError) as exc:
            metrics.ERRORS.labels(exc.code).inc()
            if isinstance(exc, DialectError) and exc.code == "too_many_instances":
                return self._refuse_body(state, exc.code, exc.message, exc.status)
            if policy.fail_modes.body == "deny":
                return self._refuse_body(state, exc.code, exc.message, exc.status)
            instances = tier.max_instances
            parsed = None
        rewritten_body: bytes | None = None
        if parsed is not None and dialect is not None:
            state.binary = parsed.binary
            watermarked = (
                tier.watermark.label_rate
                or tier.watermark.label_rate_by_level
                or tier.watermark.soft
            )
            if parsed.inputs and (self._detection is not None or watermarked):
                state.parsed_request = parsed
            steps = tier.output_for(state.level)
            if steps:
                state.request_key = request_key(parsed, quantum=quantum_of(steps))
            if dialect.name == "openai":
                outcome = apply_llm_rules(
                    parsed.doc, tier.llm, path=state.request_headers.get(":path", "")
                )
                for change in outcome.changes:
                    metrics.REQUEST_RULES.labels(change).inc()
                if outcome.refusal is not None:
                    status, refusal_body = outcome.refusal
                    state.done = True
                    return envoy.immediate(
                        status,
                        [*_JSON_HEADERS, *_rate_limit(state), *_notice(state)],
                        refusal_body,
                        details="extauthz_request_rule",
                    )
                if outcome.body is not None:
                    # A capped `n` changes what the request costs: count the body that goes on.
                    rewritten_body = outcome.body
                    instances = dialect.parse_request(
                        rewritten_body, max_instances=tier.max_instances
                    ).instances
        state.instances = instances
        if state.decision is not None and state.decision.pass_id:
            if not await self._gate.charge_pass(state.decision, state.snapshot, instances):
                # The pass cannot cover this batch: a new challenge, as hard as the batch is big.
                state.done = True
                challenge = self._gate.challenge(
                    state.decision, state.snapshot, instances=instances
                )
                return self._refusal(challenge, state, details="extauthz_challenge")
        metrics.INSTANCES.labels(state.identity.tier).inc(instances)
        limits = self._core.limits_for(
            state.identity, state.snapshot, _INSTANCE_PHASE, cost=instances
        )
        charged = await self._core.charge(
            state.identity, requests=0, instances=instances, limits=limits, snapshot=state.snapshot
        )
        if charged.record is None:
            if policy.fail_modes.store == "fail_closed":
                return self._refuse_body(
                    state, "store_unavailable", "the service cannot decide right now", 503
                )
            return self._continue_request_body(rewritten_body)
        if state.decision is not None and limits:
            decision = self._core.apply_limits(
                state.decision, limits, charged.record, state.snapshot
            )
            decision = _merge_limits(state.decision, decision)
            state.decision = decision
            if not decision.allowed:
                state.done = True
                _count_decision(decision)
                return self._refusal(decision, state, details="extauthz_rate_limited")
        return self._continue_request_body(rewritten_body)

    def _continue_request_body(self, body: bytes | None) -> proc_pb2.ProcessingResponse:
        """Let the request go on, with ``body`` replacing it (and a matching content-length)."""
        if body is None:
            return envoy.continue_response("request_body")
        # BUFFERED: content-length was sent with the headers and must follow the new body.
        mutation = envoy.header_mutation(
            [("content-length", str(len(body)))], remove=["content-encoding"]
        )
        return envoy.continue_response("request_body", mutation=mutation, body=body)

    def _refusal(
        self,
        decision: Decision,
        state: _StreamState,
        *,
        details: str = "",
        with_metadata: bool = False,
    ) -> proc_pb2.ProcessingResponse:
        """Refuse with Check's own answer; a refusal on request_headers also sets the metadata
        (a later one leaves the allowing verdict there, as Check's would be)."""
        headers = state.request_headers
        return envoy.process_refusal(
            decision,
            headers,
            path=headers.get(":path", "/"),
            request_id=state.request_id,
            captcha=self._gate.widget(state.snapshot) if state.snapshot is not None else None,
            details=details,
            with_metadata=with_metadata,
            notice=state.single_hop,
            carried=state.check_rate_limit,
        )

    def _refuse_body(
        self, state: _StreamState, code: str, message: str, status: int
    ) -> proc_pb2.ProcessingResponse:
        state.done = True
        log.info(
            "request_body_refused",
            reason=code,
            status=status,
            request_id=state.request_id,
            client=state.identity.client_id if state.identity else "",
        )
        terms = state.snapshot.policy.terms if state.snapshot is not None else None
        body = envoy.error_body(code, message, request_id=state.request_id, terms=terms)
        headers = [*_JSON_HEADERS, *_rate_limit(state), *_notice(state)]
        return envoy.immediate(status, headers, body, details=f"extauthz_{code}")

    def _decode(self, data: bytes, *, encoding: str) -> bytes:
        if len(data) > self._max_body_bytes:
            raise BodyError(
                "body_too_large", f"bodies are limited to {self._max_body_bytes} bytes", 413
            )
        return decode_body(data, encoding, limit=self._max_body_bytes)

    # --- response -------------------------------------------------------------------------------

    def _response_headers(
        self, message: proc_pb2.HttpHeaders, state: _StreamState
    ) -> proc_pb2.ProcessingResponse:
        if state.identity is None or state.snapshot is None:
            return envoy.continue_response("response_headers", mode_override=_SKIP_RESPONSE_BODY)
        # The client's remaining budget (every limit applied, by Check or here) and a granted
        # pass travel on the answer, and in single hop the terms of use (in two hops Check's
        # answer adds them).
        client_headers: list[tuple[str, str]] = []
        if state.decision is not None:
            client_headers = envoy.client_headers(
                state.decision,
                pass_ttl_s=state.snapshot.policy.challenge.pass_ttl_s,
                carried=state.check_rate_limit,
            )
            client_headers.extend(_notice(state))
        mutation = envoy.header_mutation(append=client_headers) if client_headers else None
        if state.route is None:  # single hop off the model routes: headers only
            return envoy.continue_response(
                "response_headers", mutation=mutation, mode_override=_SKIP_RESPONSE_BODY
            )
        headers = envoy.header_map_to_dict(message.headers)
        status = headers.get(":status", "0")
        state.response_status = int(status) if status.isdigit() else 0
        state.response_encoding = headers.get("content-encoding", "").strip().lower()
        tier = state.snapshot.policy.tier(state.identity.tier)
        readable = (
            200 <= state.response_status < 300
            and "json" in headers.get("content-type", "").lower()
            and not message.end_of_stream
        )
        marked = self._watermark_keys is not None and (
            tier.watermark.rate_for(state.level) > 0 or tier.watermark.soft
        )
        state.rewrite = (
            readable
            and (bool(tier.output_for(state.level)) or marked)
            and not state.binary
            and not is_binary_response(headers)
        )
        state.count_tokens = (
            readable
            and state.dialect is not None
            and state.dialect.name == "openai"
            and any(limit.unit == "tokens" for limit in tier.limits)
        )
        state.detect = (
            readable
            and state.parsed_request is not None
            and state.snapshot.policy.detection.enabled
            and not is_binary_response(headers)
        )
        if not (state.rewrite or state.count_tokens or state.detect):
            return envoy.continue_response(
                "response_headers", mutation=mutation, mode_override=_SKIP_RESPONSE_BODY
            )
        return envoy.continue_response("response_headers", mutation=mutation)

    def _marks(self, state: _StreamState) -> Marks | None:
        """The watermarks this answer gets, from the tier and the client's level."""
        if self._watermark_keys is None or state.snapshot is None or state.identity is None:
            return None
        settings = state.snapshot.policy.tier(state.identity.tier).watermark
        rate = settings.rate_for(state.level)
        if not rate and not settings.soft:
            return None
        request = state.parsed_request
        raw = (
            numeric_matrix(request.inputs, request.instances)
            if request and request.inputs
            else None
        )
        return Marks(
            keys=self._watermark_keys,
            label_rate=rate,
            soft_epsilon=settings.soft_epsilon if settings.soft else 0.0,
            raw=None if raw is None else raw.astype(np.float64),
            canonical=watermark_rows(raw) if raw is not None else None,
        )

    async def _record_evidence(self, state: _StreamState, marks: Marks, labels: LabelMarks) -> None:
        """Put every label-marked answer in the ledger: who, which key, what input, what label."""
        raw = marks.raw
        if self._ledger is None or state.identity is None or raw is None:
            return
        now = self._clock()
        records = [
            EvidenceRecord(
                state.identity.client_id,
                labels.kid,
                now,
                orjson.dumps(raw[i].tolist()),
                int(labels.targets[i]),
                terms_version=state.identity.terms_accepted,
            )
            for i in np.flatnonzero(labels.marked)
        ]
        if not records:
            return
        try:
            await self._ledger.append(records)
            metrics.EVIDENCE.inc(len(records))
        except Exception as exc:  # evidence must never cost the client its answer
            metrics.ERRORS.labels("ledger_unavailable").inc()
            log.warning("ledger_append_failed", error=str(exc)[:200])

    async def _charge_tokens(self, doc: object, state: _StreamState) -> None:
        """Charge the answer's token usage after it is served; the next request sees the debt."""
        assert state.identity is not None and state.snapshot is not None
        tokens = token_usage(doc)
        if tokens is None:
            metrics.ERRORS.labels("usage_missing").inc()
            return
        limits = self._core.limits_for(state.identity, state.snapshot, _TOKEN_PHASE, cost=tokens)
        if tokens and limits:
            await self._core.charge(
                state.identity, requests=0, instances=0, limits=limits, snapshot=state.snapshot
            )
            metrics.TOKENS.labels(state.identity.tier).inc(tokens)

    async def _response_body(
        self, body: proc_pb2.HttpBody, state: _StreamState
    ) -> proc_pb2.ProcessingResponse:
        if (
            not (state.rewrite or state.count_tokens or state.detect)
            or state.dialect is None
            or state.identity is None
            or state.snapshot is None
        ):
            return envoy.continue_response("response_body")
        rewrite, count_tokens, detect = state.rewrite, state.count_tokens, state.detect
        # One buffered body per stream; a duplicate passes through.
        state.rewrite = state.count_tokens = state.detect = False
        tier_steps = state.snapshot.policy.tier(state.identity.tier).output_for(state.level)
        try:
            raw = decode_body(body.body, state.response_encoding, limit=self._max_body_bytes)
            parsed = state.dialect.parse_response(raw)
        except (BodyError, DialectError) as exc:
            metrics.ERRORS.labels(f"response_{exc.code}").inc()
            return envoy.continue_response("response_body")
        if count_tokens:
            await self._charge_tokens(parsed.doc, state)
        if detect and self._detection is not None and state.parsed_request is not None:
            # On the model's own answer, before any rewrite: true classes and margins.
            self._detection.submit(state.identity, state.parsed_request, parsed, state.snapshot)
        if not rewrite:
            return envoy.continue_response("response_body")
        marks = self._marks(state)
        try:
            rewrite_result = rewrite_response(
                state.dialect,
                parsed,
                tier_steps,
                key=self._noise_key,
                client_id=state.identity.client_id,
                request=state.request_key,
                marks=marks,
            )
        except (TypeError, ValueError) as exc:  # e.g. an answer nested deeper than orjson writes
            metrics.ERRORS.labels("response_rewrite_failed").inc()
            log.warning(
                "response_rewrite_failed", error=str(exc)[:200], request_id=state.request_id
            )
            return envoy.continue_response("response_body")
        if rewrite_result is None:
            return envoy.continue_response("response_body")
        if rewrite_result.label_marks is not None and marks is not None:
            await self._record_evidence(state, marks, rewrite_result.label_marks)
        new_body = rewrite_result.body
        policy_label = "+".join(step.policy for step in tier_steps)
        metrics.BODY_REWRITES.labels(state.dialect.name, policy_label).inc()
        if rewrite_result.l1.size:
            metrics.DISTORTION_L1.observe(float(rewrite_result.l1.mean()))
            metrics.TOP1_CHANGED.inc(int(rewrite_result.top1_changed.sum()))
        # BUFFERED with response headers sent: Envoy keeps content-length, so it must be set here.
        mutation = envoy.header_mutation(
            [("content-length", str(len(new_body)))],
            remove=["content-encoding"] if state.response_encoding not in ("", "identity") else [],
        )
        return envoy.continue_response("response_body", mutation=mutation, body=new_body)


def _count_decision(decision: Decision) -> None:
    """One ext_proc verdict in ``extauthz_decisions_total``."""
    metrics.DECISIONS.labels(
        "ext_proc",
        decision.action.value,
        decision.identity.tier,
        metrics.reason_label(decision.reasons),
    ).inc()


def _notice(state: _StreamState) -> list[tuple[str, str]]:
    """The terms of use headers for an answer made here: in single hop only, since in two
    hops Envoy adds Check's (``response_headers_to_add``) to every answer, ext_proc's
    immediate ones included."""
    if not state.single_hop or state.snapshot is None:
        return []
    return envoy.terms_headers(state.snapshot.policy.terms)


def _rate_limit(state: _StreamState) -> list[tuple[str, str]]:
    """The RateLimit fields of an answer made here: the stream's limits merged with Check's
    (two hops), in one set."""
    charged = rate_limit_fields(state.decision.limits) if state.decision is not None else []
    return merge_rate_limit_fields(state.check_rate_limit, charged)


def _merge_limits(before: Decision, after: Decision) -> Decision:
    """Keep the limits ``before`` answered for (the request phase, in single hop) beside the
    ones just applied, each name once, the newest answer winning."""
    names = {limit.name for limit in after.limits}
    kept = tuple(limit for limit in before.limits if limit.name not in names)
    if not kept:
        return after
    return dataclasses.replace(after, limits=(*kept, *after.limits))


# What a refusal made after the verdict (by its immediate answer's code) means as an action.
_LATE_REFUSALS = {"rate_limited": Action.THROTTLE.value, "challenge": Action.CHALLENGE.value}


def _log_stream(state: _StreamState) -> None:
    """Write the stream's audit line: its verdict, or the later refusal that overrode it."""
    decision = state.decision
    assert decision is not None
    action: str | None = None
    reasons: tuple[str, ...] | None = None
    if state.refusal and decision.allowed:
        # Refused after an allowing verdict: a body the guard cannot read, an LLM request
        # rule, a pass without budget left, an instance limit on gRPC, an internal error.
        action = _LATE_REFUSALS.get(state.refusal, Action.BLOCK.value)
        reasons = (state.refusal, *decision.reasons)
    log_decision(
        "process",
        decision,
        request_id=state.request_id,
        path=state.request_headers.get(":path", ""),
        route=state.route.prefix if state.route is not None else "",
        status=state.answered_status or state.response_status,
        duration_s=state.busy_s,
        instances=state.instances,
        action=action,
        reasons=reasons,
    )


# A gzip body may hold several members (RFC 1952), which decoders read as one text; a body
# needing more than this many is refused rather than decoded member by member.
_MAX_GZIP_MEMBERS = 16


def decode_body(data: bytes, encoding: str, *, limit: int) -> bytes:
    """Undo ``content-encoding`` (gzip, deflate), refusing unknown ones, bombs over ``limit``
    and bytes after the compressed stream: every gzip member is decoded and counted, since the
    model server may read them all, and anything else left over is refused, never skipped."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise BodyError(
            "unsupported_encoding", f"content-encoding {encoding!r} is not supported", 415
        )
    is_gzip = "gzip" in encoding
    parts: list[bytes] = []
    size = 0
    rest = data
    for _ in range(_MAX_GZIP_MEMBERS if is_gzip else 1):
        out, rest = _inflate(rest, encoding, room=limit - size, limit=limit)
        parts.append(out)
        size += len(out)
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
    what = f"more than {_MAX_GZIP_MEMBERS} gzip members" if is_gzip else "data after the stream"
    raise BodyError("body_decode_error", f"cannot decode {encoding} body: {what}", 400)


def _inflate(data: bytes, encoding: str, *, room: int, limit: int) -> tuple[bytes, bytes]:
    """Decode one gzip member or deflate stream of at most ``room`` bytes from the start of
    ``data`` (``limit`` is the whole body's); return it and the bytes after it."""
    wbits = 31 if "gzip" in encoding else 15
    try:
        decoder = zlib.decompressobj(wbits)
        out = decoder.decompress(data, room + 1)
    except zlib.error:
        if wbits == 15:  # raw deflate without the zlib wrapper
            try:
                decoder = zlib.decompressobj(-15)
                out = decoder.decompress(data, room + 1)
            except zlib.error as exc:
                raise BodyError(
                    "body_decode_error", f"cannot decode {encoding} body: {exc}", 400
                ) from exc
        else:
            raise BodyError("body_decode_error", f"cannot decode {encoding} body", 400) from None
    if len(out) > room or decoder.unconsumed_tail:
        raise BodyError("body_too_large", f"decoded bodies are limited to {limit} bytes", 413)
    if not decoder.eof:
        raise BodyError("body_decode_error", f"truncated {encoding} body", 400)
    return out, decoder.unused_data


def _attribute(message: proc_pb2.ProcessingRequest, name: str) -> str:
    attributes = message.attributes.get(envoy.EXT_PROC_ATTRIBUTES)
    if attributes is None:
        return ""
    return envoy.struct_value(attributes, name)


def _jwt_payload(
    message: proc_pb2.ProcessingRequest, snapshot: Snapshot
) -> dict[str, object] | None:
    jwt = snapshot.policy.identity.jwt
    if jwt is None or jwt.namespace not in message.metadata_context.filter_metadata:
        return None
    namespace = message.metadata_context.filter_metadata[jwt.namespace]
    value = namespace.fields.get(jwt.payload_key)
    if value is None or value.WhichOneof("kind") != "struct_value":
        return None
    return envoy.struct_to_python(value.struct_value)


@dataclass(frozen=True, slots=True)
class _CheckVerdict:
    identity: Identity
    action: Action
    level: RiskLevel
    reasons: tuple[str, ...]
    enforced: bool
    pass_id: str = ""
    rate_limit: tuple[tuple[str, str], ...] = ()


def _check_verdict(message: proc_pb2.ProcessingRequest) -> _CheckVerdict | None:
    """Read the verdict Check left in ``envoy.filters.http.ext_authz`` metadata (forwarded by Envoy)."""
    metadata = message.metadata_context.filter_metadata
    if envoy.EXT_AUTHZ_NAMESPACE not in metadata:
        return None
    struct: struct_pb2.Struct = metadata[envoy.EXT_AUTHZ_NAMESPACE]
    client = envoy.struct_value(struct, "client")
    if not client:
        return None
    try:
        action = Action.parse(envoy.struct_value(struct, "action") or "allow")
        level = RiskLevel.parse(envoy.struct_value(struct, "risk") or "normal")
    except ValueError:
        return None
    reasons = tuple(r for r in envoy.struct_value(struct, "reasons").split(",") if r)
    identity = Identity(client, envoy.struct_value(struct, "tier"), "anonymous")
    enforced = envoy.struct_value(struct, "enforced") != "false"
    pass_id = envoy.struct_value(struct, "pass")
    rate_limit = tuple(envoy.rate_limit_from_metadata(struct))
    return _CheckVerdict(identity, action, level, reasons, enforced, pass_id, rate_limit)
