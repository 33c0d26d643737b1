"""The cluster and infra definitions: valid against the schemas we have offline, consistent with the code,
and locked down (nothing published beyond localhost, every service asks for credentials)."""

import configparser
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
KNOWN_ENV = {s.name for s in SETTINGS} | {"RAY_AUTH_MODE"}
# the compose stack's own secrets: in infra/.env, given to the services that need them, never to a job
STACK_SECRETS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}


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
    one_shot = {n for n, svc in services.items() if svc.get("restart") == "no"}
    for name, svc in services.items():
        if name in one_shot:  # a setup step: whoever needs it waits for it to complete
            assert all(
                dep.get("condition") == "service_completed_successfully"
                for other in services.values()
                for dep_name, dep in other.get("depends_on", {}).items()
                if dep_name == name
            ), name
            continue
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no health check"
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert set(JOB_SETTINGS) | set(PACS_SETTINGS) <= set(env), name
        assert set(env) <= KNOWN_ENV, f"{name} sets variables no job reads: {set(env) - KNOWN_ENV}"
        for key in SECRET_NAMES & set(env):
            assert str(env[key]).startswith("${"), f"{name}: {key} must come from infra/.env, not the file"
    example = dict(line.split("=", 1) for line in (REPO / "infra" / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))  # fmt: skip
    assert set(example) <= KNOWN_ENV | STACK_SECRETS and set(JOB_SETTINGS) <= set(example)


def test_settings_are_the_ones_the_code_reads():
    code = "\n".join(p.read_text() for p in (REPO / "msgan").rglob("*.py"))
    for s in SETTINGS:
        if s.name.startswith(("MSGAN_", "MLFLOW_TRACKING", "AWS_ENDPOINT")):
            assert f'"{s.name}"' in code, f"{s.name} is documented but no code reads it"


# ----------------------------------------------------------------------------- a locked-down stack


def _compose() -> dict:
    return yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())


def _published(svc: dict) -> list[tuple[str, str]]:
    """(host ip, container port) of every published port, short or long syntax; host ip '' = all interfaces."""
    out = []
    for port in svc.get("ports", []):
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "")), str(port["target"])))
            continue
        parts = str(port).split(":")
        out.append((parts[0] if len(parts) == 3 else "", parts[-1].split("/")[0]))
    return out


def _shell_words(command) -> list[str]:
    """The words of a service command, with ``sh -c "..."`` opened up."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if len(words) >= 3 and words[0] == "sh" and words[1].startswith("-"):
        return words[:2] + shlex.split(words[2])
    return words


def test_compose_publishes_nothing_beyond_localhost():
    services = _compose()["services"]
    for name, svc in services.items():
        for host_ip, port in _published(svc):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on all interfaces"
    published = {(name, port) for name, svc in services.items() for _, port in _published(svc)}
    assert ("orthanc", "4242") not in published, "Orthanc's DICOM port is published"
    assert not any(name == "postgres" for name, _ in published)
    assert ("ray-head", "8265") in published and ("mlflow", "5000") in published  # reachable locally


def test_compose_services_ask_for_credentials():
    compose = _compose()
    services = compose["services"]
    # MLflow: basic auth, an admin from infra/.env, new users with no permissions, a cookie-signing key
    mlflow = services["mlflow"]
    words = _shell_words(mlflow["command"])
    assert words[words.index("--app-name") + 1] == "basic-auth"
    env = mlflow["environment"]
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert str(env[key]).startswith("${"), key
    ini = configparser.ConfigParser()
    ini.read_string(compose["configs"]["mlflow-auth"]["content"])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    target = next(c["target"] for c in mlflow["configs"] if c["source"] == "mlflow-auth")
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == target
    # the jobs authenticate to MLflow with what MLflow reads itself
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(services["ray-head"]["environment"])
    # Orthanc: REST auth on; DICOM only for listed modalities (none), only to its own AET
    orthanc = services["orthanc"]["environment"]
    assert orthanc["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert orthanc["ORTHANC__DICOM_CHECK_CALLED_AET"] == "true"
    assert json.loads(orthanc["ORTHANC__DICOM_MODALITIES"]) == {}
    for verb in ("STORE", "ECHO", "FIND", "GET", "MOVE"):
        assert orthanc[f"ORTHANC__DICOM_ALWAYS_ALLOW_{verb}"] == "false", verb
    # Ray: token auth for the head, the workers and every job client
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"


def test_jobs_use_a_scoped_minio_user_and_root_keys_only_set_it_up():
    compose = _compose()
    services = compose["services"]
    for name, svc in services.items():
        values = " ".join(str(v) for v in (svc.get("environment") or {}).values())
        if name not in ("minio", "minio-setup"):
            assert "MINIO_ROOT" not in values, f"{name} gets MinIO's root keys"
    assert services["minio"]["environment"]["MINIO_ROOT_USER"].startswith("${MINIO_ROOT_USER")
    job_key = services["ray-head"]["environment"]["AWS_ACCESS_KEY_ID"]
    assert job_key.startswith("${AWS_ACCESS_KEY_ID")
    assert services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"] == job_key
    setup = services["minio-setup"]
    script = setup["command"][0] if isinstance(setup["command"], list) else setup["command"]
    script = script.replace("$$", "$")  # compose's escape for a literal $: the shell expands it
    steps = [shlex.split(line.split("#")[0]) for line in script.splitlines() if line.strip()]
    assert ["mc", "admin", "user", "add", "root", "${AWS_ACCESS_KEY_ID}", "${AWS_SECRET_ACCESS_KEY}"] in steps
    attach = next(s for s in steps if s[:3] == ["mc", "admin", "policy"] and s[3] == "attach")
    assert attach[4:6] == ["root", "msgan-jobs"] and attach[attach.index("--user") + 1] == "${AWS_ACCESS_KEY_ID}"
    policy = json.loads(compose["configs"]["jobs-policy"]["content"])
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"]), statement
        assert all(re.fullmatch(r"arn:aws:s3:::(msgan|mlflow)(/\*)?", r) for r in statement["Resource"]), statement


def test_launcher_uses_token_auth_and_keeps_the_dashboard_private():
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    starts = [shlex.split(c) for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]]
    starts = [w for w in starts if w[w.index("ray") + 1] == "start"]
    assert len(starts) == 2
    for words in starts:
        assert "RAY_AUTH_MODE=token" in words[: words.index("ray")], words
        hosts = [w.split("=", 1)[1] for w in words if w.startswith("--dashboard-host=")]
        assert all(h in ("127.0.0.1", "localhost") for h in hosts), words


def test_orthanc_refuses_requests_without_credentials(orthanc):
    """The suite's Orthanc is configured as the compose one: REST and DICOMweb need a password."""
    import requests

    for path in ("/system", "/patients", "/dicom-web/studies"):
        assert requests.get(f"{orthanc['rest']}{path}", timeout=10).status_code == 401, path
        wrong = requests.get(f"{orthanc['rest']}{path}", auth=(orthanc["user"], "wrong"), timeout=10)
        assert wrong.status_code == 401, path
    assert requests.get(f"{orthanc['rest']}/system", auth=(orthanc["user"], orthanc["password"]), timeout=10).ok


def test_orthanc_refuses_dicom_from_unknown_modalities(orthanc, tmp_path):
    """DICOM C-ECHO / C-STORE from an AET not in DicomModalities, or to another called AET, are refused."""
    import shutil

    import pydicom.data
    import requests

    if shutil.which("storescu") is None:
        pytest.skip("dcmtk (storescu) is not installed")
    auth = (orthanc["user"], orthanc["password"])
    system = requests.get(f"{orthanc['rest']}/system", auth=auth, timeout=10).json()
    before = requests.get(f"{orthanc['rest']}/statistics", auth=auth, timeout=10).json()["CountInstances"]
    port, aet = str(system["DicomPort"]), system["DicomAet"]
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    for calling, called in (("INTRUDER", aet), ("INTRUDER", "OTHER")):
        echo = subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", port],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        store = subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1", port, ct],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert echo.returncode != 0 and store.returncode != 0, (calling, called, echo.stderr, store.stderr)
    after = requests.get(f"{orthanc['rest']}/statistics", auth=auth, timeout=10).json()["CountInstances"]
    assert after == before, "an unknown modality stored an instance"
