"""Generates the Python for every .proto under protos/ with grpcio-tools.

Both `make protos` and the freshness test call this, so the committed code and the
check can never disagree about how it is produced. Paths are given relative to the
repository root, which makes the generated imports absolute (`protos.cri.runtime.v1`).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generated_files(root: Path) -> list[Path]:
    """Every generated file under root/protos, relative to root."""
    base = root / "protos"
    return sorted(
        p.relative_to(root)
        for p in base.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def generate(out_dir: Path) -> None:
    """Writes the generated modules for all sources into out_dir (a repository root)."""
    from grpc_tools import protoc  # dev dependency; imported late so the runtime need not have it

    include = str(resources.files("grpc_tools") / "_proto")
    # mypy-protobuf's plugins write typed stubs (.pyi) for messages and for the sync and
    # asyncio gRPC stubs; they are installed next to this interpreter.
    scripts = Path(sysconfig.get_path("scripts"))
    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its output above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root")
    args = parser.parse_args(argv)
    generate(args.out)
    for path in generated_files(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
