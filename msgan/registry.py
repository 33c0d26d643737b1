"""MLflow: runs per job and per scale, and the whole cascade as one registered model.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default: a local sqlite store). The
driver creates the experiment, the job's parent run and one child run per scale; workers
log into their child run by id (no active-run state), so a retried worker re-attaches
instead of making a duplicate run. A finished job registers the cascade as one pyfunc model
version (every scale's weights + the manifest) with the alias ``candidate``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.pyfunc import PythonModel

from msgan import __version__, storage
from msgan.cascade import Cascade

DEFAULT_DB = "runs/mlflow.db"
T = TypeVar("T")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or a sqlite store under ``runs/`` of the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = Path(DEFAULT_DB).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__


def _retry(fn: Callable[[], T], attempts: int = 6) -> T:
    """Call ``fn``, retrying when a shared sqlite store is briefly locked by another writer."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps the driver's OperationalError in several types
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(0.1 * 2**i)
    raise AssertionError("unreachable")


class RunLogger:
    """Logs into one existing run by id."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        self.metric_rows([(values, step)])

    def metric_rows(self, rows: Sequence[tuple[Mapping[str, float], int]]) -> None:
        """Several steps' metrics in as few writes as the store allows (1000 values per batch)."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for values, step in rows for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            part = batch[i : i + 1000]
            _retry(lambda part=part: self.client.log_batch(self.run_id, metrics=part))  # type: ignore[misc]

    def params(self, values: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in values.items() if k not in existing]
        if new:
            _retry(lambda: self.client.log_batch(self.run_id, params=new))

    def tags(self, values: Mapping[str, Any]) -> None:
        batch = [RunTag(k, str(v)) for k, v in values.items()]
        _retry(lambda: self.client.log_batch(self.run_id, tags=batch))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))


@dataclass(frozen=True)
class JobRuns:
    tracking_uri: str
    experiment_id: str
    parent: str
    children: dict[int, str]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def job_runs(
    experiment: str, job: str, scales: int, config: Mapping[str, Any], artifact_root: str | None = None
) -> JobRuns:
    """The job's parent run and one child run per scale, created once and found again on resubmission."""
    uri = tracking_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = storage.join(artifact_root, "mlflow-artifacts") if artifact_root else None
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id

    def find(extra: str) -> str | None:
        runs = client.search_runs([exp_id], f"tags.`msgan.job` = '{job}' and {extra}", max_results=1)
        return runs[0].info.run_id if runs else None

    parent = find("tags.`msgan.role` = 'parent'")
    if parent is None:
        parent = client.create_run(exp_id, run_name=job, tags={"msgan.job": job, "msgan.role": "parent"}).info.run_id
        RunLogger(uri, parent).params(_flatten(config))
        RunLogger(uri, parent).tags({"msgan.code_version": code_version()})
    children = {}
    for s in range(scales):
        child = find(f"tags.`msgan.scale` = '{s}'")
        if child is None:
            tags = {"msgan.job": job, "msgan.role": "scale", "msgan.scale": str(s), "mlflow.parentRunId": parent}
            child = client.create_run(exp_id, run_name=f"{job}/scale{s}", tags=tags).info.run_id
        children[s] = child
    return JobRuns(uri, exp_id, parent, children)


# ----------------------------------------------------------------------------- the cascade as a model

# MLflow asks for predict() type hints to infer an input schema; ours takes one volume, not a batch of rows.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


class CascadeModel(PythonModel):
    """pyfunc wrapper: ``predict`` translates one volume (numpy, input units) through the cascade."""

    def load_context(self, context: Any) -> None:
        self.cascade = Cascade.load(context.artifacts["cascade"])

    # No type hints: MLflow would read them as an input schema of many instances; this takes one volume.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import numpy as np

        return self.cascade.translate(np.asarray(model_input, dtype=np.float32), **(params or {}))


def register_cascade(cascade: Cascade, run_id: str, name: str, alias: str = "candidate") -> str:
    """Log the cascade into ``run_id`` as a pyfunc model, register a new version of ``name`` and
    point ``alias`` at it. Returns the version."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = cascade.save(Path(tmp) / "cascade")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="cascade",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),  # models from code: no pickle
                artifacts={"cascade": str(local)},
                pip_requirements=["torch", "numpy", "SimpleITK", "zarr", f"msgan=={__version__}"],
            )
    version = _retry(lambda: mlflow.register_model(info.model_uri, name, tags=_model_tags(cascade)))
    client = MlflowClient(uri)
    _retry(lambda: client.set_registered_model_alias(name, alias, version.version))
    return str(version.version)


def _model_tags(cascade: Cascade) -> dict[str, str]:
    m = cascade.manifest()
    return {
        "msgan.num_scales": str(m["num_scales"]),
        "msgan.halos": str(m["halos"]),
        "msgan.data_fingerprint": str(m["meta"].get("data_fingerprint", "")),
        "msgan.code_version": str(m["meta"].get("code_version", m["code_version"])),
    }


def promote(name: str, version: str, alias: str) -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (e.g. candidate -> champion)."""
    client = MlflowClient(tracking_uri())
    try:
        client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"registered model {name!r} has no version {version!r}") from err
    _retry(lambda: client.set_registered_model_alias(name, alias, version))


def load_cascade(model_uri: str, device: str = "cpu") -> Cascade:
    """A cascade from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/...``, ready for inference."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"{model_uri}: cannot be loaded from {tracking_uri()} ({err.message})") from err
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, CascadeModel):
        raise ValueError(f"{model_uri} is not an msgan cascade")
    return python_model.cascade.to(device)
