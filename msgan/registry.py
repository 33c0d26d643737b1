"""MLflow: runs per job and per scale, and the whole cascade as one registered model.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default: a local sqlite store). The
driver creates the experiment, the job's parent run and one child run per scale; workers
log into their child run by id (no active-run state), so a retried worker re-attaches
instead of making a duplicate run. A finished job registers the cascade as one model version
whose artifact is data only (every scale's weights + the manifest with their sha256 and the model spec,
never the run settings) with the alias ``candidate``; loading it builds the networks with this installed
msgan, weights only. The run settings (training, deployment, job, the data's fingerprint) are the run's
MLflow params and tags; a data path (it may name a patient) is logged as a count only.
"""

from __future__ import annotations

import hashlib
import posixpath
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion

from msgan import __version__, settings, storage
from msgan.cascade import (
    FORMAT,
    FORMATS,
    MANIFEST,
    MANIFEST_MAX_BYTES,
    WEIGHTS_MAX_BYTES,
    Cascade,
    CascadeError,
    parse_manifest,
    read_model_file,
)
from msgan.config import data_path_keys, flatten
from msgan.redact import redact_text, redact_uri

T = TypeVar("T")


def tracking_uri() -> str:
    """:func:`msgan.settings.tracking_uri`: ``MLFLOW_TRACKING_URI`` or the default sqlite store under
    ``$MSGAN_HOME`` (never the working directory, which ``ray job submit`` makes a temporary package folder),
    whose folder is made here so that MLflow can create the database."""
    uri = settings.tracking_uri()
    if uri == settings.default_tracking_uri():
        (settings.home() / settings.DEFAULT_DB).parent.mkdir(parents=True, exist_ok=True)
    return uri


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


def run_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A job's MLflow params: its config's plain values flattened to dotted keys, except the settings that
    name data files (:func:`msgan.config.data_path_keys`: they may name patients), logged as
    ``KEY.count`` (how many files) instead."""
    hidden = set(data_path_keys())
    params: dict[str, Any] = {}
    for key, value in flatten(config).items():
        if key in hidden:
            params[f"{key}.count"] = len(value) if isinstance(value, (list, tuple)) else 1
        else:
            params[key] = value
    return params


def job_runs(
    experiment: str, job: str, scales: int, config: Mapping[str, Any], artifact_root: str | None = None
) -> JobRuns:
    """The job's parent run and one child run per scale, created once and found again on resubmission. The
    parent's params are the job's ``config`` (:func:`run_params`: spec and run settings, no data path)."""
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
        RunLogger(uri, parent).params(run_params(config))
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
#
# A registered cascade is data only: the run artifact directory ``cascade/<manifest sha256[:16]>`` holds
# ``manifest.json`` and ``scale_<i>.pt`` (sha256 of each in the manifest), and the model version points at
# it. Loading downloads exactly those files, checks them and builds the networks with the *installed*
# msgan (``torch.load(weights_only=True)``); nothing else in the artifact directory is read, let alone run.

ARTIFACT_DIR = "cascade"
FORMAT_TAG = "msgan.format"
MANIFEST_TAG = "msgan.manifest_sha256"


class ModelLoadError(CascadeError):
    """A model reference that cannot be resolved, or an artifact that is not a sound msgan cascade (a
    :class:`msgan.cascade.CascadeError`, so one ``except`` catches folder and registry models alike)."""


def register_cascade(cascade: Cascade, run_id: str, name: str, alias: str = "candidate") -> str:
    """Log the cascade (manifest + weights, nothing executable; the manifest holds the model spec, never
    the run settings) into ``run_id``, register a new version of ``name`` pointing at that artifact
    directory and point ``alias`` at it. The run is tagged with the data fingerprint and code version the
    cascade's meta names. Returns the version."""
    uri = tracking_uri()
    client = MlflowClient(uri)
    model_tags = _model_tags(cascade)
    RunLogger(uri, run_id).tags({k: v for k, v in model_tags.items() if k in _RUN_TAGS and v})
    with tempfile.TemporaryDirectory() as tmp:
        local = cascade.save(Path(tmp) / "cascade")
        digest = hashlib.sha256((local / MANIFEST).read_bytes()).hexdigest()
        artifact_path = f"{ARTIFACT_DIR}/{digest[:16]}"
        _retry(lambda: client.log_artifacts(run_id, str(local), artifact_path))
    try:
        _retry(lambda: client.create_registered_model(name))
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = model_tags | {FORMAT_TAG: FORMAT, MANIFEST_TAG: digest}
    version = _retry(
        lambda: client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags)
    )
    _retry(lambda: client.set_registered_model_alias(name, alias, version.version))
    return str(version.version)


_RUN_TAGS = ("msgan.data_fingerprint", "msgan.code_version")


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


def _parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = ref.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise ModelLoadError(f"model URI {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def _model_version(model_uri: str) -> ModelVersion:
    name, version, alias = _parse_models_uri(model_uri)
    client = MlflowClient(tracking_uri())
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as err:
        raise ModelLoadError(
            f"{model_uri}: cannot be resolved in the registry at {redact_uri(tracking_uri())} "
            f"({redact_text(err.message)})"
        ) from err


def pin_model(model_uri: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` of the version the alias names now, so a batch
    loads one version however the alias moves meanwhile. Other references come back unchanged."""
    if not model_uri.startswith("models:/"):
        return model_uri
    mv = _model_version(model_uri)
    return f"models:/{mv.name}/{mv.version}"


def _artifact_source(model_uri: str) -> tuple[str, str | None]:
    """(URI of the cascade's artifact directory, the manifest sha256 the registry recorded or None)."""
    if model_uri.startswith("runs:/"):
        return model_uri.rstrip("/"), None
    mv = _model_version(model_uri)
    tags = mv.tags or {}
    if tags.get(FORMAT_TAG) not in FORMATS:
        raise ModelLoadError(
            f"{model_uri} (version {mv.version}) is not an msgan cascade artifact: tag {FORMAT_TAG}="
            f"{tags.get(FORMAT_TAG)!r}, expected one of {list(FORMATS)} (versions logged as MLflow pyfunc models "
            "are not loaded, since loading one runs code stored with it; register the cascade again)"
        )
    if not tags.get(MANIFEST_TAG):
        raise ModelLoadError(f"{model_uri} (version {mv.version}): no {MANIFEST_TAG} tag to check the manifest by")
    source = str(mv.source).rstrip("/")
    # the registry names where the weights are: only its own run's artifacts, as register_cascade wrote them
    # (runs:/<the version's run>/<path>), never an absolute path, another store or a path out of the run
    prefix = f"runs:/{mv.run_id}/"
    path = source[len(prefix) :] if mv.run_id and source.startswith(prefix) else ""
    if not path or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path or "%" in path:
        raise ModelLoadError(
            f"{model_uri} (version {mv.version}): its source {source!r} is not an artifact directory of its own run "
            f"({prefix}...); msgan loads a cascade only from where it registered it"
        )
    return source, tags[MANIFEST_TAG]


def _listing(source: str, model_uri: str) -> dict[str, Any]:
    """The artifact directory's entries by file name (one listing, before anything is downloaded)."""
    try:
        infos = mlflow.artifacts.list_artifacts(artifact_uri=source, tracking_uri=tracking_uri())
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise ModelLoadError(f"{model_uri}: cannot list its artifacts ({redact_text(str(err))})") from err
    return {posixpath.basename(i.path.rstrip("/")): i for i in infos or []}


def _download(
    source: str, name: str, dest: Path, model_uri: str, listing: Mapping[str, Any], cap: int, what: str
) -> Path:
    """``name`` from the artifact directory into ``dest``: only a file the listing shows, within ``cap``."""
    info = listing.get(name)
    if info is None or info.is_dir:
        found = "a directory" if info is not None else "missing"
        raise ModelLoadError(f"{model_uri}: {name}: {found} in the artifact directory; expected a file")
    if info.file_size is not None and int(info.file_size) > cap:
        raise ModelLoadError(
            f"{model_uri}: {name}: {info.file_size} bytes, above the cap of {cap} bytes per "
            f"{what}; refused before downloading it"
        )
    try:
        uri = f"{source}/{name}"
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking_uri())
        )
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise ModelLoadError(f"{model_uri}: cannot download {name} ({redact_text(str(err))})") from err


def _checked_manifest(path: Path, digest: str | None, model_uri: str) -> dict[str, Any]:
    """The manifest, refused unless it is the one registered and lists exactly scale_0.pt .. scale_{n-1}.pt."""
    where = f"{model_uri}: {MANIFEST}"
    try:
        raw = read_model_file(path, MANIFEST_MAX_BYTES, where, "manifest")
        if digest is not None and hashlib.sha256(raw).hexdigest() != digest:
            raise ModelLoadError(f"{where} does not match the sha256 recorded at registration (replaced artifact)")
        manifest = parse_manifest(raw, where)
    except ModelLoadError:
        raise
    except CascadeError as err:
        raise ModelLoadError(str(err)) from None
    names = [w["file"] for w in manifest["weights"]]
    want = [f"scale_{i}.pt" for i in range(len(names))]
    if names != want or manifest.get("num_scales", len(names)) != len(names):
        raise ModelLoadError(
            f"{where} lists weights {names!r} for num_scales={manifest.get('num_scales')!r}; expected exactly "
            f"{want}, one per scale"
        )
    return manifest


def load_cascade(model_uri: str, device: str = "cpu") -> Cascade:
    """A cascade from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN/PATH`` (a folder loads
    through :func:`msgan.volumes.pinning.pin`, the one dispatch of model references).

    Registry references download only the manifest and the weight files it lists, check the manifest
    against the registered sha256 and every weight against the manifest, and build the networks with
    this installed msgan (weights only). :class:`ModelLoadError` names the model and what is wrong."""
    if not model_uri.startswith(("models:/", "runs:/")):
        raise ModelLoadError(
            f"{model_uri}: not a registry reference (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/)"
        )
    source, digest = _artifact_source(model_uri)
    listing = _listing(source, model_uri)
    with tempfile.TemporaryDirectory(prefix="msgan-model-") as tmp:
        dest = Path(tmp)
        mpath = _download(source, MANIFEST, dest, model_uri, listing, MANIFEST_MAX_BYTES, "manifest")
        manifest = _checked_manifest(mpath, digest, model_uri)
        for entry in manifest["weights"]:
            _download(source, entry["file"], dest, model_uri, listing, WEIGHTS_MAX_BYTES, "weights file")
        return _load_dir(dest, device, model_uri)


def _load_dir(directory: Path, device: str, label: str | None) -> Cascade:
    """:meth:`Cascade.load` (every check of a cascade folder); its :class:`CascadeError` as a
    :class:`ModelLoadError` naming ``label`` (the registry URI) or the folder's file."""
    try:
        return Cascade.load(directory, device, label=label)
    except CascadeError as err:
        raise ModelLoadError(str(err)) from None
