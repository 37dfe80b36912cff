"""deploy/ against the real code: every flag exists, every port and address lines up.

Commands come from the compose files, the rendered kustomize overlays and the Dockerfiles; flags are
checked against each CLI's own `--help`, so renaming a flag in a service breaks this test, not a
deployment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_files import (DEPLOY, DOCKERFILES, OVERLAYS, ROOT, cli_options, dockerfile_cmd,
                          dockerfile_instructions, flag_value, load_compose, merge_compose,
                          module_of, objects, overlay_id, render_overlay)

THIRD_PARTY = ("redis-server",)  # upstream images: their flags are not ours to check
HTTP_PROBE = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w/-]*)")


def unknown_flags(module: str, args: list[str]) -> list[str]:
    """Flags in `args` that `python -m module` does not accept, or values outside its choices."""
    options = cli_options(module)
    problems = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if name not in options:
            problems.append(f"{module}: unknown flag {name}")
            continue
        choices = options[name]
        given = value if eq else (args[i + 1] if i + 1 < len(args) else None)
        if choices is not None and given not in choices:
            problems.append(f"{module}: {name} {given!r} not in {sorted(choices)}")
    return problems


def compose_variants() -> dict[str, dict]:
    base = load_compose("compose.yaml")
    return {"compose.yaml": base,
            "compose.cpu.yaml": merge_compose(base, load_compose("compose.cpu.yaml"))}


def commands(source: str) -> dict[str, list[str]]:
    """Every mmserve command a deploy source runs, by a readable id."""
    found: dict[str, list[str]] = {}
    if source.startswith("compose"):
        for file, compose in compose_variants().items():
            for name, svc in compose["services"].items():
                if svc["command"][0] in THIRD_PARTY:
                    continue
                found[f"{file}:{name}"] = svc["command"]
                test = svc["healthcheck"]["test"]
                if test[1:3] != ["python", "-c"]:
                    found[f"{file}:{name}:healthcheck"] = test[1:]
    elif source.startswith("k8s/"):
        for name, d in objects(render_overlay(source.split("/")[1]), "Deployment").items():
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["command"][0] not in THIRD_PARTY:
                    found[f"{source}:{name}"] = c["command"] + c.get("args", [])
    else:
        for path in DOCKERFILES:
            found[path.name] = dockerfile_cmd(path)
    return found


def test_the_flag_check_catches_a_renamed_flag():
    assert unknown_flags("llm_service", ["--port", "1", "--encoder-adress", "x"]) == [
        "llm_service: unknown flag --encoder-adress"]
    assert unknown_flags("llm_service", ["--engine", "vllm"]) == [
        "llm_service: --engine 'vllm' not in ['torch', 'trtllm']"]


@pytest.mark.parametrize("source", ["compose", *(f"k8s/{o}" for o in OVERLAYS), "dockerfiles"])
def test_every_flag_exists_in_the_real_cli(source):
    found = commands(source)
    assert found
    problems = []
    for where, command in found.items():
        module, args = module_of(command)
        problems += [f"{where}: {p}" for p in unknown_flags(module, args)]
    assert problems == []


@pytest.mark.parametrize("source", ["compose", *(f"k8s/{o}" for o in OVERLAYS)])
def test_every_service_command_builds_its_config(source, tmp_path):
    # Flags exist is not enough: values must parse and the model YAML must validate. Each service
    # resolves its full config with --print-config and exits, with container paths mapped to
    # the files they are mounted from.
    keys = tmp_path / "api-keys"
    keys.write_text("# placeholder\nkey-1\n")
    model = DEPLOY / "k8s" / "base" / "model.yaml" if source.startswith("k8s") else \
        ROOT / "mmserve" / "configs" / "smollm2-demo.yaml"
    paths = {"/etc/mmserve/model.yaml": str(model), "/etc/mmserve-keys/api-keys": str(keys),
             "/var/cache/mmserve": str(tmp_path)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    services = {tuple(c) for where, c in commands(source).items() if "healthcheck" not in where}
    assert len(services) == 3
    for command in sorted(services):
        module, args = module_of(list(command))
        args = [paths.get(a, a) for a in args]
        out = subprocess.run([sys.executable, "-m", module, *args, "--print-config"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{module} {' '.join(args)}:\n{out.stderr[-2000:]}"


def gateway_route_exists(path: str) -> bool:
    routes = "\n".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    return f'.get("{path}")' in routes


@pytest.mark.parametrize("file", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_ports_and_addresses_line_up(file):
    services = compose_variants()[file]["services"]
    port = {name: flag_value(svc["command"], "--port") for name, svc in services.items()}
    assert all(port.values()), port
    for name in ("encoder", "llm"):
        assert flag_value(services[name]["healthcheck"]["test"], "--address") == \
            f"127.0.0.1:{port[name]}"
    encoder_address = flag_value(services["llm"]["command"], "--encoder-address")
    assert encoder_address == f"encoder:{port['encoder']}"
    assert flag_value(services["gateway"]["command"], "--llm-address") == f"llm:{port['llm']}"

    probe = services["gateway"]["healthcheck"]["test"]
    assert probe[1:3] == ["python", "-c"]
    compile(probe[3], "<gateway healthcheck>", "exec")
    probe_port, path = HTTP_PROBE.search(probe[3]).groups()
    assert probe_port == port["gateway"] and gateway_route_exists(path)
    (published,) = services["gateway"]["ports"]
    assert published.rsplit(":", 1)[1] == port["gateway"]


def resolve_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def address_target(address: str, rendered) -> tuple[dict, int]:
    """The Service a `dns:///name.ns.svc.cluster.local:port` address names, and the port it uses."""
    match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", address)
    assert match, f"{address} is not a cluster DNS name"
    name, namespace, port = match.groups()
    service = objects(rendered, "Service")[name]
    assert service["metadata"]["namespace"] == namespace, address
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    return service, svc_port["targetPort"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_k8s_ports_probes_and_addresses_line_up(overlay):
    rendered = render_overlay(overlay)
    deployments = objects(rendered, "Deployment")
    ports = {}
    for name, d in deployments.items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        args = c["command"] + c["args"]
        port = int(flag_value(args, "--port"))
        ports[name] = port
        metrics = flag_value(args, "--metrics-port")  # Prometheus, beside the service port
        expected = [port] + ([int(metrics)] if metrics else [])
        assert [p["containerPort"] for p in c["ports"]] == expected, name
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                probe = c[kind].get("grpc") or c[kind].get("httpGet") or c[kind]["tcpSocket"]
                assert resolve_port(c, probe["port"]) == port, f"{name} {kind}"
                if "path" in probe:
                    assert gateway_route_exists(probe["path"]), probe["path"]
        service = objects(rendered, "Service")[name]
        (svc_port,) = service["spec"]["ports"]
        assert resolve_port(c, svc_port["targetPort"]) == port, name

    for client, flag, server in (("mmserve-llm", "--encoder-address", "mmserve-encoder"),
                                 ("mmserve-gateway", "--llm-address", "mmserve-llm")):
        (c,) = deployments[client]["spec"]["template"]["spec"]["containers"]
        service, target = address_target(flag_value(c["args"], flag), rendered)
        assert service["metadata"]["name"] == server
        (server_c,) = deployments[server]["spec"]["template"]["spec"]["containers"]
        assert resolve_port(server_c, target) == ports[server]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_k8s_file_flags_point_into_mounted_keys(overlay):
    rendered = render_overlay(overlay)
    data = {**{(n, "configMap"): cm["data"] for n, cm in objects(rendered, "ConfigMap").items()},
            **{(n, "secret"): {**s.get("data", {}), **s.get("stringData", {})}
               for n, s in objects(rendered, "Secret").items()}}
    checked = 0
    for name, d in objects(rendered, "Deployment").items():
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for flag in ("--config", "--api-key-file"):
            path = flag_value(c["args"], flag)
            if path is None:
                continue
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(Path(path).parent)]
            volume = volumes[mount["name"]]
            ref = (volume["configMap"]["name"], "configMap") if "configMap" in volume else \
                (volume["secret"]["secretName"], "secret")
            assert Path(path).name in data[ref], f"{name} {flag} {path}"
            checked += 1
    assert checked == 3  # encoder and LLM read the model YAML, the gateway its key file


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_healthcheck_and_exposed_ports_match(path):
    instructions = dockerfile_instructions(path)
    cmd = dockerfile_cmd(path)
    (healthcheck,) = [rest for op, rest in instructions if op == "HEALTHCHECK"]
    probe_port, probe_path = HTTP_PROBE.search(healthcheck).groups()
    assert probe_port == flag_value(cmd, "--port") and gateway_route_exists(probe_path)
    exposed = {int(p) for op, rest in instructions if op == "EXPOSE" for p in rest.split()}
    used = {int(flag_value(svc["command"], "--port"))
            for svc in compose_variants()["compose.yaml"]["services"].values()
            if svc["command"][0] not in THIRD_PARTY}
    assert exposed == used
