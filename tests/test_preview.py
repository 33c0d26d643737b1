import json

import numpy as np
import pytest
from matplotlib.image import imread

from msgan.cli import main
from msgan.io.volume import Geometry, write_volume, write_zarr
from msgan.preview import centre_views, render, save_columns


def _ramp(shape):
    return np.indices(shape).sum(axis=0).astype(np.float32)


def test_views_carry_the_true_aspect_ratio():
    views = centre_views(_ramp((10, 20, 30)), (3.0, 1.0, 0.5))
    assert [(n, v.shape, a) for n, v, a in views] == [
        ("axial", (20, 30), 2.0),
        ("coronal", (10, 30), 6.0),
        ("sagittal", (10, 20), 3.0),
    ]
    (name, img, aspect), = centre_views(_ramp((12, 8)), (0.5, 1.0))  # fmt: skip
    assert name == "image" and img.shape == (12, 8) and aspect == 0.5
    with pytest.raises(ValueError, match="2D or 3D"):
        centre_views(np.zeros((2, 2, 2, 2)), (1, 1, 1, 1))


def test_thick_slices_make_taller_coronal_rows(tmp_path):
    vol = _ramp((16, 32, 32))
    iso = save_columns(tmp_path / "iso.png", {"a": vol, "b": vol}, (1.0, 1.0, 1.0))
    thick = save_columns(tmp_path / "thick.png", {"a": vol, "b": vol}, (4.0, 1.0, 1.0))
    h_iso, w_iso = imread(iso).shape[:2]
    h_thick, w_thick = imread(thick).shape[:2]
    assert w_iso == w_thick and h_thick > 1.5 * h_iso  # coronal and sagittal are 4x taller in mm
    png2d = render({"x": centre_views(_ramp((20, 40)), (1.0, 1.0))})
    assert png2d.startswith(b"\x89PNG")


def test_msgan_preview_of_a_translated_zarr_shows_source_and_result(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dims: 3\n")
    tiny = ["--set", "num_scales=2", "--set", "lr_generator.width=4", "--set", "lr_generator.depth=1",
            "--set", "hr_generator.width=4", "--set", "hr_generator.num_blocks=1",
            "--set", "discriminator.num_layers=1", "--set", "train.hr_patch=8"]  # fmt: skip
    assert main(["new-model", "--config", str(cfg), *tiny, str(tmp_path / "model")]) == 0
    rng = np.random.default_rng(0)
    write_zarr(tmp_path / "in.zarr", [rng.uniform(-1000, 400, (18, 20, 22)).astype(np.float32)],
               Geometry((0.8, 0.8, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))  # fmt: skip
    assert main(["translate", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--model",
                 str(tmp_path / "model"), "--quiet"]) == 0  # fmt: skip
    published = imread(tmp_path / "out.zarr" / "preview.png")  # every translated volume has one, by its manifest
    assert json.loads((tmp_path / "out.zarr" / "manifest.json").read_text())["preview"] == "preview.png"
    assert main(["preview", str(tmp_path / "out.zarr")]) == 0
    img = imread(tmp_path / "out.png")
    h, w = img.shape[:2]
    assert w == 2 * 256 and h > 3 * 256 and img.std() > 0.01  # two columns, tall views (2.5 mm slices), not blank
    assert published.shape == img.shape
    single = tmp_path / "single.png"
    write_volume(tmp_path / "v.nii.gz", rng.normal(size=(10, 12, 14)).astype(np.float32), Geometry.identity(3))
    assert main(["preview", str(tmp_path / "v.nii.gz"), str(single)]) == 0
    assert imread(single).shape[1] < w  # one column
    assert main(["preview", str(tmp_path / "missing.zarr")]) == 2

    # the manifest is a file inside the volume, so untrusted: another volume it names (same shape and grid, other
    # attributes: another patient) is never drawn into the preview, nor a relative path, nor S3 for a local volume
    other = tmp_path / "elsewhere" / "other_patient.zarr"
    grid = Geometry((0.8, 0.8, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_zarr(other, [np.full((18, 20, 22), 1000, np.float32)], grid, attrs={"patient": "other"})
    manifest = tmp_path / "out.zarr" / "manifest.json"
    kept = json.loads(manifest.read_text())
    for named, says in ((str(other), "it is not its input"), ("in.zarr", "not an absolute path"),
                        ("s3://bucket/in.zarr", "on S3, this volume is local"), (123, "names no input")):  # fmt: skip
        manifest.write_text(json.dumps({**kept, "input": named}))
        (tmp_path / "leak.png").unlink(missing_ok=True)
        assert main(["preview", str(tmp_path / "out.zarr"), str(tmp_path / "leak.png")]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "leak.png").exists()
    assert (
        main(["preview", str(tmp_path / "out.zarr"), str(tmp_path / "ok.png"), "--source", str(tmp_path / "in.zarr")])
        == 0
    )
