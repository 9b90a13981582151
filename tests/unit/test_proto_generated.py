"""The generated admin API code matches proto/ (``make proto`` regenerates it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class TestGeneratedCode:
    """extauthz/_proto is exactly what scripts/gen_proto.py makes from proto/."""

    def test_generated_code_is_up_to_date(self) -> None:
        result = subprocess.run(
            [sys.executable, "scripts/gen_proto.py", "--check"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr

    def test_check_detects_a_stale_file(self, tmp_path: Path) -> None:
        generated = ROOT / "extauthz/_proto/v1/admin_pb2.pyi"
        original = generated.read_bytes()
        try:
            generated.write_bytes(original + b"\n# drift\n")
            result = subprocess.run(
                [sys.executable, "scripts/gen_proto.py", "--check"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
        finally:
            generated.write_bytes(original)
        assert result.returncode == 1
        assert "admin_pb2.pyi" in result.stderr

    def test_admin_service_is_importable_under_the_package(self) -> None:
        from extauthz._proto.v1 import admin_pb2, admin_pb2_grpc

        assert admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name == "extauthz.v1.Admin"
        assert hasattr(admin_pb2_grpc, "AdminStub")
