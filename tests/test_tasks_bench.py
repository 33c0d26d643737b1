"""benchmarks/tasks.py: the task tables' results file, configs, training jobs and cnn_large's patch."""

import pytest

from msgan.data.tasks import SEEDS, TASKS


def test_benchmark_results_resume_per_volume_and_refuse_mixed_sizes(tmp_path):
    from benchmarks.tasks import Results, tables

    path = tmp_path / "tasks.json"
    meta = {"shape": [32, 32, 32], "heldout": list(SEEDS["heldout"])}
    r = Results(path, meta)
    r.add("low-dose", "input", 301, {"ssim": 0.9, "mae_hu": 20.0, "hallucination_ml": 0.0, "seconds": 0.0})
    r.add("low-dose", "input", 302, {"ssim": 0.8, "mae_hu": 22.0, "hallucination_ml": float("nan"), "seconds": 0.0})
    again = Results(path, meta)  # a new session reads what the last one wrote
    assert again.done("low-dose", "input", 302) and not again.done("low-dose", "input", 303)
    assert again.data["low-dose"]["input"]["ssim"] == [0.9, 0.8]
    assert again.data["low-dose"]["input"]["hallucination_ml"] == [0.0, None]
    for m, ssim in (("ours", [0.95, 0.85]), ("linear", [0.9, 0.8])):
        for seed, s in zip((301, 302), ssim, strict=True):
            again.add("low-dose", m, seed, {"ssim": s, "mae_hu": 10.0 + s, "hallucination_ml": 0.0, "seconds": 1.0})
    text = tables(again.data, again.meta)
    assert "| ours | 2 | 0.9000 |" in text and "| input | 2 | 0.8500 |" in text
    again.note("low-dose", "ours", train_seconds=5.0)
    other = Results(tmp_path / "cascades.json", meta)  # a parallel run of other methods, its own file
    other.add("low-dose", "edges", 301, {"ssim": 0.5, "mae_hu": 40.0, "hallucination_ml": 3.0, "seconds": 2.0})
    other.add("low-dose", "input", 301, {"ssim": 0.1, "mae_hu": 1.0, "hallucination_ml": 0.0, "seconds": 0.0})
    other.note("low-dose", "edges", patch=44, train_seconds=9.0)
    # opened as `--merge` opens it, with the main file's meta: the other file's records still come along
    assert again.merge(Results(tmp_path / "cascades.json", again.meta)) == 1  # what the main file has is kept
    merged = Results(path, meta)
    assert merged.data["low-dose"]["edges"]["ssim"] == [0.5] and merged.data["low-dose"]["input"]["ssim"] == [0.9, 0.8]
    assert merged.meta["methods"]["low-dose"] == {"ours": {"train_seconds": 5.0},
                                                  "edges": {"patch": 44, "train_seconds": 9.0}}  # fmt: skip
    with pytest.raises(SystemExit, match="never mix sizes"):
        Results(path, {"shape": [64, 64, 64], "heldout": list(SEEDS["heldout"])})


@pytest.mark.parametrize("name", TASKS)
def test_task_configs_load_for_ours_and_edges(name):
    from benchmarks.tasks import edges_config, ours_pending, task_config

    ours = task_config(name, 128, False, [])
    assert ours_pending(ours) is None and "image" in ours.condition and ours.intensity.outside == "source"
    assert ours.data.phantom.seeds == SEEDS["train"] and ours.data.phantom.validation_seeds == SEEDS["validation"]
    paper = edges_config(ours)
    assert (paper.condition, paper.source_residual, paper.intensity.outside) == ("edges", False, "clip")
    assert task_config(name, 32, True, []).num_scales == 2  # the smoke size


def test_training_jobs_never_reuse_weights_of_another_config(tmp_path):
    import json

    from benchmarks.tasks import _training_record, task_config, training_jobs

    cfg, shape = task_config("low-dose", 32, True, []), (32, 32, 32)
    jobs = training_jobs("low-dose", {"ours": cfg}, ["ours"], shape, tmp_path)
    assert [j["scale"] for j in jobs] == list(range(cfg.num_scales))
    for j in jobs:  # what run_training leaves behind: the weights and what they were trained as
        (tmp_path / "ours").mkdir(exist_ok=True)
        (tmp_path / "ours" / f"scale_{j['scale']}.pt").write_bytes(b"weights")
        (tmp_path / "ours" / f"scale_{j['scale']}.json").write_text(json.dumps(_training_record(j)))
    assert training_jobs("low-dose", {"ours": cfg}, ["ours"], shape, tmp_path) == []
    other = cfg.replace(**{"train.l1_weight": cfg.train.l1_weight * 10})  # same shapes, another model
    assert len(training_jobs("low-dose", {"ours": other}, ["ours"], shape, tmp_path)) == cfg.num_scales
    assert not list((tmp_path / "ours").glob("*.pt")), "stale weights must go before anything loads them"
    (tmp_path / "ours" / "scale_0.pt").write_bytes(b"unrecorded")
    (tmp_path / "ours" / "scale_0.json").unlink()
    assert [j["scale"] for j in training_jobs("low-dose", {"ours": cfg}, ["ours"], shape, tmp_path)][:1] == [0]


@pytest.mark.parametrize("name", TASKS)
def test_task_configs_carry_one_more_scale_per_doubling(name):
    from benchmarks.tasks import task_config

    small, big = task_config(name, 128, False, []), task_config(name, 256, False, [])
    assert big.num_scales == small.num_scales + 1
    steps = [small.steps_for(s) for s in range(small.num_scales)]
    assert [big.steps_for(s) for s in range(big.num_scales)] == [*steps, steps[-1]]  # the new scale as the finest
    assert big.train.hr_patch == small.train.hr_patch and big.hr_generator == small.hr_generator
    assert 256 // 2 ** (big.num_scales - 1) == 128 // 2 ** (small.num_scales - 1)  # the LR grid keeps its size
    assert task_config(name, 64, False, []).num_scales == small.num_scales  # never fewer below the config's size
    assert task_config(name, 256, False, ["num_scales=3"]).num_scales == 3  # an explicit override wins


def test_cnn_large_takes_the_largest_patch_whose_step_fits_ours_peak(tmp_path):
    from benchmarks.tasks import Results, cnn_large_job, task_config

    cfg, shape = task_config("low-dose", 128, False, []), (128, 128, 128)
    results = Results(tmp_path / "t.json", {"shape": list(shape), "heldout": list(SEEDS["heldout"])})
    measured: list[int] = []
    ours_peaks = {0: 50_000_000, 1: 200_000_000, 2: 120_000_000}

    def measure(job):  # a step's peak grows with the patch's cube
        measured.append(job["patch"])
        return 1000 * job["patch"] ** 3

    def measure_scale(job):  # our scales are probed by the same rule, one job per scale of the same config
        assert job["config"] == cfg.to_dict() and job["variant"] == "ours"
        return ours_peaks[job["scale"]]

    job = cnn_large_job("low-dose", cfg, shape, tmp_path, results, print, measure, measure_scale)
    assert job is not None and job["variant"] == "cnn_large"
    assert job["patch"] == 56  # 56^3 * 1000 <= 200e6 < 60^3 * 1000: the largest multiple of 2**depth that fits
    assert job["steps"] == sum(cfg.steps_for(s) for s in range(cfg.num_scales))  # the CNN's budget rules otherwise
    assert 60 in measured and len(measured) <= 6  # doubling, then bisection
    info = results.meta["methods"]["low-dose"]["cnn_large"]
    assert info["patch"] == 56 and info["budget_from"] == "ours scale 1" and info["pending"] is None
    assert info["ours_probe_peaks_bytes"] == {str(k): v for k, v in ours_peaks.items()}

    def refuse(job):
        raise AssertionError("a probe already measured is kept")

    assert cnn_large_job("low-dose", cfg, shape, tmp_path, results, print, refuse, refuse)["patch"] == 56
    other = task_config("low-dose", 128, False, ["train.hr_patch=24"])  # another config of ours: measured again
    ours_peaks[1] = 400_000_000
    cfg = other
    assert cnn_large_job("low-dose", other, shape, tmp_path, results, print, measure, measure_scale)["patch"] == 72


def test_cnn_step_probe_measures_a_peak_that_grows_with_the_patch():
    from benchmarks.tasks import cnn_job, probe_cnn_step, task_config

    cfg = task_config("low-dose", 32, True, [])
    job = cnn_job("low-dose", cfg, (32, 32, 32), None)
    small, large = (probe_cnn_step({**job, "patch": p}) for p in (8, 32))
    assert large > small + 8 * 2**20  # 64x the voxels of every activation


def test_change_table_reports_each_methods_change_and_ours_against_the_cnn():
    from benchmarks.tasks import change_table

    def rows(ours, cnn):
        return {"low-dose": {"ours": {"ssim": ours, "mae_hu": [10.0, 12.0]},
                             "cnn": {"ssim": cnn, "mae_hu": [9.0, None]}}}  # fmt: skip

    text = change_table(rows([0.9, 0.8], [0.91, 0.81]), rows([0.88, 0.86], [0.85, 0.85]), (128, 256))
    assert "| ours | 0.8500 | 0.8700 | +0.0200 | 11.0 | 11.0 | +0.0 |" in text
    assert "| cnn | 0.8600 | 0.8500 | -0.0100 | 9.0 | 9.0 | +0.0 |" in text  # a missing volume's metric is skipped
    assert "| ours - cnn (SSIM) | -0.0100 | +0.0200 | +0.0300 |" in text
    assert "contrast" not in text  # only tasks measured at both sizes
    large = rows([0.88, 0.86], [0.85, 0.85])
    large["low-dose"]["cnn_large"] = {"ssim": [0.9, 0.9], "mae_hu": [8.0, 8.0]}  # measured at the larger size only
    text = change_table(rows([0.9, 0.8], [0.91, 0.81]), large, (128, 256))
    assert "| cnn_large | - | 0.9000 | - | - | 8.0 | - |" in text and "nan" not in text
    assert "| ours - cnn_large (SSIM) | - | -0.0300 | - | | | |" in text


def test_scale_step_probe_measures_a_peak_that_grows_with_the_patch_and_keeps_nothing(tmp_path):
    from benchmarks.tasks import SEEDS, _scale_job, probe_scale_step, task_config

    peaks = []
    for patch in (12, 24):  # the task's own networks (the smoke size's are too small to show their activations)
        cfg = task_config("low-dose", 64, False, [f"train.hr_patch={patch}"])
        peaks.append(probe_scale_step(_scale_job("ours", 1, cfg, "low-dose", SEEDS["train"], (64,) * 3, tmp_path)))
    assert peaks[1] > peaks[0] + 16 * 2**20, [p / 2**20 for p in peaks]  # 8x the voxels of every activation
    assert not any(tmp_path.iterdir())  # a probe writes no checkpoint and no weights


def test_the_cnn_large_note_states_its_probed_peak_against_ours_budget():
    from benchmarks.tasks import tables

    row = {"seeds": [301, 302], "ssim": [0.9, 0.8], "mae_hu": [10.0, 12.0], "hallucination_ml": [1.0, 2.0]}
    data = {"low-dose": {m: dict(row) for m in ("input", "cnn", "cnn_large", "ours")}}
    large = {"patch": 44, "budget_bytes": 372 * 2**20, "budget_from": "ours scale 0", "steps": 3900,
             "train_seconds": 2800.0, "step_peak_bytes": 500 * 2**20,  # its run's peak holds the data's index too
             "probe_peaks_bytes": {"44": 329 * 2**20, "48": 423 * 2**20}}  # fmt: skip
    meta = {"methods": {"low-dose": {"cnn": {"patch": 24, "train_seconds": 450.0}, "cnn_large": large}}}
    text = tables(data, meta)
    assert (
        "cnn_large: patch 44^3, the largest whose training step peaks within ours' highest (329 MiB against "
        "372 MiB, ours scale 0); trained in 2800 s (cnn, patch 24^3: 450 s), 3900 steps each." in text
    )
    del large["probe_peaks_bytes"]["44"]  # no probe at its patch (the CNN's own): its run's peak is stated
    assert "the CNN's own: even it peaks above ours' highest (500 MiB" in tables(data, meta)
