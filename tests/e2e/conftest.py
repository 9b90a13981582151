"""The real stack for end-to-end tests: demo model + guard + the real Envoy with envoy/envoy.yaml."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extauthz.demo import stack
from extauthz.demo.local import LocalStack

FREE_KEY = "e2e-free-key"
TRUSTED_KEY = "e2e-trusted-key"
LEAKED_KEY = "e2e-leaked-key"
METERED_KEY = "e2e-metered-key"
LLM_KEY = "e2e-llm-key"
METERED_PER_MINUTE = 3
LLM_TOKENS_PER_DAY = 40


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


POLICY = f"""
version: 1
identity:
  api_keys:
    - {{name: freebie, tier: free, sha256: {_digest(FREE_KEY)}}}
    - {{name: bigco, tier: trusted, sha256: {_digest(TRUSTED_KEY)}}}
    - {{name: leaky, tier: free, sha256: {_digest(LEAKED_KEY)}}}
    - {{name: meter, tier: metered, sha256: {_digest(METERED_KEY)}}}
    - {{name: chatty, tier: llm, sha256: {_digest(LLM_KEY)}}}
tiers:
  anonymous: {{max_instances: 16, output: {{policy: round, decimals: 2}}}}
  free: {{max_instances: 64, output: {{policy: round, decimals: 3}}}}
  trusted: {{max_instances: 20000, output: {{policy: passthrough}}}}
  metered:
    max_instances: 8
    limits: [{{name: per-minute, unit: requests, rate: {METERED_PER_MINUTE}, per: minute}}]
  llm:
    max_instances: 4
    limits: [{{name: tokens-daily, unit: tokens, rate: {LLM_TOKENS_PER_DAY}, per: day}}]
deny:
  key_sha256: [{_digest(LEAKED_KEY)}]
challenge: {{pass_budget: 20}}
"""


def require_envoy() -> None:
    try:
        stack.envoy_binary()
    except FileNotFoundError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the Envoy binary is missing: {exc}")
        pytest.skip(str(exc))


class E2E:
    """A running stack and the helpers tests share."""

    def __init__(self, local: LocalStack, policy_path: Path) -> None:
        self.local = local
        self.policy_path = policy_path
        self.port = local.ports.listener

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's access log lines (JSON), oldest first."""
        assert self.local.envoy is not None
        return json_lines(self.local.envoy.output())

    def model_log(self) -> str:
        assert self.local.model is not None
        return self.local.model.output()

    def guard_log(self) -> str:
        assert self.local.guard is not None
        return self.local.guard.output()


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON object lines of a process's output (access log, guard log), oldest first."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    require_envoy()
    workdir = tmp_path_factory.mktemp("e2e-stack")
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(POLICY)
    local = LocalStack(policy=policy_path, workdir=workdir)
    with local:
        yield E2E(local, policy_path)
