import numpy as np
import pytest
import torch

torch.set_num_threads(1)


# The smallest networks that still exercise every code path: 3D, tiny widths, one block.
TINY = {
    "num_scales": 3,
    "lr_generator.width": 4,
    "lr_generator.depth": 1,
    "hr_generator.width": 4,
    "hr_generator.num_blocks": 1,
    "discriminator.width": 4,
    "discriminator.num_layers": 1,
    "train.hr_patch": 8,
}


def tiny_config(**overrides):
    """A config of :data:`TINY` networks; keyword overrides use dotted keys via ``**{"a.b": v}``."""
    from msgan.config import load_config

    return load_config(None, {**TINY, **overrides})


def write_unchecked(path, image: np.ndarray, geometry) -> None:
    """A NIfTI/MHA/NRRD file as another program writes it, NaN and all (msgan's writer refuses non-finite
    voxels and broken geometry), for the tests of what readers refuse."""
    import SimpleITK as sitk

    from msgan.io.volume import to_sitk

    sitk.WriteImage(to_sitk(image, geometry), str(path), useCompression=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial running statistics and affine weights (eval-mode tests)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


@pytest.fixture(scope="session", autouse=True)
def s3_test_credentials():
    """moto's dummy S3 keys in the environment from the start, as a platform would provide real ones.

    Credentials never travel in a Ray runtime_env (msgan.storage.env_for_workers): workers of a Ray that a
    test starts in-process inherit this environment, whenever that Ray starts and whichever test then
    opens a bucket."""
    import os

    dummy = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    added = {k: v for k, v in dummy.items() if k not in os.environ}
    os.environ.update(added)
    yield
    for k in added:
        os.environ.pop(k, None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server on loopback (moto's server mode) for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 server, with the environment pointing every client at it."""
    import uuid

    import boto3

    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def s3_keys(bucket: str, prefix: str = "") -> list[str]:
    import os

    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS (Debian package) on loopback ports with DICOMweb; yields (DICOMweb URL, user, password).

    Missing Orthanc skips the tests with the reason, except in CI (CI=true), where it fails them."""
    import json
    import os
    import shutil
    import subprocess
    import time

    import requests

    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    plugin = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    if binary is None or not os.path.exists(plugin):
        message = "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_port(), _free_port()
    config = {
        "Name": "msgan-test",
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "MSGANTEST",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"msgan": "s3cret-pw"},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
        # DICOM as in infra/compose.yaml: only listed modalities (none), only to our AET
        "DicomCheckCalledAet": True,
        "DicomModalities": {},
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "HttpTimeout": 120,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    auth = ("msgan", "s3cret-pw")
    for _ in range(200):
        try:
            if requests.get(f"{base}/system", auth=auth, timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("Orthanc did not answer within 20 s")
    yield {"url": f"{base}/dicom-web", "rest": base, "user": auth[0], "password": auth[1]}
    try:
        requests.post(f"{base}/tools/shutdown", auth=auth, timeout=5)
        proc.wait(timeout=30)
    except Exception:
        proc.kill()
    log.close()
