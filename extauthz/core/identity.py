"""Who is calling: API key, JWT claims, or the client address Envoy computed."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from extauthz.policy.loader import Snapshot
from extauthz.policy.model import is_terms_version

IdentityKind = Literal["api_key", "jwt", "anonymous"]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The parts of an HTTP request the decision core reads, free of any Envoy proto.

    ``headers`` have lower-case names. ``source_address`` is the client IP that Envoy
    computed (honouring its own trusted-hops settings), without a port.
    ``jwt_payload`` holds verified claims from Envoy's jwt_authn filter, when present.
    """

    headers: Mapping[str, str]
    source_address: str
    path: str = "/"
    method: str = "GET"
    jwt_payload: Mapping[str, Any] | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Identity:
    """The client a request is charged to. ``client_id`` is opaque and never the raw key."""

    client_id: str
    tier: str
    kind: IdentityKind
    key_sha256: str = ""
    address: str = ""
    error: str = field(default="", compare=False)
    # The terms of use version this request says its client accepted ("" when none).
    terms_accepted: str = field(default="", compare=False)


def identify(request: RequestInfo, snapshot: Snapshot) -> Identity:
    """Resolve the caller; ``error`` is ``invalid_api_key`` for a key the policy does not know."""
    identity = _identify(request, snapshot)
    terms = snapshot.policy.terms
    if terms is None:
        return identity
    accepted = accepted_terms(request, snapshot, identity)
    if not accepted:
        return identity
    return Identity(
        identity.client_id,
        identity.tier,
        identity.kind,
        identity.key_sha256,
        identity.address,
        identity.error,
        accepted,
    )


def accepted_terms(request: RequestInfo, snapshot: Snapshot, identity: Identity) -> str:
    """The terms version the request's client accepted, from the sources the policy names.

    When sources disagree the best one counts: the current version, then the previous one
    of the grace, then whatever was given (so a refusal can say what the client accepted).
    """
    terms = snapshot.policy.terms
    if terms is None:
        return ""
    sources = terms.accepted_from
    found: list[str] = []
    if sources.api_key and identity.kind == "api_key" and not identity.error:
        key = snapshot.keys_by_sha256.get(identity.key_sha256)
        if key is not None and key.terms_version:
            found.append(key.terms_version)
    if sources.jwt_claim and identity.kind == "jwt" and request.jwt_payload:
        claim = request.jwt_payload.get(sources.jwt_claim)
        if isinstance(claim, str | int | float) and not isinstance(claim, bool):
            found.append(str(claim).strip())
    if sources.header:
        found.append(request.headers.get(sources.header, "").strip())
    # Malformed values (a joined duplicate header, junk) count as no acceptance.
    found = [value for value in found if is_terms_version(value)]
    if not found:
        return ""
    if terms.version in found:
        return terms.version
    if terms.grace is not None and terms.grace.previous in found:
        return terms.grace.previous
    return found[0]


def _identify(request: RequestInfo, snapshot: Snapshot) -> Identity:
    policy = snapshot.policy
    address = normalize_address(request.source_address)
    raw_key = request.headers.get(policy.identity.api_key_header, "")
    if raw_key:
        digest = hashlib.sha256(raw_key.encode("utf-8", "surrogateescape")).hexdigest()
        key = snapshot.keys_by_sha256.get(digest)
        if key is not None:
            return Identity(f"key:{key.name}", key.tier, "api_key", digest, address)
        if policy.identity.unknown_key == "deny":
            return Identity(
                f"key:{digest[:16]}",
                policy.identity.anonymous_tier,
                "api_key",
                digest,
                address,
                error="invalid_api_key",
            )
    jwt = policy.identity.jwt
    if jwt is not None and request.jwt_payload:
        subject = request.jwt_payload.get(jwt.subject_claim)
        if isinstance(subject, str) and subject:
            issuer = str(request.jwt_payload.get("iss", ""))
            tier = request.jwt_payload.get(jwt.tier_claim)
            if not isinstance(tier, str) or tier not in policy.tiers:
                tier = jwt.default_tier or policy.identity.anonymous_tier
            opaque = hashlib.sha256(f"{issuer}\0{subject}".encode()).hexdigest()[:16]
            return Identity(f"jwt:{opaque}", tier, "jwt", address=address)
    return Identity(f"ip:{address}", policy.identity.anonymous_tier, "anonymous", address=address)


@functools.lru_cache(maxsize=65_536)
def normalize_address(text: str) -> str:
    """Return the bare IP of ``text`` (``1.2.3.4:5678``, ``[::1]:80``, ``::1``), or ``unknown``."""
    text = text.strip()
    if not text:
        return "unknown"
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return "unknown"
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: one client, one id.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def in_networks(
    address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if not networks or address == "unknown":
        return False
    ip = _parsed(address)
    return any(ip in net for net in networks)


@functools.lru_cache(maxsize=65_536)
def _parsed(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address)
