"""A 2D pair task through a user's path (issue 21, item 6b): bone suppression of phantom radiographs at 1024^2.

    python benchmarks/pairs_2d.py                        # 1024^2, every method; resumable: rerun to continue
    nohup python benchmarks/pairs_2d.py > runs/pairs-2d.log 2>&1 &
    python benchmarks/pairs_2d.py --smoke                # 128^2, tiny training: checks the whole path in minutes
    python benchmarks/pairs_2d.py --methods input linear cnn    # the baselines only (no path needed)
    python benchmarks/pairs_2d.py --tables               # only print / write docs/results/pairs_2d.md

The task (``msgan.data.radiographs``): input = the AP radiograph of a 3D labelled thorax phantom; target = the same
projection with bone attenuation replaced by soft tissue's (dual-energy subtraction's soft-tissue image), with its
own noise realisation of the same level; ``noiseless`` = the target before noise. Seeds as
``msgan.data.tasks.SEEDS``: training 101-108, validation 201-204, held-out 301-308 (8 images).

Methods, fitted or trained on the same 8 training pairs, scored on the same held-out images inside the body's
footprint: ``input``; ``linear`` (radially symmetric 2D filter fitted by least squares in the Fourier domain,
``msgan.baselines.fit_radial_filter``, as tasks.py's 3D one); ``cnn`` (the 2D residual U-Net of tasks.py with its
budget rules: total steps = our cascade's, patch >= our HR patch, parameters >= our finest scale's); ``ours``
(through the path: each subject a study of two DX images, SeriesDescription INPUT / TARGET, found with
``msgan find-pairs``, split by patient from the fixed seeds, trained with ``jobs/train_all_scales.py`` on
configs/xray-2048.yaml with :data:`OURS_2D`, held-out images translated with ``jobs/translate_batch.py``, exported
to DICOM and read back). ``--pairs-via dicom-manifest`` writes pairs.csv by hand naming the DX folders (no
find-pairs); ``--pairs-via nifti`` writes 2D NIfTI files of the stored values and pairs.csv by hand.

Pixels: DX stores ``round(v * DX_GAIN + DX_OFFSET)`` in 12 bits (v the radiograph in image units, about [0, 1]);
the model works in those stored units (window 500..4100 = image units 0..1.2); scores are in image units,
window :data:`msgan.data.radiographs.WINDOW` onto [-1, 1] for SSIM / PSNR / MAE. ``ssim_clean`` / ``mae_clean``:
against the noiseless target; ``bone_residual``: mean of (output - noiseless target) on pixels whose ray crosses
bone (image units; the input's is the bone's whole contrast, 0 = bone removed).

Results go to docs/results/pairs_2d.json (``{"bone-suppression": {method: {metric: [...], seeds: [...]}}}``) after
every image; images, models and the path's files stay in ``--workdir`` (default runs/pairs-2d).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pairs_tasks import (  # noqa: E402
    SMOKE_SEEDS,
    SPLIT_NAMES,
    _atomic_text,
    assign_splits,
    export_read,
    holdout_inputs,
    manifest_pairs,
    path_env,
    patient_id,
    run_logged,
    study_uids,
    train,
    translate,
    write_pairs,
)
from benchmarks.tasks import CNN_DEPTH, Results  # noqa: E402
from msgan.data.radiographs import WINDOW, RadiographPair, bone_suppression_pair, radiograph_geometry  # noqa: E402
from msgan.data.tasks import SEEDS, split_of  # noqa: E402

Log = Callable[[str], None]
TASK = "bone-suppression"
DATA = "xray-bone"
METHODS = ("input", "linear", "cnn", "ours")
DX_GAIN, DX_OFFSET = 3000.0, 500.0  # stored = round(v * gain + offset), 12 bits
OURS_2D = [  # overrides of configs/xray-2048.yaml: translation (image-conditioned), sized for 2 CPU cores at 1024^2
    "num_scales=4", "seed=0", "condition=image", "source_residual=true", "hr_generator.residual=false",
    f"intensity.low={DX_OFFSET + WINDOW[0] * DX_GAIN:g}", f"intensity.high={DX_OFFSET + WINDOW[1] * DX_GAIN:g}",
    "intensity.outside=source", "lr_generator.width=16", "lr_generator.depth=4", "hr_generator.width=16",
    "hr_generator.num_blocks=3", "discriminator.width=16", "discriminator.num_layers=3",
    "train.steps_per_scale=[600,1200,1200,1200]", "train.batch_size=4", "train.hr_patch=64", "train.l1_weight=1000",
    "train.foreground_threshold=-0.9", "train.checkpoint_every=200", "train.log_every=100", "train.threads=1",
    "inference.memory_budget_mb=512", "inference.batch_size=1",
]  # fmt: skip
SMOKE_2D = ["num_scales=2", "train.steps_per_scale=[30,20]", "train.hr_patch=32", "lr_generator.depth=2"]
CNN_PATCH = 64
TABLE_KEYS = ("ssim", "psnr", "mae", "ssim_clean", "mae_clean", "bone_residual")


def to_stored(v: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(v, np.float64) * DX_GAIN + DX_OFFSET), 0, 4095).astype(np.uint16)


def from_stored(s: np.ndarray) -> np.ndarray:
    return ((np.asarray(s, np.float64) - DX_OFFSET) / DX_GAIN).astype(np.float32)


def ours_config(size: int, smoke: bool) -> list[str]:
    return [f"data.phantom.shape=[{size},{size}]", *OURS_2D, *(SMOKE_2D if smoke else [])]


# ----------------------------------------------------------------------------- images


def image_pair(seed: int, size: int, work: Path) -> RadiographPair:
    """The subject's pair, computed once and kept in ``work/images`` (about 25 s at 1024^2)."""
    path = work / "images" / f"{size}" / f"{seed}.npz"
    if path.exists():
        z = np.load(path)
        return RadiographPair(seed, z["input"], z["target"], z["noiseless"], z["body"], z["bone"],
                              (float(z["spacing"][0]), float(z["spacing"][1])))  # fmt: skip
    p = bone_suppression_pair(seed, size, depth=min(192, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, input=p.input, target=p.target, noiseless=p.noiseless, body=p.body, bone=p.bone,
             spacing=np.array(p.spacing))  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return p


def metrics_2d(out: np.ndarray, p: RadiographPair) -> dict[str, float]:
    """SSIM / PSNR / MAE (window units) against the target and the noiseless target inside the body; the bone left."""
    from msgan.metrics import score, window_units

    w = {k: window_units(v, *WINDOW) for k, v in (("out", out), ("target", p.target), ("clean", p.noiseless))}
    s, c = score(w["out"], w["target"], 2.0, p.body), score(w["out"], w["clean"], 2.0, p.body)
    residual = float(np.mean((np.asarray(out, np.float64) - p.noiseless)[p.bone])) if p.bone.any() else float("nan")
    return {"ssim": s.ssim, "psnr": s.psnr, "mae": s.mae, "ssim_clean": c.ssim, "mae_clean": c.mae,
            "bone_residual": residual}  # fmt: skip


# ----------------------------------------------------------------------------- baselines


def fit_linear(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Any:
    """The 2D fitted linear filter (:func:`msgan.baselines.fit_radial_filter` works in any dimension)."""
    from msgan.baselines import fit_radial_filter

    return fit_radial_filter(pairs)


CNN_CENTRE, CNN_HALF = 0.6, 0.6  # image units -> the CNN's HU-like units: (v - 0.6) / 0.6 * 1000 (window -> +-1000)


def to_cnn(v: np.ndarray) -> np.ndarray:
    return ((np.asarray(v, np.float32) - CNN_CENTRE) / CNN_HALF * 1000.0).astype(np.float32)


def from_cnn(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u, np.float32) / 1000.0 * CNN_HALF + CNN_CENTRE).astype(np.float32)


def cnn_budget(size: int, smoke: bool) -> dict[str, int]:
    """tasks.py's rules on our 2D config: steps = the whole cascade's, patch >= its HR patch (a multiple of
    2**depth), parameters >= its finest scale's generator."""
    from msgan.config import load_config
    from msgan.nets import build_generator, count_parameters

    cfg = load_config(str(ROOT / "configs" / "xray-2048.yaml"), ours_config(size, smoke))
    finest = count_parameters(build_generator(cfg, cfg.num_scales - 1))
    steps = sum(cfg.steps_for(s) for s in range(cfg.num_scales))
    patch = max(CNN_PATCH if size >= 256 else 16, cfg.train.hr_patch)
    patch = -(-patch // 2**CNN_DEPTH) * 2**CNN_DEPTH
    return {"min_parameters": finest, "steps": steps, "patch": patch, "batch_size": cfg.train.batch_size}


def train_cnn_2d(pairs: list[RadiographPair], budget: dict[str, int], path: Path, log: Log) -> dict[str, Any]:
    from msgan.baselines import cnn_for_budget, train_cnn

    torch.manual_seed(0)
    net = cnn_for_budget(2, budget["min_parameters"], CNN_DEPTH)
    data = [(to_cnn(p.input), to_cnn(p.target)) for p in pairs]
    info = train_cnn(net, data, budget["steps"], budget["patch"], budget["batch_size"],
                     log=lambda m: log(f"  {TASK}: {m}"), log_every=500)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    width = int(net.body.down[0][0].out_channels)  # type: ignore[index]
    return {**info, "width": width, "parameters": sum(p.numel() for p in net.parameters()), **budget}


def load_cnn(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from msgan.baselines import ResidualUNet, cnn_translate

    state = torch.load(path, weights_only=True)
    net = ResidualUNet(2, int(state["body.down.0.0.weight"].shape[0]), CNN_DEPTH)
    net.load_state_dict(state)
    return lambda x: from_cnn(cnn_translate(net, to_cnn(x), tile=256, overlap=16))


# ----------------------------------------------------------------------------- the path


def write_dx(folder: Path, seed: int, description: str, image: np.ndarray, spacing: tuple[float, float]) -> Path:
    """One DX image (for presentation, 12-bit MONOCHROME2, rescale 1 / 0) of the subject's study."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from msgan.io.dicom import derived_uid

    uids = study_uids(DATA, seed)
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    series = uids[description]
    sop = derived_uid(series, "1")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id(seed), f"Phantom^{seed}", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261201", "090000", "1", f"A{seed}"
    ds.ReferringPhysicianName, ds.StudyDescription, ds.Manufacturer = "", "DX CHEST DUAL ENERGY", "msgan-phantom"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["StudyInstanceUID"], series
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 2 if description == "INPUT" else 3, 1
    ds.SeriesDescription = description
    ds.ContentDate, ds.ContentTime = "20261201", "090000"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation, ds.BodyPartExamined = ["L", "F"], "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation, ds.LossyImageCompression, ds.KVP = "NO", "00", "120"
    ds.PresentationIntentType, ds.AcquisitionContextSequence = "FOR PRESENTATION", []
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape, ds.WindowCenter, ds.WindowWidth = "IDENTITY", "2048", "4096"
    ds.DetectorType, ds.ImageLaterality, ds.ViewPosition, ds.PositionerType = "DIRECT", "U", "AP", "NONE"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = [item]
    ds.ImagerPixelSpacing = ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.PixelData = np.ascontiguousarray(to_stored(image)).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "00001.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_studies(seeds: Sequence[int], size: int, work: Path, via: str, log: Log) -> Path:
    """Each subject's pair under ``work/studies/<via>/<seed>/``: DX DICOM (INPUT/, TARGET/) or NIfTI files of the
    stored values; a marker per subject beside the folder (nothing but images inside it)."""
    from msgan.io.volume import write_volume

    root = work / "studies" / f"{via}-{size}"
    done = root.with_name(root.name + ".done")
    for seed in seeds:
        if (done / str(seed)).exists():
            continue
        p = image_pair(seed, size, work)
        for description, image in (("INPUT", p.input), ("TARGET", p.target)):
            if via.startswith("dicom"):
                write_dx(root / str(seed) / description, seed, description, image, p.spacing)
            else:
                dest = root / str(seed) / f"{description.lower()}.nii.gz"
                dest.parent.mkdir(parents=True, exist_ok=True)
                write_volume(dest, to_stored(image).astype(np.float32), radiograph_geometry(image.shape))
        _atomic_text(done / str(seed), "")
    log(f"  {TASK}: {len(seeds)} studies under {root}")
    return root


def pairs_csv(root: Path, seeds: Sequence[int], size: int, work: Path, via: str, env: dict[str, str], log: Log) -> Path:
    out = work / "pairs" / f"{via}-{size}" / "pairs.csv"
    if out.exists():
        return out
    if via == "nifti":
        rows = [{"source": str(root / str(s) / "input.nii.gz"), "target": str(root / str(s) / "target.nii.gz"),
                 "split": SPLIT_NAMES[split_of(s)], "patient": patient_id(s)} for s in seeds]  # fmt: skip
        write_pairs(out, rows)
        return out
    if via == "dicom-manifest":
        manifest_pairs(root, out, seeds)
        return out
    found = out.with_name("found.csv")
    if not found.exists():
        cmd = [sys.executable, "-m", "msgan.cli", "find-pairs", str(root), "--source", "SeriesDescription=INPUT",
               "--target", "SeriesDescription=TARGET", "--validation", "0", "--holdout", "0", "--seed", "0",
               "--storage", str(out.parent / "volumes"), "--out", str(found)]  # fmt: skip
        run_logged(cmd, out.with_name("find-pairs.log"), env, log, f"{TASK}: find-pairs")
    assign_splits(found, out, DATA, seeds)
    return out


def run_ours(
    args: argparse.Namespace, results: Results, work: Path, seeds: dict[str, tuple[int, ...]], log: Log
) -> None:
    heldout = list(seeds["heldout"])
    if all(results.done(TASK, "ours", s) for s in heldout):
        return
    env = path_env(work)
    all_seeds = [s for k in ("train", "validation", "heldout") for s in seeds[k]]
    root = write_studies(all_seeds, args.size, work, args.pairs_via, log)
    pairs = pairs_csv(root, all_seeds, args.size, work, args.pairs_via, env, log)
    name = f"pairs-{TASK}-{args.pairs_via}-{args.size}"
    over = ours_config(args.size, args.smoke) + list(args.set)
    model = train(str(ROOT / "configs" / "xray-2048.yaml"), pairs, "none", 0, name, work, over, env, log)
    results.note(TASK, "ours", config="configs/xray-2048.yaml", overrides=over, pairs_via=args.pairs_via, model=model)
    inputs = holdout_inputs(pairs, DATA, work, env, log)
    outputs = translate(model, {s: inputs[s] for s in heldout}, name, work, env, log)
    fmt = "dicom" if args.pairs_via.startswith("dicom") else "nifti"
    for seed in heldout:
        if results.done(TASK, "ours", seed):
            continue
        p = image_pair(seed, args.size, work)
        image, _ = export_read(outputs[seed], work / "exports" / name / str(seed), fmt, env, log)
        if image.shape != p.input.shape:
            raise SystemExit(f"{name}: output {seed} read back as {image.shape}, not {p.input.shape}")
        r = metrics_2d(from_stored(image), p)
        results.add(TASK, "ours", seed, r)
        log(f"  {TASK} seed {seed}: ours {r['ssim']:.4f} / bone left {r['bone_residual']:.4f}")


# ----------------------------------------------------------------------------- the benchmark


def run_baselines(args: argparse.Namespace, results: Results, work: Path, seeds: dict[str, tuple[int, ...]],
                  log: Log) -> None:  # fmt: skip
    methods = [m for m in args.methods if m != "ours"]
    heldout = list(seeds["heldout"])
    if all(results.done(TASK, m, s) for m in methods for s in heldout):
        return
    models = work / "models" / f"{args.size}"
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {"input": lambda x: x}
    if "linear" in methods or "cnn" in methods:
        train_pairs = [image_pair(s, args.size, work) for s in seeds["train"]]
        if "linear" in methods:
            path = models / "linear.npz"
            if not path.exists():
                filt = fit_linear([(p.input, p.target) for p in train_pairs])
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, edges=filt.edges, gain=filt.gain)
            from msgan.baselines import RadialFilter

            z = np.load(path)
            fns["linear"] = RadialFilter(z["edges"], z["gain"]).apply
        if "cnn" in methods:
            path = models / "cnn.pt"
            if not path.exists():
                budget = cnn_budget(args.size, args.smoke)
                log(f"  {TASK}: training the CNN ({budget})")
                results.note(TASK, "cnn", **train_cnn_2d(train_pairs, budget, path, log))
            fns["cnn"] = load_cnn(path)
    for seed in heldout:
        todo = [m for m in methods if m in fns and not results.done(TASK, m, seed)]
        if not todo:
            continue
        p = image_pair(seed, args.size, work)
        line = []
        for m in todo:
            t0 = time.perf_counter()
            out = fns[m](p.input)
            r = metrics_2d(out, p)
            results.add(TASK, m, seed, {**r, "seconds": time.perf_counter() - t0})
            line.append(f"{m} {r['ssim']:.4f}/{r['bone_residual']:.4f}")
        log(f"  {TASK} seed {seed}: " + ", ".join(line))


def tables(data: dict[str, Any]) -> str:
    """Means over the held-out images; p: paired t-test of ours against the row on SSIM, Holm-corrected."""
    from msgan.metrics import holm, paired_test

    rows = data.get(TASK, {})
    ours = rows.get("ours")
    tests: dict[str, float] = {}
    for m, r in rows.items():
        if ours is None or m == "ours":
            continue
        common = [s for s in ours["seeds"] if s in r["seeds"]]
        a = [ours["ssim"][ours["seeds"].index(s)] for s in common]
        b = [r["ssim"][r["seeds"].index(s)] for s in common]
        if len(common) >= 2 and a != b:
            tests[m] = paired_test(a, b).p
    adjusted = dict(zip(tests, holm(list(tests.values())), strict=True))
    lines = [f"### {TASK} (2D, radiographs)", "",
             "Window 0..1.2 image units onto [-1, 1]; SSIM / PSNR / MAE (window units) against the target inside the "
             "body; `clean`: against the noiseless target; bone left: mean (output - noiseless target) where a ray "
             "crosses bone (image units; 0 = bone removed).", "",
             "| method | n | SSIM | PSNR | MAE | SSIM clean | MAE clean | bone left | p (SSIM) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for m in [*METHODS, *sorted(set(rows) - set(METHODS))]:
        if m not in rows:
            continue
        r = rows[m]
        cols = [_mean(r.get(k, []), 2 if k == "psnr" else 4) for k in TABLE_KEYS]
        p = f"{adjusted[m]:.2g}" if m in adjusted else ""
        lines.append(f"| {m} | {len(r['seeds'])} | " + " | ".join(cols) + f" | {p} |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float | None], digits: int) -> str:
    v = [x for x in values if x is not None]
    return f"{np.mean(v):.{digits}f}" if v else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="128^2, tiny training, few seeds, runs/pairs-2d-smoke")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--pairs-via", choices=["dicom", "dicom-manifest", "nifti"], default="dicom",
                   help="DX + find-pairs; DX, pairs.csv written here; NIfTI, pairs.csv written here")  # fmt: skip
    p.add_argument("--workdir", default=None, help="default runs/pairs-2d (smoke: runs/pairs-2d-smoke)")
    p.add_argument("--out", default=None, help="default docs/results/pairs_2d.json (smoke: in the workdir)")
    p.add_argument("--set", action="append", default=[], help="extra config override for ours, KEY=VALUE")
    p.add_argument("--tables", action="store_true", help="only print and write the tables")
    args = p.parse_args()
    if args.smoke:
        args.size = 128
    work = Path(args.workdir or ("runs/pairs-2d-smoke" if args.smoke else "runs/pairs-2d")).resolve()
    out = Path(args.out or (work / "pairs_2d.json" if args.smoke else ROOT / "docs" / "results" / "pairs_2d.json"))
    seeds = SMOKE_SEEDS if args.smoke else SEEDS
    results = Results(out, {"shape": [args.size] * 2, "heldout": list(seeds["heldout"]),
                            "validation": list(seeds["validation"]), "smoke": args.smoke})  # fmt: skip

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if not args.tables:
        log(f"{TASK} {args.size}^2, methods {args.methods}, held-out {list(seeds['heldout'])} -> {out}")
        run_baselines(args, results, work, seeds, log)
        if "ours" in args.methods:
            run_ours(args, results, work, seeds, log)
    text = tables(results.data)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
