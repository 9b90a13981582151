"""Detection through the real Envoy with the demo model, on the memory store and on Redis, in a
tier whose limits are generous (volume alone cannot decide): synthetic attackers reach
`suspicious` within 300 instances with a reason from a detector other than volume, one instance
per request or batches of 32, also spread over 10 API keys; 50 benign clients x 600 natural
queries never go above `elevated` and are never refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from extauthz.admin_client import AdminClient
from extauthz.demo.client import Client
from extauthz.demo.local import LocalStack
from extauthz.demo.model import load_data
from extauthz.demo.workspace import write_coverage_reference
from extauthz.redteam.traffic import (
    BenignClient,
    JacobianAttacker,
    LineSearchAttacker,
    SybilSplitter,
    UniformNoiseAttacker,
    popular_inputs,
)
from tests.e2e.conftest import require_envoy
from tests.integration.conftest import start_redis, stop_redis

KSERVE = "/v1/models/digits:predict"
BUDGET = 300
BENIGN_CLIENTS = 50
BENIGN_QUERIES = 600
NON_VOLUME = {
    "augmentation_steps",
    "prada_non_normal",
    "boundary_probing",
    "near_duplicates",
    "cross_client_probing",
    "input_coverage",
}


def _key(name: str) -> str:
    return f"detect-{name}-key"


NAMES = (
    [f"benign-{i}" for i in range(BENIGN_CLIENTS)]
    + [f"{attack}-{batch}" for attack in ("uniform", "linesearch", "jacobian") for batch in (1, 32)]
    + [f"sybil-{i}" for i in range(10)]
)


def _policy(workdir: Path) -> Path:
    write_coverage_reference(workdir / "reference.npy")
    keys = "\n".join(
        f"    - {{name: {name}, tier: research, sha256: {hashlib.sha256(_key(name).encode()).hexdigest()}}}"
        for name in NAMES
    )
    path = workdir / "policy.yaml"
    path.write_text(
        f"""
identity:
  api_keys:
{keys}
tiers:
  anonymous: {{max_instances: 4}}
  research: {{max_instances: 64}}
levels: {{normal: allow, elevated: allow, suspicious: challenge, abusive: block}}
detection:
  enabled: true
  input_scale: 16
  margin_baseline: 0.011
  coverage_reference: reference.npy
"""
    )
    return path


@pytest.fixture(scope="module", params=["memory", "redis"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    require_envoy()
    workdir = tmp_path_factory.mktemp(f"detect-{request.param}")
    redis = None
    args: list[str] = []
    if request.param == "redis":
        redis = start_redis(workdir / "redis")
        args = ["--store", redis.url]
    local = LocalStack(policy=_policy(workdir), workdir=workdir, guard_args=args)
    try:
        with local:
            yield local
    finally:
        if redis is not None:
            stop_redis(redis)


def _send(http: Client, name: str, rows: np.ndarray) -> tuple[int, np.ndarray | None]:
    reply = http.post(KSERVE, {"instances": rows.tolist()}, headers={"x-api-key": _key(name)})
    if reply.status != 200:
        return reply.status, None
    return 200, np.asarray(reply.json()["predictions"])


def _attack(stack: LocalStack, name: str, attacker: object, batch: int) -> int | None:
    """Send until refused or BUDGET instances; return the instances sent before the first refusal."""
    sent = 0
    with Client(stack.ports.listener) as http:
        while sent < BUDGET:
            rows = attacker.next_batch(batch)  # type: ignore[attr-defined]
            status, answers = _send(http, name, rows)
            if status != 200:
                return sent
            attacker.observe(rows, answers)  # type: ignore[attr-defined]
            sent += batch
    return None


def _client(stack: LocalStack, name: str) -> dict[str, object]:
    with AdminClient(stack.admin_target, stack.admin_token) as admin:
        return admin.get_client(f"key:{name}")


ATTACKERS = {
    "uniform": lambda seeds, rng: UniformNoiseAttacker(rng=rng),
    "linesearch": lambda seeds, rng: LineSearchAttacker(seeds, 8, rng=rng),
    "jacobian": lambda seeds, rng: JacobianAttacker(seeds, rng=rng),
}


class TestAttackers:
    """Every synthetic attacker is caught within 300 instances, by more than volume."""

    @pytest.mark.parametrize("batch", [1, 32])
    @pytest.mark.parametrize("attack", sorted(ATTACKERS))
    def test_caught_within_budget(self, stack: LocalStack, attack: str, batch: int) -> None:
        _, x_test, _, _ = load_data()
        attacker = ATTACKERS[attack](x_test[:10], np.random.default_rng(7))
        caught_at = _attack(stack, f"{attack}-{batch}", attacker, batch)
        client = _client(stack, f"{attack}-{batch}")
        assert caught_at is not None, (
            f"{attack} (batch {batch}) was never refused: {json.dumps(client)}"
        )
        assert set(client["risk_reasons"]) & NON_VOLUME, client  # type: ignore[arg-type]

    def test_sybil_spread_over_ten_keys(self, stack: LocalStack) -> None:
        _, x_test, _, _ = load_data()
        splitter = SybilSplitter(
            JacobianAttacker(x_test[:10], rng=np.random.default_rng(9)), identities=10
        )
        caught: dict[int, int] = {}
        sent = [0] * 10
        with Client(stack.ports.listener) as http:
            while any(i not in caught and sent[i] < BUDGET for i in range(10)):
                batch = splitter.next_batch(8)
                if batch.identity in caught or sent[batch.identity] >= BUDGET:
                    continue
                status, answers = _send(http, f"sybil-{batch.identity}", batch.inputs)
                if status != 200:
                    caught[batch.identity] = sent[batch.identity]
                    continue
                splitter.observe(batch.inputs, answers)
                sent[batch.identity] += 8
        assert len(caught) == 10, f"keys never refused: {sorted(set(range(10)) - set(caught))}"


class TestBenign:
    """Fifty natural clients, twice the attack budget each, stay at most `elevated`."""

    def test_benign_clients_untouched(self, stack: LocalStack) -> None:
        x_train, x_test, _, _ = load_data()
        pool = np.vstack([x_train, x_test])
        popular = popular_inputs(pool, 5, np.random.default_rng(3))
        refused: list[str] = []
        with Client(stack.ports.listener) as http:
            for i in range(BENIGN_CLIENTS):
                client = BenignClient(pool, rng=np.random.default_rng(100 + i), popular=popular)
                for _ in range(BENIGN_QUERIES // 8):
                    status, _ = _send(http, f"benign-{i}", client.next_batch(8))
                    if status != 200:
                        refused.append(f"benign-{i}: {status}")
                        break
        levels = [_client(stack, f"benign-{i}")["effective_level"] for i in range(BENIGN_CLIENTS)]
        assert not refused, refused
        assert set(levels) <= {"normal", "elevated"}, levels
