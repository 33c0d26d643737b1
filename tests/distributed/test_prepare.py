import numpy as np
import pytest

from msgan import storage
from msgan.config import ConfigError
from msgan.distributed import prepare as prep
from msgan.io.pyramids import open_pyramid
from msgan.io.volume import Geometry, read_volume, write_volume
from tests.conftest import tiny_config
from tests.dicom_data import OBLIQUE, write_ct_series


def test_files_and_dicom_folders_prepare_once(tmp_path):
    _, _, hu = write_ct_series(tmp_path / "dicom" / "s1", seed=3)
    write_volume(tmp_path / "v.nii.gz", hu, OBLIQUE)
    cfg = tiny_config(**{"num_scales": 2, "data.source": "files",
                         "data.paths": [str(tmp_path / "dicom" / "*"), str(tmp_path / "v.nii.gz")]})  # fmt: skip
    srcs = prep.sources(cfg)
    assert [s.kind for s in srcs] == ["dicom", "file"]
    prep.check_shapes(cfg, srcs)
    root = storage.normalize_uri(tmp_path / "store")
    first = prep.prepare(cfg, srcs, root, use_ray=False)
    assert [p["prepared"] for p in first] == [True, True] and first[0]["shape"] == list(hu.shape)
    assert first[0]["uri"] != first[1]["uri"]  # different bytes, different fingerprints
    again = prep.prepare(cfg, srcs, root, use_ray=False)
    assert [p["prepared"] for p in again] == [False, False] and [p["uri"] for p in again] == [p["uri"] for p in first]
    pyr = open_pyramid(first[0]["uri"])
    assert pyr.shapes == [(6, 20, 18), (12, 40, 36)]


def test_missing_or_unusable_data_is_a_config_error(tmp_path):
    cfg = tiny_config(**{"data.source": "files", "data.paths": [str(tmp_path / "nothing*.nii.gz")]})
    with pytest.raises(ConfigError, match="matches no readable file"):
        prep.sources(cfg)
    (tmp_path / "bad.mha").write_bytes(b"garbage")
    cfg = tiny_config(**{"data.source": "files", "data.paths": [str(tmp_path / "bad.mha")]})
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        prep.check_shapes(cfg, prep.sources(cfg))


def test_image_condition_on_files_is_refused_before_ray(tmp_path, monkeypatch):
    """condition=image needs (source, target) pairs, which files do not give: the job refuses the config in
    its pre-flight, naming the file and the rule, before Ray starts or anything is written."""
    import ray

    from msgan.distributed.pipeline import run_training_job

    vol = tmp_path / "v.nii.gz"
    write_volume(vol, np.zeros((24, 24, 24), np.float32), Geometry.identity(3))
    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    cfg = tiny_config(
        **{"condition": "image", "data.source": "files", "data.paths": [str(vol)], "job.storage": str(store)}
    )
    assert not ray.is_initialized()
    lines: list[str] = []
    with pytest.raises(ConfigError, match=rf"{vol}: condition=.image. trains on \(source, target\) pairs: name them"):
        run_training_job(cfg, log=lines.append, workdir=tmp_path / "out")
    assert not ray.is_initialized(), "Ray was started for a configuration that cannot train"
    assert lines == [] and not store.exists() and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="condition='image'"):  # the local path's pre-flight too
        prep.check_shapes(cfg, [prep.VolumeSource("file", str(vol))])


def test_dicom_series_with_other_dims_is_refused_before_work(tmp_path):
    """A DICOM series is 3D: a 2D config names the folder and the rule in the pre-flight (not in a Ray task)."""
    write_ct_series(tmp_path / "dicom" / "s1", seed=3)
    paths = [str(tmp_path / "dicom" / "s1")]
    cfg = tiny_config(**{"dims": 2, "data.phantom.shape": [64, 64], "data.source": "files", "data.paths": paths})
    with pytest.raises(ConfigError, match=r"s1: a 3D image; the config trains 2D \(dims\)"):
        prep.check_shapes(cfg, prep.sources(cfg))


def _mr_pairs(root, gains=((1.0, 0.0), (3.5, 120.0))):

    from tests.test_normalize import mr_like

    root.mkdir(parents=True, exist_ok=True)
    lines = ["source,target,split"]
    for k, (gain, offset) in enumerate(gains):
        t1 = mr_like((24, 24, 24), seed=0)  # one anatomy on two scanners
        t2 = (1400.0 - t1) * (t1 > 100)  # another contrast of the same anatomy: dark and bright swapped
        write_volume(root / f"t1_{k}.nii.gz", (t1 * gain + offset).astype(np.float32), Geometry.identity(3))
        write_volume(root / f"t2_{k}.nii.gz", (t2 * 2 * gain).astype(np.float32), Geometry.identity(3))
        lines.append(f"t1_{k}.nii.gz,t2_{k}.nii.gz,train")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def test_mr_pairs_normalise_each_side_and_two_scanners_give_the_same_pyramids(tmp_path):
    """intensity.normalize=percentile: a T1 -> T2 pair set trains, each side normalised by its own body, so a
    pair on another scanner's scale prepares to the same windowed images (and a CT window would not)."""
    from msgan.train import train_locally

    pairs = _mr_pairs(tmp_path / "mr")
    over = {
        "condition": "image+edges", "source_residual": True, "hr_generator.residual": False,
        "intensity.normalize": "percentile", "intensity.low": -200.0, "intensity.high": 1400.0,
        "data.source": "pairs", "data.pairs": str(pairs), "num_scales": 2, "train.steps": 2,
    }  # fmt: skip
    cfg = tiny_config(**over)
    a, b = prep.training_pyramids(cfg)
    for s in range(cfg.num_scales):
        np.testing.assert_allclose(a.sources[s], b.sources[s], atol=2e-3)
        np.testing.assert_allclose(a.images[s], b.images[s], atol=2e-3)
    cascade = train_locally(cfg, [a, b], log=lambda _: None)
    out = cascade.translate(read_volume(str(tmp_path / "mr" / "t1_1.nii.gz"))[0])
    assert np.isfinite(out).all() and out.shape == (24, 24, 24)
    ct = tiny_config(**(over | {"intensity.normalize": "none"}))
    a, b = prep.training_pyramids(ct)
    assert np.abs(a.sources[-1] - b.sources[-1]).max() > 0.1


def test_a_moved_target_is_registered_back_with_align_rigid(tmp_path):
    """contrast: the arterial phase moved by a rigid motion (3 degrees, 4 mm). With data.align=rigid the
    prepared target lies where the unmoved one does; with none it stays moved. The residual says so too."""
    import SimpleITK as sitk

    from msgan.data.tasks import make_task

    vol = make_task("contrast", 201, (48, 48, 48))
    geom = Geometry(
        origin=(0.0, 0.0, 0.0), spacing=tuple(reversed(vol.spacing)), direction=Geometry.identity(3).direction
    )
    moved = sitk.GetImageFromArray(vol.target)
    moved.SetSpacing(geom.spacing)
    motion = sitk.Euler3DTransform()
    motion.SetCenter(moved.TransformContinuousIndexToPhysicalPoint([23.5, 23.5, 23.5]))
    motion.SetRotation(0.05, 0.0, -0.03)
    motion.SetTranslation((4.0, -3.0, 2.0))
    moved = sitk.Resample(moved, moved, motion, sitk.sitkLinear, -1000.0)
    write_volume(tmp_path / "before.nii.gz", vol.input, geom)
    write_volume(tmp_path / "after.nii.gz", sitk.GetArrayFromImage(moved).astype(np.float32), geom)
    (tmp_path / "pairs.csv").write_text("source,target\nbefore.nii.gz,after.nii.gz\n")
    errors, residuals = {}, {}
    for method in ("none", "rigid"):
        over = {"condition": "image", "source_residual": True, "hr_generator.residual": False,
                "data.source": "pairs", "data.pairs": str(tmp_path / "pairs.csv"), "data.align": method}  # fmt: skip
        cfg = tiny_config(**over)
        (src,) = prep.sources(cfg)
        ready = prep.prepared_pair(src, cfg)
        inner = ready.valid.copy()
        inner[:8], inner[-8:], inner[:, :8], inner[:, -8:], inner[..., :8], inner[..., -8:] = (False,) * 6
        errors[method] = float(np.abs(ready.target - vol.target)[inner].mean())
        residuals[method] = ready.alignment["residual"]
    assert errors["rigid"] < 0.5 * errors["none"], errors
    assert residuals["rigid"] < residuals["none"], residuals


def test_the_job_preflight_checks_the_whole_manifest_by_dicom_patient_and_frame(tmp_path):
    """The job's pre-flight refuses what `msgan check-pairs` refuses: one DICOM patient in train and holdout
    (no patient column: the PatientID decides), and a pair across two frames of reference with align none
    (accepted with align rigid)."""
    for seed in (1, 2):
        write_ct_series(tmp_path / f"s{seed}" / "sharp", seed=seed, kernel="B80f", series_name="sharp")
        write_ct_series(tmp_path / f"s{seed}" / "soft", seed=seed, kernel="B30f", series_name="soft")
    csv = tmp_path / "pairs.csv"
    csv.write_text("source,target,split\ns1/sharp,s1/soft,train\ns2/sharp,s2/soft,holdout\n")
    base = {"condition": "image", "source_residual": True, "hr_generator.residual": False, "num_scales": 2,
            "data.source": "pairs", "data.pairs": str(csv)}  # fmt: skip
    cfg = tiny_config(**base)
    train = prep.sources(cfg)  # the training split alone still checks every row of the manifest
    with pytest.raises(ConfigError, match=r"pairs.csv row 3: .*DICOM PatientID is in split 'train' at row 2"):
        prep.check_shapes(cfg, train)
    csv.write_text("source,target,split\ns1/sharp,s2/soft,train\n")  # two acquisitions' frames
    with pytest.raises(ConfigError, match=r"pairs.csv row 2: .*different frames of reference.*data.align: rigid"):
        prep.check_shapes(cfg, prep.sources(cfg))
    prep.check_pairs(tiny_config(**base, **{"data.align": "rigid"}), prep.sources(cfg))
