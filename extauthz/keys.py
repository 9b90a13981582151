"""HMAC-SHA256 keys with ids, so that tokens signed before a rotation still verify.

A :class:`KeyRing` holds one *current* key, which signs, and any number of older keys, which
only verify. Every token names the id (``kid``) of the key that signed it, so an operator rotates
by adding a key, making it current, and removing the old one once its tokens have expired.

Each use derives its own ring with :meth:`KeyRing.derive` (``"pow"``, ``"pass"``, ``"noise"``,
``"watermark"``): one secret on disk, but a challenge MAC can never be replayed as a pass MAC.
Secrets never appear in ``repr`` or in error messages.

:func:`seal` and :func:`unseal` turn a small JSON object into a signed, dot-separated token and
back; proof-of-work challenges and passes are such tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import orjson
import yaml

MIN_SECRET_BYTES = 16
# Key ids travel inside dot-separated tokens, headers and cookies: keep them short and plain.
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")


class KeyRingError(ValueError):
    """A key file or key set that cannot be used; the message names the problem, never a secret."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Signing keys by id: ``current_id`` signs, every key in ``keys`` verifies.

    Build one with :meth:`from_file`, :meth:`single` or :meth:`random`; the constructor checks
    that key ids are plain (``[A-Za-z0-9_-]{1,32}``), secrets hold at least 16 bytes, and the
    current id is among the keys.
    """

    current_id: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyRingError("key ring: no keys")
        for kid, secret in self.keys.items():
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise KeyRingError(f"key ring: key id {kid!r} must match [A-Za-z0-9_-]{{1,32}}")
            if not isinstance(secret, bytes):
                raise KeyRingError(f"key ring: key {kid!r} is not bytes")
            if len(secret) < MIN_SECRET_BYTES:
                raise KeyRingError(
                    f"key ring: key {kid!r} holds {len(secret)} bytes, "
                    f"needs at least {MIN_SECRET_BYTES}"
                )
        if self.current_id not in self.keys:
            raise KeyRingError(
                f"key ring: current key {self.current_id!r} is not among the keys "
                f"({', '.join(sorted(self.keys))})"
            )
        # Freeze a private copy: a caller's dict must not change a ring in use.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @classmethod
    def single(cls, secret: bytes, kid: str = "k0") -> KeyRing:
        """Return a ring of one key, e.g. from a Secret file holding one secret."""
        return cls(current_id=kid, keys={kid: secret})

    @classmethod
    def random(cls, kid: str = "ephemeral") -> KeyRing:
        """Return a ring of one fresh random key: fine for one replica, lost on restart."""
        return cls.single(os.urandom(32), kid)

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Read ``{current: <kid>, keys: {<kid>: <secret string>, ...}}`` from a YAML file.

        Raise :class:`KeyRingError` naming the file and the problem (unreadable, not YAML, a
        missing field, a short secret, an unknown current id).
        """
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyRingError(f"{source}: cannot read key file: {exc}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise KeyRingError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(doc, Mapping):
            raise KeyRingError(f"{source}: expected a mapping with 'current' and 'keys'")
        unknown = sorted(str(k) for k in doc if k not in ("current", "keys"))
        if unknown:
            raise KeyRingError(f"{source}: unknown field(s) {', '.join(unknown)}")
        current = doc.get("current")
        if not isinstance(current, str):
            raise KeyRingError(f"{source}: 'current' must be a key id string")
        raw = doc.get("keys")
        if not isinstance(raw, Mapping) or not raw:
            raise KeyRingError(f"{source}: 'keys' must be a non-empty mapping of id to secret")
        keys: dict[str, bytes] = {}
        for kid, secret in raw.items():
            if not isinstance(kid, str):
                raise KeyRingError(f"{source}: keys: key id {kid!r} must be a string")
            if isinstance(secret, str):
                keys[kid] = secret.encode("utf-8")
            elif isinstance(secret, bytes):  # YAML !!binary
                keys[kid] = secret
            else:
                raise KeyRingError(f"{source}: keys.{kid}: secret must be a string")
        try:
            return cls(current_id=current, keys=keys)
        except KeyRingError as exc:
            raise KeyRingError(f"{source}: {exc}") from None

    @property
    def ids(self) -> tuple[str, ...]:
        """Return the key ids in the ring, sorted."""
        return tuple(sorted(self.keys))

    def sign(self, data: bytes) -> tuple[str, bytes]:
        """Return ``(kid, mac)``: the HMAC-SHA256 of ``data`` under the current key."""
        mac = hmac.new(self.keys[self.current_id], data, hashlib.sha256).digest()
        return self.current_id, mac

    def verify(self, kid: str, data: bytes, mac: bytes) -> bool:
        """Return whether ``mac`` is the MAC of ``data`` under key ``kid`` (unknown kid: False).

        The comparison takes constant time, so a forger learns nothing from timing.
        """
        secret = self.keys.get(kid)
        if secret is None:
            return False
        expected = hmac.new(secret, data, hashlib.sha256).digest()
        return hmac.compare_digest(expected, mac)

    def derive(self, purpose: str) -> KeyRing:
        """Return a ring with the same ids whose secrets are ``HMAC(secret, purpose)``.

        Give each use its own purpose so that a MAC made for one is worthless for another.
        """
        label = purpose.encode("utf-8")
        return KeyRing(
            current_id=self.current_id,
            keys={
                kid: hmac.new(secret, label, hashlib.sha256).digest()
                for kid, secret in self.keys.items()
            },
        )


# --- Signed tokens -------------------------------------------------------------------------------
# "<version>.<kid>.<b64url JSON claims>.<b64url HMAC>", the MAC taken over "<version>.<kid>.<claims>"
# so that neither the version nor the key id can be swapped. Challenges and passes share this form.

MAX_TOKEN_CHARS = 4096
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_MAC_BYTES = hashlib.sha256().digest_size


@dataclass(frozen=True, slots=True)
class Unsealed:
    """What :func:`unseal` found: ``reason`` is ``ok``, ``malformed`` or ``bad_signature``."""

    reason: str
    claims: Mapping[str, object]

    @property
    def ok(self) -> bool:
        """Return whether the token was well formed and signed by a key in the ring."""
        return self.reason == "ok"


_MALFORMED = Unsealed("malformed", MappingProxyType({}))
_BAD_SIGNATURE = Unsealed("bad_signature", MappingProxyType({}))


def b64url(data: bytes) -> str:
    """Return ``data`` as unpadded URL-safe base64 (safe in headers, cookies and tokens)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes | None:
    """Return the bytes of canonical unpadded URL-safe base64, or None for anything else."""
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Refuse non-canonical spellings (stray low bits) so one token has one text.
    return data if b64url(data) == text else None


def seal(keys: KeyRing, version: str, claims: Mapping[str, object]) -> str:
    """Return ``claims`` as a signed token ``<version>.<kid>.<claims>.<mac>`` (current key)."""
    body = b64url(orjson.dumps(dict(claims)))
    kid = keys.current_id
    _, mac = keys.sign(f"{version}.{kid}.{body}".encode("ascii"))
    return f"{version}.{kid}.{body}.{b64url(mac)}"


def unseal(keys: KeyRing, version: str, token: str) -> Unsealed:
    """Check a token made by :func:`seal` and return its claims; never raise.

    ``malformed`` covers anything that is not a token of ``version`` (wrong shape, bad base64,
    over :data:`MAX_TOKEN_CHARS`, claims that are not a JSON object); ``bad_signature`` covers an
    unknown key id or a MAC that does not match.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        return _MALFORMED
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != version or not _KID.fullmatch(parts[1]):
        return _MALFORMED
    _, kid, body, mac_text = parts
    mac = b64url_decode(mac_text)
    payload = b64url_decode(body)
    if mac is None or payload is None or len(mac) != _MAC_BYTES:
        return _MALFORMED
    if not keys.verify(kid, f"{version}.{kid}.{body}".encode("ascii"), mac):
        return _BAD_SIGNATURE
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _MALFORMED
    if not isinstance(claims, dict):
        return _MALFORMED
    return Unsealed("ok", claims)
