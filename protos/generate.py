"""Generates the Python gRPC stubs for every .proto in this folder.

Run from anywhere: ``python protos/generate.py``. The stubs are written next to
the .proto files and are git-ignored; generating from the repository root makes
the cross-file imports come out as ``from protos import common_pb2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from grpc_tools import protoc  # build-time dependency
    import grpc_tools

    protos = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *protos]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    print(f"generated stubs for {', '.join(protos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
