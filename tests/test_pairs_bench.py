"""The pairs benchmarks' own parts (benchmarks/pairs_tasks.py, benchmarks/pairs_2d.py), without any training: the
DICOM studies they write, the split assignment, the motion and thick-slice variants, the 2D baselines and tables."""

import csv
import functools

import numpy as np
import pydicom
import pytest

from benchmarks import pairs_2d, pairs_tasks
from benchmarks.tasks import Results
from msgan.data.tasks import make_task
from msgan.io.dicom import read_series
from tests.dicom_data import assert_valid_dicom

SHAPE = (16, 20, 24)


@functools.cache
def series_of(data, seed=301):
    return pairs_tasks.study_series(data, seed, SHAPE)


def written(tmp_path, data, seed=301):
    tv, series = series_of(data, seed)
    files = pairs_tasks.write_study(tmp_path / str(seed), data, seed, series)
    return tv, series, files, read_series([tmp_path / str(seed)])


def test_study_reads_back_as_two_series_of_one_study_on_the_oblique_grid(tmp_path):
    tv, series, files, got = written(tmp_path, "sharp-to-soft")
    assert not got.errors and len(got.volumes) == 2
    by_name = {v.identifiers["SeriesDescription"]: v for v in got.volumes}
    assert set(by_name) == {"INPUT", "TARGET"}
    for name, kernel, hu, geom in series:
        v = by_name[name]
        assert v.image.shape == hu.shape and np.abs(v.image - hu).max() <= 0.5 + 1e-4  # HU rounded once
        assert v.geometry.allclose(geom, atol=1e-5)
        assert v.identifiers["ConvolutionKernel"] == pairs_tasks.KERNEL_NAMES[kernel]
    np.testing.assert_array_equal(series[0][2], tv.input)  # the input series is the task's input
    direction = np.asarray(series[0][3].direction).reshape(3, 3)
    tilt = np.degrees(np.arccos(np.clip(np.diag(direction), -1, 1)))
    assert (tilt[:2] > 2.0).all() and np.allclose(direction @ direction.T, np.eye(3))  # oblique about two axes
    ids = [v.identifiers for v in got.volumes]
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert ids[0][key] == ids[1][key]
    assert ids[0]["PatientID"] == pairs_tasks.patient_id(301)
    ds = pydicom.dcmread(files["TARGET"][0])
    assert ds.ImageType[:2] == ["ORIGINAL", "PRIMARY"] and float(ds.RescaleIntercept) == -1024.0
    assert ds.pixel_array.dtype == np.int16  # stored = HU + 1024, the first slice of the target
    np.testing.assert_array_equal(ds.pixel_array, np.round(series[1][2][0]).astype(np.int16) + 1024)


def test_study_passes_dciodvfy(tmp_path):
    _, _, files, _ = written(tmp_path, "contrast-moved")
    assert_valid_dicom([files["INPUT"][0], files["TARGET"][-1]])


def test_thick_target_is_the_mean_of_slice_pairs_on_its_own_grid(tmp_path):
    tv, series, _, got = written(tmp_path, "kernel-thick")
    thick = next(v for v in got.volumes if v.identifiers["SeriesDescription"] == "TARGET")
    thin_geom = series[0][3]
    assert thick.image.shape == (SHAPE[0] // 2, *SHAPE[1:])
    assert thick.geometry.spacing[2] == pytest.approx(2 * thin_geom.spacing[2], abs=1e-5)
    np.testing.assert_allclose(thick.image[3], np.round((tv.target[6] + tv.target[7]) / 2), atol=0.51)
    d = np.asarray(thin_geom.direction).reshape(3, 3)
    mid = np.asarray(thin_geom.origin) + 6.5 * thin_geom.spacing[2] * d[:, 2]  # between thin slices 6 and 7
    np.testing.assert_allclose(
        np.asarray(thick.geometry.origin) + 3 * thick.geometry.spacing[2] * d[:, 2], mid, atol=1e-4
    )


def test_moved_target_is_a_rigid_motion_of_a_few_mm_and_degrees():
    angles, shift = pairs_tasks.rigid_motion(301)
    assert all(1.5 <= abs(a) <= 3.0 for a in angles) and all(2.0 <= abs(s) <= 4.0 for s in shift)
    assert pairs_tasks.rigid_motion(301) == (angles, shift) != pairs_tasks.rigid_motion(302)
    tv, series = series_of("contrast-moved")
    moved, same = series[1][2], make_task("contrast", 301, SHAPE)
    np.testing.assert_array_equal(same.target, tv.target)  # the truth stays unmoved
    body = tv.labels != 0
    assert np.abs(moved - tv.target)[body].mean() > 20.0  # anatomy moved
    assert (moved == pairs_tasks.PADDING_HU).any()  # what the moved patient was not imaged at


def found_csv(tmp_path, rows):
    path = tmp_path / "found.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["source", "target", "split", "patient"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_splits_follow_the_fixed_seeds_by_patient(tmp_path):
    seeds = (101, 201, 301)
    rows = [{"source": f"v/{s}-in.zarr", "target": f"v/{s}-out.zarr", "split": "train",
             "patient": pairs_tasks.patient_id(s)} for s in seeds]  # fmt: skip
    out = pairs_tasks.assign_splits(found_csv(tmp_path, rows), tmp_path / "pairs.csv", "low-dose", seeds)
    assert [r["split"] for r in out] == ["train", "validation", "holdout"]
    assert pairs_tasks.read_pairs(tmp_path / "pairs.csv")[2]["source"] == "v/301-in.zarr"  # relative to the CSV
    with pytest.raises(SystemExit, match=r"no pair for subjects \[201, 301\]"):
        pairs_tasks.assign_splits(found_csv(tmp_path, rows[:1]), tmp_path / "p2.csv", "low-dose", seeds)
    with pytest.raises(SystemExit, match="paired twice"):
        pairs_tasks.assign_splits(found_csv(tmp_path, [rows[0], rows[0]]), tmp_path / "p3.csv", "low-dose", (101,))


def test_a_pseudonymised_patient_is_found_by_the_uids_of_its_ingested_source(tmp_path):
    from msgan.io.convert import ingest

    _, _, _, _ = written(tmp_path / "studies", "low-dose", 301)
    report = ingest(tmp_path / "studies" / "301" / "INPUT", tmp_path / "v" / "a.zarr")
    assert report.written
    row = {"source": "v/a.zarr", "target": "v/b.zarr", "split": "train", "patient": "3f9a0c"}
    out = pairs_tasks.assign_splits(found_csv(tmp_path, [row]), tmp_path / "pairs.csv", "low-dose", (301,))
    assert out[0]["split"] == "holdout" and out[0]["patient"] == "3f9a0c"


def test_tables_compare_with_in_memory_and_run_to_run(tmp_path):
    res = Results(tmp_path / "p.json", {"shape": [8] * 3, "heldout": [301, 302], "validation": []})
    ref = {"sharp-to-soft": {"ours": {"seeds": [301, 302], "ssim": [0.90, 0.92], "mae_hu": [10.0, 12.0]}}}
    for seed, (a, b) in zip((301, 302), ((0.906, 0.90), (0.915, 0.93)), strict=True):
        res.add("sharp-to-soft", "ours", seed, {"ssim": a, "mae_hu": 11.0})
        res.add("sharp-to-soft", "ours_seed1", seed, {"ssim": b, "mae_hu": 11.5})
    res.add("kernel-thick", "ours", 301, {"ssim": 0.8, "mae_hu": 20.0})
    text = pairs_tasks.tables(res.data, ref)
    line = next(ln for ln in text.splitlines() if ln.startswith("| sharp-to-soft | ours | tasks.json"))
    assert "| 2 | +0.0005 | +0.0 | -0.0045 | -0.5 | yes |" in line  # d 0.0005 / 0 HU vs run-to-run 0.0045 / 0.5
    thick = next(ln for ln in text.splitlines() if ln.startswith("| kernel-thick | ours | sharp-to-soft"))
    assert "(path) | 1 | -0.1060 | +9.0 | -0.0045 | -0.5 | no |" in thick  # vs its base task, its noise


def test_2d_linear_fit_recovers_a_known_filter():
    from msgan.baselines import RadialFilter, _radial_frequency

    rng = np.random.default_rng(0)
    edges = np.linspace(0.0, np.sqrt(2) / 2 + 1e-9, 129)
    centres = (edges[:-1] + edges[1:]) / 2
    known = RadialFilter(edges, np.exp(-((centres / 0.2) ** 2)) + 0.1)
    pairs = [(x, known.apply(x)) for x in (rng.standard_normal((64, 48)) for _ in range(3))]
    fitted = pairs_2d.fit_linear(pairs)
    f = _radial_frequency((64, 48))[0]
    seen = np.unique(np.searchsorted(edges, f, side="right") - 1)  # bands that hold frequencies of a 64 x 48 grid
    assert len(seen) > 80
    np.testing.assert_allclose(fitted.gain[seen], known.gain[seen], atol=1e-6)


def test_dx_pair_reads_back_in_the_model_units_with_its_spacing(tmp_path):
    from msgan.data.radiographs import bone_suppression_pair

    p = bone_suppression_pair(301, (40, 32), depth=16, slab=64)
    path = pairs_2d.write_dx(tmp_path / "301" / "INPUT", 301, "INPUT", p.input, p.spacing)
    got = read_series([tmp_path / "301"]).volumes[0]
    assert got.image.shape == (40, 32) and got.geometry.spacing == pytest.approx(p.spacing)
    np.testing.assert_allclose(pairs_2d.from_stored(got.image), p.input, atol=0.5 / pairs_2d.DX_GAIN + 1e-6)
    assert got.identifiers["SeriesDescription"] == "INPUT" and got.identifiers["PatientID"] == "PAIRS0301"
    assert_valid_dicom([path])


def test_2d_scores_see_the_bone_left():
    from msgan.data.radiographs import bone_suppression_pair

    p = bone_suppression_pair(301, (40, 32), depth=16, slab=64)
    as_input, as_truth = pairs_2d.metrics_2d(p.input, p), pairs_2d.metrics_2d(p.noiseless, p)
    assert as_input["bone_residual"] > 0.02 and abs(as_truth["bone_residual"]) < 1e-6
    assert as_truth["ssim_clean"] == pytest.approx(1.0) and as_input["ssim"] < as_truth["ssim"]
