"""deploy/k8s: each overlay renders, every object is valid Kubernetes, the pieces fit together."""

from __future__ import annotations

import pytest
import yaml

from deploy_files import K8S, ROOT, flag_value, objects, render_overlay

try:
    import kubernetes_validate
except ImportError:  # a dev dependency; fail loudly rather than skip the schema checks
    kubernetes_validate = None

# gRPC probes are GA since 1.27; the newest is what current clusters run.
K8S_VERSIONS = ("1.27.0", "1.33.0")
POOLS = ("encoder", "llm")


def validation_errors(docs, version: str) -> list[str]:
    if kubernetes_validate is None:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate")
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")
    return errors


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_is_valid(rendered, version):
    assert len(rendered) > 10
    assert validation_errors(rendered, version) == []


def test_queue_depth_hpa_example_is_valid():
    docs = list(yaml.safe_load_all((K8S / "examples" / "hpa-queue-depth.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"HorizontalPodAutoscaler"}
    for version in K8S_VERSIONS:
        assert validation_errors(docs, version) == []
    names = {d["spec"]["scaleTargetRef"]["name"] for d in docs}
    assert names <= set(objects(render_overlay("cpu"), "Deployment"))


def test_validation_rejects_a_probe_port_by_name():
    # Native gRPC probes take a number, not a port name: the kind of slip this suite must catch.
    (deployment,) = [d for d in render_overlay("cpu") if d["metadata"]["name"] == "mmserve-encoder"
                     and d["kind"] == "Deployment"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    container(broken)["readinessProbe"]["grpc"]["port"] = "grpc"
    assert validation_errors([broken], K8S_VERSIONS[0]) != []


def test_model_configmap_matches_the_repository_config():
    shipped = yaml.safe_load((ROOT / "mmserve" / "configs" / "smollm2-demo.yaml").read_text())
    assert yaml.safe_load((K8S / "base" / "model.yaml").read_text()) == shipped


def test_services_hpas_and_pdbs_target_real_pods(rendered):
    deployments = objects(rendered, "Deployment")
    assert set(deployments) == {"mmserve-encoder", "mmserve-llm", "mmserve-gateway",
                                "mmserve-redis"}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in objects(rendered, kind).items():
            selector = obj["spec"]["selector"]
            selector = selector if kind == "PodDisruptionBudget" else {"matchLabels": selector}
            assert selects(selector, pod_labels[name]), f"{kind}/{name} selects no pods"
    hpas = objects(rendered, "HorizontalPodAutoscaler")
    assert set(hpas) == set(deployments) - {"mmserve-redis"}  # one store, not scaled
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": name}
    services = objects(rendered, "Service")
    for pool in POOLS:  # headless: clients resolve every ready pod and balance themselves
        assert services[f"mmserve-{pool}"]["spec"]["clusterIP"] == "None"


def test_probes_resources_and_security(rendered):
    for name, deployment in objects(rendered, "Deployment").items():
        c = container(deployment)
        for probe in ("readinessProbe", "livenessProbe"):
            kind = {"mmserve-gateway": "httpGet", "mmserve-redis": "tcpSocket"}.get(name, "grpc")
            assert kind in c[probe], f"{name} {probe}"
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), f"{name} {part}"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_pods_outlast_the_services_drain(rendered):
    """SIGKILL (terminationGracePeriodSeconds) comes only after each service's drain."""
    services = {name: d for name, d in objects(rendered, "Deployment").items()
                if container(d)["command"][0].startswith("mmserve-")}
    assert len(services) == 3  # gateway, LLM, encoder (Redis is not ours)
    for name, deployment in services.items():
        grace = flag_value(container(deployment)["args"], "--shutdown-grace-s")
        assert grace is not None, f"{name} sets no --shutdown-grace-s"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= float(grace) + 10, name


def test_gpus_only_in_the_gpu_overlay_on_separate_pools(rendered, overlay):
    deployments = objects(rendered, "Deployment")
    gpus = {n: container(d)["resources"]["limits"].get("nvidia.com/gpu")
            for n, d in deployments.items()}
    if overlay == "cpu":
        assert set(gpus.values()) == {None}
        return
    assert gpus == {"mmserve-encoder": 1, "mmserve-llm": 1, "mmserve-gateway": None,
                    "mmserve-redis": None}
    selectors = {n: d["spec"]["template"]["spec"].get("nodeSelector")
                 for n, d in deployments.items()}
    assert selectors["mmserve-encoder"] != selectors["mmserve-llm"]
    for pool in POOLS:
        pod = deployments[f"mmserve-{pool}"]["spec"]["template"]["spec"]
        assert selectors[f"mmserve-{pool}"], pool
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), pool
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v]
        assert set(claims) <= set(objects(rendered, "PersistentVolumeClaim")) and claims, pool


def allowed_sources(rendered, component: str) -> tuple[set[str], set[int]]:
    """Components whose pods may open connections to `component`'s pods, and on which ports."""
    labels = {"app.kubernetes.io/name": "mmserve", "app.kubernetes.io/component": component}
    sources: set[str] = set()
    ports: set[int] = set()
    for policy in objects(rendered, "NetworkPolicy").values():
        spec = policy["spec"]
        if "Ingress" not in spec["policyTypes"] or not selects(spec["podSelector"], labels):
            continue
        for rule in spec.get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']} lets anyone in"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, peer
                sources.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
            ports |= {p["port"] for p in rule.get("ports", [])}
    return sources, ports


def test_network_policy_chain_gateway_llm_encoder(rendered):
    policies = objects(rendered, "NetworkPolicy")
    default_deny = [p for p in policies.values()
                    if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert default_deny, "no default-deny ingress policy"
    services = objects(rendered, "Service")
    for target, source in (("llm", "gateway"), ("encoder", "llm"), ("redis", "encoder")):
        sources, ports = allowed_sources(rendered, target)
        assert sources == {source}
        assert ports == {p["port"] for p in services[f"mmserve-{target}"]["spec"]["ports"]}


def test_mounted_config_and_api_keys_exist(rendered):
    configmaps = {n.rsplit("-", 1)[0]: cm for n, cm in objects(rendered, "ConfigMap").items()}
    assert yaml.safe_load(configmaps["mmserve-model"]["data"]["model.yaml"])["model"]
    secrets = objects(rendered, "Secret")
    for deployment in objects(rendered, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container(deployment).get("volumeMounts", []):
            source = volumes[mount["name"]]
            if "configMap" in source:
                assert source["configMap"]["name"] in objects(rendered, "ConfigMap")
            if "secret" in source:
                assert source["secret"]["secretName"] in secrets


def test_encoders_use_the_redis_media_store_service(rendered):
    """Every encoder replica reads the same store: the ConfigMap it loads names the Redis
    Service and port, and the settings build a valid encoder config."""
    from encoder_service.config import EncoderConfig

    configmaps = objects(rendered, "ConfigMap")
    (encoder,) = [d for n, d in objects(rendered, "Deployment").items() if n == "mmserve-encoder"]
    (source,) = container(encoder)["envFrom"]
    env = configmaps[source["configMapRef"]["name"]]["data"]
    url = env["MMSERVE_ENCODER_MEDIA_STORE_URL"]
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    redis = objects(rendered, "Service")[host.split(".")[0]]
    assert int(port) in {p["port"] for p in redis["spec"]["ports"]}
    assert host.split(".")[1] == redis["metadata"]["namespace"]
    config = EncoderConfig(media_store=env["MMSERVE_ENCODER_MEDIA_STORE"], media_store_url=url,
                           media_store_ttl_s=float(env["MMSERVE_ENCODER_MEDIA_STORE_TTL_S"]))
    assert config.media_store == "redis"
