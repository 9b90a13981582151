"""Read policy YAML (and its keys file) into a validated, immutable ``Snapshot``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from extauthz.policy.model import ApiKey, Policy

DEFAULT_POLICY_NAME = "default.yaml"


class PolicyError(Exception):
    """A policy that cannot be used; ``problems`` name the YAML path and the reason of each."""

    code = "policy_invalid"

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A validated policy plus the indexes the hot path needs."""

    policy: Policy
    source: str
    digest: str
    keys_by_sha256: Mapping[str, ApiKey] = field(default_factory=dict)
    watched_files: tuple[Path, ...] = ()


def default_policy_text() -> str:
    """Return the built-in policy: safe for a public model API with no keys configured."""
    return resources.files("extauthz.policy").joinpath(DEFAULT_POLICY_NAME).read_text("utf-8")


def load_default() -> Snapshot:
    return parse_policy(default_policy_text(), source="<built-in default policy>")


def load_policy(path: Path) -> Snapshot:
    """Read and validate the policy at ``path``; raise ``PolicyError`` when it cannot be used."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [f"cannot read: {exc}"]) from exc
    return parse_policy(text, source=str(path), base_dir=path.parent, policy_file=path)


def parse_policy(
    text: str, *, source: str, base_dir: Path | None = None, policy_file: Path | None = None
) -> Snapshot:
    """Validate policy ``text``; relative ``keys_file`` paths resolve against ``base_dir``."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(source, [f"not valid YAML: {exc}"]) from exc
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise PolicyError(source, ["the document must be a mapping of policy sections"])
    watched = [policy_file] if policy_file is not None else []
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    keys_file = _keys_file(document, base_dir)
    if keys_file is not None:
        document, keys_text = _merge_keys(document, keys_file, source)
        watched.append(keys_file)
        digest = hashlib.sha256((text + "\0" + keys_text).encode("utf-8")).hexdigest()
    try:
        policy = Policy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(source, [_describe(err) for err in exc.errors()]) from None
    _check_coverage_reference(policy, base_dir, source)
    keys = {key.sha256: key for key in policy.identity.api_keys}
    return Snapshot(policy, source, digest, keys, tuple(watched))


def _check_coverage_reference(policy: Policy, base_dir: Path | None, source: str) -> None:
    """Refuse a detection.coverage_reference that does not exist, before any request needs it."""
    name = policy.detection.coverage_reference
    if not name or not policy.detection.enabled:
        return
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise PolicyError(
            source,
            [f"detection.coverage_reference: no such file {path} (a .npy of projected vectors)"],
        )


def _keys_file(document: dict[str, Any], base_dir: Path | None) -> Path | None:
    identity = document.get("identity")
    if not isinstance(identity, dict) or not identity.get("keys_file"):
        return None
    path = Path(str(identity["keys_file"]))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _merge_keys(
    document: dict[str, Any], keys_file: Path, source: str
) -> tuple[dict[str, Any], str]:
    """Append the keys file's ``api_keys`` to the policy's own."""
    try:
        keys_text = keys_file.read_text("utf-8")
        loaded = yaml.safe_load(keys_text) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(source, [f"identity.keys_file: cannot read {keys_file}: {exc}"]) from exc
    extra = loaded.get("api_keys") if isinstance(loaded, dict) else None
    if not isinstance(extra, list):
        raise PolicyError(
            source, [f"identity.keys_file: {keys_file} must hold a list under 'api_keys'"]
        )
    identity = dict(document["identity"])
    own = identity.get("api_keys") or []
    if not isinstance(own, list):
        raise PolicyError(source, ["identity.api_keys: must be a list"])
    identity["api_keys"] = [*own, *extra]
    return {**document, "identity": identity}, keys_text


_REWORDING = (
    ("Input should be ", "must be "),
    ("Value error, ", ""),
    ("Extra inputs are not permitted", "unknown field"),
    ("Field required", "is required"),
)


def _describe(error: Mapping[str, Any]) -> str:
    path = ""
    for part in error.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "lax-", "json-")):
            path += f".{part}" if path else str(part)
    message = str(error.get("msg", "invalid"))
    for old, new in _REWORDING:
        message = message.replace(old, new)
    return f"{path}: {message}" if path else message
