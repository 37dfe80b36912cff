"""deploy/docker/gpu_env.py: mmserve installs around the TensorRT-LLM container's packages and
the image build stops on a broken environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "gpu_env.py"


@pytest.fixture(scope="module")
def gpu_env():
    spec = importlib.util.spec_from_file_location("gpu_env", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_installed_package_and_read_back(gpu_env):
    packages = {"torch": "2.9.0a0+145a3a7bda.nv25.10", "transformers": "4.57.1",
                "tensorrt-llm": "1.2.1"}
    text = gpu_env.constraints(packages)
    assert "transformers==4.57.1\n" in text and "torch==2.9.0a0+145a3a7bda.nv25.10\n" in text
    assert gpu_env.parse_constraints(text) == packages
    assert gpu_env.parse_constraints("Tensorrt_LLM==1.2.1\n# comment\n") == {
        "tensorrt-llm": "1.2.1"}


def test_a_replaced_or_removed_package_is_named(gpu_env):
    before = {"transformers": "4.57.1", "torch": "2.9.0", "numpy": "1.26.4"}
    after = {"transformers": "5.24.0", "numpy": "1.26.4", "gguf": "0.17.1"}
    assert gpu_env.replaced(before, after) == ["torch 2.9.0 -> removed",
                                               "transformers 4.57.1 -> 5.24.0"]


def test_only_pip_check_problems_the_base_did_not_have_count(gpu_env):
    base = ["tensorrt-llm 1.2.1 has requirement nvidia-nccl-cu13==2.27.7, but you have 2.28.3."]
    now = [*base, "mmserve 0.1.0 has requirement transformers<6,>=4.57, but you have 4.53.1."]
    assert gpu_env.new_problems(base, now) == [now[1]]


def test_requirements_are_the_project_ones_plus_extras(gpu_env):
    lines = gpu_env.requirements(ROOT / "pyproject.toml", ["gpu"])
    assert "transformers>=4.57,<6" in lines and "tensorrt>=10" in lines
    with pytest.raises(SystemExit, match="unknown extras"):
        gpu_env.requirements(ROOT / "pyproject.toml", ["cuda"])


def test_snapshot_then_check_deps_passes_on_an_untouched_environment(tmp_path):
    snapshot = tmp_path / "container.txt"
    run = [sys.executable, str(SCRIPT)]
    assert subprocess.run([*run, "snapshot", str(snapshot)], check=False).returncode == 0
    assert "torch==" in snapshot.read_text()
    result = subprocess.run([*run, "check-deps", str(snapshot)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    snapshot.write_text(snapshot.read_text().replace("torch==", "torch==0.0.1+"))
    result = subprocess.run([*run, "check-deps", str(snapshot)], capture_output=True, text=True)
    assert result.returncode == 1 and "replaced a package of the base image: torch" in result.stderr


def check_imports(version: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fakes"), str(ROOT)]),
           "MMSERVE_FAKE_TRTLLM_VERSION": version}
    return subprocess.run([sys.executable, str(SCRIPT), "check-imports"], env=env,
                          capture_output=True, text=True, timeout=120, cwd="/")


def test_check_imports_passes_with_the_1_2_executor_and_fails_without_one():
    ok = check_imports("1.2.1")
    assert ok.returncode == 0, ok.stderr
    assert "TensorRT-LLM 1.2.1: C++ executor binding loads" in ok.stdout
    assert "llm_service.engine.trtllm.engine: imports" in ok.stdout
    broken = check_imports("1.3.0")
    assert broken.returncode == 1
    assert "tensorrt_llm 1.3.0 does not have" in broken.stderr and "1.2.x" in broken.stderr
