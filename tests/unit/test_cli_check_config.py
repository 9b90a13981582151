"""`extauthz check-config FILE`: 0 and a summary for a usable policy, 1 and the YAML path otherwise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from extauthz.cli import main
from extauthz.policy.loader import default_policy_text

WriteFile = Callable[[str, str], Path]
KeyDigest = Callable[[str], str]


class TestCheckConfig:
    """check-config validates a policy file without starting anything."""

    def test_good_file_prints_ok(
        self, write_file: WriteFile, key_digest: KeyDigest, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write_file(
            "policy.yaml",
            f"""
            mode: shadow
            identity:
              api_keys:
                - {{name: alice, sha256: '{key_digest("k")}', tier: free}}
            """,
        )
        assert main(["check-config", str(path)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith(f"{path}: ok")
        assert "mode shadow" in out
        assert "1 API keys" in out
        assert err == ""

    def test_built_in_default_checks_ok(
        self, write_file: WriteFile, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write_file("default.yaml", default_policy_text())
        assert main(["check-config", str(path)]) == 0
        out, _ = capsys.readouterr()
        assert "tiers anonymous, free, trusted" in out

    def test_bad_file_names_the_yaml_path_on_stderr(
        self, write_file: WriteFile, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write_file("policy.yaml", "tiers:\n  anonymous: {}\n  free: {max_instances: -3}\n")
        assert main(["check-config", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert f"{path}: invalid" in err
        assert "tiers.free.max_instances: " in err

    def test_every_problem_is_listed(
        self, write_file: WriteFile, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write_file("policy.yaml", "mode: loud\nbogus: 1\n")
        assert main(["check-config", str(path)]) == 1
        _, err = capsys.readouterr()
        assert "mode: " in err
        assert "bogus: unknown field" in err

    def test_missing_keys_file_fails(
        self, write_file: WriteFile, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write_file("policy.yaml", "identity: {keys_file: keys.yaml}\n")
        assert main(["check-config", str(path)]) == 1
        _, err = capsys.readouterr()
        assert "identity.keys_file: cannot read" in err

    def test_missing_file_fails(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", str(tmp_path / "absent.yaml")]) == 1
        _, err = capsys.readouterr()
        assert "cannot read" in err

    def test_file_argument_is_required(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as caught:
            main(["check-config"])
        assert caught.value.code == 2
        assert "file" in capsys.readouterr().err
