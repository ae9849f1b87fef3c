"""deploy/ against the code: every file parses (and matches its tool's schema where the schema is
installable), every `loraplex` command line parses with the real CLI, ports and probes agree across
the Dockerfile, compose, Kubernetes, Envoy and Prometheus, and Prometheus accepts its files."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from loraplex.clients import ADAPTER_HEADER
from loraplex.server.api.config import ServerConfig
from loraplex.server.api.server import SERVICES
from loraplex.server.config import AdapterConfig, EngineConfig, ModelConfig
from tests.deploy.conftest import (DEPLOY, alert_expressions, dashboard_queries, dockerfile_instructions,
                                   dockerfile_json, k8s_object, load_yaml, load_yaml_all, loraplex_calls_in_shell,
                                   parse_loraplex, promql_metric_names)

yaml = pytest.importorskip("yaml", reason="PyYAML (test extra) is not installed")

OLDEST_KUBERNETES = "1.27.0"  # gRPC container probes are GA from 1.27


# ---------------------------------------------------------------------- helpers
def deployment_container() -> dict:
    return k8s_object("Deployment", "loraplex")["spec"]["template"]["spec"]["containers"][0]


def deployment_argv() -> list[str]:
    """The container's args with each $(VAR) expanded from the ConfigMap, as the kubelet does."""
    container = deployment_container()
    config = k8s_object("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]

    def expand(arg: str) -> str:
        def one(match):
            assert match.group(1) in config, f"$({match.group(1)}) is not in the ConfigMap"
            return config[match.group(1)]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)

    return [expand(str(arg)) for arg in container["args"]]


def compose() -> dict:
    return load_yaml("docker-compose.yaml")


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def envoy_clusters() -> dict[str, dict]:
    return {c["name"]: c for c in load_yaml("envoy/envoy.yaml")["static_resources"]["clusters"]}


def envoy_listener(name: str) -> dict:
    listeners = load_yaml("envoy/envoy.yaml")["static_resources"]["listeners"]
    return next(listener for listener in listeners if listener["name"] == name)


def envoy_routes() -> list[dict]:
    manager = envoy_listener("grpc")["filter_chains"][0]["filters"][0]["typed_config"]
    return [route for host in manager["route_config"]["virtual_hosts"] for route in host["routes"]]


def check_serve_settings(args) -> None:
    """Build the configs `loraplex serve` would build from these flags (the model directory need not exist)."""
    AdapterConfig(max_rank=args.max_rank, max_device_adapters=args.max_device_adapters,
                  max_host_adapters=args.max_host_adapters)
    ServerConfig(engine=EngineConfig(model=ModelConfig(path=Path("/models"))), host=args.host, port=args.port,
                 metrics_port=args.metrics_port, http_port=args.http_port, drain_grace=args.drain_grace,
                 max_queued_requests=args.max_queued_requests)


# ---------------------------------------------------------------------- every file parses
def test_every_file_parses_and_the_kustomization_names_real_files():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert len(files) >= 14, files
    for path in files:
        text = path.read_text()
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert docs and all(isinstance(d, dict) for d in docs if d is not None), path
    kustomization = load_yaml("kustomization.yaml")
    named = list(kustomization["resources"])
    named += [f.split("=", 1)[-1] for g in kustomization["configMapGenerator"] for f in g["files"]]
    for relative in named:
        assert (DEPLOY / relative).is_file(), f"kustomization.yaml names {relative}, which does not exist"


def test_kubernetes_objects_match_the_kubernetes_schema():
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
    checked = 0
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml_all(f"k8s/{path.name}"):
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD of the Prometheus Operator: no schema in Kubernetes itself
            for version in (OLDEST_KUBERNETES, validate.latest_version()):
                validate.validate(doc, version, strict=True)  # strict: an unknown (misspelt) field fails
            checked += 1
    assert checked >= 9


def test_kustomize_builds_and_wires_the_generated_router_config():
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    command = [tool, "build", str(DEPLOY)] if tool.endswith("kustomize") else [tool, "kustomize", str(DEPLOY)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    router_config = next(name for kind, name in objects if kind == "ConfigMap" and name.startswith("loraplex-router-"))
    router = objects[("Deployment", "loraplex-router")]["spec"]["template"]["spec"]
    assert router["volumes"][0]["configMap"]["name"] == router_config
    assert yaml.safe_load(objects[("ConfigMap", router_config)]["data"]["envoy.yaml"]) == load_yaml("envoy/envoy.yaml")
    assert {("Deployment", "loraplex"), ("Service", "loraplex"), ("PodDisruptionBudget", "loraplex"),
            ("ConfigMap", "loraplex-serve"), ("Service", "loraplex-router")} <= set(objects)


def test_envoy_config_matches_the_envoy_api():
    config = load_yaml("envoy/envoy.yaml")
    text = json.dumps(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generated modules warn about their own pydantic use
        pytest.importorskip("envoy_data_plane", reason="envoy-data-plane (test extra) is not installed")
        from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

        for type_url in set(re.findall(r'"@type": "type\.googleapis\.com/([\w.]+)"', text)):
            importlib.import_module("envoy_data_plane." + type_url.rsplit(".", 1)[0])  # registers the Any type
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no field Envoy deprecated
        bootstrap = Bootstrap.from_dict(config)  # unknown fields and enum values raise
    assert {c.name for c in bootstrap.static_resources.clusters} == set(envoy_clusters())
    broken = json.loads(text)
    broken["static_resources"]["clusters"][0]["lb_policy"] = "MAGLEVV"
    with pytest.raises(ValueError):
        Bootstrap.from_dict(broken)


# ---------------------------------------------------------------------- loraplex command lines
def test_every_loraplex_command_line_parses_with_the_real_cli():
    """Dockerfile ENTRYPOINT + CMD and HEALTHCHECK, the compose services, the Kubernetes args."""
    assert dockerfile_json("ENTRYPOINT") == ["loraplex"]
    image_serve = parse_loraplex(dockerfile_json("CMD"))
    healthcheck = dockerfile_json("HEALTHCHECK")
    assert healthcheck[0] == "loraplex"
    parse_loraplex(healthcheck[1:])

    services = compose()["services"]
    compose_serve = parse_loraplex(services["loraplex"]["command"])
    compose_health = services["loraplex"]["healthcheck"]["test"]
    assert compose_health[:2] == ["CMD", "loraplex"]
    parse_loraplex(compose_health[2:])
    setup_calls = loraplex_calls_in_shell(services["setup"]["command"][0])
    assert [call[0] for call in setup_calls] == ["demo-model", "train"]
    for call in setup_calls:
        parse_loraplex(call)

    k8s_serve = parse_loraplex(deployment_argv())
    for args in (image_serve, compose_serve, k8s_serve):
        assert args.command == "serve" and args.host == "0.0.0.0"
        assert args.adapter_repo is not None and args.adapter_repo == args.adapter_root
        check_serve_settings(args)


def test_the_configmap_holds_only_flags_the_deployment_uses():
    container = deployment_container()
    config = k8s_object("ConfigMap", "loraplex-serve")["data"]
    used = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(map(str, container["args"]))))
    assert used == set(config), f"unused: {set(config) - used}, missing: {used - set(config)}"
    assert all(isinstance(value, str) for value in config.values())  # ConfigMap data must be strings


def test_models_and_adapters_come_from_mounted_volumes():
    k8s = parse_loraplex(deployment_argv())
    mounts = {m["mountPath"]: m for m in deployment_container()["volumeMounts"]}
    for path in (k8s.model, k8s.adapter_repo):
        mount = next(m for p, m in mounts.items() if str(path) == p or str(path).startswith(p + "/"))
        assert mount.get("readOnly") is True, f"{path} should be mounted read-only"
    services = compose()["services"]
    compose_serve = parse_loraplex(services["loraplex"]["command"])
    volumes = {v.split(":")[1]: v for v in services["loraplex"]["volumes"]}
    assert volumes["/models"].endswith(":ro") and volumes[str(compose_serve.adapter_repo)].endswith(":ro")
    assert str(compose_serve.model).startswith("/models/")
    image_serve = parse_loraplex(dockerfile_json("CMD"))
    assert str(image_serve.model).startswith("/models/") and str(image_serve.adapter_repo) == "/adapters"


# ---------------------------------------------------------------------- ports and probes
def test_ports_agree_everywhere():
    k8s = parse_loraplex(deployment_argv())
    container = deployment_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": k8s.port, "metrics": k8s.metrics_port, "http": k8s.http_port}
    annotations = k8s_object("Deployment", "loraplex")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == k8s.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    service = k8s_object("Service", "loraplex")
    assert service["spec"]["clusterIP"] == "None", "Envoy needs every replica's address (a headless Service)"
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} <= set(ports)
    assert service_ports["grpc"]["port"] == k8s.port and service_ports["metrics"]["port"] == k8s.metrics_port
    assert service_ports["http"]["port"] == k8s.http_port
    monitor = load_yaml("k8s/servicemonitor.yaml")
    assert monitor["spec"]["endpoints"][0]["port"] in service_ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    for cluster in ("loraplex_affinity", "loraplex_spread"):
        for group in envoy_clusters()[cluster]["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                socket = endpoint["endpoint"]["address"]["socket_address"]
                assert (socket["address"], socket["port_value"]) == (service["metadata"]["name"], k8s.port)
    router = k8s_object("Deployment", "loraplex-router")["spec"]["template"]
    router_ports = {p["name"]: p["containerPort"] for p in router["spec"]["containers"][0]["ports"]}
    assert envoy_listener("grpc")["address"]["socket_address"]["port_value"] == router_ports["grpc"]
    assert envoy_listener("admin_pages")["address"]["socket_address"]["port_value"] == router_ports["admin-pages"]
    assert int(router["metadata"]["annotations"]["prometheus.io/port"]) == router_ports["admin-pages"]
    router_service = k8s_object("Service", "loraplex-router")
    assert router_service["spec"]["ports"][0]["targetPort"] in router_ports

    image = parse_loraplex(dockerfile_json("CMD"))
    exposed = {int(p) for word, rest in dockerfile_instructions() if word == "EXPOSE" for p in rest.split()}
    assert exposed == {image.port, image.metrics_port, image.http_port}
    assert flag(dockerfile_json("HEALTHCHECK"), "--server") == f"127.0.0.1:{image.port}"

    services = compose()["services"]
    served = parse_loraplex(services["loraplex"]["command"])
    published = {int(p.rsplit(":", 1)[1]) for p in services["loraplex"]["ports"]}
    assert published == {served.port, served.metrics_port, served.http_port}
    assert flag(services["loraplex"]["healthcheck"]["test"], "--server") == f"127.0.0.1:{served.port}"
    scrape = load_yaml("prometheus/prometheus.yml")["scrape_configs"]
    assert [s["job_name"] for s in scrape] == ["loraplex"]
    assert scrape[0]["static_configs"][0]["targets"] == [f"loraplex:{served.metrics_port}"]
    prometheus_port = int(services["prometheus"]["ports"][0].rsplit(":", 1)[1])
    datasource = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"


def test_probes_ask_grpc_health_for_services_the_server_registers():
    """Kubernetes' `grpc` probe calls grpc.health.v1.Health/Check; tests/deploy/test_live_server.py
    asks a live server the same questions."""
    k8s = parse_loraplex(deployment_argv())
    container = deployment_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handler = container[probe]
        assert set(handler) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert handler["grpc"]["port"] == k8s.port
        assert handler["grpc"].get("service", "") in {"", *SERVICES}
    for cluster in envoy_clusters().values():
        if cluster["name"].startswith("loraplex_"):
            (check,) = cluster["health_checks"]
            assert check["grpc_health_check"].get("service_name", "") in {"", *SERVICES}


def test_termination_grace_covers_the_drain():
    pod = k8s_object("Deployment", "loraplex")["spec"]["template"]["spec"]
    drain_grace = parse_loraplex(deployment_argv()).drain_grace
    pre_stop = deployment_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # the kubelet's clock includes preStop; leave ten seconds for the engine's shutdown
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain_grace + 10
    resources = deployment_container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    user = [rest for word, rest in dockerfile_instructions() if word == "USER"][-1]
    assert user.split(":")[0] == str(security["runAsUser"]), "the image's user and the pod's should agree"
    compose_grace = parse_loraplex(compose()["services"]["loraplex"]["command"]).drain_grace
    assert float(compose()["services"]["loraplex"]["stop_grace_period"].rstrip("s")) > compose_grace


def test_pod_disruption_budgets_select_the_deployments():
    for name in ("loraplex", "loraplex-router"):
        budget = k8s_object("PodDisruptionBudget", name)["spec"]
        labels = k8s_object("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable", 0) >= 1


# ---------------------------------------------------------------------- routing
def test_envoy_hashes_adapters_on_the_header_the_client_sets():
    clusters = envoy_clusters()
    affinity, spread = envoy_routes()
    # requests naming an adapter: consistent hashing on the client's header
    (matcher,) = affinity["match"]["headers"]
    assert matcher["name"] == ADAPTER_HEADER and matcher["string_match"]["safe_regex"]["regex"] == ".+"
    assert affinity["route"]["hash_policy"] == [{"header": {"header_name": ADAPTER_HEADER}}]
    hashed = clusters[affinity["route"]["cluster"]]
    assert hashed["lb_policy"] in {"RING_HASH", "MAGLEV"}
    assert hashed["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] >= 100
    # the base model (empty header): no affinity to keep, the least loaded replica
    assert "headers" not in spread["match"] and "hash_policy" not in spread["route"]
    assert clusters[spread["route"]["cluster"]]["lb_policy"] == "LEAST_REQUEST"
    for route in (affinity, spread):
        assert route["match"]["grpc"] == {} and route["route"]["timeout"] == "0s"
        assert "unavailable" in route["route"]["retry_policy"]["retry_on"].split(",")
    for name in (affinity["route"]["cluster"], spread["route"]["cluster"]):
        cluster = clusters[name]
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"], "gRPC needs HTTP/2 upstream"
        assert cluster["type"] == "STRICT_DNS"


# ---------------------------------------------------------------------- Prometheus and Grafana
def test_promql_metric_names_finds_every_selector_and_nothing_else():
    expr = ('histogram_quantile(0.95, sum by (le, tier) '
            '(rate(loraplex_a_bucket{job=~"$job", x="by(y)"}[$__rate_interval])))'
            ' / on(instance) group_left(pod) sum without (code) (b_total offset 5m) > bool 1e3'
            ' and label_values(c_total{job=~"$job"}, instance)')
    assert promql_metric_names(expr) == {"loraplex_a_bucket", "b_total", "c_total"}
    assert promql_metric_names('up{job="loraplex"} == 0') == {"up"}


def test_alert_rules_cover_queue_depth_error_rate_and_kv_usage():
    names = set().union(*map(promql_metric_names, alert_expressions()))
    assert {"loraplex_queue_depth", "loraplex_request_errors_total", "loraplex_requests_total",
            "loraplex_kv_cache_usage_ratio"} <= names
    rules = [rule for group in load_yaml("prometheus/alerts.yml")["groups"] for rule in group["rules"]]
    for rule in rules:
        assert rule["alert"].startswith("Loraplex") and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and "for" in rule


def test_dashboard_is_well_formed():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/loraplex.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
    assert {"datasource", "job", "instance"} <= {v["name"] for v in dashboard["templating"]["list"]}
    assert len(set().union(*map(promql_metric_names, dashboard_queries()))) >= 15


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return promtool


def _promtool_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_the_compose_config():
    for args in (("check", "rules", str(DEPLOY / "prometheus/alerts.yml")),
                 ("check", "config", str(DEPLOY / "prometheus/prometheus.yml"))):
        result = _promtool_run(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_kubernetes_config(tmp_path):
    path = DEPLOY / "prometheus/prometheus-kubernetes.yml"
    result = _promtool_run("check", "config", str(path))
    output = result.stdout + result.stderr
    if result.returncode and "field kubernetes_sd_configs not found" in output:
        # Debian builds Prometheus without Kubernetes discovery: check everything else (relabelling,
        # rule files) with the discovery swapped for a static target
        config = yaml.safe_load(path.read_text())
        for job in config["scrape_configs"]:
            del job["kubernetes_sd_configs"]
            job["static_configs"] = [{"targets": ["pod:9400"]}]
        (tmp_path / path.name).write_text(yaml.safe_dump(config))
        shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path / "alerts.yml")
        result = _promtool_run("check", "config", str(tmp_path / path.name))
        output = result.stdout + result.stderr
    assert result.returncode == 0, output
