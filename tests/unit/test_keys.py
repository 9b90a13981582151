"""KeyRing: loading key files, signing with the current key, verifying by id, derivation; signed tokens."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from extauthz.keys import (
    MAX_TOKEN_CHARS,
    KeyRing,
    KeyRingError,
    b64url,
    b64url_decode,
    seal,
    unseal,
)

SECRET_A = "a" * 32
SECRET_B = "b" * 32


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


class TestFromFile:
    """A key file yields a ring; every bad file raises KeyRingError naming the file and problem."""

    def test_reads_current_and_all_keys(self, tmp_path: Path) -> None:
        """Both keys are loaded, the named one is current and signs."""
        ring = KeyRing.from_file(
            write(tmp_path, f"current: k2\nkeys:\n  k1: {SECRET_A}\n  k2: {SECRET_B}\n")
        )
        assert ring.current_id == "k2"
        assert ring.ids == ("k1", "k2")
        assert ring.sign(b"x") == KeyRing.single(SECRET_B.encode(), "k2").sign(b"x")

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("current: k1\nkeys:\n  k1: short\n", "holds 5 bytes, needs at least 16"),
            (f"current: k9\nkeys:\n  k1: {SECRET_A}\n", "current key 'k9' is not among"),
            (f"keys:\n  k1: {SECRET_A}\n", "'current' must be a key id string"),
            ("current: k1\n", "'keys' must be a non-empty mapping"),
            ("current: k1\nkeys: {}\n", "'keys' must be a non-empty mapping"),
            ("current: k1\nkeys:\n  k1: 12345678901234567890\n", "secret must be a string"),
            (f"current: k.1\nkeys:\n  k.1: {SECRET_A}\n", "must match"),
            (f"current: k1\nkeys:\n  k1: {SECRET_A}\nextra: 1\n", "unknown field(s) extra"),
            ("- just\n- a list\n", "expected a mapping"),
            ("current: [unclosed\n", "not valid YAML"),
        ],
    )
    def test_bad_files_name_the_problem(self, tmp_path: Path, text: str, problem: str) -> None:
        """The error names the file and the problem, and never echoes a secret."""
        path = write(tmp_path, text)
        with pytest.raises(KeyRingError) as err:
            KeyRing.from_file(path)
        assert problem in str(err.value)
        assert str(path) in str(err.value)
        assert SECRET_A not in str(err.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable file is a KeyRingError (a ValueError), not a bare OSError."""
        with pytest.raises(KeyRingError, match="cannot read key file"):
            KeyRing.from_file(tmp_path / "absent.yaml")

    def test_binary_secret(self, tmp_path: Path) -> None:
        """A YAML !!binary secret is used as raw bytes."""
        raw = bytes(range(20))
        text = f"current: k1\nkeys:\n  k1: !!binary {base64.b64encode(raw).decode()}\n"
        ring = KeyRing.from_file(write(tmp_path, text))
        assert ring.keys["k1"] == raw


class TestSignVerify:
    """MACs verify under the key that made them and nowhere else."""

    def test_round_trip_and_tamper(self) -> None:
        """The MAC verifies; another message, MAC, or kid does not."""
        ring = KeyRing.single(SECRET_A.encode())
        kid, mac = ring.sign(b"hello")
        assert kid == "k0" and len(mac) == 32
        assert ring.verify(kid, b"hello", mac)
        assert not ring.verify(kid, b"hellO", mac)
        assert not ring.verify(kid, b"hello", bytes([mac[0] ^ 1]) + mac[1:])
        assert not ring.verify("nope", b"hello", mac)

    def test_old_key_verifies_until_removed(self) -> None:
        """After rotation the old key still verifies; a ring without it does not."""
        old = KeyRing.single(SECRET_A.encode(), "old")
        kid, mac = old.sign(b"m")
        rotated = KeyRing("new", {"old": SECRET_A.encode(), "new": SECRET_B.encode()})
        assert rotated.sign(b"m")[0] == "new"
        assert rotated.verify(kid, b"m", mac)
        assert not KeyRing.single(SECRET_B.encode(), "new").verify(kid, b"m", mac)

    def test_random_rings_differ(self) -> None:
        """Two random rings do not share a key."""
        a, b = KeyRing.random(), KeyRing.random()
        assert a.current_id == "ephemeral"
        kid, mac = a.sign(b"m")
        assert not b.verify(kid, b"m", mac)

    def test_secrets_not_in_repr(self) -> None:
        """repr shows the current id but not the secrets."""
        ring = KeyRing.single(SECRET_A.encode())
        assert "k0" in repr(ring) and SECRET_A not in repr(ring)

    def test_caller_dict_cannot_change_the_ring(self) -> None:
        """Mutating the dict a ring was built from changes nothing."""
        keys = {"k0": SECRET_A.encode()}
        ring = KeyRing("k0", keys)
        keys["k0"] = SECRET_B.encode()
        assert ring.keys["k0"] == SECRET_A.encode()


class TestDerive:
    """Derived rings keep ids but share no key with the parent or with other purposes."""

    def test_purposes_are_separate(self) -> None:
        """A MAC under one purpose fails under another and under the parent."""
        ring = KeyRing("k2", {"k1": SECRET_A.encode(), "k2": SECRET_B.encode()})
        pow_ring, pass_ring = ring.derive("pow"), ring.derive("pass")
        assert pow_ring.ids == ring.ids and pow_ring.current_id == "k2"
        kid, mac = pow_ring.sign(b"m")
        assert pow_ring.verify(kid, b"m", mac)
        assert not pass_ring.verify(kid, b"m", mac)
        assert not ring.verify(kid, b"m", mac)

    def test_deterministic(self) -> None:
        """Every replica derives the same key from the same secret."""
        a = KeyRing.single(SECRET_A.encode()).derive("pow")
        b = KeyRing.single(SECRET_A.encode()).derive("pow")
        assert a.keys == b.keys


class TestSealedTokens:
    """seal/unseal: the claims round trip; any change is malformed or a bad signature."""

    RING = KeyRing.single(SECRET_A.encode())

    def test_round_trip(self) -> None:
        """Claims come back as they went in."""
        token = seal(self.RING, "t1", {"x": 1, "y": "z"})
        assert token.startswith("t1.k0.")
        assert unseal(self.RING, "t1", token).claims == {"x": 1, "y": "z"}

    def test_version_and_kid_are_signed(self) -> None:
        """Another version is malformed; an edited kid or claims fail the MAC."""
        token = seal(self.RING, "t1", {"x": 1})
        assert unseal(self.RING, "t2", token).reason == "malformed"
        # The kid is under the MAC: relabelling fails even where k1 holds the same secret.
        twin = KeyRing("k1", {"k0": SECRET_A.encode(), "k1": SECRET_A.encode()})
        assert unseal(twin, "t1", token).reason == "ok"
        assert unseal(twin, "t1", token.replace(".k0.", ".k1.")).reason == "bad_signature"
        assert unseal(self.RING, "t1", token.replace(".k0.", ".k1.")).reason == "bad_signature"
        _, kid, body, mac = token.split(".")
        other = b64url(b'{"x":2}')
        assert unseal(self.RING, "t1", f"t1.{kid}.{other}.{mac}").reason == "bad_signature"

    def test_non_object_claims_are_malformed(self) -> None:
        """A correctly signed JSON list is still malformed."""
        token = seal(self.RING, "t1", {"x": 1})
        _, kid, _, _ = token.split(".")
        body = b64url(b"[1,2]")
        _, mac = self.RING.sign(f"t1.{kid}.{body}".encode())
        assert unseal(self.RING, "t1", f"t1.{kid}.{body}.{b64url(mac)}").reason == "malformed"

    def test_oversized_token(self) -> None:
        """A token past MAX_TOKEN_CHARS is malformed before any work."""
        token = seal(self.RING, "t1", {"x": "y" * MAX_TOKEN_CHARS})
        assert unseal(self.RING, "t1", token).reason == "malformed"

    @pytest.mark.parametrize("text", ["QQ", "QR", "Q", "QQ==", "Q+Q/", "QUI"])
    def test_b64url_is_canonical(self, text: str) -> None:
        """Only the one unpadded URL-safe spelling of some bytes decodes."""
        decoded = b64url_decode(text)
        assert decoded is None or b64url(decoded) == text
        assert (decoded is None) == (text not in ("QQ", "QUI"))
