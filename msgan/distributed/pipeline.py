"""The main job: prepare -> train all scales at once -> register the cascade -> translate held-out volumes.

Without pairs (``train.objective: unpaired``) step 1 also fits the forward model of every scale on the driver,
from the two prepared image sets (:func:`fit_forward_from_stores`), records it in MLflow and hands it to every
scale's workers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msgan import console, settings, storage
from msgan.cascade import Cascade
from msgan.config import Config, ConfigError
from msgan.distributed import prepare as prep
from msgan.distributed.train import ScaleOutcome, load_generators, train_all_scales
from msgan.io.pyramids import open_pyramid
from msgan.pyramid import Pyramid
from msgan.redact import redact_uri
from msgan.train import FORWARD_CROP, central_crop

if TYPE_CHECKING:
    from msgan.forward_model import ForwardModel
    from msgan.registry import JobRuns, RunLogger

Log = Callable[[str], None]


LOCAL_WORKER_START_TIMEOUT_S = 600  # Ray Train's worker-group start timeout on a local cluster (Ray's default: 60)


class JobFailed(RuntimeError):
    """Some scales did not finish; resubmitting the job resumes them from their checkpoints."""


@dataclass
class JobResult:
    job: str
    model_name: str
    version: str
    outcomes: list[ScaleOutcome]
    holdout: list[dict[str, Any]] = field(default_factory=list)
    tracking_uri: str = ""
    seconds: float = 0.0


def ensure_ray(cfg: Config | None = None, verbose: bool | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one.

    Quiet unless ``verbose`` (default: :func:`msgan.console.verbose`): Ray's own logging at WARNING and
    workers' output not forwarded (our workers report through a progress board; failures come back as
    exceptions). Submitted jobs carry their environment in the job's runtime env; a local cluster gets
    the storage and tracking variables of this process (workers need them to reach S3 and MLflow).
    """
    import ray

    from msgan import console

    if ray.is_initialized():
        return
    verbose = console.verbose() if verbose is None else verbose
    console.quiet(verbose)
    console.ray_data_progress(verbose)
    if not verbose:
        console.filter_raylet_noise()
    kwargs = console.ray_init_kwargs(verbose)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    # A busy single machine (every scale, the data tasks and the user's own work on a few cores) may take more
    # than Ray Train's default 60 s to start a scale's worker: the scale then failed outright. The local
    # cluster inherits this process's environment; a setting the user made wins.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(LOCAL_WORKER_START_TIMEOUT_S))
    env = storage.env_for_workers()
    ray.init(
        address="local",
        runtime_env={"env_vars": env} if env else None,
        include_dashboard=False,  # no job server needed locally; its processes would take CPU from training
        **kwargs,
    )


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_storage(root: str, tracking: str, nodes: int, volumes: Sequence[prep.VolumeSource] = ()) -> None:
    """Storage, the MLflow store and the data the Ray tasks read (a pair's sides: preparation runs on any
    node) must be reachable from every node: on a multi-node cluster a node-local path fails here, before
    any work, unless MSGAN_SHARED_PATHS marks it as a shared mount."""
    try:
        settings.check_reachable_from_all_nodes("job.storage", root, nodes)
        settings.check_reachable_from_all_nodes("the MLflow store", tracking, nodes)
        for v in volumes:
            if v.kind == "pair":
                settings.check_reachable_from_all_nodes(f"{v.label}: source", v.ref, nodes)
                settings.check_reachable_from_all_nodes(f"{v.label}: target", v.target, nodes)
            elif v.kind == "image":
                settings.check_reachable_from_all_nodes(f"{v.label}: image", v.ref, nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from err


class TrainingConsole:
    """The driver's view of every scale training at once, fed by the workers through a progress board:
    per scale its step, rate and ETA (a bar on a terminal, a line per quarter when piped), restarts and
    failures with their cause (always shown), and the end of each scale."""

    def __init__(self, cfg: Config, log: Log, progress: console.Progress | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.progress = progress or console.Progress()
        self.failures: dict[int, list[str]] = {}

    def handle(self, item: dict[str, Any]) -> None:
        scale, kind = int(item.get("scale", -1)), item.get("kind")
        label = f"[scale {scale}]"
        if kind == "start":
            steps, at = int(item["steps"]), item.get("t")
            self.progress.add(scale, label, steps, "steps", start=int(item["step"]), final_line=False, at=at)
            again = f"attempt {item['attempt']}, resumed at step {item['step']}" if item["attempt"] > 1 else ""
            start = again or ("resumed at step " + str(item["step"]) if item["step"] else "started")
            self.progress.say(
                f"{label} {start}: {item['steps']} steps on {item['device']} (world_size={item['world']})"
            )
        elif kind == "step":
            note = f"G {item['loss_g']:.3f} (L1 {item['l1']:.4f}) D {item['loss_d']:.3f}"
            self.progress.update(scale, int(item["step"]), note, at=item.get("t"))
        elif kind == "failed":
            self.failures.setdefault(scale, []).append(str(item["error"]))
            self.progress.say(f"{label} worker (rank {item.get('rank', 0)}) failed: {item['error']}")
        elif kind == "done":
            self.progress.update(scale, int(item["step"]), at=item.get("t"))
            self.progress.say(f"{label} done: {item['step']} steps in {console.fmt_seconds(item['seconds'])}")


def fit_local_cluster(cfg: Config, log: Log) -> Config:
    """On a local cluster training on CPUs, every scale's workers must fit at once (all scales train at the same
    time; one left waiting for a CPU fails when Ray Train's start timeout runs out): when ``job.cpus_per_worker``
    asks for more CPUs than the machine has, the reservation is shared out (a reservation only: each worker's
    threads are ``train.threads``). A cluster named by RAY_ADDRESS may autoscale: its settings are kept."""
    import ray

    from msgan.distributed.train import use_gpu

    if os.environ.get("RAY_ADDRESS") or use_gpu(cfg):
        return cfg
    workers = cfg.num_scales * cfg.job.workers_per_scale
    total = float(ray.cluster_resources().get("CPU", 0))
    if total <= 0 or workers * cfg.job.cpus_per_worker <= total:
        return cfg
    share = math.floor(100 * total / workers) / 100
    log(
        f"      {workers} workers x job.cpus_per_worker={cfg.job.cpus_per_worker:g} do not fit this machine's "
        f"{total:g} CPUs at once: each reserves {share:g} instead"
    )
    return cfg.replace(**{"job.cpus_per_worker": share})


def job_name(cfg: Config, fingerprints: list[str]) -> str:
    """The configured name, or one derived from everything that shapes the result: resubmitting resumes."""
    if cfg.job.name:
        return cfg.job.name
    d = cfg.to_dict()
    d.pop("job")
    h = hashlib.sha256(json.dumps([d, sorted(fingerprints)], sort_keys=True).encode()).hexdigest()
    return f"msgan-{h[:10]}"


def central_crops(uri: str, num_scales: int, size: int = FORWARD_CROP) -> Pyramid:
    """The images of a prepared store, each scale's cut to its central ``size`` voxels per side (a level
    smaller than that whole): the store is opened lazily and only the crop is read, so a 512^3 archive volume
    costs at most 8 MiB per scale on the driver, never the whole level. Edges are not read."""
    pyr = open_pyramid(uri, range(num_scales), cache_bytes=0)  # zarr arrays: nothing read yet
    return Pyramid(images=[central_crop(level, size) for level in pyr.images], edges=[])


def fit_forward_from_stores(cfg: Config, sources: Sequence[str], targets: Sequence[str]) -> list[ForwardModel]:
    """Training without pairs: every scale's forward model (target -> source), fitted on the driver from the
    two sets' prepared stores by :func:`msgan.train.fit_forward_models` (the local path's fit), each volume
    read as a central crop of at most :data:`FORWARD_CROP` voxels per side per scale (:func:`central_crops`):
    spectra and noise levels need a representative piece of the body, and the driver's memory stays bounded
    by the number of volumes, not by their size."""
    from msgan.train import fit_forward_models

    n = cfg.num_scales
    return fit_forward_models(cfg, [central_crops(u, n) for u in sources], [central_crops(u, n) for u in targets])


def forward_models(
    cfg: Config, job: str, root: str, sources: Sequence[str], targets: Sequence[str], parent: RunLogger, log: Log
) -> list[ForwardModel]:
    """The job's forward models: fitted once (:func:`fit_forward_from_stores`) and kept as
    ``<storage>/runs/<job>/forward_models.json``, so a resubmitted job resumes its scales with the very models
    they trained with; each scale's :meth:`~msgan.forward_model.ForwardModel.summary` is shown, and goes to the
    parent MLflow run as metrics ``forward_<name>`` (step: the scale) and the JSON as an artifact."""
    import tempfile

    from msgan.forward_model import ForwardModel

    uri = storage.join(root, "runs", job, "forward_models.json")
    if storage.exists(uri):
        try:
            models = [
                ForwardModel.from_dict(d) for d in storage.json_object(storage.read_text(uri), ["scales"])["scales"]
            ]
            if len(models) != cfg.num_scales:
                raise ValueError(f"{len(models)} models for {cfg.num_scales} scales")
        except (ValueError, TypeError) as err:
            raise JobFailed(f"{redact_uri(uri)}: {err}; remove it to fit the forward models again") from None
        log(f"      forward model of every scale: fitted before (job {job!r}), reused")
    else:
        log(
            f"      fitting the forward model (target -> source) of every scale on {len(sources)} source and "
            f"{len(targets)} target images (central crops of at most {FORWARD_CROP} voxels per side)"
        )
        t0 = time.perf_counter()
        models = fit_forward_from_stores(cfg, sources, targets)
        storage.write_text(uri, json.dumps({"scales": [m.to_dict() for m in models]}))
        log(f"      fitted in {console.fmt_seconds(time.perf_counter() - t0)}")
    for s, m in enumerate(models):
        log(f"      [scale {s}] forward model: " + ", ".join(f"{k} {v:.3g}" for k, v in m.summary().items()))
    if "msgan.forward_models" not in parent.client.get_run(parent.run_id).data.tags:
        for s, m in enumerate(models):
            parent.metrics({f"forward_{k}": float(v) for k, v in m.summary().items() if np.isfinite(v)}, step=s)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "forward_models.json"
            path.write_text(json.dumps({"scales": [m.to_dict() for m in models],
                                        "summary": [m.summary() for m in models]}, indent=1))  # fmt: skip
            parent.artifact(path, "forward_model")
        parent.tags({"msgan.forward_models": "fitted"})
    return models


def summary_table(outcomes: list[ScaleOutcome]) -> str:
    rows = [
        f"{'scale':>5} {'steps':>7} {'time':>8} {'loss G':>8} {'L1':>8} {'loss D':>7} {'val SSIM':>8} {'peak MiB':>9}"
    ]
    for o in sorted(outcomes, key=lambda o: o.scale):
        s = o.summary
        if s is None:
            rows.append(f"{o.scale:>5}  FAILED: {o.error}")
            continue
        note = " (done before)" if o.skipped else ""
        rows.append(
            f"{o.scale:>5} {s['steps']:>7} {s['seconds']:>7.1f}s {s['loss_g'] or 0:>8.3f} {s['loss_g_l1'] or 0:>8.4f} "
            f"{s['loss_d'] or 0:>7.3f} {s.get('val_ssim', float('nan')):>8.3f} {s['peak_memory_bytes'] / 2**20:>9.0f}"
            f"{note}"
        )
    return "\n".join(rows)


def translate_holdout(
    cascade: Cascade, cfg: Config, out_dir: Path, log: Log, volumes: list[prep.VolumeSource] | None = None
) -> list[dict[str, Any]]:
    """Translate each end-of-job volume (:func:`msgan.distributed.prepare.end_of_job` unless ``volumes``);
    phantoms are scored against their truth (:func:`msgan.metrics.score_against_truth`, as the demo scores),
    pairs against their target inside its body and the pair's overlap (:func:`msgan.metrics.score_pair`)."""
    from msgan.io.volume import write_volume
    from msgan.metrics import score_against_truth, score_pair
    from msgan.preview import save_columns

    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    units = "normalised units" if cfg.intensity.normalize != "none" else "image units: HU for CT"
    for held in prep.held_out(cfg, volumes):
        t0 = time.perf_counter()
        ours = cascade.translate(held.image)
        seconds = time.perf_counter() - t0
        write_volume(out_dir / f"{held.stem}_translated.nii.gz", ours, held.geometry)
        entry: dict[str, Any] = {"source": held.label, "seconds": seconds, "output": str(out_dir)}
        png = out_dir / f"{held.stem}.png"
        spacing = held.geometry.numpy_spacing()
        if held.truth is None:
            save_columns(png, {"input": held.image, "ours": ours}, spacing)
            log(f"      {held.label}: translated in {seconds:.1f}s")
        elif held.valid is not None or held.scored_input is not None:  # a pair: no phantom labels
            image = held.scored_input if held.scored_input is not None else held.image
            p_in, p_ours = score_pair(cfg, image, ours, held.truth, held.valid, spacing, png)
            entry["input"], entry["ours"] = p_in.__dict__, p_ours.__dict__
            entry["alignment"] = held.alignment
            log(
                f"      {held.label}: SSIM input {p_in.ssim:.4f} -> ours {p_ours.ssim:.4f}, PSNR {p_in.psnr:.2f} -> "
                f"{p_ours.psnr:.2f} dB, MAE {p_in.mae:.1f} -> {p_ours.mae:.1f}, RMSE {p_in.rmse:.1f} -> "
                f"{p_ours.rmse:.1f} ({units}, body and overlap; {seconds:.1f}s)"
            )
        else:
            s_in, s_ours = score_against_truth(cfg, held.image, ours, held.truth, spacing, png)
            entry["input"], entry["ours"] = s_in.__dict__, s_ours.__dict__
            log(
                f"      {held.label}: SSIM input {s_in.ssim:.4f} -> ours {s_ours.ssim:.4f}, "
                f"MAE {s_in.mae:.4f} -> {s_ours.mae:.4f} (window units; {seconds:.1f}s)"
            )
        entry["png"] = str(png)
        results.append(entry)
    scored = [h for h in results if "ours" in h]
    if len(scored) > 1:
        keys = [k for k in scored[0]["ours"] if k != "voxels"]
        mean = {side: {k: float(np.nanmean([h[side][k] for h in scored])) for k in keys} for side in ("input", "ours")}
        log(
            f"      mean of {len(scored)}: "
            + ", ".join(f"{k} {mean['input'][k]:.4g} -> {mean['ours'][k]:.4g}" for k in keys)
        )
    return results


def run_training_job(
    cfg: Config, log: Log = print, workdir: str | Path = "runs", progress: console.Progress | None = None
) -> JobResult:
    """Prepare, train every scale at once on Ray, register the cascade, translate held-out volumes.

    Relative paths (``job.storage``, ``workdir``) and the default MLflow store live under ``MSGAN_HOME``
    (:mod:`msgan.settings`), never under the working directory, which ``ray job submit`` makes temporary."""
    from msgan import registry

    t_start = time.perf_counter()
    root = storage.resolve_storage(cfg.job.storage)
    out_root = settings.resolve_local(workdir)
    train_src, val_src = prep.sources(cfg), prep.sources(cfg, "validation")
    end_kind, end_src = prep.end_of_job(cfg)
    if not train_src:
        raise ConfigError("no training volumes: set data.phantom.seeds, data.paths or data.pairs")
    # bad data or config fails here, before Ray or training; a pair used twice is checked once
    prep.check_shapes(cfg, list(dict.fromkeys([*train_src, *val_src, *end_src])))
    ensure_ray(cfg)
    tracking = registry.tracking_uri()
    check_shared_storage(root, tracking, alive_nodes(), [*train_src, *val_src])
    log(f"storage {root}")
    log(f"MLflow  {redact_uri(tracking)}")
    log(f"outputs {out_root}")
    # held-out pairs are read, checked and aligned in step 1 too: a bad one fails before training, not after
    held_pairs = [v for v in end_src if v.kind == "pair" and v not in (*train_src, *val_src)]
    prepared, val_prepared, held_prepared = _prepare_volumes(cfg, train_src, val_src, held_pairs, root, log)
    volumes, val_volumes = [p["uri"] for p in prepared], [p["uri"] for p in val_prepared]
    source_volumes: list[str] = []
    fingerprints = [Path(u).stem for u in volumes]
    sets: dict[str, str] = {}
    if cfg.train.objective == "unpaired":  # the workers' volumes are the targets; scale 0 reads the sources too
        by_side: dict[str, list[str]] = {"sources": [], "targets": []}
        for src, p in zip(train_src, prepared, strict=True):
            by_side[src.side].append(p["uri"])
        source_volumes, volumes = by_side["sources"], by_side["targets"]
        # which set a volume is in shapes the result: swapping the two folders is another job
        fingerprints = [f"{side}/{Path(u).stem}" for side, uris in by_side.items() for u in uris]
        sets = {side: _set_fingerprint(uris) for side, uris in by_side.items()}
    job = job_name(cfg, fingerprints)
    runs = registry.job_runs(cfg.job.experiment, job, cfg.num_scales, cfg.to_dict(), artifact_root=root)
    parent = registry.RunLogger(runs.tracking_uri, runs.parent)
    _record_data(cfg, prepared + val_prepared + held_prepared, parent, sets)
    forward = forward_models(cfg, job, root, source_volumes, volumes, parent, log) if source_volumes else []
    outcomes = _train_scales(cfg, job, volumes, val_volumes, root, runs, log, progress, source_volumes, forward)
    version, model_uri = _register(cfg, job, root, fingerprints, outcomes, parent, log, forward)
    out_dir = out_root / job / end_kind
    holdout = _translate_holdout_of(model_uri, cfg, out_dir, parent, log, end_kind, end_src)
    seconds = time.perf_counter() - t_start
    log(f"done in {console.fmt_seconds(seconds)}. Outputs: {out_dir}")
    for h in holdout:
        log(f"picture: {h['png']}")
    log(f"MLflow UI: mlflow ui --backend-store-uri {redact_uri(runs.tracking_uri)}")
    return JobResult(job, cfg.job.registered_model, version, outcomes, holdout, runs.tracking_uri, seconds)


def _prepare_volumes(
    cfg: Config, train_src: list[Any], val_src: list[Any], held: list[Any], root: str, log: Log
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Step 1: the pyramids of every training and validation volume, and of the held-out pairs (so that
    each is read, checked and aligned before any training), under ``root`` (reused when there). Returns
    what :func:`msgan.distributed.prepare.prepare` says of each (training, validation, held-out)."""
    more = f" + {len(held)} held-out pairs" if held else ""
    sides = [v.side for v in train_src if v.kind == "image"]
    what = (
        f"{sides.count('sources')} source-set + {sides.count('targets')} target-set images (no pairs)"
        if sides
        else f"{len(train_src)} training"
    )
    log(f"[1/4] preparing {what} + {len(val_src)} validation volumes{more} under {root}/pyramids")
    everything = train_src + val_src + held
    prepared = prep.prepare(cfg, everything, root)
    n_new = sum(p["prepared"] for p in prepared)
    log(f"      {n_new} prepared, {len(prepared) - n_new} already there (same content fingerprint)")
    for src, p in zip(everything, prepared, strict=True):
        a = p.get("alignment")
        if a is not None:
            how = "same grid" if a["same_grid"] and a["method"] == "none" else f"{a['method']}"
            log(f"      {src.label}: {how}, overlap {a['overlap']:.0%}, residual {a['residual']:.4f}")
    n, m = len(train_src), len(train_src) + len(val_src)
    return prepared[:n], prepared[n:m], prepared[m:]


def _set_fingerprint(uris: Sequence[str]) -> str:
    """An image set's fingerprint: of its prepared stores' content fingerprints (order-free), so a CSV or a
    folder of the same images gives the same one."""
    return hashlib.sha256(json.dumps(sorted(Path(u).stem for u in uris)).encode()).hexdigest()[:24]


def _record_data(
    cfg: Config, prepared: list[dict[str, Any]], parent: RunLogger, sets: dict[str, str] | None = None
) -> None:
    """What the job trained on, in MLflow as tags and metrics of the parent run (never a patient path): the
    pairs manifest's fingerprint and the alignment setting, each pair's alignment residual and overlap by
    its CSV row (the metric's step); without pairs, each image set's fingerprint and size (``sets``: set ->
    fingerprint) and the scored pairs' as above."""
    if cfg.data.source not in ("pairs", "unpaired"):
        return
    from msgan.data.pairs import pairs_fingerprint

    tags = parent.client.get_run(parent.run_id).data.tags
    if "msgan.pairs_fingerprint" in tags or "msgan.sources_fingerprint" in tags:
        return  # a resubmitted job: recorded the first time
    if cfg.data.source == "unpaired":
        counts: dict[str, int] = {}
        for p in prepared:
            side = p["source"].get("side", "")
            counts[side] = counts.get(side, 0) + 1
        parent.tags({f"msgan.{side}_fingerprint": fp for side, fp in (sets or {}).items()})
        parent.metrics({f"{side}_images": float(counts.get(side, 0)) for side in (sets or {})}, step=0)
        if not cfg.data.pairs:
            return
    parent.tags({"msgan.pairs_fingerprint": pairs_fingerprint(cfg.data.pairs), "msgan.align": cfg.data.align})
    for p in prepared:
        a, row = p.get("alignment"), int(p["source"].get("row", 0))
        if a is not None:
            parent.metrics({"align_residual": a["residual"], "align_overlap": a["overlap"]}, step=row)


def _train_scales(
    cfg: Config,
    job: str,
    volumes: list[str],
    val_volumes: list[str],
    root: str,
    runs: JobRuns,
    log: Log,
    progress: console.Progress | None,
    source_volumes: Sequence[str] = (),
    forward: Sequence[ForwardModel] = (),
) -> list[ScaleOutcome]:
    """Step 2: every scale at once on Ray, shown on the console; raises :class:`JobFailed` if any failed.
    Without pairs every scale's workers get the source set's stores and the forward models."""
    log(f"[2/4] training {cfg.num_scales} scales at once as job {job!r} (MLflow run {runs.parent})")
    cfg = fit_local_cluster(cfg, log)
    board = console.ProgressBoard()
    view = TrainingConsole(cfg, log, progress)
    stop = board.follow(view.handle)
    try:
        outcomes = train_all_scales(
            cfg, job, volumes, val_volumes, root, runs.tracking_uri, runs.children, board=board.handle,
            source_volumes=source_volumes, forward=[m.to_dict() for m in forward],
        )  # fmt: skip
    finally:
        stop()
        view.progress.close()
    log("      " + summary_table(outcomes).replace("\n", "\n      "))
    failed = [o for o in outcomes if o.summary is None]
    if failed:
        raise JobFailed(
            f"scales {[o.scale for o in failed]} failed ({'; '.join(str(o.error) for o in failed)}); "
            f"resubmit the same job to resume them from their checkpoints"
        )
    return outcomes


def _register(
    cfg: Config,
    job: str,
    root: str,
    fingerprints: list[str],
    outcomes: list[ScaleOutcome],
    parent: RunLogger,
    log: Log,
    forward: Sequence[ForwardModel] = (),
) -> tuple[str, str]:
    """Step 3: register the trained cascade once (a resubmitted job finds its version on the parent run).
    Returns (version, the model URI of the ``candidate`` alias). Without pairs the model's metadata holds
    each scale's forward-model summary, as :func:`msgan.train.train_locally` writes it."""
    from msgan import registry

    log(f"[3/4] registering the cascade as a new version of {cfg.job.registered_model!r}")
    tags = parent.client.get_run(parent.run_id).data.tags
    version = tags.get("msgan.registered_version")
    if version is None:
        meta = {
            "steps": [o.summary["steps"] for o in outcomes if o.summary],
            "data_fingerprint": hashlib.sha256(json.dumps(sorted(fingerprints)).encode()).hexdigest()[:24],
            "volumes": fingerprints,
            "code_version": registry.code_version(),
        }
        if forward:
            meta["forward_models"] = [m.summary() for m in forward]
        cascade = Cascade(cfg, load_generators(cfg, root, job), meta)
        version = registry.register_cascade(cascade, parent.run_id, cfg.job.registered_model)
        parent.tags({"msgan.registered_version": version})
    model_uri = f"models:/{cfg.job.registered_model}@candidate"
    log(f"      version {version}, alias 'candidate' -> {model_uri}")
    return version, model_uri


def _translate_holdout_of(
    model_uri: str,
    cfg: Config,
    out_dir: Path,
    parent: RunLogger,
    log: Log,
    kind: str = "holdout",
    volumes: list[prep.VolumeSource] | None = None,
) -> list[dict[str, Any]]:
    """Step 4: translate the end-of-job volumes (``kind``: the held-out ones, or the validation ones when the
    config holds none out) with the registered model; their scores (per volume and the mean, as
    ``<kind>_<metric>`` and ``<kind>_mean_<metric>``) and pictures go to the job's parent run."""
    from msgan import registry

    what = "held-out" if kind == "holdout" else "validation (no held-out volumes named)"
    log(f"[4/4] translating {what} volumes with {model_uri}")
    loaded = registry.load_cascade(model_uri)
    holdout = translate_holdout(loaded, cfg, out_dir, log, volumes)
    scored = []
    for i, h in enumerate(holdout):
        if "ours" in h:  # ours as <kind>_<metric>, the input itself beside it as <kind>_input_<metric>
            finite = {k: float(v) for k, v in h["ours"].items() if np.isfinite(v)}
            finite |= {f"input_{k}": float(v) for k, v in h["input"].items() if np.isfinite(v)}
            parent.metrics({f"{kind}_{k}": v for k, v in finite.items()}, step=i)
            scored.append(finite)
        if "png" in h:
            parent.artifact(h["png"], kind)
    if scored:
        keys = sorted(set.intersection(*(set(s) for s in scored)))
        parent.metrics({f"{kind}_mean_{k}": float(np.mean([s[k] for s in scored])) for k in keys}, step=0)
    return holdout
