"""Pure proto helpers: read requests, build Check answers, ext_proc mutations and immediate responses."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.challenge.captcha import CaptchaWidget
from extauthz.challenge.page import page_csp, render_challenge_page
from extauthz.challenge.passes import set_cookie_value
from extauthz.core.decision import Decision
from extauthz.core.limiter import merge_rate_limit_fields, rate_limit_fields
from extauthz.core.risk import Action
from extauthz.policy.model import Terms

UPSTREAM_CLIENT = "x-extauthz-client"
UPSTREAM_TIER = "x-extauthz-tier"
UPSTREAM_RISK = "x-extauthz-risk"
# The terms of use on every answer: an RFC 8288 link (relation from RFC 6903) and the version.
TERMS_VERSION_HEADER = "x-extauthz-terms-version"
TERMS_RELATION = "terms-of-service"

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
EXT_PROC_NAMESPACE = "extauthz"
EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
# On model routes Check leaves its RateLimit field values in its metadata under these keys, and
# ext_proc answers the client with one set of fields holding them and the limits it charged.
RATELIMIT_POLICY_KEY = "ratelimit_policy"
RATELIMIT_KEY = "ratelimit"

_JSON = "application/json"
_MESSAGES = {
    "deny_list": "this client is not allowed to use the API",
    "operator_block": "this client has been blocked by an operator",
    "invalid_api_key": "the API key is not valid",
    "store_unavailable": "the service cannot decide right now; try again shortly",
    "terms_not_accepted": "this tier requires acceptance of the current terms of use",
}
_DENY_MESSAGES = {
    Action.THROTTLE: "too many requests; retry after the time given in Retry-After",
    Action.CHALLENGE: "a challenge must be solved before this client may continue",
    Action.BLOCK: "this client may not use the API",
}


# --- reading -----------------------------------------------------------------------------------


def header_map_to_dict(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    """Return an ext_proc HeaderMap as a dict with lower-case names (duplicates comma-joined)."""
    result: dict[str, str] = {}
    for header in header_map.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        key = header.key.lower()
        result[key] = f"{result[key]},{value}" if key in result else value
    return result


def struct_value(struct: struct_pb2.Struct, key: str) -> str:
    """Return the string (or number as text) at ``key`` in ``struct``, or ``""``."""
    if key not in struct.fields:
        return ""
    value = struct.fields[key]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return str(value.string_value)
    if kind == "number_value":
        return repr(value.number_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    return ""


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Convert a Struct to plain Python values."""
    from google.protobuf.json_format import MessageToDict

    converted: dict[str, Any] = MessageToDict(struct)
    return converted


def decision_key(decision: Decision) -> tuple[object, ...]:
    """What the metadata of ``decision`` is made of: equal keys, equal metadata (answer caches
    add what else their answers carry)."""
    identity = decision.identity
    return (
        identity.client_id,
        identity.tier,
        decision.level,
        decision.action,
        decision.reasons,
        decision.enforced,
        decision.pass_id,
        identity.terms_accepted,
    )


def decision_struct(decision: Decision) -> struct_pb2.Struct:
    """The dynamic metadata fields every path emits: client, tier, risk, level, action, reasons.

    Kept per distinct set of values (a client's requests mostly repeat one), as building a
    Struct costs more than copying it; callers copy it into their answer and never change it.
    """
    key = decision_key(decision)
    struct = _STRUCTS.get(key)
    if struct is None:
        if len(_STRUCTS) >= _MAX_STRUCTS:
            _STRUCTS.clear()
        struct = _STRUCTS[key] = _build_decision_struct(decision)
    return struct


_STRUCTS: dict[tuple[object, ...], struct_pb2.Struct] = {}
# Bounded: one entry per active client and verdict; cleared when full.
_MAX_STRUCTS = 8192


def _build_decision_struct(decision: Decision) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(
        {
            "client": decision.identity.client_id,
            "tier": decision.identity.tier,
            "risk": decision.level.label,
            "level": int(decision.level),
            "action": decision.action.value,
            "reasons": ",".join(decision.reasons),
            "enforced": decision.enforced,
            "pass": decision.pass_id,
            # The terms version the client accepted, for the access log and ext_proc.
            "terms": decision.identity.terms_accepted,
        }
    )
    return struct


def rate_limit_from_metadata(struct: struct_pb2.Struct) -> list[tuple[str, str]]:
    """The RateLimit fields Check left in its metadata for ext_proc, or none."""
    policy = struct_value(struct, RATELIMIT_POLICY_KEY)
    value = struct_value(struct, RATELIMIT_KEY)
    if not policy or not value:
        return []
    return [("ratelimit-policy", policy), ("ratelimit", value)]


def upstream_headers(decision: Decision) -> list[tuple[str, str]]:
    return [
        (UPSTREAM_CLIENT, decision.identity.client_id),
        (UPSTREAM_TIER, decision.identity.tier),
        (UPSTREAM_RISK, decision.level.label),
    ]


# --- terms of use -------------------------------------------------------------------------------


def terms_headers(terms: Terms | None) -> list[tuple[str, str]]:
    """The notice every answer through the guard carries: where the terms are, which version."""
    if terms is None:
        return []
    return [
        ("link", f'<{terms.url}>; rel="{TERMS_RELATION}"'),
        (TERMS_VERSION_HEADER, terms.version),
    ]


def terms_document(terms: Terms, *, accepted: str | None = None) -> dict[str, Any]:
    """The terms in a refusal body; ``accepted`` (when not None) adds what the client accepted
    and, during a grace, until when the previous version still admits."""
    document: dict[str, Any] = {"url": terms.url, "version": terms.version}
    if accepted is not None:
        document["accepted"] = accepted or None
        if terms.grace is not None:
            document["previous"] = terms.grace.previous
            document["previous_until"] = terms.grace.until.isoformat()
    return document


# --- refusals ----------------------------------------------------------------------------------


def refusal(
    decision: Decision,
    *,
    request_id: str = "",
    accept: str = "",
    path: str = "/",
    captcha: CaptchaWidget | None = None,
    notice: bool = True,
    carried: Sequence[tuple[str, str]] = (),
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Return (status, headers, body) for a decision that refuses the request: JSON, or for a
    challenge asked by a browser (``accept`` prefers text/html), the page that solves it.
    The body names the terms of use; the headers too unless ``notice`` is False (Envoy adds
    Check's own to the answer). ``carried`` are Check's RateLimit fields (two hops, from its
    metadata): one set of fields holds them and the decision's limits, the latter winning."""
    message = _MESSAGES.get(decision.error) or _DENY_MESSAGES.get(decision.action, "refused")
    document: dict[str, Any] = {
        "error": decision.error,
        "action": decision.action.value,
        "message": message,
    }
    headers = [("content-type", _JSON), ("cache-control", "no-store")]
    terms = decision.terms
    if terms is not None:
        if notice:
            headers.extend(terms_headers(terms))
        if decision.error == "terms_not_accepted":
            accepted = decision.identity.terms_accepted
            document["terms"] = terms_document(terms, accepted=accepted)
            on_record = (
                f"the version on record for this client is {accepted}"
                if accepted
                else "no acceptance is on record for this client"
            )
            document["message"] = (
                f"this tier requires acceptance of the terms of use version {terms.version} "
                f"at {terms.url}; {on_record}: accept them, then retry"
            )
        else:
            document["terms"] = terms_document(terms)
    limit = decision.refused_by
    if limit is not None:
        document["limit"] = {
            "name": limit.name,
            "unit": limit.unit,
            "scope": limit.scope,
            "quota": limit.quota,
            "window_s": limit.window_s,
            "remaining": limit.state.remaining,
            "reset_s": math.ceil(limit.state.reset_s),
        }
        document["message"] = (
            f"the {limit.unit} limit {limit.name!r} ({limit.quota} per {_window(limit.window_s)}) "
            f"is spent; retry after {decision.retry_after_s} s"
        )
    headers.extend(merge_rate_limit_fields(carried, rate_limit_fields(decision.limits)))
    if decision.retry_after_s:
        document["retry_after_s"] = decision.retry_after_s
        headers.append(("retry-after", str(decision.retry_after_s)))
    challenge = decision.challenge
    if challenge is not None:
        document["challenge"] = {
            "scheme": "ExtauthzPoW",
            "token": challenge.token,
            "difficulty": challenge.difficulty,
            "expires_at": int(challenge.expires_at),
            "header": "x-extauthz-pow",
            "how": "find a decimal nonce such that SHA-256 of '<token>:<nonce>' starts with "
            "<difficulty> zero bits, then retry with x-extauthz-pow: <token>:<nonce> "
            "(python -m extauthz solve does it)",
        }
        headers.append(
            (
                "www-authenticate",
                f'ExtauthzPoW realm="extauthz", challenge="{challenge.token}", '
                f'difficulty="{challenge.difficulty}"',
            )
        )
        if _wants_html(accept):
            page = render_challenge_page(
                token=challenge.token,
                difficulty=challenge.difficulty,
                expires_at=challenge.expires_at,
                retry_url=path,
                captcha=captcha,
            )
            headers[0] = ("content-type", "text/html; charset=utf-8")
            headers.append(("content-security-policy", page_csp(captcha)))
            return decision.status, headers, page
    elif decision.status == 401:
        headers.append(("www-authenticate", 'ApiKey realm="extauthz"'))
    if request_id:
        document["request_id"] = request_id
    return decision.status, headers, json.dumps(document, separators=(",", ":")).encode()


def _wants_html(accept: str) -> bool:
    """A browser navigation asks for text/html before (or instead of) JSON."""
    accept = accept.lower()
    if "text/html" not in accept:
        return False
    return "application/json" not in accept or accept.index("text/html") < accept.index(
        "application/json"
    )


def grant_headers(decision: Decision, *, pass_ttl_s: float) -> list[tuple[str, str]]:
    """The pass granted with this answer: a header for API clients, a cookie for browsers."""
    if not decision.granted_pass:
        return []
    return [
        ("x-extauthz-pass", decision.granted_pass),
        ("set-cookie", set_cookie_value(decision.granted_pass, ttl_s=pass_ttl_s)),
    ]


def client_headers(
    decision: Decision, *, pass_ttl_s: float, carried: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """What an allowed request's answer tells the client: its remaining budget in RateLimit
    fields (merged with Check's ``carried`` ones, as in ``refusal``) and a pass granted now."""
    return [
        *merge_rate_limit_fields(carried, rate_limit_fields(decision.limits)),
        *grant_headers(decision, pass_ttl_s=pass_ttl_s),
    ]


def denial(
    decision: Decision,
    headers: Mapping[str, str],
    *,
    path: str,
    request_id: str,
    captcha: CaptchaWidget | None = None,
    notice: bool = True,
    carried: Sequence[tuple[str, str]] = (),
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The (status, headers, body) refusing a request with these ``headers``: the one answer
    Check puts in its denied_response and ext_proc in its ImmediateResponse."""
    return refusal(
        decision,
        request_id=request_id,
        accept=headers.get("accept", ""),
        path=path,
        captcha=captcha,
        notice=notice,
        carried=carried,
    )


def _window(seconds: float) -> str:
    names = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86_400.0: "day", 2_592_000.0: "month"}
    return names.get(seconds, f"{seconds:g} s")


def error_body(
    code: str, message: str, *, request_id: str = "", terms: Terms | None = None
) -> bytes:
    """A JSON error body; with ``terms``, the terms of use in force (as refusals carry)."""
    document: dict[str, Any] = {"error": code, "message": message}
    if terms is not None:
        document["terms"] = terms_document(terms)
    if request_id:
        document["request_id"] = request_id
    return json.dumps(document, separators=(",", ":")).encode()


# --- Check answers ------------------------------------------------------------------------------


def _header_options(
    pairs: Iterable[tuple[str, str]], *, append: bool = False
) -> list[base_pb2.HeaderValueOption]:
    action = (
        base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
        if append
        else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v), append_action=action
        )
        for k, v in pairs
    ]


def check_ok(
    decision: Decision,
    client_headers: Sequence[tuple[str, str]] = (),
    *,
    remove: Sequence[str] = (),
    rate_limit_in_metadata: bool = False,
) -> auth_pb2.CheckResponse:
    """Allow, sending the client's id, tier and risk upstream and the decision as metadata;
    ``client_headers`` go on the answer to the client (a granted pass); ``remove`` names the
    request headers the upstream must not see (the raw API key).

    The client's remaining budget goes on its answer as RateLimit fields, or with
    ``rate_limit_in_metadata`` (a model route, where ext_proc charges the instances next) into
    the metadata, for ext_proc to send in one set of fields with its own: Envoy adds these
    headers after ext_proc's, so two sets would reach the client.
    """
    fields = rate_limit_fields(decision.limits)
    response = auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=auth_pb2.OkHttpResponse(
            headers=_header_options(upstream_headers(decision)),
            headers_to_remove=list(remove),
            # The client's remaining budget and the terms of use, on the answer it gets.
            response_headers_to_add=_header_options(
                [
                    *(() if rate_limit_in_metadata else fields),
                    *client_headers,
                    *terms_headers(decision.terms),
                ],
                append=True,
            ),
        ),
        dynamic_metadata=decision_struct(decision),
    )
    if rate_limit_in_metadata and fields:
        metadata = response.dynamic_metadata.fields
        metadata[RATELIMIT_POLICY_KEY].string_value = fields[0][1]
        metadata[RATELIMIT_KEY].string_value = fields[1][1]
    return response


def check_answer(
    decision: Decision,
    headers: Mapping[str, str],
    *,
    path: str,
    request_id: str,
    pass_ttl_s: float,
    captcha: CaptchaWidget | None = None,
    remove: Sequence[str] = (),
    rate_limit_in_metadata: bool = False,
) -> auth_pb2.CheckResponse:
    """Turn a decision into Check's answer: allow with headers and metadata (dropping the
    request headers named in ``remove``; ``rate_limit_in_metadata`` as in ``check_ok``), or
    the denial, which always carries its RateLimit fields."""
    if decision.allowed:
        return check_ok(
            decision,
            grant_headers(decision, pass_ttl_s=pass_ttl_s),
            remove=remove,
            rate_limit_in_metadata=rate_limit_in_metadata,
        )
    status, answer_headers, body = denial(
        decision, headers, path=path, request_id=request_id, captcha=captcha
    )
    return check_denied(status, answer_headers, body, decision_struct(decision))


def check_denied(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    metadata: struct_pb2.Struct | None = None,
) -> auth_pb2.CheckResponse:
    code = code_pb2.UNAVAILABLE if status >= 500 else code_pb2.PERMISSION_DENIED
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code),
        denied_response=auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_header_options(headers),
            body=body.decode("utf-8"),
        ),
        dynamic_metadata=metadata,
    )


# --- ext_proc answers ----------------------------------------------------------------------------


def header_mutation(
    set_headers: Iterable[tuple[str, str]] = (),
    remove: Iterable[str] = (),
    *,
    append: Iterable[tuple[str, str]] = (),
) -> proc_pb2.HeaderMutation:
    """Set (overwrite) ``set_headers``, add ``append`` beside any existing value, drop ``remove``."""
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    add = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    options = [(k, v, overwrite) for k, v in set_headers] + [(k, v, add) for k, v in append]
    return proc_pb2.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode("utf-8")),
                append_action=action,
            )
            for k, v, action in options
        ],
        remove_headers=list(remove),
    )


def immediate(
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    details: str = "",
    metadata: Mapping[str, struct_pb2.Struct] | None = None,
) -> proc_pb2.ProcessingResponse:
    """An ImmediateResponse: Envoy answers the client with it and ends the stream."""
    response = proc_pb2.ProcessingResponse(
        immediate_response=proc_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=details,
        )
    )
    if metadata:
        _put_metadata(response, metadata)
    return response


def process_refusal(
    decision: Decision,
    headers: Mapping[str, str],
    *,
    path: str,
    request_id: str,
    captcha: CaptchaWidget | None = None,
    details: str = "",
    with_metadata: bool = True,
    notice: bool = True,
    carried: Sequence[tuple[str, str]] = (),
) -> proc_pb2.ProcessingResponse:
    """Refuse from ext_proc with exactly the status, headers and body Check would have sent,
    and (``with_metadata``) the decision under the ``extauthz`` namespace; ``notice`` False
    leaves the terms of use headers to Check's answer (two hops); ``carried`` are Check's
    RateLimit fields, sent in one set with the decision's."""
    status, answer_headers, body = denial(
        decision,
        headers,
        path=path,
        request_id=request_id,
        captcha=captcha,
        notice=notice,
        carried=carried,
    )
    metadata = {EXT_PROC_NAMESPACE: decision_struct(decision)} if with_metadata else None
    return immediate(
        status,
        answer_headers,
        body,
        details=details or f"extauthz_{decision.error}",
        metadata=metadata,
    )


def _put_metadata(
    response: proc_pb2.ProcessingResponse, metadata: Mapping[str, struct_pb2.Struct]
) -> None:
    for namespace, struct in metadata.items():
        response.dynamic_metadata.fields[namespace].struct_value.CopyFrom(struct)


def continue_response(
    phase: str,
    *,
    mutation: proc_pb2.HeaderMutation | None = None,
    body: bytes | None = None,
    metadata: Mapping[str, struct_pb2.Struct] | None = None,
    mode_override: Any = None,
) -> proc_pb2.ProcessingResponse:
    """Answer ``phase`` (``request_headers``, ``response_body``, ...) with CONTINUE and optional changes."""
    response = proc_pb2.ProcessingResponse()
    if phase.endswith("_trailers"):
        getattr(response, phase).SetInParent()
        if mutation is not None:
            getattr(response, phase).header_mutation.CopyFrom(mutation)
    else:
        getattr(response, phase).response.SetInParent()
        common = getattr(response, phase).response
        common.status = proc_pb2.CommonResponse.CONTINUE
        if mutation is not None:
            common.header_mutation.CopyFrom(mutation)
        if body is not None:
            common.body_mutation.body = body
    if metadata:
        _put_metadata(response, metadata)
    if mode_override is not None:
        response.mode_override.CopyFrom(mode_override)
    return response
