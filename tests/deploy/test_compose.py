"""deploy/compose: valid against the Compose spec, and shaped the way deploy/README.md promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_files import COMPOSE_DIR, ROOT, interpolate

SERVICES = {"encoder", "llm", "gateway"}
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def check_compose_spec(*files: Path) -> subprocess.CompletedProcess:
    if not CHECK_JSONSCHEMA.exists():
        pytest.fail(f"{CHECK_JSONSCHEMA} missing: pip install check-jsonschema")
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec",
                           *map(str, files)], capture_output=True, text=True, timeout=60)


def test_compose_files_match_the_compose_spec(compose_cpu, tmp_path):
    # The CPU override uses Compose's `!reset` tag, which a plain YAML parser rejects, so the
    # merged file (what `docker compose -f compose.yaml -f compose.cpu.yaml` runs) is checked.
    merged = tmp_path / "compose.cpu.merged.yaml"
    merged.write_text(yaml.safe_dump(compose_cpu))
    out = check_compose_spec(COMPOSE_DIR / "compose.yaml", merged)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_schema_check_rejects_a_misspelt_key(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  llm:\n    image: mmserve:cpu\n    comand: [mmserve-llm]\n")
    assert check_compose_spec(bad).returncode != 0


@pytest.mark.parametrize("variant", ["compose_gpu", "compose_cpu"])
def test_three_services_only_the_gateway_published(variant, request):
    compose = request.getfixturevalue(variant)
    services = compose["services"]
    assert {name for name, svc in services.items() if not svc.get("profiles")} == SERVICES
    # The media store is opt-in (`--profile redis`), and the encoder can be pointed at it.
    assert services["redis"]["profiles"] == ["redis"]
    env = services["encoder"]["environment"]
    assert interpolate(env["MMSERVE_ENCODER_MEDIA_STORE"]) == "memory"
    assert env["MMSERVE_ENCODER_MEDIA_STORE_URL"] == "redis://redis:6379/0"
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"gateway"}
    # Loopback unless the operator opts in: the gateway may run without an API key.
    assert interpolate(services["gateway"]["ports"][0]).startswith("127.0.0.1:")


@pytest.mark.parametrize("variant", ["compose_gpu", "compose_cpu"])
def test_start_order_waits_for_health(variant, request):
    services = request.getfixturevalue(variant)["services"]
    assert services["llm"]["depends_on"] == {"encoder": {"condition": "service_healthy"}}
    assert services["gateway"]["depends_on"] == {"llm": {"condition": "service_healthy"}}
    for name in SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and "curl" not in test, f"{name}: {test}"
    for name in ("encoder", "llm"):
        assert services[name]["healthcheck"]["test"][1:4] == [
            "python", "-m", "encoder_service.healthcheck"]


def test_encoder_and_llm_get_separate_configurable_gpus(compose_gpu):
    def gpus(name: str, env: dict[str, str] | None = None) -> list[str]:
        devices = compose_gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"]
        return [interpolate(i, env) for d in devices for i in d["device_ids"]]

    assert gpus("encoder") == ["0"] and gpus("llm") == ["1"]
    assert gpus("encoder", {"ENCODER_GPU": "2"}) == ["2"]
    assert gpus("llm", {"LLM_GPU": "3"}) == ["3"]
    assert "deploy" not in compose_gpu["services"]["gateway"]


def test_cpu_override_drops_every_gpu_reservation(compose_cpu):
    for name, svc in compose_cpu["services"].items():
        if name == "redis":
            continue  # not ours: the upstream image
        assert "deploy" not in svc or not svc["deploy"], name
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
        assert interpolate(svc["image"]) == "mmserve:cpu"


@pytest.mark.parametrize("variant", ["compose_gpu", "compose_cpu"])
def test_model_yaml_read_only_and_cache_in_a_named_volume(variant, request):
    compose = request.getfixturevalue(variant)
    for name in ("encoder", "llm"):
        mounts = {m["target"]: m for m in compose["services"][name]["volumes"]}
        config = mounts["/etc/mmserve/model.yaml"]
        assert config["type"] == "bind" and config["read_only"] is True
        assert (COMPOSE_DIR / interpolate(config["source"])).resolve().is_file()
        cache = mounts["/var/cache/mmserve"]
        assert cache["type"] == "volume" and cache["source"] in compose["volumes"]
        assert "/etc/mmserve/model.yaml" in compose["services"][name]["command"]


@pytest.mark.parametrize("variant", ["compose_gpu", "compose_cpu"])
def test_build_points_at_dockerfiles_that_exist(variant, request):
    for name, svc in request.getfixturevalue(variant)["services"].items():
        if name == "redis":
            continue
        context = (COMPOSE_DIR / svc["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / interpolate(svc["build"]["dockerfile"])).is_file(), name
