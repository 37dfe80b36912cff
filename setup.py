"""The package build generates the gRPC stubs (protos/*_pb2*.py and .pyi, git-ignored).

Everything else about the package is in pyproject.toml. Generating from the repository
root makes the stubs' imports come out as `from protos import common_pb2` (no rewriting).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        try:
            subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py")], check=True)
        except subprocess.CalledProcessError as exc:
            raise SetupError(f"generating the gRPC stubs failed (exit {exc.returncode}); "
                             "grpcio-tools is a build requirement") from exc
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
