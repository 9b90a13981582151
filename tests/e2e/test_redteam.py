"""The red team through the real Envoy and the guard with the demo policy: a smoke run of
``extauthz redteam`` at a small budget whose JSON report matches the published schema, whose
HTML report is written, and whose guarded numbers show the guard at work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from extauthz.demo.local import LocalStack
from extauthz.demo.workspace import prepare
from extauthz.redteam.cli import main
from tests.e2e.conftest import require_envoy

SCHEMA = json.loads((Path(__file__).parents[2] / "extauthz/redteam/report.schema.json").read_text())
KSERVE = "/v1/models/digits:predict"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    require_envoy()
    workdir = tmp_path_factory.mktemp("redteam")
    files = prepare(workdir)
    with LocalStack(policy=files.policy, workdir=workdir, guard_args=files.guard_args) as local:
        yield local


def _thieves(first: int, count: int) -> tuple[str, str]:
    keys = ",".join(f"demo-thief-{i:02d}-key" for i in range(first, first + count))
    ids = ",".join(f"key:thief-{i:02d}" for i in range(first, first + count))
    return keys, ids


def _guard_flags(stack: LocalStack) -> list[str]:
    return [
        "--admin", stack.admin_target,
        "--admin-token-file", str(stack.admin_token_file),
        "--keys-file", str(stack.workdir / "keys.yaml"),
        "--noise-key-file", str(stack.workdir / "noise.key"),
    ]  # fmt: skip


def _valid(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc  # type: ignore[no-any-return]


class TestRedTeamSmoke:
    """Every classifier attack and the benign clients run through Envoy; the report is valid."""

    def test_json_report_matches_the_schema(self, stack: LocalStack, tmp_path: Path) -> None:
        keys, ids = _thieves(0, 6)
        out, page = tmp_path / "report.json", tmp_path / "report.html"
        code = main(
            [
                "--target", f"http://127.0.0.1:{stack.ports.listener}{KSERVE}",
                "--reference", f"http://127.0.0.1:{stack.ports.model}",
                "--equation-path", "/v1/models/digits-linear:predict",
                "--budget", "96",
                "--batch", "32",
                "--keys", keys,
                "--client-ids", ids,
                "--benign-clients", "2",
                "--benign-queries", "48",
                "--benign-keys", "demo-user-00-key,demo-user-01-key",
                "--benign-client-ids", "key:user-00,key:user-01",
                "--label", "defended",
                "--json", str(out),
                "--html", str(page),
                *_guard_flags(stack),
            ]
        )  # fmt: skip
        assert code == 0
        doc = _valid(out)
        run = doc["runs"][0]  # type: ignore[index]
        attacks = {a["attack"]: a for a in run["attacks"]}
        assert set(attacks) == {
            "knockoff", "knockoff-adaptive", "uniform", "jacobian", "linesearch", "equation"
        }  # fmt: skip
        for attack in attacks.values():
            assert attack["sent"] == 96 and attack["fidelity"] is not None
            assert attack["risk"], "risk samples recorded through the admin API"
        assert run["benign"]["refusals"] == 0 and run["benign"]["queries"] == 96
        html = page.read_text()
        assert html.startswith("<!DOCTYPE html>") and "<svg" in html

    def test_logprob_probe_is_refused_on_the_free_tier(
        self, stack: LocalStack, tmp_path: Path
    ) -> None:
        out = tmp_path / "probe.json"
        code = main(
            [
                "--target", f"http://127.0.0.1:{stack.ports.listener}/v1/chat/completions",
                "--dialect", "openai",
                "--reference", f"http://127.0.0.1:{stack.ports.model}",
                "--keys", "demo-thief-20-key",
                "--json", str(out),
            ]
        )  # fmt: skip
        assert code == 0
        probe = _valid(out)["runs"][0]["attacks"][0]  # type: ignore[index]
        assert probe["attack"] == "logprob_probe"
        # logit_bias with logprobs is refused (400) for free keys: only the unbiased top-5 is read.
        assert probe["first_refusal"] == 1 and probe["statuses"].get("400", 0) >= 1
        assert probe["fidelity"] < 0.05
