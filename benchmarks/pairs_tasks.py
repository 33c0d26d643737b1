"""The four phantom tasks through a user's path (issue 21, item 6a): DICOM studies -> find-pairs -> the training job
-> the batch translation of held-out volumes -> export to DICOM -> scored against the phantom's truth.

    python benchmarks/pairs_tasks.py                    # 128^3, every row; resumable: rerun to continue
    nohup python benchmarks/pairs_tasks.py > runs/pairs-tasks.log 2>&1 &     # in the background
    python benchmarks/pairs_tasks.py --smoke            # 32^3, tiny training, 3 rows: checks the whole path
    python benchmarks/pairs_tasks.py --until write      # only write the DICOM studies (no training)
    python benchmarks/pairs_tasks.py --tables           # only print / write docs/results/pairs_tasks.md

What a user would have: each subject (seeds of ``msgan.data.tasks.SEEDS``: training 101-108, validation 201-204,
held-out 301-308) is one DICOM CT study of two series, ``INPUT`` and ``TARGET`` (SeriesDescription), one
FrameOfReferenceUID, PatientID per seed, int16 pixels with RescaleIntercept -1024 / RescaleSlope 1 (HU rounded to
the integer, as scanners store them), on an oblique grid (the phantom's spacing, turned 4 degrees about x and
3 about y). Pairs are found with ``msgan find-pairs`` (``--validation 0 --holdout 0``: every pair first in
``train``), and the split column is then set by patient from the fixed seeds (``find-pairs``' random split
cannot give the fixed seeds; one patient is one seed, so a split by patient it stays). ``--pairs-via manifest``
writes the same pairs.csv by hand, naming the DICOM series folders (a fallback that skips find-pairs).

Rows (``{row: {method: {metric: [per volume], seeds: [...]}}}`` in docs/results/pairs_tasks.json, the shape of
tasks.json): every task of ``msgan.data.tasks`` with ``input`` (the ingested input, scored), ``ours`` (trained
with the task's config, seed 0) and ``ours_seed1`` (the same, ``--set seed=1``: run-to-run noise); variants:
``kernel-thick`` (sharp-to-soft; the target written as a real thick-slice reconstruction: the mean of each pair
of slices, on its own grid of twice the slice thickness; ``data.align=none`` resamples it physically);
``contrast-moved-none`` / ``contrast-moved-rigid`` (contrast; the target phase moved by a rigid motion drawn per
subject, 1.5-3 degrees about each axis and 2-4 mm along each, resampled with SimpleITK's Euler3DTransform,
B-spline, -2048 HU outside the field of view; trained with ``data.align`` none / rigid). Every row is scored with
``msgan.metrics.ct_metrics`` against the UNMOVED, thin-slice truth of ``msgan.data.tasks.make_task`` on the input's
grid. The tables compare with the ``ours`` rows of docs/results/tasks.json (the in-memory benchmark: same seeds,
configs and budgets) and give the run-to-run difference of the two trainings beside it.

Everything is kept under ``--workdir`` (default runs/pairs-tasks; MSGAN_HOME and the sqlite MLflow store are set to
it): the studies, pairs.csv, the job's storage, translations, exports and logs. A rerun skips written studies,
finished trainings (a marker written when the job exits 0; an unfinished job resumes from its checkpoints, same
job.name), published translations and scored volumes (results are saved after every volume).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tasks import SMOKE, Results, _fmt  # noqa: E402
from msgan.data.phantom import default_spacing  # noqa: E402
from msgan.data.tasks import METRIC_WINDOW, SEEDS, TASKS, TaskVolume, make_task, split_of  # noqa: E402
from msgan.io.volume import Geometry  # noqa: E402

Log = Callable[[str], None]

OBLIQUE_DEG = (4.0, 3.0)  # the study grid turned about x, then y
MOTION_DEG = (1.5, 3.0)  # contrast-moved: |angle| about each axis, drawn per subject
MOTION_MM = (2.0, 4.0)  # |shift| along each axis
PADDING_HU = -2048.0  # what a moved target holds where nothing was imaged (outside the field of view)
INTERCEPT = -1024.0  # stored = HU - intercept, int16, slope 1
KERNEL_NAMES = {"sharp": "B70f", "soft": "B30f"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "heldout": "holdout"}  # tasks' seeds -> pairs.csv
SMOKE_SEEDS = {"train": (101, 102, 103, 104), "validation": (201,), "heldout": (301, 302)}
SMOKE_ROWS = ("sharp-to-soft", "kernel-thick", "contrast-moved-rigid")
TABLE_KEYS = ("ssim", "psnr", "mae_hu", "rmse_hu", "hallucination_ml")


@dataclass(frozen=True)
class Row:
    task: str  # msgan.data.tasks task: the truth and the config (configs/<task>.yaml)
    data: str  # which DICOM data set (a task's own, or a variant's)
    align: str  # data.align of the training
    methods: tuple[tuple[str, int], ...]  # (method, training seed)


ROWS: dict[str, Row] = {
    **{t: Row(t, t, "none", (("ours", 0), ("ours_seed1", 1))) for t in TASKS},
    "kernel-thick": Row("sharp-to-soft", "kernel-thick", "none", (("ours", 0),)),
    "contrast-moved-none": Row("contrast", "contrast-moved", "none", (("ours", 0),)),
    "contrast-moved-rigid": Row("contrast", "contrast-moved", "rigid", (("ours", 0),)),
}
BASE_OF = {"kernel-thick": "sharp-to-soft", "contrast-moved-none": "contrast", "contrast-moved-rigid": "contrast"}
DATASETS = {**{t: (t, "same-grid") for t in TASKS}, "kernel-thick": ("sharp-to-soft", "thick"),
            "contrast-moved": ("contrast", "moved")}  # fmt: skip


# ----------------------------------------------------------------------------- the studies


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """R = Rz @ Ry @ Rx for angles (x, y, z) in degrees (ITK axis order)."""
    ax, ay, az = (np.deg2rad(float(a)) for a in (*angles_deg, 0.0, 0.0)[:3])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


def study_geometry(shape: Sequence[int], spacing: Sequence[float] | None = None,
                   angles_deg: Sequence[float] = OBLIQUE_DEG) -> Geometry:  # fmt: skip
    """The phantom grid (numpy ``shape`` (z, y, x), its spacing) turned by ``angles_deg`` about its centre, which
    sits at the origin of patient coordinates: an oblique acquisition."""
    sp = tuple(reversed(default_spacing(shape) if spacing is None else tuple(spacing)))  # ITK order (x, y, z)
    d = rotation(angles_deg)
    half = (np.asarray(tuple(reversed(shape)), dtype=np.float64) - 1.0) / 2.0 * np.asarray(sp)
    origin = -d @ half
    return Geometry(tuple(float(v) for v in sp), tuple(float(v) for v in origin), tuple(float(v) for v in d.ravel()))


def thick_slices(image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """A thick-slice reconstruction: each pair of slices (numpy axis 0) averaged, on its own grid (twice the slice
    spacing and thickness, the first slice centred between the first two thin ones)."""
    n = image.shape[0] // 2 * 2
    thick = image[:n].reshape(n // 2, 2, *image.shape[1:]).mean(axis=1, dtype=np.float64).astype(np.float32)
    d = np.asarray(geometry.direction).reshape(3, 3)
    sx, sy, sz = geometry.spacing
    origin = np.asarray(geometry.origin) + 0.5 * sz * d[:, 2]
    return thick, Geometry((sx, sy, 2 * sz), tuple(float(v) for v in origin), geometry.direction)


def rigid_motion(seed: int) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The subject's motion between the phases: (angles about x, y, z in degrees, shift in mm), each of a
    magnitude drawn in :data:`MOTION_DEG` / :data:`MOTION_MM` with a random sign."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x40E]))

    def draw(lo_hi: tuple[float, float]) -> tuple[float, float, float]:
        v = rng.uniform(*lo_hi, size=3) * rng.choice([-1.0, 1.0], size=3)
        return (float(v[0]), float(v[1]), float(v[2]))

    return draw(MOTION_DEG), draw(MOTION_MM)


def move(image: np.ndarray, geometry: Geometry, seed: int) -> np.ndarray:
    """``image`` after the subject's :func:`rigid_motion` about the grid's centre, on the same grid (B-spline;
    :data:`PADDING_HU` where the moved patient was not imaged)."""
    import SimpleITK as sitk

    from msgan.io.volume import from_sitk, to_sitk

    angles, shift = rigid_motion(seed)
    img = to_sitk(np.asarray(image, np.float32), geometry)
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()])
    t = sitk.Euler3DTransform()
    t.SetCenter(centre)
    t.SetRotation(*(np.deg2rad(a) for a in angles))
    t.SetTranslation(shift)
    out = sitk.Resample(img, img, t, sitk.sitkBSpline, PADDING_HU, sitk.sitkFloat32)
    return from_sitk(out)[0]


def study_series(
    data: str, seed: int, shape: Sequence[int]
) -> tuple[TaskVolume, list[tuple[str, str, np.ndarray, Geometry]]]:
    """The subject's task volume and the two series of its study: (description, kernel, HU, geometry)."""
    task, variant = DATASETS[data]
    tv = make_task(task, seed, shape)
    geom = study_geometry(shape, tv.spacing)
    kin = str(tv.params.get("input_kernel", tv.params.get("kernel", "soft")))
    kout = str(tv.params.get("target_kernel", tv.params.get("kernel", "soft")))
    target, tgeom = tv.target, geom
    if variant == "thick":
        target, tgeom = thick_slices(tv.target, geom)
    elif variant == "moved":
        target = move(tv.target, geom, seed)
    return tv, [("INPUT", kin, tv.input, geom), ("TARGET", kout, target, tgeom)]


def patient_id(seed: int) -> str:
    return f"PAIRS{seed:04d}"


def study_uids(data: str, seed: int) -> dict[str, str]:
    from msgan.io.dicom import derived_uid

    return {"StudyInstanceUID": derived_uid("msgan-pairs", data, str(seed), "study"),
            "FrameOfReferenceUID": derived_uid("msgan-pairs", data, str(seed), "frame"),
            **{f"{d}": derived_uid("msgan-pairs", data, str(seed), d) for d in ("INPUT", "TARGET")}}  # fmt: skip


def write_study(
    folder: Path, data: str, seed: int, series: list[tuple[str, str, np.ndarray, Geometry]]
) -> dict[str, list[Path]]:
    """One study: each series in ``folder/<description>/`` as single-frame CT images (ORIGINAL, int16 with
    RescaleIntercept :data:`INTERCEPT`); one FrameOfReferenceUID; PatientID per seed."""
    import pydicom

    from msgan.io.dicom import CT_IMAGE, write_series

    uids = study_uids(data, seed)
    ids = {"PatientID": patient_id(seed), "PatientName": f"Phantom^{seed}", "PatientBirthDate": "19600101",
           "PatientSex": "O", "StudyDate": "20261201", "StudyTime": "090000", "StudyID": "1",
           "AccessionNumber": f"A{seed}", "StudyDescription": "CT THORAX PAIRS", "Modality": "CT",
           "Manufacturer": "msgan-phantom", "BodyPartExamined": "CHEST", "KVP": "120", "SOPClassUID": CT_IMAGE,
           "StudyInstanceUID": uids["StudyInstanceUID"],
           "FrameOfReferenceUID": uids["FrameOfReferenceUID"]}  # fmt: skip
    out: dict[str, list[Path]] = {}
    for number, (description, kernel, image, geom) in enumerate(series, start=2):
        stored = np.clip(np.round(np.asarray(image, np.float64)) - INTERCEPT, -32768, 32767).astype(np.int16)
        files = write_series(stored.astype(np.float32) + INTERCEPT, geom, folder / description,
                             {**ids, "ConvolutionKernel": KERNEL_NAMES[kernel]}, uids[description], description,
                             series_number=number)  # fmt: skip
        for k, f in enumerate(files):  # a scanner's series: ORIGINAL\PRIMARY, stored = HU + 1024
            ds = pydicom.dcmread(f)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.RescaleIntercept, ds.RescaleSlope = f"{INTERCEPT:g}", "1"
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.save_as(f, enforce_file_format=True)
        out[description] = files
    return out


def dataset_record(data: str, shape: Sequence[int], seeds: Sequence[int]) -> dict[str, Any]:
    return {"data": data, "task": DATASETS[data][0], "variant": DATASETS[data][1], "shape": list(shape),
            "seeds": list(seeds), "oblique_deg": list(OBLIQUE_DEG), "intercept": INTERCEPT,
            "motion_deg": list(MOTION_DEG), "motion_mm": list(MOTION_MM), "padding_hu": PADDING_HU}  # fmt: skip


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_dataset(data: str, shape: Sequence[int], seeds: Sequence[int], root: Path, log: Log) -> Path:
    """Every subject's study of ``data`` under ``root/<data>/<seed>/`` (nothing else in that folder: it is what
    find-pairs reads); a subject is done when its marker ``root/<data>.done/<seed>`` is there (written last), so a
    stopped run rewrites only the study in flight. Another record (shape, seeds, settings) in ``root/<data>.json``
    is refused: never mix."""
    folder, done = root / data, root / f"{data}.done"
    record = dataset_record(data, shape, seeds)
    have = root / f"{data}.json"
    if have.exists() and json.loads(have.read_text()) != record:
        raise SystemExit(f"{folder}: holds studies of {have.read_text()[:200]}...; this run wants {record}: pass "
                         "another --workdir (never mix)")  # fmt: skip
    _atomic_text(have, json.dumps(record))
    todo = [s for s in seeds if not (done / str(s)).exists()]
    if todo:
        log(f"  {data}: writing {len(todo)} of {len(seeds)} studies under {folder}")
    for seed in todo:
        study = folder / str(seed)
        if study.exists():
            shutil.rmtree(study)  # a study in flight when the last run stopped
        _, series = study_series(data, seed, shape)
        write_study(study, data, seed, series)
        _atomic_text(done / str(seed), "")
    return folder


# ----------------------------------------------------------------------------- the user's commands


def run_logged(cmd: list[str], log_file: Path, env: dict[str, str], log: Log, what: str) -> None:
    """Run a command of the user's path, its output into ``log_file``; a failure stops the benchmark with the
    command, its exit status and the last lines it printed."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"  {what}: {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}  (log {log_file})")
    t0 = time.perf_counter()
    with log_file.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-25:])
        raise SystemExit(f"{what} failed (exit {rc}): {' '.join(cmd)}\n--- last lines of {log_file}:\n{tail}")
    log(f"  {what}: done in {time.perf_counter() - t0:.0f}s")


def path_env(work: Path) -> dict[str, str]:
    """This benchmark's own MSGAN_HOME and MLflow store: nothing of it lands in the user's ~/.msgan."""
    env = dict(os.environ)
    env["MSGAN_HOME"] = str(work)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def msgan_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "msgan.cli", *args]


PAIRS_COLUMNS = ("source", "target", "split", "patient")


def read_pairs(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_pairs(path: Path, rows: Iterable[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(PAIRS_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def resolve_in(csv_path: Path, value: str) -> str:
    """A pairs.csv path as the manifest means it: relative to the CSV's folder, absolute or a URI as it is."""
    if "://" in value or Path(value).is_absolute():
        return value
    return str((csv_path.parent / value).resolve())


def seed_of_pair(row: dict[str, str], csv_path: Path, known: dict[str, int]) -> int:
    """Which subject a found pair is: its ``patient`` when that is a PatientID we wrote, else an identifier we wrote
    (PatientID, study or series UID) among the attributes of its ingested source volume (a pseudonymised patient
    column is fine)."""
    if row.get("patient") in known:
        return known[row["patient"]]
    from msgan.io.volume import open_zarr

    source = resolve_in(csv_path, row["source"])
    try:
        _, _, meta = open_zarr(source)
    except Exception as err:
        raise SystemExit(f"{csv_path}: pair {row}: patient {row.get('patient')!r} is unknown and its source cannot "
                         f"be read to find the subject ({err})") from err  # fmt: skip
    hits = {known[s] for s in _strings(meta) if s in known}
    if len(hits) != 1:
        raise SystemExit(f"{csv_path}: pair with source {row['source']}: {len(hits)} subjects match its identifiers")
    return hits.pop()


def assign_splits(found: Path, out: Path, data: str, seeds: Sequence[int]) -> list[dict[str, str]]:
    """``found`` (find-pairs' CSV, every pair in one split) rewritten to ``out`` with the split of each subject's
    fixed seed; every seed must be found exactly once."""
    known = {patient_id(s): s for s in seeds}
    for s in seeds:
        known.update({uid: s for uid in study_uids(data, s).values()})
    rows, seen = [], {}
    for r in read_pairs(found):
        seed = seed_of_pair(r, found, known)
        if seed in seen:
            raise SystemExit(f"{found}: subject {seed} is paired twice ({seen[seed]} and {r['source']})")
        seen[seed] = r["source"]
        rows.append({**r, "split": SPLIT_NAMES[split_of(seed)], "patient": r.get("patient") or patient_id(seed)})
    missing = sorted(set(seeds) - set(seen))
    if missing:
        raise SystemExit(f"{found}: find-pairs found no pair for subjects {missing} (see the log beside it)")
    if out.parent != found.parent:
        rows = [{**r, "source": resolve_in(found, r["source"]), "target": resolve_in(found, r["target"])} for r in rows]
    write_pairs(out, rows)
    return rows


def manifest_pairs(study_root: Path, out: Path, seeds: Sequence[int]) -> list[dict[str, str]]:
    """pairs.csv written by hand: each side a folder holding one DICOM series (relative to the CSV)."""
    rows = [{"source": os.path.relpath(study_root / str(s) / "INPUT", out.parent),
             "target": os.path.relpath(study_root / str(s) / "TARGET", out.parent),
             "split": SPLIT_NAMES[split_of(s)], "patient": patient_id(s)} for s in seeds]  # fmt: skip
    write_pairs(out, rows)
    return rows


def find_pairs(study_root: Path, pairs_dir: Path, data: str, seeds: Sequence[int], via: str, env: dict[str, str],
               log: Log, extra: Sequence[str] = ()) -> Path:  # fmt: skip
    """``pairs_dir/pairs.csv`` for ``data``: ``msgan find-pairs`` (everything in train), then the fixed splits."""
    out = pairs_dir / "pairs.csv"
    if out.exists():
        return out
    if via == "manifest":
        manifest_pairs(study_root, out, seeds)
        return out
    found = pairs_dir / "found.csv"
    if not found.exists():
        run_logged(msgan_cmd("find-pairs", str(study_root), "--source", "SeriesDescription=INPUT", "--target",
                             "SeriesDescription=TARGET", "--validation", "0", "--holdout", "0", "--seed", "0",
                             "--storage", str(pairs_dir / "volumes"), "--out", str(found), *extra),
                   pairs_dir / "find-pairs.log", env, log, f"{data}: find-pairs")  # fmt: skip
    assign_splits(found, out, data, seeds)
    return out


def holdout_inputs(pairs: Path, data: str, work: Path, env: dict[str, str], log: Log) -> dict[int, str]:
    """seed -> OME-Zarr of each held-out pair's source (a DICOM folder is ingested first with ``msgan ingest``)."""
    known = {patient_id(s): s for s in SEEDS["heldout"]}
    for s in SEEDS["heldout"]:
        known.update({uid: s for uid in study_uids(data, s).values()})
    out: dict[int, str] = {}
    for r in read_pairs(pairs):
        if r["split"] != "holdout":
            continue
        src = resolve_in(pairs, r["source"])
        if src.rstrip("/").endswith(".zarr"):
            out[seed_of_pair(r, pairs, known)] = src
            continue
        seed = known.get(r["patient"])
        if seed is None:
            raise SystemExit(f"{pairs}: held-out source {src} is no OME-Zarr and its patient is none we wrote")
        dest = work / "holdout-inputs" / data / f"{seed}.zarr"
        if not (dest / "zarr.json").exists():
            run_logged(msgan_cmd("ingest", src, str(dest), "--replace"), dest.parent / "ingest.log", env, log,
                       f"{data}: ingest {seed}")  # fmt: skip
        out[seed] = str(dest)
    return out


def train(config: str, pairs: Path, align: str, seed: int, name: str, work: Path, extra: Sequence[str],
          env: dict[str, str], log: Log) -> str:  # fmt: skip
    """``jobs/train_all_scales.py`` on the pairs; returns the registered model's URI. Done when its marker is there;
    an interrupted job resumes from its checkpoints (same job.name)."""
    marker = work / "jobs" / name / "trained.json"
    model = f"models:/{name}@candidate"
    if marker.exists():
        return str(json.loads(marker.read_text())["model"])
    sets = ["data.source=pairs", f"data.pairs={pairs}", f"data.align={align}", f"seed={seed}",
            f"job.storage={work / 'storage'}", f"job.name={name}", f"job.registered_model={name}",
            "job.experiment=pairs-benchmark", *extra]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "jobs" / "train_all_scales.py"), "--config", config]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    run_logged(cmd, work / "jobs" / name / "train.log", env, log, f"{name}: training")
    _atomic_text(marker, json.dumps({"model": model, "seconds": time.perf_counter() - t0, "overrides": sets}))
    return model


def translate(model: str, inputs: dict[int, str], name: str, work: Path, env: dict[str, str], log: Log
              ) -> dict[int, str]:  # fmt: skip
    """The batch path (``jobs/translate_batch.py``) on the held-out inputs; seed -> translated OME-Zarr. Volumes it
    published before with the same model version are skipped by the job itself."""
    out = work / "translated" / name
    want = {s: out / (Path(p.rstrip("/")).name) for s, p in inputs.items()}
    if (
        not all((p / "zarr.json").exists() for p in want.values())
        or not (work / "translated" / f"{name}.json").exists()
    ):
        run_logged([sys.executable, str(ROOT / "jobs" / "translate_batch.py"), "--model", model, "--inputs",
                    *inputs.values(), "--output", str(out), "--report", str(work / "translated" / f"{name}.json")],
                   work / "translated" / f"{name}.log", env, log, f"{name}: translate_batch")  # fmt: skip
    missing = [str(p) for p in want.values() if not p.exists()]
    if missing:
        have = sorted(q.name for q in out.glob("*.zarr"))
        raise SystemExit(f"translate_batch published no {missing[:2]} under {out} (there: {have[:5]})")
    return {s: str(p) for s, p in want.items()}


def export_read(volume: str, dest: Path, fmt: str, env: dict[str, str], log: Log) -> tuple[np.ndarray, Geometry]:
    """``msgan export`` of a volume (DICOM or NIfTI), read back as a user's viewer would (msgan's readers)."""
    from msgan.io.dicom import read_series
    from msgan.io.volume import read_volume

    target = dest if fmt == "dicom" else dest / "out.nii.gz"
    run_logged(msgan_cmd("export", volume, str(target), "--format", fmt, "--replace"), dest.parent / "export.log",
               env, lambda _: None, "export")  # fmt: skip
    if fmt == "nifti":
        return read_volume(target)
    got = read_series([dest])
    if len(got.volumes) != 1:
        raise SystemExit(f"{dest}: the export reads back as {len(got.volumes)} series ({got.errors})")
    return got.volumes[0].image.astype(np.float32), got.volumes[0].geometry


def check_grid(image: np.ndarray, geom: Geometry, want: Geometry, shape: Sequence[int], what: str) -> None:
    """Invariant 3 on the user's path: what comes back sits on the input's grid (DICOM keeps 6 decimals)."""
    if tuple(image.shape) != tuple(shape) or not geom.allclose(want, atol=1e-3):
        raise SystemExit(f"{what}: read back as {image.shape} on {geom}, not the input's {tuple(shape)} on {want}")


# ----------------------------------------------------------------------------- the benchmark


def row_methods(row: str, smoke: bool, only: tuple[str, ...] = ()) -> tuple[tuple[str, int], ...]:
    methods = ROWS[row].methods
    methods = methods[:1] if smoke else methods
    return tuple(m for m in methods if not only or m[0] in only)


def score_row(row: str, args: argparse.Namespace, results: Results, work: Path, seeds: dict[str, tuple[int, ...]],
              env: dict[str, str], log: Log) -> None:  # fmt: skip
    spec = ROWS[row]
    shape = (args.shape,) * 3
    all_seeds = [s for k in ("train", "validation", "heldout") for s in seeds[k]]
    studies = write_dataset(spec.data, shape, all_seeds, work / "studies", log)
    if args.until == "write":
        return
    pairs = find_pairs(studies, work / "pairs" / spec.data, spec.data, all_seeds, args.pairs_via, env, log)
    if args.until == "pairs":
        return
    config = str(ROOT / "configs" / f"{spec.task}.yaml")
    extra = [*(f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in SMOKE.items())] if args.smoke else []
    extra += list(args.set)
    heldout = list(seeds["heldout"])
    methods = row_methods(row, args.smoke, tuple(args.methods or ()))
    todo = [m for m, _ in methods if not all(results.done(row, m, s) for s in heldout)]
    if not todo and all(results.done(row, "input", s) for s in heldout):
        log(f"  {row}: every method x {len(heldout)} held-out volumes already scored")
        return
    inputs = holdout_inputs(pairs, spec.data, work, env, log)
    for seed in heldout:  # the input as the path ingested it: the bar, and a check of ingest on the oblique grid
        if not results.done(row, "input", seed):
            from msgan.io.volume import read_volume

            tv, series = study_series(spec.data, seed, shape)
            image, geom = read_volume(inputs[seed])
            check_grid(image, geom, series[0][3], shape, f"{row} input {seed}")
            r = _metrics(image, tv)
            results.add(row, "input", seed, r)
            log(f"  {row} seed {seed}: input {r['ssim']:.4f} / {r['mae_hu']:.1f} HU")
    for method, train_seed in methods:
        if all(results.done(row, method, s) for s in heldout):
            continue
        name = f"pairs-{row}-{method}-{args.shape}"
        model = train(config, pairs, spec.align, train_seed, name, work, extra, env, log)
        results.note(row, method, config=f"configs/{spec.task}.yaml", align=spec.align, seed=train_seed,
                     overrides=extra, pairs_via=args.pairs_via, model=model)  # fmt: skip
        outputs = translate(model, {s: inputs[s] for s in heldout}, name, work, env, log)
        for seed in heldout:
            if results.done(row, method, seed):
                continue
            tv, series = study_series(spec.data, seed, shape)
            t0 = time.perf_counter()
            image, geom = export_read(outputs[seed], work / "exports" / name / str(seed), "dicom", env, log)
            check_grid(image, geom, series[0][3], shape, f"{name} output {seed}")
            r = _metrics(image, tv)
            results.add(row, method, seed, {**r, "export_read_seconds": time.perf_counter() - t0})
            log(
                f"  {row} seed {seed}: {method} {r['ssim']:.4f} / {r['mae_hu']:.1f} HU / {r['hallucination_ml']:.1f} mL"
            )


def _metrics(image: np.ndarray, tv: TaskVolume) -> dict[str, float]:
    from msgan.metrics import ct_metrics

    return ct_metrics(np.asarray(image, np.float32), tv.target, tv.noiseless, tv.labels, tv.spacing, METRIC_WINDOW)


# ----------------------------------------------------------------------------- tables


def _mean(entry: dict[str, Any] | None, key: str, seeds: Sequence[int] | None = None) -> float:
    if not entry or key not in entry:
        return float("nan")
    vals = [
        v for s, v in zip(entry["seeds"], entry[key], strict=True) if v is not None and (seeds is None or s in seeds)
    ]
    return float(np.mean(vals)) if vals else float("nan")


def tables(data: dict[str, Any], reference: dict[str, Any] | None) -> str:
    """One table of every row and method (means over held-out volumes), then the comparison: each path ``ours``
    against the in-memory ``ours`` of tasks.json (same held-out seeds), beside the run-to-run difference of the two
    trainings of that task (seed 0 vs seed 1); each variant against its base task through the path."""
    lines = ["### Held-out volumes through the user's path", "",
             "| row | method | n | SSIM | PSNR | MAE HU | RMSE HU | halluc. mL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in [*ROWS, *sorted(set(data) - set(ROWS))]:
        for method, entry in data.get(row, {}).items():
            cols = " | ".join(_fmt(entry.get(k, []), k) for k in TABLE_KEYS)
            lines.append(f"| {row} | {method} | {len(entry['seeds'])} | {cols} |")
    lines += ["", "### Path vs in-memory benchmark, and run-to-run noise", "",
              "d: mean of this row minus the reference's, over the held-out volumes both hold. Run-to-run: `ours` "
              "minus `ours_seed1` (two trainings through the path, seeds 0 and 1).", "",
              "| row | method | compared with | n | d SSIM | d MAE HU | run-to-run d SSIM | run-to-run d MAE HU "
              "| within noise |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in ROWS:
        rows = data.get(row, {})
        for method in (m for m, _ in ROWS[row].methods if m in rows):
            mine = rows[method]
            if row in BASE_OF:
                ref, what = data.get(BASE_OF[row], {}).get("ours"), f"{BASE_OF[row]} ours (path)"
                noise_rows = data.get(BASE_OF[row], {})
            else:
                ref, what = (reference or {}).get(row, {}).get("ours"), "tasks.json ours (in memory)"
                noise_rows = rows
            common = [s for s in mine["seeds"] if ref and s in ref["seeds"]]
            d = {k: _mean(mine, k, common) - _mean(ref, k, common) for k in ("ssim", "mae_hu")}
            a, b = noise_rows.get("ours"), noise_rows.get("ours_seed1")
            both = [s for s in (a or {}).get("seeds", []) if b and s in b["seeds"]]
            rr = {k: _mean(a, k, both) - _mean(b, k, both) for k in ("ssim", "mae_hu")}
            within = "-"
            if common and both:
                within = "yes" if all(abs(d[k]) <= abs(rr[k]) for k in d) else "no"
            lines.append(f"| {row} | {method} | {what} | {len(common)} | {d['ssim']:+.4f} | {d['mae_hu']:+.1f} | "
                         f"{rr['ssim']:+.4f} | {rr['mae_hu']:+.1f} | {within} |".replace("+nan", "-"))  # fmt: skip
    return "\n".join(lines) + "\n"


def load_reference(path: Path, shape: int) -> dict[str, Any] | None:
    """The in-memory benchmark's results when they were measured at ``shape``."""
    meta = path.with_name(path.stem + "_meta.json")
    if not path.exists() or not meta.exists():
        return None
    if json.loads(meta.read_text()).get("shape") != [shape] * 3:
        return None
    return dict(json.loads(path.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help=f"32^3, tiny training, rows {list(SMOKE_ROWS)}, few seeds")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="default: every row")
    p.add_argument("--methods", nargs="+", default=None, choices=["ours", "ours_seed1"],
                   help="only these trainings (default: both; e.g. `ours` of every row first)")  # fmt: skip
    p.add_argument("--workdir", default=None, help="default runs/pairs-tasks (smoke: runs/pairs-tasks-smoke)")
    p.add_argument("--out", default=None, help="default docs/results/pairs_tasks.json (smoke: in the workdir)")
    p.add_argument("--reference", default=str(ROOT / "docs" / "results" / "tasks.json"),
                   help="the in-memory benchmark's results (compared when measured at the same shape)")  # fmt: skip
    p.add_argument("--pairs-via", choices=["find-pairs", "manifest"], default="find-pairs",
                   help="find-pairs (the user path) or a pairs.csv written here naming DICOM folders")  # fmt: skip
    p.add_argument("--until", choices=["write", "pairs", "all"], default="all", help="stop after this stage")
    p.add_argument("--set", action="append", default=[], help="extra config override for every training, KEY=VALUE")
    p.add_argument("--tables", action="store_true", help="only print and write the tables")
    args = p.parse_args()
    if args.smoke:
        args.shape = 32
    rows = args.rows or list(SMOKE_ROWS if args.smoke else ROWS)
    work = Path(args.workdir or ("runs/pairs-tasks-smoke" if args.smoke else "runs/pairs-tasks")).resolve()
    out = Path(
        args.out or (work / "pairs_tasks.json" if args.smoke else ROOT / "docs" / "results" / "pairs_tasks.json")
    )
    seeds = SMOKE_SEEDS if args.smoke else SEEDS
    results = Results(out, {"shape": [args.shape] * 3, "heldout": list(seeds["heldout"]),
                            "validation": list(seeds["validation"]), "smoke": args.smoke})  # fmt: skip

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if not args.tables:
        env = path_env(work)
        log(f"rows {rows}, {args.shape}^3, held-out {list(seeds['heldout'])} -> {out} (workdir {work})")
        for row in rows:
            score_row(row, args, results, work, seeds, env, log)
    text = tables(results.data, load_reference(Path(args.reference), args.shape))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
