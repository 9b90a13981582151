"""`make demo` stays true: the demo's traffic through the real stack meets its own expectations."""

from __future__ import annotations

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
        assert run_demo(workdir=tmp_path) == 0
        out = capsys.readouterr().out
        for client in ("benign anonymous", "alice (free key)", "harvester (anonymous)"):
            assert client in out
        assert "demo ok" in out
        assert "ip:127.0.0.3" in out and "action=block" in out
