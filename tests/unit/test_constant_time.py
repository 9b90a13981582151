"""Every secret comparison in the security modules takes constant time.

The test reads the source (no import side effects) and fails on any ``==`` / ``!=`` whose
operands name a secret (a token, MAC, digest, signature, password, API key...) or a local
variable assigned from one, e.g. ``expected = hmac.new(...).digest()``. Such a comparison stops
at the first differing byte, so its timing tells a forger how much of a guess was right;
``hmac.compare_digest`` does not. Lengths (``len(mac)``), module constants (``_MAC_BYTES``)
and comparisons of public parts are not secrets; the few public parts of a secret that are
compared on purpose are listed in ``PUBLIC`` with the reason, and the list must stay current.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "extauthz"

# What verifies or holds secrets: challenges, passes, CAPTCHA, keys, identity (API key
# digests), the Envoy-facing servicers and the admin API (its bearer token), the evidence
# ledger and the watermarks (keyed HMACs).
SECURITY_MODULES = (
    "challenge",
    "keys.py",
    "core/identity.py",
    "service",
    "evidence",
    "protect/watermark.py",
)

# Comparisons of the public part of a secret, by file and source text, with the reason.
PUBLIC = {
    ("keys.py", "parts[0] != version"): "a token's version prefix is public",
    (
        "challenge/client.py",
        "sent.get(PASS_HEADER) == self.pass_token",
    ): "the solver compares the pass it holds with the one it sent; nothing is verified",
}

# Functions that must compare with compare_digest: the guard's verifiers.
VERIFIERS = (
    ("keys.py", "KeyRing.verify"),
    ("challenge/passes.py", "_same"),
    ("challenge/pow.py", "verify"),
    ("service/admin.py", "AdminService._authenticate"),
)

_SECRET_WORDS = re.compile(
    r"token|secret|mac|hmac|digest|hexdigest|signature|sig|password|passwd|credentials?|apikey"
)
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("raw", "key"), ("secret", "key"), ("signing", "key"), ("private", "key")}
)
# Calls whose result says nothing about a secret's bytes.
_PUBLIC_CALLS = frozenset({"len", "isinstance", "type", "bool"})


def _words(name: str) -> list[str]:
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return [word for word in snake.split("_") if word]


def secret_name(name: str) -> bool:
    """Whether an identifier names a secret (``mac``, ``admin_token``, ``raw_key``...)."""
    if name.lstrip("_").isupper():  # a module constant: a size or a header name
        return False
    words = _words(name)
    return any(_SECRET_WORDS.fullmatch(word) for word in words) or any(
        pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False)
    )


def _identifiers(node: ast.AST) -> Iterator[str]:
    """The names an expression reads its value from (not those inside ``len(...)``)."""
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id in _PUBLIC_CALLS:
            return
        yield from _identifiers(node.func)
    elif isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr
        yield from _identifiers(node.value)
    elif isinstance(node, ast.Subscript):
        yield from _identifiers(node.value)
    elif isinstance(node, ast.BinOp):
        yield from _identifiers(node.left)
        yield from _identifiers(node.right)
    elif isinstance(node, ast.JoinedStr):
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                yield from _identifiers(value.value)


def _secret_in(node: ast.AST, derived: set[str]) -> bool:
    return any(secret_name(name) or name in derived for name in _identifiers(node))


def _derived(function: ast.AST) -> set[str]:
    """Local names assigned from a secret (``expected = hmac.new(...).digest()``)."""
    names: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            if _secret_in(node.value, set()):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    line: int
    source: str


def timing_unsafe(source: str, path: str = "<snippet>") -> list[Finding]:
    """Every ``==``/``!=`` comparison involving a secret in ``source``."""
    tree = ast.parse(source)
    findings: list[Finding] = []
    scopes = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)),
    ]
    seen: set[int] = set()
    for scope in reversed(scopes):  # innermost functions first, with their own derived names
        derived = _derived(scope) if scope is not tree else set()
        for node in ast.walk(scope):
            if id(node) in seen or not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            seen.add(id(node))
            if any(_secret_in(operand, derived) for operand in (node.left, *node.comparators)):
                findings.append(Finding(path, node.lineno, ast.unparse(node)))
    return findings


def _security_files() -> list[Path]:
    files: list[Path] = []
    for entry in SECURITY_MODULES:
        path = PACKAGE / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


class TestTheChecker:
    """The checker flags timing-unsafe comparisons of secrets and nothing else."""

    @pytest.mark.parametrize(
        "source",
        [
            "def f(mac, expected_mac):\n    return mac == expected_mac\n",
            "def f(supplied, admin_token):\n    return supplied != admin_token\n",
            "def f(k, d, given):\n    expected = hmac.new(k, d, sha256).digest()\n"
            "    return given == expected\n",
            "def f(self, other):\n    return self.secret == other\n",
            "def f(token, wanted):\n    parts = token.split('.')\n    return parts[3] == wanted\n",
            "def f(raw_key, listed):\n    return raw_key == listed\n",
            "def f(headers, pass_):\n    return headers['x-extauthz-pass'] == pass_.signature\n",
        ],
        ids=[
            "mac",
            "token",
            "derived_digest",
            "attribute",
            "derived_split",
            "api_key",
            "subscript",
        ],
    )
    def test_flags_secret_equality(self, source: str) -> None:
        assert len(timing_unsafe(source)) == 1

    @pytest.mark.parametrize(
        "source",
        [
            "def f(mac, expected):\n    return hmac.compare_digest(mac, expected)\n",
            "def f(mac):\n    return len(mac) != _MAC_BYTES\n",
            "def f(key):\n    return key == 'authorization'\n",
            "def f(sealed):\n    return sealed.reason == 'bad_signature'\n",
            "def f(status):\n    return status != 200\n",
            "def f(mac):\n    return isinstance(mac, bytes) == True\n",
        ],
        ids=["compare_digest", "length", "header_name", "reason", "status", "type_check"],
    )
    def test_leaves_public_comparisons(self, source: str) -> None:
        assert timing_unsafe(source) == []


class TestSecurityModules:
    """The guard's own security modules compare secrets only with compare_digest."""

    def test_no_secret_compared_with_equality(self) -> None:
        files = _security_files()
        assert len(files) >= 15  # the walk found the modules (challenge/, service/, ...)
        findings = [
            finding
            for path in files
            for finding in timing_unsafe(path.read_text("utf-8"), _relative(path))
            if (finding.path, finding.source) not in PUBLIC
        ]
        assert findings == [], "compare secrets with hmac.compare_digest"

    def test_public_exceptions_still_exist(self) -> None:
        """An exception for code that is gone must go too, so the list cannot hide a new one."""
        present = {
            (finding.path, finding.source)
            for path in _security_files()
            for finding in timing_unsafe(path.read_text("utf-8"), _relative(path))
        }
        assert set(PUBLIC) <= present

    @pytest.mark.parametrize(("path", "qualname"), VERIFIERS)
    def test_verifiers_use_compare_digest(self, path: str, qualname: str) -> None:
        tree = ast.parse((PACKAGE / path).read_text("utf-8"))
        node: ast.AST = tree
        for name in qualname.split("."):
            node = next(
                child
                for child in ast.iter_child_nodes(node)
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and child.name == name
            )
        calls = {
            ast.unparse(n.func)
            for n in ast.walk(node)
            if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("compare_digest")
        }
        assert calls & {"hmac.compare_digest", "secrets.compare_digest"}
