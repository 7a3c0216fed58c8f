"""deploy/: the Kubernetes manifests for Triton, parsed as YAML and checked for what a cluster
needs of them (no cluster here: kubectl never sees them in these tests)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document"
    return docs[0]


def test_every_manifest_parses_and_opens_with_a_comment():
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"triton-deployment.yaml", "triton-service.yaml", "triton-hpa.yaml",
                                       "triton-podmonitor.yaml", "prometheus-adapter-values.yaml"}
    for f in files:
        assert f.read_text().startswith("# "), f"{f.name} has no comment header"
        manifest(f.name)


def test_deployment():
    d = manifest("triton-deployment.yaml")
    assert (d["apiVersion"], d["kind"]) == ("apps/v1", "Deployment")
    pod = d["spec"]["template"]["spec"]
    assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    (triton,) = pod["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert sorted(p["containerPort"] for p in triton["ports"]) == [8000, 8001, 8002]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-repository=/models" in triton["args"]
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    assert mounts["models"] == "/models"
    (init,) = pod["initContainers"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"] == "/models"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) | {m["name"] for m in init["volumeMounts"]} <= set(volumes)
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_image_is_the_dockerfiles_triton_release():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    tag = re.search(r"^ARG TRITON_TAG=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in dockerfile
    pod = manifest("triton-deployment.yaml")["spec"]["template"]["spec"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["image"].endswith(f"/deeplab-triton:{tag}"), c["image"]


def test_service_targets_the_pods_and_ports():
    s, d = manifest("triton-service.yaml"), manifest("triton-deployment.yaml")
    assert (s["apiVersion"], s["kind"]) == ("v1", "Service")
    assert s["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    named = {p["name"] for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["port"] for p in s["spec"]["ports"]} == {8000, 8001, 8002}
    assert {p["targetPort"] for p in s["spec"]["ports"]} <= named


def test_hpa_scales_the_deployment_on_the_adapters_queue_metric():
    h, d = manifest("triton-hpa.yaml"), manifest("triton-deployment.yaml")
    assert (h["apiVersion"], h["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    ref = h["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (d["apiVersion"], d["kind"], d["metadata"]["name"])
    (metric,) = h["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = manifest("prometheus-adapter-values.yaml")["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "rate(nv_inference_queue_duration_us" in rule["metricsQuery"]
    # the queues are the composing models': an ensemble's own queue time is near zero in Triton
    queued = re.search(r"rate\(nv_inference_queue_duration_us\{[^}]*model=~\"([^\"]+)\"", rule["metricsQuery"])
    assert queued and set(queued.group(1).split("|")) == {"deeplab_pad", "deeplab_network", "deeplab_crf"}
    assert 'nv_inference_request_success{<<.LabelMatchers>>,model="deeplab"}' in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    p = manifest("triton-podmonitor.yaml")
    assert p["kind"] == "PodMonitor" and p["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert p["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
