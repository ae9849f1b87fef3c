"""A real `loraplex serve` after traffic: every metric the dashboard and the alert rules use is on its
/metrics page, and its health service answers the probes of deploy/ (Kubernetes, Envoy, Docker)."""

from __future__ import annotations

import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex import clients
from tests.servers import LORAPLEX
from tests.deploy.conftest import (alert_expressions, dashboard_queries, dockerfile_json, k8s_object, load_yaml,
                                   promql_metric_names)

pytestmark = pytest.mark.timeout(300)

PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not the server


def exported_names(metrics_url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(repo_server):
    with repo_server.client() as client:
        client.generate("Q: Where do fish live?\nA:", max_new_tokens=4, ignore_eos=True)
        client.generate("Q: Where do fish live?\nA:", adapter="delta", max_new_tokens=4, ignore_eos=True)
        with pytest.raises(clients.NotFound):
            client.generate("hi", adapter="ghost")  # an error, so that the error counters have a series
    exported = exported_names(repo_server.metrics_url)
    for source, queries in (("grafana/dashboards/loraplex.json", dashboard_queries()),
                            ("prometheus/alerts.yml", alert_expressions())):
        used = set().union(*map(promql_metric_names, queries))
        assert len(used) >= 5, source
        missing = used - exported - PROMETHEUS_OWN
        assert not missing, f"deploy/{source} uses metrics the server does not export: {sorted(missing)}"


def test_the_probes_of_deploy_find_the_server_serving(repo_server):
    container = k8s_object("Deployment", "loraplex")["spec"]["template"]["spec"]["containers"][0]
    services = {container[p]["grpc"].get("service", "") for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    for cluster in load_yaml("envoy/envoy.yaml")["static_resources"]["clusters"]:
        for check in cluster.get("health_checks", []):
            services.add(check["grpc_health_check"].get("service_name", ""))
    with grpc.insecure_channel(repo_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in services:
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service

    # the image's HEALTHCHECK command, pointed at this server
    command = dockerfile_json("HEALTHCHECK")
    command[command.index("--server") + 1] = repo_server.address
    result = subprocess.run([LORAPLEX, *command[1:]], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    command[command.index("--server") + 1] = "127.0.0.1:1"  # nothing listens there
    result = subprocess.run([LORAPLEX, *command[1:]], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stdout.startswith("UNAVAILABLE"), result.stdout + result.stderr


def test_the_endpoint_picker_finds_its_metrics_on_the_pool_port(repo_server):
    """The inference gateway's picker scrapes /metrics on the pool's target port (the HTTP API's) and
    parses the lora info gauge by its labels, as it does vLLM's."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.deploy.test_gateway import EPP_METRIC_FLAGS, epp_flags

    with repo_server.client() as client:
        client.generate("Q: Where do fish live?\nA:", adapter="delta", max_new_tokens=2)
    url = repo_server.http_url.removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    flags = epp_flags()
    for flag in EPP_METRIC_FLAGS:
        assert flags[flag] in families, f"{flag} {flags[flag]} is not on {url}"
    (info,) = families[flags["--lora-info-metric"]].samples
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert int(info.labels["max_lora"]) >= 1 and info.value > 1e9  # a Unix time
    kv = families[flags["--kv-cache-usage-percentage-metric"]].samples[0].value
    assert 0 <= kv <= 1, "the picker reads a fraction from 0 to 1"
