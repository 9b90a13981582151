"""Generate extauthz/_proto/ from proto/ (``make proto``); ``--check`` fails when they differ.

protoc's virtual include path maps proto/extauthz/v1 to extauthz/_proto/v1, so the generated
modules import each other as ``extauthz._proto.v1`` without any rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("admin.proto",)
OUT_PACKAGE = Path("extauthz/_proto/v1")


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    (out_root / OUT_PACKAGE).mkdir(parents=True, exist_ok=True)
    for name in PROTOS:
        args = [
            "protoc",
            f"-I{OUT_PACKAGE.as_posix()}={(ROOT / 'proto/extauthz/v1').as_posix()}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"{OUT_PACKAGE.as_posix()}/{name}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {name}")
    for package in (out_root / "extauthz/_proto", out_root / OUT_PACKAGE):
        (package / "__init__.py").write_text(
            '"""Generated from proto/ by scripts/gen_proto.py; never edit."""\n'
        )
    files = (out_root / "extauthz/_proto").rglob("*")
    return sorted(
        p.relative_to(out_root) for p in files if p.is_file() and "__pycache__" not in p.parts
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed code instead"
    )
    args = parser.parse_args()
    if not args.check:
        files = generate(ROOT)
        print("generated:", ", ".join(str(f) for f in files))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = [
            f
            for f in files
            if not (ROOT / f).is_file() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
        ]
    if stale:
        print(
            "stale generated code (run `make proto`):", ", ".join(map(str, stale)), file=sys.stderr
        )
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
