"""Process settings: read once from flags and ``EXTAUTHZ_*`` environment variables, then frozen."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a process needs before it reads the policy.

    The decision budget bounds every store call made while deciding one request; Envoy's
    ext_authz timeout and ext_proc ``message_timeout`` in ``envoy/envoy.yaml`` sit above it.
    """

    policy_path: Path | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 9191
    http_port: int = 9192
    store_url: str = "memory"
    decision_budget_ms: float = 50.0
    max_message_bytes: int = 8 * MIB
    admin_token_file: Path | None = None
    # Key of the output policies' keyed noise (a k8s Secret); the same file on every replica.
    noise_key_file: Path | None = None
    # Keys with ids (YAML {current, keys}) for challenges and passes; rotate by adding a key.
    keys_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    reload_interval_s: float = 2.0
    drain_s: float = 5.0
    log_level: str = "info"
    log_format: str = "json"
    memory_max_clients: int = 100_000
    # Guard replicas sharing the store: under fail_modes.store: local each replica enforces
    # 1/replicas of every budget on its own.
    replicas: int = 1
    # Worker processes of this guard (``serve --workers N``): each runs its own event loop on the
    # same ports (SO_REUSEPORT) under a supervisor; more than one needs the shared store.
    workers: int = 1
    client_ttl_s: float = 86_400.0

    @property
    def decision_budget_s(self) -> float:
        return self.decision_budget_ms / 1000.0

    @property
    def grpc_max_message_bytes(self) -> int:
        """gRPC message limit: above Envoy's buffer (the largest body + 2 MiB in envoy/envoy.yaml),
        so a body Envoy lets through reaches the guard and gets a clear 413, not a stream error."""
        return self.max_message_bytes + 4 * MIB

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        for name in ("grpc_port", "http_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name}: must be a port number 0..65535, got {value}")
        for name in ("decision_budget_ms", "reload_interval_s", "drain_s", "client_ttl_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number")
        if self.decision_budget_ms <= 0:
            raise ValueError("decision_budget_ms: must be a positive number")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes: must be at least 1024")
        if self.log_format not in ("json", "console"):
            raise ValueError("log_format: must be 'json' or 'console'")
        if self.reload_interval_s <= 0 or self.drain_s < 0:
            raise ValueError("reload_interval_s must be positive and drain_s not negative")
        if self.replicas < 1:
            raise ValueError("replicas: must be at least 1")
        self._validate_workers()
        if self.memory_max_clients < 1 or self.client_ttl_s <= 0:
            raise ValueError("memory_max_clients and client_ttl_s must be positive")
        if self.policy_path is not None and not self.policy_path.is_file():
            raise ValueError(f"policy_path: no such file: {self.policy_path}")
        for name in (
            "admin_token_file",
            "noise_key_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
        ):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file: mTLS needs tls_cert_file and tls_key_file too")

    def _validate_workers(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: must be at least 1, got {self.workers}")
        if self.workers == 1:
            return
        if self.store_url == "memory":
            raise ValueError(
                "workers: --workers needs a shared store (redis://...): "
                "each worker would keep its own limits"
            )
        if self.grpc_port == 0 or self.http_port == 0:
            raise ValueError(
                "workers: --workers needs fixed ports: port 0 would give each worker its own port"
            )


def from_env(overrides: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings: explicit ``overrides`` (flags) win over ``EXTAUTHZ_<NAME>`` variables."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw: object = overrides.get(f.name)
        if raw is None:
            env_value = environ.get(f"EXTAUTHZ_{f.name.upper()}")
            if env_value is None or env_value == "":
                continue
            raw = env_value
        values[f.name] = _coerce(f.name, f.type, raw)
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.validate()
    return settings


def _coerce(name: str, type_name: object, raw: object) -> object:
    text = str(type_name)
    try:
        if "Path" in text:
            return Path(str(raw))
        if text == "int":
            return int(str(raw))
        if text == "float":
            return float(str(raw))
    except ValueError:
        raise ValueError(f"{name}: cannot read {raw!r} as {text}") from None
    return raw


__all__ = ["MIB", "Settings", "from_env"]
