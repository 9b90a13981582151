"""Hashcash-style proof of work: stateless signed challenges, a solver, and the check.

The guard issues a challenge as a signed token ``c1.<kid>.<claims>.<mac>`` whose claims name the
client it was made for (``b``, an opaque binding such as a hash of the client id), the difficulty
(``d``, leading zero bits), the expiry (``e``, epoch seconds) and 16 random bytes (``r``). The
client answers with ``<token>:<nonce>`` in ``x-extauthz-pow``, where ``nonce`` is a decimal
string such that ``sha256("<token>:<nonce>")`` starts with at least ``d`` zero bits.

Nothing is stored when a challenge is issued: the MAC proves the guard made it. Verifying costs
one HMAC and one SHA-256. **Single use is the caller's job**: :func:`verify` returns the
challenge id, and the guard marks it spent in its store (until ``expires_at``) before it honours
the solution, so one solution buys one pass.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from extauthz.keys import KeyRing, b64url, seal, unseal

VERSION = "c1"
RANDOM_BYTES = 16
# The solver compares whole digests; 64 bits is far past anything a client can pay for.
MAX_DIFFICULTY = 64
MAX_BINDING_CHARS = 256
MAX_NONCE_CHARS = 20
_BLOCK = 1000
_SUFFIXES = tuple(b"%03d" % i for i in range(_BLOCK))


@dataclass(frozen=True, slots=True)
class Challenge:
    """An issued challenge: send ``token`` and ``difficulty``; ``id`` names it for single use."""

    token: str
    difficulty: int
    expires_at: float
    id: str


@dataclass(frozen=True, slots=True)
class Verified:
    """The outcome of :func:`verify`.

    ``reason`` is one of ``ok``, ``malformed``, ``bad_signature``, ``expired``, ``wrong_client``,
    ``insufficient_work``. ``challenge_id``, ``difficulty`` and ``expires_at`` come from the
    signed claims, so they are empty (``""``, ``0``, ``0.0``) for ``malformed`` and
    ``bad_signature``.
    """

    ok: bool
    reason: str
    challenge_id: str = ""
    difficulty: int = 0
    expires_at: float = 0.0


_MALFORMED = Verified(False, "malformed")
_BAD_SIGNATURE = Verified(False, "bad_signature")


def _check_difficulty(difficulty: int) -> None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int):
        raise TypeError("difficulty must be an int")
    if not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in [0, {MAX_DIFFICULTY}], got {difficulty}")


def issue(
    keys: KeyRing, *, binding: str, difficulty: int, now: float, ttl_s: float, rng_bytes: bytes
) -> Challenge:
    """Return a signed challenge for the client named by ``binding``, valid ``ttl_s`` from ``now``.

    ``rng_bytes`` must be 16 fresh random bytes (``os.urandom(16)`` in the guard, fixed in tests);
    they make each challenge distinct and become its id.
    """
    _check_difficulty(difficulty)
    if len(rng_bytes) != RANDOM_BYTES:
        raise ValueError(f"rng_bytes must be {RANDOM_BYTES} bytes, got {len(rng_bytes)}")
    if len(binding) > MAX_BINDING_CHARS:
        raise ValueError(f"binding must be at most {MAX_BINDING_CHARS} characters")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    expires = int(now + ttl_s)
    challenge_id = b64url(rng_bytes)
    token = seal(keys, VERSION, {"b": binding, "d": difficulty, "e": expires, "r": challenge_id})
    return Challenge(token=token, difficulty=difficulty, expires_at=float(expires), id=challenge_id)


def leading_zero_bits(digest: bytes) -> int:
    """Return how many zero bits ``digest`` starts with (all of them for an all-zero digest)."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


class Unsolved(RuntimeError):
    """:func:`solve` tried ``max_iterations`` nonces without meeting the difficulty."""


def solve(token: str, difficulty: int, *, max_iterations: int | None = None, start: int = 0) -> str:
    """Return the first decimal nonce from ``start`` whose ``sha256("<token>:<nonce>")`` has
    at least ``difficulty`` leading zero bits.

    Expect ``2**difficulty`` hashes. The hash of ``"<token>:"`` is computed once and copied per
    try, and the digest is compared as bytes against ``2**(256-difficulty)``; past 1,000 the
    nonce's high digits are hashed once per block of 1,000 too. Raise :class:`Unsolved` after
    ``max_iterations`` tries (split a search across workers with ``start``).
    """
    _check_difficulty(difficulty)
    if start < 0:
        raise ValueError("start must be >= 0")
    end = None if max_iterations is None else start + max(0, max_iterations)
    if difficulty == 0 and end != start:
        return str(start)
    prefix = hashlib.sha256(f"{token}:".encode())
    limit = (1 << (256 - difficulty)).to_bytes(32, "big") if difficulty else b""
    n = start
    # Below the first full block (and up to a block boundary), hash the whole nonce each time.
    head_end = max(_BLOCK, -(-start // _BLOCK) * _BLOCK)
    if end is not None:
        head_end = min(head_end, end)
    while n < head_end:
        h = prefix.copy()
        h.update(b"%d" % n)
        if h.digest() < limit:
            return str(n)
        n += 1
    # Whole blocks: "<high digits>" hashed once, then each of "000".."999" appended to a copy.
    while end is None or n < end:
        high = prefix.copy()
        high.update(b"%d" % (n // _BLOCK))
        suffixes = _SUFFIXES if end is None or end - n >= _BLOCK else _SUFFIXES[: end - n]
        copy = high.copy
        for i, suffix in enumerate(suffixes):
            h = copy()
            h.update(suffix)
            if h.digest() < limit:
                return str(n + i)
        n += len(suffixes)
    raise Unsolved(f"no nonce in [{start}, {end}) meets difficulty {difficulty}")


def verify(keys: KeyRing, header: str, *, binding: str, now: float) -> Verified:
    """Check an ``x-extauthz-pow`` value ``<token>:<nonce>`` for the client ``binding`` at ``now``.

    Check, in order: the shape, the MAC (by key id), the expiry, the binding, the work. Never
    raise, whatever the header holds. A valid result does not mean unused: mark
    ``challenge_id`` spent before honouring it.
    """
    if not isinstance(header, str):
        return _MALFORMED
    token, sep, nonce = header.rpartition(":")
    if (
        not sep
        or not 0 < len(nonce) <= MAX_NONCE_CHARS
        or not nonce.isascii()
        or not nonce.isdigit()
    ):
        return _MALFORMED
    sealed = unseal(keys, VERSION, token)
    if not sealed.ok:
        return _BAD_SIGNATURE if sealed.reason == "bad_signature" else _MALFORMED
    claims = sealed.claims
    bound, difficulty, expires, challenge_id = (claims.get(k) for k in ("b", "d", "e", "r"))
    if (
        not isinstance(bound, str)
        or not isinstance(challenge_id, str)
        or isinstance(difficulty, bool)
        or not isinstance(difficulty, int)
        or not 0 <= difficulty <= MAX_DIFFICULTY
        or isinstance(expires, bool)
        or not isinstance(expires, int)
    ):
        return _MALFORMED

    def result(reason: str) -> Verified:
        return Verified(reason == "ok", reason, challenge_id, difficulty, float(expires))

    if now >= expires:
        return result("expired")
    if not hmac.compare_digest(
        bound.encode("utf-8", "surrogatepass"), binding.encode("utf-8", "surrogatepass")
    ):
        return result("wrong_client")
    # The header is exactly "<token>:<nonce>", the string the client hashed; it is ASCII here.
    if leading_zero_bits(hashlib.sha256(header.encode("ascii")).digest()) < difficulty:
        return result("insufficient_work")
    return result("ok")
