"""The main job without pairs (data.source: unpaired, train.objective: unpaired; issue 22): the config's rules,
both image sets and the scored pairs as the job lists and checks them before any work, the sets' images prepared
as plain pyramid stores, the forward models fitted on the driver from central crops, each scale worker's data,
and one whole job on tiny NIfTI sets (sharp sources and soft targets of other subjects) that trains, registers
and scores a held-out pair."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from msgan import storage
from msgan.config import ConfigError, data_path_keys, load_config
from msgan.distributed import prepare as prep
from msgan.io.pyramids import open_pyramid
from msgan.io.volume import Geometry, write_volume
from tests.conftest import tiny_config
from tests.distributed.conftest import run_job, write_config

SHAPE = (32, 32, 32)
UNPAIRED = {
    "num_scales": 2,
    "condition": "image+edges",
    "source_residual": True,
    "hr_generator.residual": False,
    "train.objective": "unpaired",
    "train.batch_size": 2,
    "data.source": "unpaired",
}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Sharp and soft reconstructions of subjects 1-6 (32^3 NIfTI, written once): ``<seed>_sharp.nii.gz``,
    ``<seed>_soft.nii.gz``."""
    from msgan.data.phantom import kernel_pair

    root = tmp_path_factory.mktemp("volumes")
    for seed in range(1, 7):
        soft, sharp = kernel_pair(SHAPE, seed)
        write_volume(root / f"{seed}_sharp.nii.gz", sharp, Geometry.identity(3))
        write_volume(root / f"{seed}_soft.nii.gz", soft, Geometry.identity(3))
    return root


def write_sets(root: Path, vols: Path, sources_csv: str | None = None, pairs_csv: str | None = None) -> dict:
    """Sources: a CSV of sharp subjects 1-2 (train) and 6 (holdout: translated, not scored); targets: a folder
    of soft subjects 3-4; scored pairs: subject 5 (holdout). Returns the config's data keys."""
    root.mkdir(parents=True, exist_ok=True)
    soft = root / "soft"
    soft.mkdir()
    for seed in (3, 4):
        shutil.copy(vols / f"{seed}_soft.nii.gz", soft / f"{seed}.nii.gz")
    sources = root / "sources.csv"
    sources.write_text(
        sources_csv
        or f"image,split,patient\n{vols}/1_sharp.nii.gz,,p1\n{vols}/2_sharp.nii.gz,train,p2\n"
        f"{vols}/6_sharp.nii.gz,holdout,p6\n"
    )
    pairs = root / "pairs.csv"
    pairs.write_text(
        pairs_csv or f"source,target,split,patient\n{vols}/5_sharp.nii.gz,{vols}/5_soft.nii.gz,holdout,p5\n"
    )
    return {"data.sources": str(sources), "data.targets": str(soft), "data.pairs": str(pairs)}


def cfg_of(data: dict, **over):
    return tiny_config(**(UNPAIRED | data | over))


# ----------------------------------------------------------------------------- the config


def test_the_config_names_two_sets_for_the_unpaired_objective():
    paired_model = {k: v for k, v in UNPAIRED.items() if k.startswith(("condition", "source_", "hr_"))}
    with pytest.raises(ConfigError, match=r"data.source='phantom': must be unpaired when train.objective=unpaired"):
        tiny_config(**paired_model, **{"train.objective": "unpaired"})
    with pytest.raises(ConfigError, match=r"train.objective='paired': must be unpaired when data.source=unpaired"):
        tiny_config(**paired_model, **{"data.source": "unpaired", "data.sources": "a", "data.targets": "b"})
    with pytest.raises(ConfigError, match=r"data.targets='': must name an image set"):
        cfg_of({"data.sources": "a.csv"})
    with pytest.raises(ConfigError, match=r"names the same set as data.sources"):
        cfg_of({"data.sources": "x", "data.targets": "x"})
    cfg = cfg_of({"data.sources": "/nowhere/sharp", "data.targets": "/nowhere/soft.csv"})  # loads; the job checks
    assert (cfg.data.sources, cfg.data.targets) == ("/nowhere/sharp", "/nowhere/soft.csv")
    assert {"data.sources", "data.targets"} <= set(data_path_keys())  # never logged, never saved with a model
    template = load_config(Path(__file__).resolve().parents[2] / "configs" / "unpaired-ct-kernel.yaml")
    assert template.train.objective == "unpaired" and template.data.source == "unpaired"


# ----------------------------------------------------------------------------- what the job lists and checks


def test_the_job_lists_both_sets_and_the_scored_pairs(tmp_path, volumes):
    cfg = cfg_of(write_sets(tmp_path, volumes))
    train = prep.sources(cfg)
    src, tgt = prep.unpaired_sets(train)
    assert [v.label for v in src] == ["sources.csv row 2", "sources.csv row 3"]
    assert [v.label for v in tgt] == ["soft/3.nii.gz", "soft/4.nii.gz"]
    assert {v.kind for v in train} == {"image"} and len(train) == 4
    assert prep.sources(cfg, "validation") == []
    kind, held = prep.end_of_job(cfg)
    assert kind == "holdout" and [v.label for v in held] == ["pairs.csv row 2", "sources.csv row 4"]
    assert [v.kind for v in held] == ["pair", "image"]
    prep.check_shapes(cfg, [*train, *held])  # every image readable, 3D, one modality, no leak


def test_mixed_training_held_out_targets_and_bad_images_are_refused_before_any_work(tmp_path, volumes, monkeypatch):
    import ray

    from msgan.distributed.pipeline import run_training_job

    mixed = f"source,target\n{volumes}/5_sharp.nii.gz,{volumes}/5_soft.nii.gz\n"
    cfg = cfg_of(write_sets(tmp_path / "a", volumes, pairs_csv=mixed))
    with pytest.raises(ConfigError, match=r"rows 2 are training pairs: mixed training \(pairs plus unpaired images\)"):
        prep.sources(cfg)
    data = write_sets(tmp_path / "b", volumes)
    held_target = tmp_path / "t.csv"
    held_target.write_text(f"image,split\n{volumes}/3_soft.nii.gz,train\n{volumes}/4_soft.nii.gz,holdout\n")
    with pytest.raises(ConfigError, match=r"data.targets: t.csv row 3 is a holdout row"):
        prep.end_of_job(cfg_of(data | {"data.targets": str(held_target)}))
    # a 2D image among the targets, and a training source of the held-out pair's patient: both listed, nothing run
    write_volume(Path(data["data.targets"]) / "flat.nii.gz", np.zeros((32, 32), np.float32), Geometry.identity(2))
    Path(data["data.sources"]).write_text(f"image,patient\n{volumes}/1_sharp.nii.gz,p5\n{volumes}/2_sharp.nii.gz,p2\n")
    monkeypatch.setenv("MSGAN_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    lines: list[str] = []
    with pytest.raises(ConfigError) as err:
        run_training_job(cfg_of(data, **{"job.storage": str(store)}), log=lines.append, workdir=tmp_path / "out")
    text = str(err.value)
    assert text.startswith("2 of 5 images cannot be used (nothing was prepared)"), text
    assert "sources.csv row 2 (sources): the same patient is in split 'holdout' at pairs.csv row 2" in text
    assert "soft/flat.nii.gz (targets): a 2D image, the model is 3D (a folder set holds one image per entry" in text
    assert not ray.is_initialized() and lines == [] and not store.exists()


# ----------------------------------------------------------------------------- stores, forward models, workers


def test_images_prepare_as_plain_stores_and_fit_the_forward_models_from_central_crops(tmp_path, volumes):
    from msgan.distributed.pipeline import central_crops, fit_forward_from_stores
    from msgan.distributed.train import _scale_data
    from msgan.train import ScaleTrainer

    cfg = cfg_of(write_sets(tmp_path, volumes), **{"train.steps": 1})
    src, tgt = prep.unpaired_sets(prep.sources(cfg))
    root = storage.normalize_uri(tmp_path / "store")
    src_uris = [p["uri"] for p in prep.prepare(cfg, src, root, use_ray=False)]
    tgt_uris = [p["uri"] for p in prep.prepare(cfg, tgt, root, use_ray=False)]
    assert not (Path(storage.local_path(src_uris[0])) / "source").exists()  # the image alone, not a pair
    pair = prep.end_of_job(cfg)[1][0]
    as_image = prep.VolumeSource("image", pair.ref, side="sources")
    assert prep.fingerprint(as_image, cfg) != prep.fingerprint(pair, cfg)  # a plain store is not a pair's
    assert prep.fingerprint(as_image, cfg) == prep.fingerprint(prep.VolumeSource("image", pair.ref), cfg)

    crops = central_crops(tgt_uris[0], 2, size=8)
    whole = open_pyramid(tgt_uris[0])
    assert crops.shapes == [(8, 8, 8), (8, 8, 8)]
    np.testing.assert_array_equal(crops.images[1], np.asarray(whole.images[1])[12:20, 12:20, 12:20])
    np.testing.assert_array_equal(central_crops(tgt_uris[0], 2, size=128).images[0], whole.images[0])
    forward = fit_forward_from_stores(cfg, src_uris, tgt_uris)
    assert len(forward) == 2 and all(m.dims == 3 for m in forward)
    assert forward[1].summary()["gain_0.4"] > 1.0  # soft -> sharp: the forward model sharpens

    dicts = [m.to_dict() for m in forward]
    lr = _scale_data(tgt_uris, 0, cfg, src_uris, dicts)
    hr = _scale_data(tgt_uris, 1, cfg, src_uris, dicts)
    assert all(isinstance(a, np.ndarray) for a in lr.source_set) and len(lr.source_set) == 2
    assert all(isinstance(a, zarr.Array) for a in hr.source_set)  # an HR scale reads no source voxel
    assert hr.synth is not None and hr.synth.forward == forward[1]
    for scale, data in ((0, lr), (1, hr)):
        step = ScaleTrainer(cfg, scale, data).train_step()
        assert np.isfinite(step.loss_g) and np.isfinite(step.loss_d)
    paired = tiny_config(**{"num_scales": 2})
    assert _scale_data(tgt_uris, 1, paired).synth is None


# ----------------------------------------------------------------------------- the whole job


@pytest.mark.slow
def test_job_trains_without_pairs_registers_and_scores_the_held_out_pair(tmp_path, job_env):
    from mlflow import MlflowClient

    from msgan.data.tasks import make_task

    vols = tmp_path / "vols"
    vols.mkdir()
    geom = Geometry.identity(3, (12.5, 12.5, 12.5))
    for seed, side in ((101, "input"), (102, "input"), (105, "target"), (106, "target"), (301, "both")):
        v = make_task("sharp-to-soft", seed, SHAPE, workers=1)
        if side in ("input", "both"):
            write_volume(vols / f"{seed}_sharp.nii.gz", v.input, geom)
        if side in ("target", "both"):
            write_volume(vols / f"{seed}_soft.nii.gz", v.target, geom)
    data = tmp_path / "data"
    (data / "soft").mkdir(parents=True)
    for seed in (105, 106):
        shutil.copy(vols / f"{seed}_soft.nii.gz", data / "soft" / f"{seed}.nii.gz")
    (data / "sharp.csv").write_text(f"image,patient\n{vols}/101_sharp.nii.gz,s101\n{vols}/102_sharp.nii.gz,s102\n")
    (data / "pairs.csv").write_text(f"source,target,split\n{vols}/301_sharp.nii.gz,{vols}/301_soft.nii.gz,holdout\n")
    storage_dir = tmp_path / "storage"
    extra = {
        "condition": "image+edges", "source_residual": True, "hr_generator": {"residual": False},
        "train": {"objective": "unpaired"},
        "data": {"source": "unpaired", "sources": str(data / "sharp.csv"), "targets": str(data / "soft"),
                 "pairs": str(data / "pairs.csv")},
        "job": {"storage": str(storage_dir)},
    }  # fmt: skip
    cfg = write_config(tmp_path, extra)
    proc = run_job(cfg, job_env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "preparing 2 source-set + 2 target-set images (no pairs) + 0 validation volumes + 1 held-out pairs" in out
    assert "fitting the forward model (target -> source) of every scale on 2 source and 2 target images" in out
    assert "[scale 1] forward model: gain_0.1" in out
    assert "translating held-out volumes" in out and "pairs.csv row 2: SSIM input" in out
    assert len(list((storage_dir / "pyramids").glob("*.zarr"))) == 5  # 4 images + the held-out pair
    client = MlflowClient(job_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("test")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "msgan.sources_fingerprint" in r.data.tags)
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["msgan.sources_fingerprint"] != tags["msgan.targets_fingerprint"]
    assert "msgan.pairs_fingerprint" in tags and "holdout_mean_ssim" in metrics and "holdout_input_ssim" in metrics
    history = client.get_metric_history(parent.info.run_id, "forward_gain_0.25")
    assert sorted(m.step for m in history) == [0, 1]
    art = Path(client.download_artifacts(parent.info.run_id, "forward_model", str(tmp_path / "fm")))
    saved = json.loads((art / "forward_models.json").read_text())
    assert len(saved["scales"]) == 2 and saved["summary"][1]["gain_0.1"] > 0
    version = client.get_model_version("tiny", "1")
    files = Path(client.download_artifacts(version.run_id, "", str(tmp_path / "dl")))
    text = "".join(p.read_text(errors="ignore") for p in files.rglob("*.json"))
    assert "forward_models" in text and "sharp.csv" not in text and "101_sharp" not in text
    # resubmitted: the same job, its forward models reused, every scale done before, nothing registered again
    again = run_job(cfg, job_env, tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "forward model of every scale: fitted before" in out and out.count("(done before)") == 2
    assert "version 1," in out
