"""Watermarks through the real Envoy: a clone trained on answers served to the free tier is
proven with p < 1e-6 from the evidence ledger; a model trained on the true labels is not."""

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
from extauthz.evidence.cli import label_evidence
from extauthz.evidence.ledger import import_jsonl
from extauthz.evidence.verify import combine_p_values, verify_soft_mark
from extauthz.keys import KeyRing
from tests.bench.power_curve import suspect_probs, train_clone, train_null
from tests.e2e.conftest import require_envoy

KEY = "wm-free-key"
RATE = 0.05
QUERIES = 2000
KSERVE = "/v1/models/digits:predict"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_envoy()
    workdir = tmp_path_factory.mktemp("watermark")
    (workdir / "keys.yaml").write_text(
        "current: wm1\nkeys: {wm1: e2e-watermark-deployment-key-0123}\n"
    )
    policy = workdir / "policy.yaml"
    policy.write_text(
        f"""
identity:
  api_keys: [{{name: thief, tier: free, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}]
tiers:
  anonymous: {{max_instances: 4}}
  free:
    max_instances: 64
    watermark: {{label_rate: {RATE}, soft: true, soft_epsilon: 0.05}}
"""
    )
    local = LocalStack(
        policy=policy, workdir=workdir, guard_args=["--keys-file", str(workdir / "keys.yaml")]
    )
    with local:
        yield local


def _natural_queries(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x_train, x_test, y_train, y_test = load_data()
    base, labels = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(base), size=count)
    noisy = np.clip(
        np.rint(base[pick] + rng.normal(0.0, 2.0, size=(count, base.shape[1]))), 0.0, 16.0
    )
    return noisy, labels[pick]


class TestCloneVerification:
    """The thief's clone carries the marks; an honest model does not; answers are stable."""

    def test_clone_is_proven_and_honest_model_is_not(
        self, stack: LocalStack, tmp_path: Path
    ) -> None:
        x, truth = _natural_queries(QUERIES, seed=11)
        served = []
        with Client(stack.ports.listener) as http:
            for start in range(0, QUERIES, 50):
                reply = http.post(
                    KSERVE,
                    {"instances": x[start : start + 50].tolist()},
                    headers={"x-api-key": KEY},
                )
                assert reply.status == 200
                served.append(np.asarray(reply.json()["predictions"]))
            again = http.post(KSERVE, {"instances": x[:50].tolist()}, headers={"x-api-key": KEY})
        probs = np.vstack(served)
        assert np.array_equal(
            np.asarray(again.json()["predictions"]), probs[:50]
        )  # repeats are identical

        with AdminClient(stack.admin_target, stack.admin_token) as admin:
            records = import_jsonl(admin.export_evidence())
        assert records and {r.client_id for r in records} == {"key:thief"}
        assert abs(len(records) / QUERIES - RATE) < 0.02  # the keyed share, within sampling error

        keys = KeyRing.from_file(stack.workdir / "keys.yaml")
        ledger_inputs = np.asarray([json.loads(r.input) for r in records])

        def verdict(model: object) -> float:
            label = label_evidence(records, keys, suspect_probs(model, ledger_inputs))
            probe, _ = _natural_queries(2000, seed=99)
            soft = verify_soft_mark(suspect_probs(model, probe), probe, keys, kid=records[0].kid)
            return combine_p_values([label.p_value, soft.p_value])

        clone = train_clone(x, probs, seed=0)
        honest = train_null(x, truth, seed=0)
        assert verdict(clone) < 1e-6
        assert verdict(honest) > 1e-3
