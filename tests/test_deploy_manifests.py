"""deploy/: the Kubernetes manifests for Triton, parsed as YAML and checked for what makes them work
together, with Triton and with the repository they serve (no cluster here: kubectl never sees them
in these tests). Values are derived from what they must agree with (the other manifests, the
Dockerfile, Triton's own defaults, the GPU repository the toolkit writes), not restated."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# Triton's ports when its arguments name none (tritonserver --help: --http-port, --grpc-port, --metrics-port)
TRITON_DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document"
    return docs[0]


def pod_spec() -> dict:
    return manifest("triton-deployment.yaml")["spec"]["template"]["spec"]


def triton_container() -> dict:
    (triton,) = pod_spec()["containers"]
    return triton


def triton_option(name: str) -> str | None:
    """The value of tritonserver's --name=value in the Triton container's arguments."""
    for arg in triton_container()["args"]:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def test_every_manifest_is_one_yaml_document():
    for f in sorted(DEPLOY.glob("*.yaml")):
        manifest(f.name)


def test_container_ports_are_the_ones_triton_listens_on():
    declared = {p["name"]: p["containerPort"] for p in triton_container()["ports"]}
    listening = {name: int(triton_option(f"{name}-port") or port) for name, port in TRITON_DEFAULT_PORTS.items()}
    assert declared == listening


def test_probes_ask_tritons_health_endpoints_on_its_http_port():
    triton = triton_container()
    port_numbers = {p["name"]: p["containerPort"] for p in triton["ports"]}
    http = int(triton_option("http-port") or TRITON_DEFAULT_PORTS["http"])
    # Triton's HTTP/REST health API (the KServe v2 protocol): live = the process answers,
    # ready = every model loaded
    wanted = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
              "readinessProbe": "/v2/health/ready"}
    for probe, path in wanted.items():
        get = triton[probe]["httpGet"]
        assert port_numbers.get(get["port"], get["port"]) == http, (probe, get["port"])
        assert get["path"] == path, (probe, get["path"])


def test_the_repository_triton_reads_is_the_one_the_init_container_fills():
    pod = pod_spec()
    triton = triton_container()
    repository = triton_option("model-repository")
    assert repository, "tritonserver is given no --model-repository"
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    assert repository in mounts, f"{repository} is not a mounted volume of the Triton container"
    volume = mounts[repository]
    (init,) = pod["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert volume in init_mounts, "the initContainer does not mount the repository's volume"
    # the copy the initContainer makes lands in that volume
    assert init_mounts[volume] in " ".join(init["args"]), init["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in [triton, init]:
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']} mounts undeclared volume {m['name']}"


def test_the_python_backend_gets_a_memory_backed_shm_and_the_ensemble_one_gpu():
    """The Python backend moves tensors through /dev/shm; the GPU ensemble hands the network's scores
    to the CRF step on the same device, so a replica is given exactly one GPU."""
    triton = triton_container()
    shm = [m["name"] for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm, "no /dev/shm volume"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert volumes[shm[0]]["emptyDir"]["medium"] == "Memory"
    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) == 1


def test_images_are_built_from_the_dockerfiles_triton_release():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    tag = re.search(r"^ARG TRITON_TAG=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in dockerfile
    pod = pod_spec()
    for c in pod["containers"] + pod["initContainers"]:
        assert c["image"].endswith(f"/deeplab-triton:{tag}"), c["image"]


def test_service_and_podmonitor_select_the_pods_and_name_their_ports():
    d = manifest("triton-deployment.yaml")
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    named = {p["name"] for p in triton_container()["ports"]}
    s = manifest("triton-service.yaml")
    assert s["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in s["spec"]["ports"]} == named  # every Triton port reachable
    p = manifest("triton-podmonitor.yaml")
    assert p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in p["spec"]["podMetricsEndpoints"]} == {"metrics"} <= named
    assert triton_option("allow-metrics") != "false"


def test_hpa_scales_the_deployment_on_the_queue_of_the_models_the_repository_has(tmp_path):
    """The adapter's rule must sum the queue time of exactly the composing models of the GPU
    repository the toolkit writes, over the requests of its ensemble."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from serving.repository import write_gpu_repository
    from test_triton_gpu_repo import make_plan  # a dummy plan with a real sidecar

    repo = write_gpu_repository(make_plan(tmp_path / "plan"), tmp_path / "repo")
    models = {p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()}
    ensembles = {m for m in models if 'platform: "ensemble"' in (repo / m / "config.pbtxt").read_text()}
    (ensemble,) = ensembles
    composing = models - ensembles

    h, d = manifest("triton-hpa.yaml"), manifest("triton-deployment.yaml")
    ref = h["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (d["apiVersion"], d["kind"], d["metadata"]["name"])
    (metric,) = h["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = manifest("prometheus-adapter-values.yaml")["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    queued = re.search(r"rate\(nv_inference_queue_duration_us\{[^}]*model=~\"([^\"]+)\"", rule["metricsQuery"])
    assert queued and set(queued.group(1).split("|")) == composing, (queued and queued.group(1), composing)
    served = re.search(r"nv_inference_request_success\{[^}]*model=\"([^\"]+)\"", rule["metricsQuery"])
    assert served and served.group(1) == ensemble
    series = re.search(r"model=\"([^\"]+)\"", rule["seriesQuery"])
    assert series and series.group(1) in composing
