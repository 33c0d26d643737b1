"""The cluster and infra definitions: valid against the schemas we have offline, consistent with the code."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from msgan.settings import JOB_SETTINGS, PACS_SETTINGS, SETTINGS

REPO = Path(__file__).resolve().parents[2]
K8S = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
K8S_VERSION = "1.33"
SECRET_NAMES = {s.name for s in SETTINGS if s.secret}
KNOWN_ENV = {s.name for s in SETTINGS} | {"RAY_AUTH_MODE", "POSTGRES_PASSWORD"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    """Every container spec in a manifest, wherever its kind keeps them."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "containers" and isinstance(value, list):
                    found.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found


def _image_repo(image: str) -> str:
    return image.rsplit(":", 1)[0]


def _entrypoint_scripts(text: str) -> list[str]:
    return re.findall(r"\b(jobs/[\w/]+\.py)\b", text)


def test_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > t["min_workers"] for t in workers)


def test_manifests_have_the_kinds_kuberay_expects():
    kinds = {(d["apiVersion"], d["kind"]) for p in K8S for d in _docs(p)}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob")} <= kinds
    cluster = next(d for p in K8S for d in _docs(p) if d["kind"] == "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["rayVersion"] == ray.__version__
    job = next(d for p in K8S for d in _docs(p) if d["kind"] == "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_core_objects_and_pod_templates_validate(path):
    """Core kinds validate whole; a RayCluster's pod templates validate as Kubernetes PodTemplates."""
    for doc in _docs(path):
        if doc["apiVersion"].startswith("ray.io/"):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            templates = [g["template"] for g in [spec.get("headGroupSpec", {}), *spec.get("workerGroupSpecs", [])]
                         if "template" in g]  # fmt: skip
            if "submitterPodTemplate" in doc["spec"]:
                templates.append(doc["spec"]["submitterPodTemplate"])
            for t in templates:
                pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
                kubernetes_validate.validate(pt, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_gpus_where_they_should_be():
    cluster = next(d for p in K8S for d in _docs(p) if d["kind"] == "RayCluster")
    head = _containers(cluster["spec"]["headGroupSpec"])
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head)
    for group in cluster["spec"]["workerGroupSpecs"]:
        for c in _containers(group):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert group["maxReplicas"] > group["minReplicas"]


def test_secrets_only_by_reference():
    for path in K8S:
        for doc in _docs(path):
            if doc["kind"] == "Secret":
                assert path.name.endswith(".example.yaml")
                assert set(doc["stringData"].values()) == {"change-me"}, "an example Secret holds placeholders only"
                continue
            if doc["kind"] == "ConfigMap":
                assert not SECRET_NAMES & set(doc["data"]), "secrets do not belong in a ConfigMap"
            for c in _containers(doc):
                for e in c.get("env", []):
                    assert e["name"] in KNOWN_ENV, f"{path.name}: {e['name']} is not read by any job"
                    if e["name"] in SECRET_NAMES:
                        assert "secretKeyRef" in e.get("valueFrom", {}), (
                            f"{path.name}: {e['name']} must come from a Secret"
                        )


def test_images_and_entrypoints_exist():
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}") and "gpu" in base  # Ray 2.60 with CUDA
    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    repos = {_image_repo(launcher["docker"]["image"])}
    scripts = set()
    for path in K8S:
        scripts |= set(_entrypoint_scripts(path.read_text()))
        for doc in _docs(path):
            repos |= {_image_repo(c["image"]) for c in _containers(doc)}
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    assert compose["services"]["ray-head"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert len(repos) == 1, f"one project image everywhere, found {repos}"
    assert {"jobs/train_all_scales.py", "jobs/translate_pacs_exports.py"} <= scripts
    for script in sorted(scripts):
        assert (REPO / script).is_file(), script
        r = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (script, r.stderr[-500:])
    for path in K8S:
        for doc in _docs(path):
            if doc["kind"] == "RayJob":
                args = shlex.split(doc["spec"]["entrypoint"])
                assert (REPO / "configs" / Path(args[args.index("--config") + 1]).name).is_file()


def test_compose_health_checks_and_environment():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no health check"
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert set(JOB_SETTINGS) | set(PACS_SETTINGS) <= set(env), name
        assert set(env) <= KNOWN_ENV, f"{name} sets variables no job reads: {set(env) - KNOWN_ENV}"
        for key in SECRET_NAMES & set(env):
            assert str(env[key]).startswith("${"), f"{name}: {key} must come from infra/.env, not the file"
    example = dict(line.split("=", 1) for line in (REPO / "infra" / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))  # fmt: skip
    assert set(example) <= KNOWN_ENV and set(JOB_SETTINGS) <= set(example)


def test_settings_are_the_ones_the_code_reads():
    code = "\n".join(p.read_text() for p in (REPO / "msgan").rglob("*.py"))
    for s in SETTINGS:
        if s.name.startswith(("MSGAN_", "MLFLOW_TRACKING", "AWS_ENDPOINT")):
            assert f'"{s.name}"' in code, f"{s.name} is documented but no code reads it"
