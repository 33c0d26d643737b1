import re
import subprocess
import sys

import numpy as np
import pytest

from msgan.cli import main
from msgan.io.volume import Geometry, read_volume, write_volume, write_zarr

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
    write_volume(tmp_path / "bad.mha", bad, Geometry.identity(3))
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
