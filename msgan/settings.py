"""The environment every job reads: one list, used by the docs, the infra files and their tests.

Every setting marked ``secret`` is masked by :func:`msgan.redact.redact_text` in every text we write, in every
encoding (plain, percent-encoded, base64, HTTP Basic/Bearer, URL userinfo).

It also decides where relative local paths live: never the process's working directory (under
``ray job submit --working-dir`` that is a temporary package folder, gone with the Ray session)
but ``MSGAN_HOME`` (default ``~/.msgan``) on the node that runs the driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    name: str
    meaning: str
    secret: bool = False  # comes from a secret store, never from an image or a committed file


SETTINGS = (
    Setting("MSGAN_HOME", "root of relative file:// storage, job outputs and the default MLflow store (~/.msgan)"),
    Setting("MSGAN_SHARED_PATHS", "folders every node mounts (NFS), separated by :; other paths fail on clusters"),
    Setting("MSGAN_VERBOSE", "1: libraries' logs, workers' output and tracebacks on the console (as --verbose)"),
    Setting("MLFLOW_TRACKING_URI", "MLflow tracking server (default: sqlite at $MSGAN_HOME/runs/mlflow.db)"),
    Setting("MLFLOW_TRACKING_USERNAME", "MLflow user, for a server with basic auth (MLflow reads it)", secret=True),
    Setting("MLFLOW_TRACKING_PASSWORD", "MLflow password, for a server with basic auth", secret=True),
    Setting("MLFLOW_TRACKING_TOKEN", "MLflow bearer token, for a server with token auth", secret=True),
    Setting("MLFLOW_S3_ENDPOINT_URL", "S3 endpoint for MLflow artifacts (MinIO)"),
    Setting("AWS_ENDPOINT_URL", "S3-compatible endpoint for pyramids, checkpoints, volumes (MinIO)"),
    Setting("AWS_DEFAULT_REGION", "S3 region"),
    Setting("AWS_ACCESS_KEY_ID", "S3 access key", secret=True),
    Setting("AWS_SECRET_ACCESS_KEY", "S3 secret key", secret=True),
    Setting("AWS_SESSION_TOKEN", "S3 session token, with temporary credentials", secret=True),
    Setting("MSGAN_PACS_URL", "the PACS DICOMweb root, e.g. http://orthanc:8042/dicom-web"),
    Setting("MSGAN_PACS_USER", "PACS user", secret=True),
    Setting("MSGAN_PACS_PASSWORD", "PACS password", secret=True),
    Setting("MSGAN_MAX_VOXELS", "largest volume an input may declare, in voxels (default 2048**3); refused above"),
    Setting("MSGAN_PACS_PAGE_SIZE", "QIDO-RS results asked per request when searching the PACS (default 500)"),
    Setting("RAY_AUTH_TOKEN", "Ray cluster token for `ray job submit` clients", secret=True),
)

# What a training or translation job needs to reach storage and tracking (the PACS pass adds the MSGAN_PACS_*).
JOB_SETTINGS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
PACS_SETTINGS = ("MSGAN_PACS_URL", "MSGAN_PACS_USER", "MSGAN_PACS_PASSWORD")

DEFAULT_HOME = "~/.msgan"
DEFAULT_DB = "runs/mlflow.db"  # under home()


def home() -> Path:
    """``MSGAN_HOME`` (default ``~/.msgan``), absolute: relative local paths resolve against it."""
    return Path(os.environ.get("MSGAN_HOME") or DEFAULT_HOME).expanduser().resolve()


def resolve_local(path: str | os.PathLike[str]) -> Path:
    """An absolute path as given; a relative one under :func:`home`, never under the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else home() / p


def default_tracking_uri() -> str:
    """The MLflow store when ``MLFLOW_TRACKING_URI`` is not set: sqlite under :func:`home`."""
    return f"sqlite:///{home() / DEFAULT_DB}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def shared_paths() -> list[Path]:
    """``MSGAN_SHARED_PATHS``: local folders every node mounts at the same place."""
    raw = os.environ.get("MSGAN_SHARED_PATHS", "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def local_path_of(uri: str) -> Path | None:
    """The local file behind a ``file://`` storage URI or a ``sqlite:///`` MLflow URI; None for remote ones."""
    for prefix in ("file://", "sqlite:///"):
        if uri.startswith(prefix):
            return Path("/" + uri[len(prefix) :].lstrip("/"))
    return None if "://" in uri else Path(uri)


def check_reachable_from_all_nodes(what: str, uri: str, nodes: int) -> None:
    """On a cluster of several nodes a node-local path is a silent split brain: refuse it, naming the fix."""
    path = local_path_of(uri)
    if nodes <= 1 or path is None:
        return
    if any(path == s or s in path.parents for s in shared_paths()):
        return
    raise ValueError(
        f"{what} {uri} is a local path, but the Ray cluster has {nodes} nodes and the others cannot see it; "
        f"use s3://bucket/prefix (an MLflow server for tracking), or a shared mount listed in MSGAN_SHARED_PATHS "
        f"(now {os.environ.get('MSGAN_SHARED_PATHS', '') or 'unset'})"
    )
