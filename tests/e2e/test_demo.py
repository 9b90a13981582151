"""`make demo` stays true: the demo's traffic through the real stack meets its own expectations,
and its red team prints the side-by-side table and writes both reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extauthz.demo.run import run_demo
from tests.e2e.conftest import require_envoy


class TestDemo:
    """The demo runs model + guard + Envoy, sends its traffic and exits 0."""

    def test_demo_exits_zero_and_reports_every_client(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        require_envoy()
        reports = tmp_path / "reports"
        assert run_demo(workdir=tmp_path / "stack", budget=200, report_dir=reports) == 0
        out = capsys.readouterr().out
        for client in ("benign anonymous", "alice (free key)", "harvester (anonymous)"):
            assert client in out
        assert "demo ok" in out
        assert "ip:127.0.0.3" in out and "action=block" in out
        assert "undefended vs defended" in out and "benign clients" in out
        doc = json.loads((reports / "redteam-report.json").read_text())
        assert [run["label"] for run in doc["runs"]] == ["undefended", "defended"]
        assert doc["budget"] == 200
        assert "<svg" in (reports / "redteam-report.html").read_text()
