"""Proof of work: issue, solve and verify; each way a solution can be wrong has its reason."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.challenge.pow import (
    MAX_DIFFICULTY,
    Challenge,
    Unsolved,
    issue,
    leading_zero_bits,
    solve,
    verify,
)
from extauthz.keys import KeyRing, b64url

KEYS = KeyRing.single(b"s" * 32).derive("challenge")
NOW = 1_700_000_000.0
RNG = bytes(range(16))


def make(difficulty: int = 10, binding: str = "client-a", rng: bytes = RNG) -> Challenge:
    return issue(KEYS, binding=binding, difficulty=difficulty, now=NOW, ttl_s=60.0, rng_bytes=rng)


def solved(challenge: Challenge) -> str:
    return f"{challenge.token}:{solve(challenge.token, challenge.difficulty)}"


def work_of(header: str) -> int:
    return leading_zero_bits(hashlib.sha256(header.encode()).digest())


class TestIssue:
    """A challenge is a signed token naming binding, difficulty, expiry and its random id."""

    def test_shape(self) -> None:
        """c1.<kid>.<payload>.<mac>; payload carries b, d, e (int), r; id is r."""
        c = make(difficulty=12)
        version, kid, payload, mac = c.token.split(".")
        assert (version, kid) == ("c1", "k0")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims == {"b": "client-a", "d": 12, "e": int(NOW + 60), "r": b64url(RNG)}
        assert c.id == b64url(RNG) and c.difficulty == 12 and c.expires_at == NOW + 60
        assert ":" not in c.token

    def test_random_bytes_make_distinct_challenges(self) -> None:
        """Different random bytes give a different token and id."""
        a, b = make(rng=RNG), make(rng=bytes(16))
        assert a.token != b.token and a.id != b.id

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"difficulty": -1},
            {"difficulty": MAX_DIFFICULTY + 1},
            {"rng_bytes": b"short"},
            {"ttl_s": 0.0},
            {"binding": "x" * 257},
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, object]) -> None:
        """Out-of-range arguments are refused at issue time."""
        base: dict[str, object] = {
            "binding": "c",
            "difficulty": 8,
            "now": NOW,
            "ttl_s": 60.0,
            "rng_bytes": RNG,
        }
        with pytest.raises(ValueError):
            issue(KEYS, **{**base, **kwargs})  # type: ignore[arg-type]


class TestSolve:
    """The solver finds the first nonce meeting the difficulty and honours its bounds."""

    @pytest.mark.parametrize("difficulty", [0, 1, 4, 8, 12])
    def test_solution_meets_difficulty(self, difficulty: int) -> None:
        """The nonce is decimal and its hash has enough leading zero bits."""
        c = make(difficulty)
        nonce = solve(c.token, difficulty)
        assert nonce.isdigit() and nonce == str(int(nonce))
        assert work_of(f"{c.token}:{nonce}") >= difficulty

    def test_first_solution_from_start(self) -> None:
        """No smaller nonce from ``start`` meets the difficulty (checked by brute force)."""
        c = make(10)
        for start in (0, 995, 1000, 123_456):
            nonce = int(solve(c.token, 10, start=start))
            assert nonce >= start
            assert all(work_of(f"{c.token}:{n}") < 10 for n in range(start, nonce))
            assert work_of(f"{c.token}:{nonce}") >= 10

    def test_max_iterations(self) -> None:
        """A bound too small raises Unsolved; the solution lies just past it."""
        c = make(12)
        nonce = int(solve(c.token, 12))
        if nonce > 0:
            with pytest.raises(Unsolved):
                solve(c.token, 12, max_iterations=nonce)
        assert int(solve(c.token, 12, max_iterations=nonce + 1)) == nonce

    def test_bounded_search_across_blocks(self) -> None:
        """A bound ending inside a block of 1,000 is exact."""
        c = make(12)
        first = int(solve(c.token, 12, start=1500))
        with pytest.raises(Unsolved):
            solve(c.token, 12, start=1500, max_iterations=first - 1500)
        assert int(solve(c.token, 12, start=1500, max_iterations=first - 1500 + 1)) == first

    def test_impossible_difficulty_is_refused(self) -> None:
        """Difficulties outside [0, 64] are a ValueError, not an endless loop."""
        with pytest.raises(ValueError):
            solve("t", MAX_DIFFICULTY + 1)


class TestLeadingZeroBits:
    """leading_zero_bits counts from the most significant bit of the first byte."""

    @pytest.mark.parametrize(
        ("digest", "bits"),
        [(b"\x80", 0), (b"\x01", 7), (b"\x00\x40", 9), (b"\x00\x00", 16), (b"\xff" * 32, 0)],
    )
    def test_counts(self, digest: bytes, bits: int) -> None:
        """Known digests give known counts."""
        assert leading_zero_bits(digest) == bits


class TestVerify:
    """verify says ok only for a signed, live, bound, worked solution; otherwise why not."""

    def test_ok(self) -> None:
        """A solved challenge verifies, with its id, difficulty and expiry."""
        c = make(10)
        v = verify(KEYS, solved(c), binding="client-a", now=NOW + 1)
        assert (v.ok, v.reason, v.challenge_id, v.difficulty) == (True, "ok", c.id, 10)
        assert v.expires_at == c.expires_at

    def test_expired(self) -> None:
        """At the expiry second, the solution no longer counts."""
        c = make(4)
        assert verify(KEYS, solved(c), binding="client-a", now=c.expires_at - 0.5).ok
        v = verify(KEYS, solved(c), binding="client-a", now=c.expires_at)
        assert (v.ok, v.reason, v.challenge_id) == (False, "expired", c.id)

    def test_wrong_client(self) -> None:
        """Another client cannot spend a challenge issued to the first."""
        v = verify(KEYS, solved(make(4)), binding="client-b", now=NOW)
        assert (v.ok, v.reason) == (False, "wrong_client")

    def test_insufficient_work(self) -> None:
        """A nonce that misses the difficulty is insufficient_work."""
        c = make(12)
        lazy = next(n for n in range(10_000) if work_of(f"{c.token}:{n}") < 12)
        v = verify(KEYS, f"{c.token}:{lazy}", binding="client-a", now=NOW)
        assert (v.ok, v.reason, v.difficulty) == (False, "insufficient_work", 12)

    def test_difficulty_cannot_be_lowered(self) -> None:
        """Editing d in the payload breaks the signature, whatever the work."""
        c = make(20)
        version, kid, payload, mac = c.token.split(".")
        cheap = make(0)
        forged = f"{version}.{kid}.{cheap.token.split('.')[2]}.{mac}"
        assert verify(KEYS, f"{forged}:0", binding="client-a", now=NOW).reason == "bad_signature"

    @pytest.mark.parametrize("part", [2, 3])
    def test_flipped_byte_is_bad_signature(self, part: int) -> None:
        """One changed character in the payload or the MAC fails the MAC check."""
        c = make(4)
        parts = c.token.split(".")
        text = parts[part]
        # Flip a middle character to another base64url letter; keep the spelling canonical.
        i = len(text) // 2
        parts[part] = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
        header = f"{'.'.join(parts)}:{solve('.'.join(parts), 4)}"
        v = verify(KEYS, header, binding="client-a", now=NOW)
        assert (v.ok, v.reason, v.challenge_id) == (False, "bad_signature", "")

    def test_unknown_kid_and_wrong_key(self) -> None:
        """A kid not in the ring, or the right kid with another secret, is bad_signature."""
        c = make(4)
        stranger = KeyRing.single(b"t" * 32, "k9")
        assert verify(stranger, solved(c), binding="client-a", now=NOW).reason == "bad_signature"
        other = KeyRing.single(b"t" * 32)
        assert verify(other, solved(c), binding="client-a", now=NOW).reason == "bad_signature"
        undervived = KeyRing.single(b"s" * 32)  # the parent ring, not the derived one
        assert verify(undervived, solved(c), binding="client-a", now=NOW).reason == "bad_signature"

    def test_rotation(self) -> None:
        """A challenge signed before a rotation verifies while its kid remains in the ring."""
        old = KeyRing.single(b"s" * 32, "old")
        c = issue(old, binding="c", difficulty=4, now=NOW, ttl_s=60, rng_bytes=RNG)
        rotated = KeyRing("new", {"old": b"s" * 32, "new": b"n" * 32})
        assert verify(rotated, solved(c), binding="c", now=NOW).ok
        dropped = KeyRing.single(b"n" * 32, "new")
        assert verify(dropped, solved(c), binding="c", now=NOW).reason == "bad_signature"

    @pytest.mark.parametrize(
        "header",
        [
            "",
            ":",
            "abc",
            "c1.k0.x.y:1",
            "c1.k0.e30.AAAA:1",
            "nonce-missing:",
            "c2.k0.aa.bb:1",
            "c1.k0.a.b.c:1",
        ],
    )
    def test_malformed(self, header: str) -> None:
        """Anything that is not <token>:<digits> of our shape is malformed."""
        v = verify(KEYS, header, binding="client-a", now=NOW)
        assert (v.ok, v.reason, v.challenge_id, v.difficulty) == (False, "malformed", "", 0)

    @pytest.mark.parametrize("nonce", ["", "-1", "1e3", "０", "1" * 21, " 1", "0x1"])
    def test_malformed_nonce(self, nonce: str) -> None:
        """The nonce must be 1 to 20 ASCII digits."""
        c = make(0)
        assert verify(KEYS, f"{c.token}:{nonce}", binding="client-a", now=NOW).reason == (
            "malformed"
        )

    @settings(max_examples=400, deadline=None)
    @given(st.text(max_size=300))
    def test_never_raises_on_text(self, header: str) -> None:
        """Random text (surrogates and all) yields a non-ok result, never an exception."""
        v = verify(KEYS, header, binding="client-a", now=NOW)
        assert not v.ok

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 200), st.text(alphabet="AZaz09-_.:", max_size=8))
    def test_never_raises_on_mangled_tokens(self, cut: int, junk: str) -> None:
        """A solution with a splice of junk never raises, and passes only with its token intact."""
        header = solved(make(2))
        mangled = header[:cut] + junk + header[cut + len(junk) :]
        v = verify(KEYS, mangled, binding="client-a", now=NOW)
        if v.ok:
            assert mangled.rpartition(":")[0] == header.rpartition(":")[0]
            assert work_of(mangled) >= 2
