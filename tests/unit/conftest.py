"""Shared unit-test fixtures: a clock that moves only when told, and policies built from text."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from extauthz.policy.loader import Snapshot, parse_policy
from tests.store_contract import FakeClock

PolicyFromText = Callable[[str], Snapshot]


def _key_digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


@pytest.fixture
def key_digest() -> Callable[[str], str]:
    """Return the function giving the hex SHA-256 a policy lists for a raw API key."""
    return _key_digest


@pytest.fixture
def clock() -> FakeClock:
    """Return a clock pinned at a fixed epoch second; tests move it with ``advance``."""
    return FakeClock()


@pytest.fixture
def policy_from_text() -> PolicyFromText:
    """Return a helper that validates dedented YAML into a ``Snapshot`` (raises ``PolicyError``)."""

    def build(text: str) -> Snapshot:
        return parse_policy(textwrap.dedent(text), source="<test policy>")

    return build


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """Return a helper that writes dedented text to ``tmp_path / name`` and returns the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), "utf-8")
        return path

    return write
