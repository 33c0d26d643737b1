"""The main job: prepare -> train all scales at once -> register the cascade -> translate held-out volumes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msgan import storage
from msgan.cascade import Cascade
from msgan.config import Config, ConfigError
from msgan.distributed import prepare as prep
from msgan.distributed.train import ScaleOutcome, load_generators, train_all_scales

Log = Callable[[str], None]


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


def ensure_ray(cfg: Config) -> None:
    """Connect to the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it) or start a local one.

    Submitted jobs carry their environment in the job's runtime env; a local cluster gets the
    storage and tracking variables of this process (workers need them to reach S3 and MLflow).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every scale's progress lines
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    env = storage.env_for_workers()
    ray.init(
        address="local",
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=True,
        include_dashboard=False,  # no job server needed locally; its processes would take CPU from training
    )


def job_name(cfg: Config, fingerprints: list[str]) -> str:
    """The configured name, or one derived from everything that shapes the result: resubmitting resumes."""
    if cfg.job.name:
        return cfg.job.name
    d = cfg.to_dict()
    d.pop("job")
    h = hashlib.sha256(json.dumps([d, sorted(fingerprints)], sort_keys=True).encode()).hexdigest()
    return f"msgan-{h[:10]}"


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


def translate_holdout(cascade: Cascade, cfg: Config, out_dir: Path, log: Log) -> list[dict[str, Any]]:
    """Translate each held-out volume; phantoms are scored against their soft-kernel truth."""
    from msgan.data.phantom import default_spacing, kernel_pair, radiograph
    from msgan.demo import body_mask, save_slices_png
    from msgan.io.volume import Geometry, read_volume, write_volume
    from msgan.metrics import score
    from msgan.pyramid import window

    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in prep.sources(cfg, holdout=True):
        t0 = time.perf_counter()
        truth: np.ndarray | None = None
        if src.kind == "file":
            image, geom = read_volume(src.ref)
        else:
            shape = cfg.data.phantom.shape
            geom = Geometry.identity(cfg.dims, tuple(reversed(default_spacing(shape))))
            if cfg.dims == 3:  # sharp kernel in, soft kernel is the truth
                truth, image = kernel_pair(shape, int(src.ref))
            else:  # radiograph generated from its own edges: the radiograph is the truth
                truth = image = radiograph(shape, seed=int(src.ref), depth=min(192, max(shape)))
        ours = cascade.translate(image)
        seconds = time.perf_counter() - t0
        stem = f"holdout_{src.ref}" if src.kind == "phantom" else Path(src.ref).name.split(".")[0]
        write_volume(out_dir / f"{stem}_translated.nii.gz", ours, geom)
        entry: dict[str, Any] = {"source": src.label, "seconds": seconds, "output": str(out_dir)}
        if truth is not None:
            w = {k: window(v, cfg.intensity) for k, v in (("input", image), ("ours", ours), ("truth", truth))}
            mask = body_mask(w["truth"])
            entry["input"] = score(w["input"], w["truth"], mask=mask).__dict__
            entry["ours"] = score(w["ours"], w["truth"], mask=mask).__dict__
            png = save_slices_png(out_dir / f"{stem}.png", {"input (sharp)": w["input"], "ours": w["ours"],
                                                            "truth (soft)": w["truth"]})  # fmt: skip
            entry["png"] = str(png)
            log(
                f"  {src.label}: SSIM input {entry['input']['ssim']:.4f} -> ours {entry['ours']['ssim']:.4f}, "
                f"MAE {entry['input']['mae']:.4f} -> {entry['ours']['mae']:.4f} ({seconds:.1f}s)"
            )
        results.append(entry)
    return results


def run_training_job(cfg: Config, log: Log = print, workdir: str | Path = "runs") -> JobResult:
    """Prepare, train every scale at once on Ray, register the cascade, translate held-out volumes."""
    from msgan import registry

    t_start = time.perf_counter()
    root = storage.normalize_uri(cfg.job.storage)
    train_src, holdout_src = prep.sources(cfg), prep.sources(cfg, holdout=True)
    if not train_src:
        raise ConfigError("no training volumes: set data.phantom.seeds or data.paths")
    prep.check_shapes(cfg, train_src)  # bad data or config fails here, before Ray or any training starts
    ensure_ray(cfg)
    log(f"[1/4] preparing {len(train_src)} training + {len(holdout_src)} held-out volumes under {root}/pyramids")
    prepared = prep.prepare(cfg, train_src + holdout_src, root)
    n_new = sum(p["prepared"] for p in prepared)
    log(f"      {n_new} prepared, {len(prepared) - n_new} already there (same content fingerprint)")
    volumes = [p["uri"] for p in prepared[: len(train_src)]]
    val_volumes = [p["uri"] for p in prepared[len(train_src) :]]
    fingerprints = [Path(u).stem for u in volumes]
    job = job_name(cfg, fingerprints)
    data_fp = hashlib.sha256(json.dumps(sorted(fingerprints)).encode()).hexdigest()[:24]

    runs = registry.job_runs(cfg.job.experiment, job, cfg.num_scales, cfg.to_dict(), artifact_root=root)
    log(f"[2/4] training {cfg.num_scales} scales at once as job {job!r} (MLflow run {runs.parent})")
    outcomes = train_all_scales(cfg, job, volumes, val_volumes, root, runs.tracking_uri, runs.children)
    log("      " + summary_table(outcomes).replace("\n", "\n      "))
    failed = [o for o in outcomes if o.summary is None]
    if failed:
        raise JobFailed(
            f"scales {[o.scale for o in failed]} failed ({'; '.join(str(o.error) for o in failed)}); "
            f"resubmit the same job to resume them from their checkpoints"
        )

    log(f"[3/4] registering the cascade as a new version of {cfg.job.registered_model!r}")
    parent = registry.RunLogger(runs.tracking_uri, runs.parent)
    tags = parent.client.get_run(runs.parent).data.tags
    version = tags.get("msgan.registered_version")
    if version is None:
        meta = {
            "job": job,
            "steps": [o.summary["steps"] for o in outcomes if o.summary],
            "data_fingerprint": data_fp,
            "volumes": fingerprints,
            "code_version": registry.code_version(),
        }
        cascade = Cascade(cfg, load_generators(cfg, root, job), meta)
        version = registry.register_cascade(cascade, runs.parent, cfg.job.registered_model)
        parent.tags({"msgan.registered_version": version})
    model_uri = f"models:/{cfg.job.registered_model}@candidate"
    log(f"      version {version}, alias 'candidate' -> {model_uri}")

    log(f"[4/4] translating held-out volumes with {model_uri}")
    loaded = registry.load_cascade(model_uri)
    out_dir = Path(workdir).resolve() / job / "holdout"
    holdout = translate_holdout(loaded, cfg, out_dir, log)
    for i, h in enumerate(holdout):
        if "ours" in h:
            parent.metrics({f"holdout_{k}": v for k, v in h["ours"].items() if np.isfinite(v)}, step=i)
        if "png" in h:
            parent.artifact(h["png"], "holdout")
    seconds = time.perf_counter() - t_start
    log(f"done in {seconds:.0f}s. Outputs: {out_dir}")
    log(f"MLflow: {runs.tracking_uri}  (UI: mlflow ui --backend-store-uri {runs.tracking_uri})")
    return JobResult(job, cfg.job.registered_model, version, outcomes, holdout, runs.tracking_uri, seconds)
