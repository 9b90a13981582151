"""Signed passes: what a client gets for a solved challenge, and shows instead of solving again.

A pass is a token ``p1.<kid>.<claims>.<mac>`` whose claims carry an id (``i``), the client binding
(``b``), optionally the client address (``a``, empty when not bound to one), the expiry (``e``,
epoch seconds) and an instance budget (``n``). The guard returns it in the ``x-extauthz-pass``
response header and, for browsers, in the ``extauthz_pass`` cookie; clients send either back.

A pass is stateless like a challenge. **Budget accounting is the caller's job**: the guard charges
the instances of each request to the pass id in its store and asks for a new challenge once the
budget is spent, so a pass cannot be replayed forever within its lifetime.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from extauthz.keys import KeyRing, b64url, seal, unseal

VERSION = "p1"
RANDOM_BYTES = 16
HEADER = "x-extauthz-pass"
COOKIE = "extauthz_pass"


@dataclass(frozen=True, slots=True)
class Pass:
    """The claims of a pass whose signature verified."""

    id: str
    binding: str
    address: str
    expires_at: float
    budget: int


@dataclass(frozen=True, slots=True)
class PassCheck:
    """The outcome of :func:`read_pass`.

    ``reason`` is one of ``ok``, ``malformed``, ``bad_signature``, ``expired``, ``wrong_client``,
    ``wrong_address``; ``pass_`` is set only when ``ok``.
    """

    ok: bool
    reason: str
    pass_: Pass | None = None


_MALFORMED = PassCheck(False, "malformed")
_BAD_SIGNATURE = PassCheck(False, "bad_signature")
_EXPIRED = PassCheck(False, "expired")
_WRONG_CLIENT = PassCheck(False, "wrong_client")
_WRONG_ADDRESS = PassCheck(False, "wrong_address")


def issue_pass(
    keys: KeyRing,
    *,
    binding: str,
    address: str = "",
    ttl_s: float,
    budget: int,
    now: float,
    rng_bytes: bytes,
) -> str:
    """Return a signed pass for the client ``binding`` (and ``address`` if not empty).

    ``rng_bytes`` must be 16 fresh random bytes; they become the pass id that budgets are charged
    to. ``budget`` is the number of instances the pass covers.
    """
    if len(rng_bytes) != RANDOM_BYTES:
        raise ValueError(f"rng_bytes must be {RANDOM_BYTES} bytes, got {len(rng_bytes)}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    claims = {
        "i": b64url(rng_bytes),
        "b": binding,
        "a": address,
        "e": int(now + ttl_s),
        "n": budget,
    }
    return seal(keys, VERSION, claims)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def read_pass(keys: KeyRing, token: str, *, binding: str, address: str, now: float) -> PassCheck:
    """Check a pass for the client ``binding`` at ``address`` at time ``now``; never raise.

    Check, in order: the shape, the MAC (by key id, so passes signed before a rotation verify
    while their key is in the ring), the expiry, the binding, the address (skipped when the pass
    names none).
    """
    sealed = unseal(keys, VERSION, token)
    if not sealed.ok:
        return _BAD_SIGNATURE if sealed.reason == "bad_signature" else _MALFORMED
    claims = sealed.claims
    pass_id, bound, bound_address, expires, budget = (claims.get(k) for k in "ibaen")
    if (
        not isinstance(pass_id, str)
        or not isinstance(bound, str)
        or not isinstance(bound_address, str)
        or isinstance(expires, bool)
        or not isinstance(expires, int)
        or isinstance(budget, bool)
        or not isinstance(budget, int)
    ):
        return _MALFORMED
    if now >= expires:
        return _EXPIRED
    if not _same(bound, binding):
        return _WRONG_CLIENT
    if bound_address and not _same(bound_address, address):
        return _WRONG_ADDRESS
    return PassCheck(True, "ok", Pass(pass_id, bound, bound_address, float(expires), budget))


def pass_from_headers(headers: Mapping[str, str]) -> str:
    """Return the pass a request carries: ``x-extauthz-pass``, else the ``extauthz_pass`` cookie.

    Header names are looked up in lower case, as Envoy sends them. A cookie header that does not
    parse yields ``""``; a malformed cookie before ours does not hide it.
    """
    value = headers.get(HEADER, "")
    if value:
        return value.strip()
    cookie_header = headers.get("cookie", "")
    if COOKIE not in cookie_header:
        return ""
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(cookie_header)
    except CookieError:
        pass
    morsel = cookies.get(COOKIE)
    if morsel is not None:
        return morsel.value
    # SimpleCookie stops at the first pair it cannot read; try each pair on its own.
    for pair in cookie_header.split(";"):
        if COOKIE not in pair:
            continue
        single: SimpleCookie = SimpleCookie()
        try:
            single.load(pair.strip())
        except CookieError:
            continue
        morsel = single.get(COOKIE)
        if morsel is not None:
            return morsel.value
    return ""


def set_cookie_value(token: str, *, ttl_s: float, secure: bool = False) -> str:
    """Return a ``Set-Cookie`` value carrying the pass for ``ttl_s`` seconds, script-proof."""
    value = f"{COOKIE}={token}; Path=/; Max-Age={max(0, int(ttl_s))}; HttpOnly; SameSite=Strict"
    return value + "; Secure" if secure else value
