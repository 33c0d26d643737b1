import re
import subprocess
import sys

import numpy as np
import pytest

from msgan.cli import main
from msgan.io.volume import Geometry, read_volume, write_volume, write_zarr
from tests.conftest import write_unchecked

TINY = [
    "--set", "num_scales=3", "--set", "lr_generator.width=4", "--set", "lr_generator.depth=1",
    "--set", "hr_generator.width=4", "--set", "hr_generator.num_blocks=1",
    "--set", "discriminator.num_layers=1", "--set", "train.hr_patch=8",
]  # fmt: skip


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "msgan.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in (
        "demo",
        "new-model",
        "translate",
        "phantom",
        "train",
        "promote",
        "check-pairs",
        "ingest",
        "export",
        "pacs-sync",
        "info",
    ):
        assert cmd in out.stdout


@pytest.fixture
def model(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dims: 3\n")
    assert main(["new-model", "--config", str(cfg), *TINY, str(tmp_path / "model"), "--seed", "5"]) == 0
    return tmp_path / "model"


@pytest.mark.parametrize("in_suffix,out_suffix", [(".nii.gz", ".mha"), (".zarr", ".nii.gz")])
def test_translate_keeps_geometry_and_ignores_tile(tmp_path, model, in_suffix, out_suffix, rng):
    geom = Geometry((0.7, 0.7, 2.0), (10.0, -20.0, 5.0), (1, 0, 0, 0, 0, -1, 0, 1, 0))
    image = rng.uniform(-1000, 400, (21, 26, 19)).astype(np.float32)  # not a multiple of any tile
    src = tmp_path / f"in{in_suffix}"
    write_volume(src, image, geom)
    outs = []
    for tile in ("4", "12"):
        dst = tmp_path / f"out{tile}{out_suffix}"
        assert main(["translate", str(src), str(dst), "--model", str(model), "--tile", tile, "--quiet"]) == 0
        out, g = read_volume(dst)
        assert out.shape == image.shape and g.allclose(geom)
        outs.append(out)
    assert float(np.abs(outs[0] - outs[1]).max()) < 1e-2  # HU


def test_translate_bad_input_writes_nothing(tmp_path, model, capsys):
    bad = np.zeros((16, 16, 16), np.float32)
    bad[1, 2, 3] = np.nan
    write_unchecked(tmp_path / "bad.mha", bad, Geometry.identity(3))
    assert main(["translate", str(tmp_path / "bad.mha"), str(tmp_path / "o.nii.gz"), "--model", str(model)]) == 2
    assert re.search(r"bad\.mha: .*NaN", capsys.readouterr().err)
    assert not (tmp_path / "o.nii.gz").exists()
    assert main(["translate", str(tmp_path / "none.nii.gz"), str(tmp_path / "o.nii.gz"), "--model", str(model)]) == 2
    assert "none.nii.gz" in capsys.readouterr().err


def test_phantom_and_info(tmp_path, model, capsys):
    assert main(["phantom", str(tmp_path / "p.nii.gz"), "--shape", "16", "20", "24", "--kernel", "sharp"]) == 0
    img, geom = read_volume(tmp_path / "p.nii.gz")
    assert img.shape == (16, 20, 24) and geom.spacing == pytest.approx((400 / 24,) * 3)
    assert main(["info", str(model)]) == 0
    assert '"halos": [\n    0,\n    4,\n    4\n  ]' in capsys.readouterr().out


def test_translate_shows_tiles_rate_and_eta_and_says_when_nothing_was_done(tmp_path, model, capsys, rng):
    write_zarr(tmp_path / "in.zarr", [rng.uniform(-1000, 400, (21, 26, 19)).astype(np.float32)], Geometry.identity(3))
    args = ["translate", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--model", str(model), "--tile", "4"]
    assert main(args) == 0
    out = capsys.readouterr()
    for s in (1, 2):
        assert re.search(rf"scale {s}: (\d+)/\1 tiles \(100%\)  [\d.]+ tiles/(s|min)  done in \d+s", out.err), out.err
    assert re.search(r"scale 2: \d+/\d+ tiles \( 25%\)  [\d.]+ tiles/(s|min)  ETA \d+", out.err), out.err
    assert "translated " in out.out
    assert main(args) == 0  # published by the same model: nothing to do, and it says so
    again = capsys.readouterr()
    assert "already translated by" in again.out and "translated in" not in again.out and " in 0.0s" not in again.out


def test_unexpected_error_is_one_line_and_the_traceback_is_for_verbose(tmp_path, capsys, monkeypatch):
    import msgan.cascade

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("[1, 2]")  # valid JSON, not a manifest: bad input, named
    assert main(["info", str(tmp_path / "m")]) == 2
    assert "manifest.json" in capsys.readouterr().err

    def broken(folder):
        raise AttributeError("a bug")

    monkeypatch.setattr(msgan.cascade, "read_manifest", broken)  # what is tested is how a bug is shown
    assert main(["info", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("msgan info: error: AttributeError:"), err
    assert main(["info", str(tmp_path / "m"), "--verbose"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_train_reads_the_jobs_data_sources_dicom_folders_included(tmp_path, capsys):
    from tests.dicom_data import write_ct_series

    write_ct_series(tmp_path / "dicom" / "s1", seed=3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dims: 3\n")
    paths = f"data.paths=['{tmp_path / 'dicom' / '*'}']"
    args = ["train", "--config", str(cfg), *TINY, "--set", "num_scales=2", "--set", "train.steps=1",
            "--set", "data.source=files", "--set", paths, str(tmp_path / "m")]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "m" / "manifest.json").is_file()


def test_train_without_pairs_from_two_folders(tmp_path, capsys):
    """``msgan train`` with ``train.objective=unpaired``: the source folder feeds scale 0 and the forward model,
    the target folder trains; the saved cascade records the fitted models."""
    import json

    from msgan.data.phantom import kernel_pair

    for folder, seeds, side in (("sharp", (1, 2), 1), ("soft", (3, 4), 0)):
        (tmp_path / folder).mkdir()
        for seed in seeds:
            write_volume(
                tmp_path / folder / f"{seed}.nii.gz", kernel_pair((24, 24, 24), seed)[side], Geometry.identity(3)
            )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dims: 3\n")
    sets = ["--set", "train.objective=unpaired", "--set", "data.source=unpaired", "--set", "condition=image",
            "--set", "source_residual=true", "--set", "hr_generator.residual=false",
            "--set", f"data.sources={tmp_path / 'sharp'}", "--set", f"data.targets={tmp_path / 'soft'}"]  # fmt: skip
    args = ["train", "--config", str(cfg), *TINY, "--set", "num_scales=2", "--set", "train.steps=1", *sets,
            str(tmp_path / "m")]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "m" / "manifest.json").read_text())["meta"]
    assert len(meta["forward_models"]) == 2 and meta["forward_models"][1]["gain_0.4"] > 1.5  # soft targets -> sharp


def _pairs_folder(tmp_path):
    """Small volumes: a, b, d, e on one grid, c far away from them."""
    eye = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    for name, origin in (("a.nii.gz", 0.0), ("b.mha", 0.0), ("c.nii.gz", 500.0), ("d.nii.gz", 0.0), ("e.mha", 0.0)):
        write_volume(tmp_path / name, np.zeros((6, 8, 10), np.float32), Geometry((1.0, 1.0, 2.0), (origin, 0, 0), eye))
    return tmp_path


def test_check_pairs_prints_a_line_per_pair_and_exits_by_what_it_found(tmp_path, capsys):
    folder = _pairs_folder(tmp_path)
    good = folder / "good.csv"
    good.write_text("source,target,split\na.nii.gz,b.mha,train\nd.nii.gz,e.mha,holdout\n")
    assert main(["check-pairs", str(good), "--dims", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("row 2    train      source 10x8x6 @ 1x1x2 mm  target 10x8x6 @ 1x1x2 mm  same grid")
    assert out[0].endswith("overlap 100%  ok") and out[1].startswith("row 3    holdout")
    assert out[2] == (
        "2 pair(s) (train 1, holdout 1): 2 usable, 0 unusable; 0 to resample onto the source grid, 0 needing data.align"
    )

    bad = folder / "bad.csv"
    bad.write_text("source,target\na.nii.gz,b.mha\nc.nii.gz,a.nii.gz\n")
    assert main(["check-pairs", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("row 3 ") and out[1].endswith("resample  overlap 0%  UNUSABLE: no physical overlap")
    assert out[2].startswith("2 pair(s) (train 2): 1 usable, 1 unusable (rows 3)")
    assert main(["check-pairs", str(good), "--dims", "2"]) == 1
    assert "UNUSABLE: source is 3D, the model is 2D" in capsys.readouterr().out


def test_check_pairs_refuses_a_bad_manifest_in_one_line(tmp_path, capsys):
    folder = _pairs_folder(tmp_path)
    (folder / "p.csv").write_text("source,target,kernel\na.nii.gz,b.mha,B70f\n")
    assert main(["check-pairs", str(folder / "p.csv")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"msgan check-pairs: {folder / 'p.csv'} row 1: unknown column 'kernel'")
    assert main(["check-pairs", str(folder / "none.csv")]) == 2
    assert "none.csv: no such pairs file" in capsys.readouterr().err


def test_find_pairs_is_wired_to_its_module_when_there_is_one(monkeypatch, capsys):
    import argparse
    import types

    from msgan.cli import build_parser

    seen = {}
    stub = types.ModuleType("msgan.find_pairs")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("dicom_dir")
        parser.add_argument("--out", required=True)

    def run(args: argparse.Namespace) -> int:
        seen.update(dicom_dir=args.dicom_dir, out=args.out)
        return 3

    stub.add_arguments, stub.run = add_arguments, run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msgan.find_pairs", stub)
    assert main(["find-pairs", "studies", "--out", "pairs.csv"]) == 3
    assert seen == {"dicom_dir": "studies", "out": "pairs.csv"}
    monkeypatch.setitem(sys.modules, "msgan.find_pairs", None)  # the module is not there (yet): no command
    assert "find-pairs" not in build_parser().format_help()
    assert "check-pairs" in build_parser().format_help()
    with pytest.raises(SystemExit):
        main(["find-pairs", "studies"])
    assert "invalid choice: 'find-pairs'" in capsys.readouterr().err
