"""The ``msgan`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msgan.config import ConfigError, load_config
from msgan.console import Progress, quiet, run_entry, scale_progress, set_verbose
from msgan.io import patterns


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="experiment YAML (configs/*.yaml); defaults if omitted")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    from msgan.demo import run_demo
    from msgan.settings import resolve_local

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else resolve_local("runs/demo")
    t0 = time.perf_counter()
    run_demo(cfg, out, progress=Progress())
    print(f"demo finished in {time.perf_counter() - t0:.1f}s; outputs in {out}")
    return 0


def cmd_new_model(args: argparse.Namespace) -> int:
    from msgan.cascade import Cascade

    cfg = load_config(args.config, args.overrides)
    cascade = Cascade.untrained(cfg, seed=args.seed)
    out = cascade.save(args.out_dir, replace=args.replace)
    print(f"wrote an untrained {cfg.dims}D cascade of {cfg.num_scales} scales (halos {cascade.halos}) to {out}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from msgan.io import outputs
    from msgan.io.volume import read_volume, write_volume
    from msgan.volumes.tasks import is_ours

    if str(args.input).endswith(".zarr") and str(args.output).endswith(".zarr"):
        return _translate_store(args)
    output = outputs.resolve_output(args.output, [args.input])  # before any work: never the input, never elsewhere
    outputs.refuse_unless_replace(
        output, lambda u: is_ours(u) or outputs.is_msgan_volume(u), args.replace, "msgan's translation"
    )
    from msgan.volumes.pinning import pin

    cascade = pin(args.model).load(args.device)  # the one model-reference dispatch (registry or folder)
    image, geom = read_volume(args.input)
    if image.ndim != cascade.config.dims:
        raise SystemExit(f"msgan: {args.input}: a {image.ndim}D image; the model translates {cascade.config.dims}D")
    t0 = time.perf_counter()
    progress = None if args.quiet else Progress(sys.stderr)
    try:
        out = cascade.translate(
            image, tile=args.tile, device=args.device, progress=scale_progress(progress) if progress else None
        )
    except ValueError as err:
        raise ValueError(f"{args.input}: {err}") from err  # bad input: exit status 2, one line naming it
    finally:
        if progress is not None:
            progress.close()
    write_volume(args.output, out, geom, replace=args.replace)
    print(f"translated {args.input} {image.shape} -> {args.output} in {time.perf_counter() - t0:.1f}s")
    return 0


def _translate_store(args: argparse.Namespace) -> int:
    """zarr to zarr: staged, tile by tile, constant memory; the output appears only when complete."""
    from msgan.volumes.local import translate_volume
    from msgan.volumes.pinning import pin
    from msgan.volumes.tasks import check_output, volume_task

    pinned = pin(args.model)  # the alias resolved once: what loads is what the manifest names
    task = volume_task(args.input, "", pinned.model_id, output=args.output, run=pinned.run)
    check_output(task, args.replace, args.replace)  # before loading anything: absent or msgan's own
    cascade = pinned.load(args.device)
    t0 = time.perf_counter()
    progress = None if args.quiet else Progress(sys.stderr)
    try:
        manifest = translate_volume(
            task, cascade, args.device, tile=args.tile, progress=scale_progress(progress) if progress else None,
            replace=args.replace, volumes=args.replace,
        )  # fmt: skip
    finally:
        if progress is not None:
            progress.close()
    status = manifest.get("status", "translated")
    if status == "skipped":
        print(f"{args.output} is already translated by {manifest['model']} (its manifest.json); nothing to do")
        return 0
    again = (
        f" (re-translated: {manifest.get('previous_model')} -> {manifest['model']})"
        if status == "re-translated"
        else ""
    )
    print(
        f"translated {args.input} {tuple(manifest['shape'])} -> {args.output} in {time.perf_counter() - t0:.1f}s{again}"
    )
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    import numpy as np

    from msgan.data.phantom import default_spacing, phantom_geometry, reconstruct, thorax_phantom
    from msgan.io.volume import write_volume

    shape = tuple(args.shape)
    spacing = tuple(args.spacing) if args.spacing else default_spacing(shape)
    truth = thorax_phantom(shape, spacing, args.seed)
    vol = truth if args.kernel == "truth" else reconstruct(truth, (args.kernel,), seed=args.seed + 7919)[args.kernel]
    geom = phantom_geometry(shape, spacing)
    from msgan.io import outputs

    output = outputs.resolve_output(args.output)
    outputs.refuse_unless_replace(output, outputs.is_msgan_volume, args.replace, "a volume msgan wrote")
    write_volume(args.output, np.asarray(vol, dtype=np.float32), geom, replace=args.replace)
    print(f"wrote {args.kernel} phantom seed {args.seed} {shape} spacing {spacing} mm to {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from msgan.distributed.prepare import check_shapes, sources, training_pyramids, unpaired_pyramids
    from msgan.train import fingerprint, train_locally

    cfg = load_config(args.config, args.overrides)
    check_shapes(cfg, sources(cfg))  # the job's sources and checks: phantoms, files, DICOM folders, pairs, sets
    if cfg.train.objective == "unpaired":  # the target set trains, the source set feeds scale 0 and the fit
        source_set, pyramids = unpaired_pyramids(cfg)
    else:
        source_set, pyramids = [], training_pyramids(cfg)
    cascade = train_locally(cfg, pyramids, progress=Progress(), sources=source_set)
    cascade.meta["data_fingerprint"] = fingerprint([*pyramids, *source_set])
    print(f"wrote {cascade.save(args.out_dir, replace=args.replace)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from msgan.redact import redact_uri
    from msgan.registry import promote, tracking_uri

    promote(args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version} ({redact_uri(tracking_uri())})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from msgan.io.convert import ingest

    report = ingest(args.source, args.output, replace=args.replace)
    for key, uri in report.written.items():
        print(f"ingested {key} -> {uri}")
        for note in report.notes.get(key, []):
            print(f"  note: {note}")
    for key, why in report.skipped.items():
        print(f"skipped {key}: {why}", file=sys.stderr)
    for key, why in report.errors.items():
        print(f"REFUSED {key}: {why}", file=sys.stderr)
    return 1 if report.errors or not report.written else 0


def cmd_export(args: argparse.Namespace) -> int:
    from msgan.io.convert import export

    out = export(args.volume, args.out_dir, args.format, args.description, classic=args.classic, replace=args.replace)
    where = out.files[0].parent if args.format == "dicom" else out.files[0]
    uid = f" (series {out.series_uid})" if out.series_uid else ""
    print(f"exported {args.volume} -> {where}: {len(out.files)} file(s){uid}")
    return 0


def cmd_pacs_sync(args: argparse.Namespace) -> int:
    from msgan.pacs_sync import SyncConfig, run_once
    from msgan.storage import resolve_storage

    cfg = SyncConfig(
        model=args.model,
        storage=args.storage or resolve_storage("runs/pacs"),
        modality=args.modality,
        kernel=args.kernel,
        description=args.description,
        match=tuple(args.match),
        study_date=args.study_date,
        push=not args.no_push,
        export_prefix=args.export,
        export_format=args.format,
        retranslate=args.retranslate,
        retry_failed=args.retry_failed,
        limit=args.limit,
    )
    report = run_once(cfg)
    print(report.summary())
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from msgan.io import outputs
    from msgan.io.volume import ZARR_SUFFIXES, read_volume, suffix_of
    from msgan.preview import default_output, preview_volume, save_columns

    target = outputs.resolve_output(
        args.output or default_output(args.volume), [args.volume, *filter(None, [args.source])]
    )
    outputs.refuse_unless_replace(target, lambda _: False, args.replace)
    if suffix_of(args.volume) in ZARR_SUFFIXES:
        where = preview_volume(args.volume, args.output or default_output(args.volume), args.source)
    else:
        columns = {}
        if args.source:
            columns["source"] = read_volume(args.source)[0]
        image, geom = read_volume(args.volume)
        columns["result" if args.source else Path(args.volume).name] = image
        where = str(save_columns(args.output or default_output(args.volume), columns, geom.numpy_spacing()))
    print(f"wrote {where}")
    return 0


def cmd_check_pairs(args: argparse.Namespace) -> int:
    from msgan.data.pairs import PairsError, check_pairs, describe, read_pairs

    try:
        pairs = read_pairs(args.pairs)
    except PairsError as err:  # the manifest itself is refused: one line naming the row, exit 2
        from msgan.redact import redact_text

        print(f"msgan check-pairs: {redact_text(str(err))}", file=sys.stderr)
        return 2
    checks = check_pairs(pairs, args.dims)
    for c in checks:
        print(describe(c))
    bad = [c for c in checks if not c.usable]
    per_split = ", ".join(
        f"{split} {n}"
        for split in ("train", "validation", "holdout")
        if (n := sum(c.pair.split == split for c in checks))
    )
    resample = sum(c.usable and not c.same_grid and not c.different_frames for c in checks)
    align = sum(c.usable and c.different_frames for c in checks)
    print(
        f"{len(checks)} pair(s) ({per_split}): {len(checks) - len(bad)} usable, {len(bad)} unusable"
        + (f" (rows {', '.join(str(c.pair.row) for c in bad)})" if bad else "")
        + f"; {resample} to resample onto the source grid, {align} needing data.align"
    )
    return 1 if bad else 0


def cmd_find_pairs(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module("msgan.find_pairs").run(args))


def cmd_doctor(args: argparse.Namespace) -> int:
    from msgan.doctor import doctor

    return doctor(args.storage, args.gpu)


def cmd_info(args: argparse.Namespace) -> int:
    from msgan.cascade import manifest_config, read_manifest

    manifest = read_manifest(args.model)  # the folder's confinement rules: a plain, capped JSON file
    manifest_config(manifest, f"{args.model}/manifest.json")  # never a summary its spec contradicts
    keep = (
        "format",
        "code_version",
        "dims",
        "num_scales",
        "halos",
        "hr_patch",
        "parameters",
        "intensity",
        "spec",
        "meta",
    )
    print(json.dumps({k: manifest.get(k) for k in keep}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="msgan",
        description="Multi-scale patch GANs for translating large medical images (Uzunova et al. 2019).",
    )
    p.add_argument("--verbose", action="store_true", help="libraries' logs, and the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_sub_parser(common))

    _add_model_commands(sub)
    _add_data_commands(sub)
    return p


def _add_model_commands(sub: Any) -> None:
    """Subcommands that make, train, run and promote models."""
    d = sub.add_parser("demo", help="end-to-end local demo: train on phantoms, translate, score, plot")
    _config_args(d)
    d.set_defaults(config="configs/demo.yaml" if Path("configs/demo.yaml").is_file() else None)
    d.add_argument("--out", default=None, help="output folder (default: $MSGAN_HOME/runs/demo, MSGAN_HOME=~/.msgan)")
    d.set_defaults(func=cmd_demo)

    n = sub.add_parser("new-model", help="write an untrained, seeded cascade (every scale + manifest)")
    _config_args(n, required=True)
    n.add_argument("out_dir", help="cascade folder to write")
    n.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    _replace_arg(n, "a cascade folder msgan wrote")
    n.set_defaults(func=cmd_new_model)

    t = sub.add_parser("translate", help="translate one volume (NIfTI, MHA, NRRD or OME-Zarr) through a cascade")
    t.add_argument("input", help="input volume; format from the suffix")
    t.add_argument("output", help="output volume; same size and geometry as the input")
    t.add_argument("--model", required=True, help="cascade folder, or models:/NAME@ALIAS from the MLflow registry")
    t.add_argument("--tile", type=int, default=None, help="inference tile core in voxels (default: memory budget)")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--quiet", action="store_true", help="no per-scale progress")
    _replace_arg(t, "msgan's translation of another model version, or an existing single output file")
    t.set_defaults(func=cmd_translate)

    ph = sub.add_parser("phantom", help="write a synthetic thorax CT (soft or sharp kernel, or noiseless truth)")
    ph.add_argument("output", help="output volume (.nii.gz, .mha, .nrrd, .zarr)")
    ph.add_argument("--shape", type=int, nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"))
    ph.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"), help="mm")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--kernel", choices=["soft", "sharp", "truth"], default="soft")
    _replace_arg(ph, "an existing output file")
    ph.set_defaults(func=cmd_phantom)

    tr = sub.add_parser("train", help="train every scale locally, one after another, into a cascade folder")
    _config_args(tr, required=True)
    tr.add_argument("out_dir", help="cascade folder to write")
    _replace_arg(tr, "a cascade folder msgan wrote")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("promote", help="point an alias of a registered cascade at a version (MLflow)")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("version", help="model version to point at")
    pr.add_argument("--alias", default="champion", help="alias to move (default champion)")
    pr.set_defaults(func=cmd_promote)


def _add_data_commands(sub: Any) -> None:
    """Subcommands that move images in and out (DICOM, PACS), look at them, and check the set-up."""
    ig = sub.add_parser("ingest", help="DICOM folder (one or more series) or NIfTI/MHA -> OME-Zarr volume(s)")
    ig.add_argument("source", help="folder of DICOM files (searched recursively), or a NIfTI/MHA/NRRD file")
    ig.add_argument("output", help="OUT.zarr for one series; a folder (OUT/<SeriesInstanceUID>.zarr) for several")
    _replace_arg(ig, "a volume msgan ingested before")
    ig.set_defaults(func=cmd_ingest)

    ex = sub.add_parser("export", help="OME-Zarr volume -> DICOM series (derived, new UIDs) or NIfTI")
    ex.add_argument("volume", help="an ingested or translated volume (.zarr)")
    ex.add_argument("out_dir", help="folder for the DICOM files, or a .nii.gz path / folder for NIfTI")
    ex.add_argument("--format", choices=["dicom", "nifti"], default="dicom")
    ex.add_argument("--description", default=None, help="SeriesDescription (default: says what made it)")
    ex.add_argument("--classic", action="store_true", help="an Enhanced CT/MR source: write classic single-frame files")
    _replace_arg(ex, "the same series exported before, or an existing NIfTI file")
    ex.set_defaults(func=cmd_export)

    ps = sub.add_parser("pacs-sync", help="one pass of the scheduled translation of new PACS series (DICOMweb)")
    ps.add_argument("--model", required=True, help="models:/NAME@ALIAS or a cascade folder")
    ps.add_argument("--storage", default=None, help="state and volumes (path or s3://; default $MSGAN_HOME/runs/pacs)")
    ps.add_argument("--modality", default="CT")
    ps.add_argument("--kernel", default=None, help="regex on ConvolutionKernel, e.g. 'B[6-9]0f'")
    ps.add_argument("--description", default=None, help="regex on SeriesDescription")
    ps.add_argument(
        "--match", action="append", default=[], metavar="KEYWORD=REGEX",
        help="series filter in the syntax of find-pairs (repeatable; all must match): " + patterns.HELP,
    )  # fmt: skip
    ps.add_argument("--study-date", default=None, help="DICOM date range, e.g. 20260101-")
    ps.add_argument("--no-push", action="store_true", help="do not store results back into the PACS")
    ps.add_argument("--export", default=None, help="also write results under this folder")
    ps.add_argument("--format", choices=["dicom", "nifti"], default="dicom", help="format for --export")
    ps.add_argument("--retranslate", action="store_true", help="redo series translated by another model version")
    ps.add_argument("--retry-failed", action="store_true", help="try again series refused in an earlier pass")
    ps.add_argument("--limit", type=int, default=None, help="at most this many series per pass")
    ps.set_defaults(func=cmd_pacs_sync)

    pv = sub.add_parser("preview", help="PNG of a volume's centre slices (a translated one beside its source)")
    pv.add_argument("volume", help="OME-Zarr volume (a translated one shows its source too), or NIfTI/MHA/NRRD")
    pv.add_argument("output", nargs="?", default=None, help="PNG to write (default: beside the volume, NAME.png)")
    pv.add_argument("--source", default=None, help="show this volume as the source (default: the manifest's input)")
    _replace_arg(pv, "an existing PNG")
    pv.set_defaults(func=cmd_preview)

    dr = sub.add_parser("doctor", help="check what a job needs: packages, Ray, storage, MLflow, PACS, GPU")
    dr.add_argument(
        "--storage", default="runs/storage", help="storage to probe (default runs/storage under MSGAN_HOME)"
    )
    dr.add_argument("--gpu", choices=["auto", "gpu"], default="auto", help="gpu: a missing GPU is a failure")
    dr.set_defaults(func=cmd_doctor)

    cp = sub.add_parser("check-pairs", help="check a pairs.csv: one line per pair (sizes, spacing, overlap, problems)")
    cp.add_argument("pairs", help="pairs CSV (path or s3://): columns source,target[,split][,patient]")
    cp.add_argument("--dims", type=int, choices=[2, 3], default=None, help="the model's dimensionality, if known")
    cp.set_defaults(func=cmd_check_pairs)

    _add_find_pairs(sub)

    i = sub.add_parser("info", help="print a cascade's manifest summary")
    i.add_argument("model", help="cascade folder")
    i.set_defaults(func=cmd_info)


def _add_find_pairs(sub: Any) -> None:
    """``find-pairs`` (msgan.find_pairs: its own arguments and run); absent while that module is."""
    import importlib

    help_ = "harvest (source, target) pairs from DICOM folders or a PACS into a pairs.csv"
    try:
        module = importlib.import_module("msgan.find_pairs")
    except ModuleNotFoundError as err:
        if err.name == "msgan.find_pairs":
            return  # not part of this installation
        missing = str(err)  # a dependency of find_pairs: the command says so when run; the others still work
        fp = sub.add_parser("find-pairs", help=f"{help_} (unavailable: {missing})")
        fp.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

        def unavailable(args: argparse.Namespace) -> int:
            print(f"msgan find-pairs: unavailable here ({missing})", file=sys.stderr)
            return 1

        fp.set_defaults(func=unavailable)
        return
    fp = sub.add_parser("find-pairs", help=help_)
    module.add_arguments(fp)
    fp.set_defaults(func=cmd_find_pairs)


def _replace_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--replace", action="store_true",
        help=f"replace {what} (default: refuse). Anything msgan did not write is never replaced",
    )  # fmt: skip


def _sub_parser(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Subcommand parsers that also accept ``--verbose`` after the command."""

    class Sub(argparse.ArgumentParser):
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw["parents"] = [*kw.get("parents", []), common]
            super().__init__(*a, **kw)

    return Sub


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one line naming it), 1 an unexpected error (one line; the
    traceback with ``--verbose``)."""
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    quiet(args.verbose)
    from msgan.redact import redact_text

    def body() -> int:
        try:
            return int(args.func(args))
        except (ConfigError, FileNotFoundError, ValueError) as err:
            print(f"msgan {args.command}: {redact_text(str(err))}", file=sys.stderr)
            return 2

    return run_entry(f"msgan {args.command}", body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
