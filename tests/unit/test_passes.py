"""Passes: issue and read, each refusal with its reason, key rotation, headers and cookies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.challenge.passes import (
    Pass,
    issue_pass,
    pass_from_headers,
    read_pass,
    set_cookie_value,
)
from extauthz.keys import KeyRing, b64url

KEYS = KeyRing.single(b"s" * 32).derive("pass")
NOW = 1_700_000_000.0
RNG = bytes(range(16))


def make(keys: KeyRing = KEYS, *, address: str = "", binding: str = "client-a") -> str:
    return issue_pass(
        keys, binding=binding, address=address, ttl_s=300.0, budget=500, now=NOW, rng_bytes=RNG
    )


class TestReadPass:
    """read_pass admits only a signed, live pass of this client (and address, when bound)."""

    def test_round_trip(self) -> None:
        """A fresh pass reads back with every claim."""
        token = make(address="10.0.0.1")
        assert token.startswith("p1.k0.")
        check = read_pass(KEYS, token, binding="client-a", address="10.0.0.1", now=NOW + 1)
        assert (check.ok, check.reason) == (True, "ok")
        assert check.pass_ == Pass(b64url(RNG), "client-a", "10.0.0.1", NOW + 300, 500)

    def test_unbound_address_matches_any(self) -> None:
        """A pass without an address is good from any address."""
        check = read_pass(KEYS, make(), binding="client-a", address="192.0.2.9", now=NOW)
        assert check.ok and check.pass_ is not None and check.pass_.address == ""

    def test_expired(self) -> None:
        """At the expiry second the pass is refused, and its claims are not handed out."""
        check = read_pass(KEYS, make(), binding="client-a", address="", now=NOW + 300)
        assert (check.ok, check.reason, check.pass_) == (False, "expired", None)

    def test_wrong_client(self) -> None:
        """Another client cannot use the pass."""
        check = read_pass(KEYS, make(), binding="client-b", address="", now=NOW)
        assert (check.ok, check.reason) == (False, "wrong_client")

    def test_wrong_address(self) -> None:
        """A pass bound to an address is refused from another one."""
        check = read_pass(
            KEYS, make(address="10.0.0.1"), binding="client-a", address="10.0.0.2", now=NOW
        )
        assert (check.ok, check.reason) == (False, "wrong_address")

    @pytest.mark.parametrize("part", [2, 3])
    def test_flipped_character_is_bad_signature(self, part: int) -> None:
        """One changed character in the claims or the MAC fails the MAC check."""
        parts = make().split(".")
        i = len(parts[part]) // 2
        parts[part] = (
            parts[part][:i] + ("A" if parts[part][i] != "A" else "B") + parts[part][i + 1 :]
        )
        check = read_pass(KEYS, ".".join(parts), binding="client-a", address="", now=NOW)
        assert (check.ok, check.reason, check.pass_) == (False, "bad_signature", None)

    def test_challenge_keys_do_not_sign_passes(self) -> None:
        """A pass made with the challenge-derived ring (or another secret) is bad_signature."""
        for keys in (KeyRing.single(b"s" * 32).derive("challenge"), KeyRing.single(b"t" * 32)):
            check = read_pass(KEYS, make(keys), binding="client-a", address="", now=NOW)
            assert check.reason == "bad_signature"

    def test_rotation(self) -> None:
        """A pass signed by an old kid verifies while the kid is in the ring, not after removal."""
        old = KeyRing.single(b"o" * 32, "old")
        token = make(old)
        rotated = KeyRing("new", {"old": b"o" * 32, "new": b"n" * 32})
        assert read_pass(rotated, token, binding="client-a", address="", now=NOW).ok
        assert make(rotated).startswith("p1.new.")
        removed = KeyRing.single(b"n" * 32, "new")
        assert read_pass(removed, token, binding="client-a", address="", now=NOW).reason == (
            "bad_signature"
        )

    @pytest.mark.parametrize(
        ("token", "reason"),
        [
            ("", "malformed"),
            ("p1", "malformed"),
            ("p1.k0..", "malformed"),
            ("c1.k0.e30.AAAA", "malformed"),
            ("p1.k0.!!." + "A" * 43, "malformed"),
            ("p1.k0.e30.AAAA", "malformed"),  # a 3-byte MAC
            ("p1.k0.e30." + "A" * 43, "bad_signature"),  # well formed, wrong MAC
        ],
    )
    def test_malformed(self, token: str, reason: str) -> None:
        """Strings that are not a pass are malformed; a well formed one with a wrong MAC is not."""
        check = read_pass(KEYS, token, binding="client-a", address="", now=NOW)
        assert (check.ok, check.reason) == (False, reason)

    @settings(max_examples=400, deadline=None)
    @given(st.text(max_size=300))
    def test_never_raises(self, token: str) -> None:
        """Random text never raises and never reads as a pass."""
        assert not read_pass(KEYS, token, binding="client-a", address="", now=NOW).ok


class TestIssuePass:
    """issue_pass refuses arguments that would make a useless or unsafe pass."""

    @pytest.mark.parametrize(
        "kwargs", [{"rng_bytes": b"x"}, {"ttl_s": 0.0}, {"budget": -1}, {"budget": True}]
    )
    def test_bad_arguments(self, kwargs: dict[str, object]) -> None:
        """Short randomness, no lifetime, or a negative or boolean budget is a ValueError."""
        base: dict[str, object] = {
            "binding": "c",
            "ttl_s": 60.0,
            "budget": 10,
            "now": NOW,
            "rng_bytes": RNG,
        }
        with pytest.raises(ValueError):
            issue_pass(KEYS, **{**base, **kwargs})  # type: ignore[arg-type]


class TestPassFromHeaders:
    """The pass comes from x-extauthz-pass, else from the extauthz_pass cookie, else ""."""

    def test_header_wins(self) -> None:
        """The header is preferred over the cookie."""
        headers = {"x-extauthz-pass": "p1.H", "cookie": "extauthz_pass=p1.C"}
        assert pass_from_headers(headers) == "p1.H"

    @pytest.mark.parametrize(
        ("cookie", "expected"),
        [
            ("extauthz_pass=p1.k0.a.b", "p1.k0.a.b"),
            ("session=x; extauthz_pass=p1.k0.a.b; theme=dark", "p1.k0.a.b"),
            ('extauthz_pass="p1.k0.a.b"', "p1.k0.a.b"),
            # SimpleCookie stops at garbage: ours after it is still found.
            ("bad cookie; extauthz_pass=p1.k0.a.b", "p1.k0.a.b"),
            ('a="unterminated; extauthz_pass=p1.k0.a.b', "p1.k0.a.b"),
            ("x=1;;; extauthz_pass=p1.k0.a.b ; z", "p1.k0.a.b"),
            ("my_extauthz_pass=nope", ""),
            ("session=x", ""),
            ("", ""),
            ("\x00\xff;=;;", ""),
        ],
    )
    def test_cookie(self, cookie: str, expected: str) -> None:
        """The cookie is read from messy cookie headers; its absence gives ""."""
        assert pass_from_headers({"cookie": cookie}) == expected

    def test_nothing(self) -> None:
        """No header and no cookie gives ""."""
        assert pass_from_headers({}) == ""

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_garbage_cookie_never_raises(self, cookie: str) -> None:
        """Any cookie header text returns a string."""
        assert isinstance(pass_from_headers({"cookie": cookie + "; extauthz_pass=x"}), str)

    def test_cookie_round_trip(self) -> None:
        """What set_cookie_value sets, a browser sends back and pass_from_headers reads."""
        token = make()
        set_cookie = set_cookie_value(token, ttl_s=300)
        sent_back = set_cookie.split(";")[0]
        assert pass_from_headers({"cookie": f"a=1; {sent_back}"}) == token


class TestSetCookieValue:
    """The pass cookie is scoped to the site, script-proof and same-site only."""

    def test_attributes(self) -> None:
        """Path, integral Max-Age, HttpOnly and SameSite=Strict; Secure only on request."""
        assert set_cookie_value("T", ttl_s=299.9) == (
            "extauthz_pass=T; Path=/; Max-Age=299; HttpOnly; SameSite=Strict"
        )
        assert set_cookie_value("T", ttl_s=60, secure=True).endswith("; SameSite=Strict; Secure")
