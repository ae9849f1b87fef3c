"""deploy/gateway/ (the Kubernetes inference gateway) against the code and the rest of deploy/: the pool
selects the loraplex pods on their HTTP port, the endpoint picker's flags name metrics the server
exports in the format the picker parses, the route sends the OpenAI API to the pool."""

from __future__ import annotations

import re

import pytest

from loraplex.server.api.config import ServerConfig
from loraplex.server.config import EngineConfig, ModelConfig
from tests.deploy.conftest import DEPLOY, k8s_object, load_yaml, load_yaml_all, parse_loraplex
from tests.deploy.test_manifests import deployment_argv

METRICS_SOURCE = (DEPLOY.parent / "server" / "api" / "metrics.py").read_text()
# the picker reads these model-server protocol metrics; each flag names loraplex's equivalent
EPP_METRIC_FLAGS = {"--total-queued-requests-metric", "--kv-cache-usage-percentage-metric", "--lora-info-metric"}


def gateway_object(kind: str, name: str) -> dict:
    for relative in load_yaml("gateway/kustomization.yaml")["resources"]:
        for doc in load_yaml_all(f"gateway/{relative}"):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/gateway/kustomization.yaml's resources")


def epp_container() -> dict:
    return gateway_object("Deployment", "loraplex-epp")["spec"]["template"]["spec"]["containers"][0]


def epp_flags() -> dict[str, str]:
    args = [str(a) for a in epp_container()["args"]]
    assert all(a.startswith("--") for a in args[::2]), "the picker's args should be --flag value pairs"
    return dict(zip(args[::2], args[1::2]))


def test_the_kustomization_names_real_files_and_core_objects_match_the_kubernetes_schema():
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
    kinds = []
    for relative in load_yaml("gateway/kustomization.yaml")["resources"]:
        assert (DEPLOY / "gateway" / relative).is_file(), relative
        for doc in load_yaml_all(f"gateway/{relative}"):
            kinds.append(doc["kind"])
            if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].startswith("rbac.authorization.k8s.io"):
                continue  # the Gateway API and Inference Extension CRDs: checked field by field below
            validate.validate(doc, validate.latest_version(), strict=True)
    assert sorted(kinds) == sorted(["InferencePool", "HTTPRoute", "ServiceAccount", "Role", "RoleBinding",
                                    "Service", "Deployment"])


def test_the_pool_selects_the_loraplex_pods_on_their_http_port():
    pool = gateway_object("InferencePool", "loraplex")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    deployment = k8s_object("Deployment", "loraplex")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    serve = parse_loraplex(deployment_argv())
    assert serve.http_port is not None, "the pool needs `serve --http-port`"
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [serve.http_port]
    container_ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert container_ports["http"] == serve.http_port
    ServerConfig(engine=EngineConfig(model=ModelConfig(path=serve.model)), port=serve.port,
                 metrics_port=serve.metrics_port, http_port=serve.http_port)  # the three ports are distinct

    picker = pool["spec"]["endpointPickerRef"]
    service = gateway_object("Service", picker["name"])
    assert picker.get("kind", "Service") == "Service" and picker["failureMode"] in {"FailOpen", "FailClose"}
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == picker["port"]["number"]]
    epp_ports = {p["name"]: p["containerPort"] for p in epp_container()["ports"]}
    assert epp_ports[port["targetPort"]] == int(epp_flags()["--grpc-port"])
    assert service["spec"]["selector"].items() <= \
        gateway_object("Deployment", "loraplex-epp")["spec"]["template"]["metadata"]["labels"].items()


def test_the_picker_watches_this_pool_with_loraplex_metric_names():
    flags = epp_flags()
    assert flags["--pool-name"] == "loraplex"
    namespace = next(e for e in epp_container()["env"] if e["name"] == "POD_NAMESPACE")
    assert flags["--pool-namespace"] == "$(POD_NAMESPACE)"
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert EPP_METRIC_FLAGS <= set(flags)
    exported = set(re.findall(r'"(loraplex_[a-z_]+)"', METRICS_SOURCE))
    for flag in EPP_METRIC_FLAGS:
        assert flags[flag] in exported, f"{flag} {flags[flag]} is not a metric of server/api/metrics.py"
    # the picker scrapes /metrics on the pool's target port unless told otherwise: loraplex serves it there too
    assert "--model-server-metrics-port" not in flags
    epp_ports = {p["name"]: p["containerPort"] for p in epp_container()["ports"]}
    assert epp_ports["grpc-health"] == int(flags["--grpc-health-port"]) == epp_container()["readinessProbe"]["grpc"]["port"]

    epp_pod = gateway_object("Deployment", "loraplex-epp")["spec"]["template"]["spec"]
    role = gateway_object("Role", "loraplex-epp")
    binding = gateway_object("RoleBinding", "loraplex-epp")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": epp_pod["serviceAccountName"]}]
    readable = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"]
                for resource in rule["resources"] if {"get", "list", "watch"} <= set(rule["verbs"])}
    assert {("inference.networking.k8s.io", "inferencepools"), ("", "pods")} <= readable
    drain = k8s_object("Deployment", "loraplex")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert epp_pod["terminationGracePeriodSeconds"] >= drain


def test_the_route_sends_the_openai_api_to_the_pool():
    route = gateway_object("HTTPRoute", "loraplex")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"][0]["kind"] == "Gateway"
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == \
        ("inference.networking.k8s.io", "InferencePool", gateway_object("InferencePool", "loraplex")["metadata"]["name"])
    prefixes = [m["path"]["value"] for m in rule["matches"] if m["path"]["type"] == "PathPrefix"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        assert any(path.startswith(prefix) for prefix in prefixes), path
    assert rule["timeouts"]["request"] == "0s", "long generations need no route timeout"
