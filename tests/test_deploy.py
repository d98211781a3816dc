"""Deployment files, checked without a Docker engine or a cluster: hadolint on the Dockerfiles, the
Kubernetes schemas (kubernetes-validate; trimmed CRD schemas for KEDA and the Prometheus Operator),
and cross-checks of images, ports, env names, probes and commands against the code."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.cli.serve import serve

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
K8S = REPO / "deploy" / "k8s"
CRD_SCHEMAS = Path(__file__).parent / "fixtures" / "crd-schemas"
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh.json",
             ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.keda.sh.json",
             ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.json"}


def _k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _find(kind: str, name: str) -> dict:
    return next(d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def _entrypoint(dockerfile: str) -> list[str]:
    line = next(ln for ln in (DOCKER / dockerfile).read_text().splitlines() if ln.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


def _dockerfile_env(dockerfile: str) -> dict[str, str]:
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    return {k: v for line in text.splitlines() if line.startswith("ENV ") for k, v in re.findall(r"(\w+)=(\S+)", line)}


def _cuda_base(dockerfile: str) -> bool:
    base = next(ln.split()[1] for ln in (DOCKER / dockerfile).read_text().splitlines() if ln.startswith("FROM "))
    return base.startswith("nvidia/cuda:")


def _valid_env_name(name: str) -> bool:
    if name == "KAFKA_BOOTSTRAP_SERVERS":
        return True
    field = name.removeprefix("FABWATCH_").lower()
    return name.startswith("FABWATCH_") and field in Settings.model_fields


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfiles_pass_hadolint(dockerfile: str):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_manifests_match_their_schemas():
    docs = _k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PersistentVolumeClaim", "ScaledObject",
                                         "ServiceMonitor"}
    for doc in docs:
        crd = CRD_KINDS.get((doc["apiVersion"], doc["kind"]))
        if crd:
            jsonschema.validate(doc, json.loads((CRD_SCHEMAS / crd).read_text()))
        else:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_processor_deployment_agrees_with_the_code():
    spec = _find("Deployment", "fabwatch-processor")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    entry = _entrypoint("processor.Dockerfile")
    metrics_port = int(entry[entry.index("--metrics-port") + 1])
    assert container["ports"][0]["containerPort"] == metrics_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert all(_valid_env_name(e["name"]) for e in container["env"]), container["env"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "registry")
    assert mount["readOnly"] is True and mount["mountPath"] == entry[entry.index("--registry") + 1]
    cache = next(m for m in container["volumeMounts"] if m["name"] == "trt-cache")  # TensorRT writes its engines
    assert cache["mountPath"] == _dockerfile_env("processor.Dockerfile")["FABWATCH_TRT_CACHE"]
    assert not cache.get("readOnly") and "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "trt-cache")
    trainer = _find("Deployment", "fabwatch-trainer")["spec"]["template"]["spec"]["containers"][0]
    assert not any(m.get("readOnly") for m in trainer["volumeMounts"] if m["name"] == "registry")

    scaler = _find("ScaledObject", "fabwatch-processor")["spec"]
    trigger = scaler["triggers"][0]["metadata"]
    assert trigger["consumerGroup"] == inspect.signature(serve).parameters["group"].default
    assert trigger["topic"] == Settings().topics.sensors
    assert scaler["scaleTargetRef"]["name"] == "fabwatch-processor"


def test_probed_endpoints_exist_on_the_metrics_server():
    from fabwatch.stream.metrics import MetricsServer, ProcessorMetrics

    server = MetricsServer(ProcessorMetrics(), ready=lambda: True, port=0, host="127.0.0.1")
    try:
        for path in ("/ready", "/healthz", "/metrics"):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                assert resp.status == 200, path
    finally:
        server.close()


def test_compose_services_images_env_and_ports():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    for name in ("processor", "trainer"):
        svc = services[name]
        assert (DOCKER / svc["build"]["context"]).resolve() == REPO
        assert (REPO / svc["build"]["dockerfile"]).is_file()
        assert all(_valid_env_name(k) for k in svc["environment"]), svc["environment"]
        assert svc["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "9108:9108" in services["processor"]["ports"]
    trt_cache = _dockerfile_env("processor.Dockerfile")["FABWATCH_TRT_CACHE"]
    assert services["processor"]["volumes"] == ["registry:/registry:ro", f"trt-cache:{trt_cache}"]
    assert "trt-cache" in compose["volumes"]
    targets = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    assert {t for job in targets for t in job["static_configs"][0]["targets"]} == {"processor:9108", "trainer:9109"}


@pytest.mark.parametrize("dockerfile", ["processor.Dockerfile", "trainer.Dockerfile"])
def test_container_entrypoints_are_valid_commands(dockerfile: str):
    from fabwatch.stream.cli.main import app

    args = _entrypoint(dockerfile)
    assert args[0] == "fabwatch"
    result = CliRunner().invoke(app, [args[1], "--help"])
    assert result.exit_code == 0, result.output
    for flag in (a for a in args[2:] if a.startswith("--")):
        assert flag in result.output, f"{dockerfile}: {args[1]} has no {flag}"


def test_gpus_are_requested_only_for_images_built_on_cuda():
    """A GPU request for an image without CUDA (plain TensorFlow on python:slim) holds a GPU that nothing uses."""
    requests = []
    for doc in _k8s_docs():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                res = c.get("resources", {})
                gpus = {**res.get("requests", {}), **res.get("limits", {})}.get("nvidia.com/gpu", 0)
                requests.append((c["image"], int(gpus) > 0))
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    images = {svc["image"]: Path(svc["build"]["dockerfile"]).name for svc in compose.values() if "build" in svc}
    for svc in compose.values():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if "build" in svc:
            requests.append((svc["image"], any("gpu" in d.get("capabilities", []) for d in devices)))
    assert {image for image, _ in requests} <= set(images), "every image is built from a Dockerfile here"
    for image, wants_gpu in requests:
        assert not wants_gpu or _cuda_base(images[image]), f"{image} requests a GPU, {images[image]} has no CUDA base"
    assert _cuda_base("processor.Dockerfile") and not _cuda_base("trainer.Dockerfile")  # the check can tell
