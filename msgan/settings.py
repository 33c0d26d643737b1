"""The environment every job reads: one list, used by the docs, the infra files and their tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    meaning: str
    secret: bool = False  # comes from a secret store, never from an image or a committed file


SETTINGS = (
    Setting("MLFLOW_TRACKING_URI", "MLflow tracking server (default: sqlite under runs/)"),
    Setting("MLFLOW_S3_ENDPOINT_URL", "S3 endpoint for MLflow artifacts (MinIO)"),
    Setting("AWS_ENDPOINT_URL", "S3-compatible endpoint for pyramids, checkpoints, volumes (MinIO)"),
    Setting("AWS_DEFAULT_REGION", "S3 region"),
    Setting("AWS_ACCESS_KEY_ID", "S3 access key", secret=True),
    Setting("AWS_SECRET_ACCESS_KEY", "S3 secret key", secret=True),
    Setting("MSGAN_PACS_URL", "the PACS DICOMweb root, e.g. http://orthanc:8042/dicom-web"),
    Setting("MSGAN_PACS_USER", "PACS user", secret=True),
    Setting("MSGAN_PACS_PASSWORD", "PACS password", secret=True),
    Setting("RAY_AUTH_TOKEN", "Ray cluster token for `ray job submit` clients", secret=True),
)

# What a training or translation job needs to reach storage and tracking (the PACS pass adds the MSGAN_PACS_*).
JOB_SETTINGS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
PACS_SETTINGS = ("MSGAN_PACS_URL", "MSGAN_PACS_USER", "MSGAN_PACS_PASSWORD")
