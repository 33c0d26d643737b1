"""benchmarks/gpu_check.py on a CPU (``--device cpu --quick``), in a Python that has only torch, its own
requirements and numpy (as the GPU machine has): every figure written as it is measured, the table, the
budget and SIGTERM keeping what was measured, and the script's copies of ct-kernel and of the training
step checked against the real ones."""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from msgan.config import load_config
from msgan.nets import HRGenerator

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
QUICK = ("--device", "cpu", "--quick", "--threads", "1")


@pytest.fixture(scope="module")
def torch_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder holding only torch, numpy and what torch requires (links to this venv's copies): run with
    ``python -S`` and it on PYTHONPATH, nothing else of the venv (yaml, dask, zarr, SimpleITK, scipy) imports."""
    site = tmp_path_factory.mktemp("torch-only-site")
    todo, seen = ["torch", "numpy"], set()
    while todo:
        name = re.split(r"[\s;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = md.distribution(name)
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
        for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].startswith((".", "__pycache__"))}:
            src, dst = Path(str(dist.locate_file(top))), site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    assert not (site / "yaml").exists() and not (site / "dask").exists()
    return site


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-S", str(SCRIPT), *QUICK, "--out", str(out), *args]


def environment(site: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site), "HOME": os.environ.get("HOME", "/tmp")}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_run(torch_only: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check") / "gpu"
    proc = subprocess.run(command(out, "--sizes", "48"), cwd=REPO, env=environment(torch_only), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return proc, out


def test_quick_run_measures_every_figure_with_torch_and_numpy_only(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(out)
    meta = recs[0]
    assert (
        meta["figure"] == "meta" and meta["device"] == "cpu" and meta["grids"]["48"] == [[12] * 3, [24] * 3, [48] * 3]
    )
    skipped = [r for r in recs if r["figure"] in ("skipped", "error", "stopped")]
    assert not skipped, (
        f"{skipped}: msgan.engine must import with torch and numpy alone; msgan/augment.py imports "
        "AugmentConfig from msgan.config (yaml) for a type annotation only: import it under TYPE_CHECKING"
    )
    by = {(r["figure"], r.get("scale"), r.get("precision")): r for r in recs}
    for scale in range(3):
        for prec in ("fp32", "bf16"):
            for fig in ("train_peak", "infer_peak", "throughput"):
                assert by[(fig, scale, prec)]["value"] > 0, (fig, scale, prec)
            train, infer = by[("train_peak", scale, prec)], by[("infer_peak", scale, prec)]
            if prec == "fp32":  # the measured tensor bytes agree with msgan.memory's model
                assert 0.5 < train["peak_bytes"] / train["model_bytes"] < 2, train
                assert 0.5 < infer["peak_bytes"] / infer["model_bytes"] < 2, infer
            assert (infer["tile"], infer["batch"]) == ((None, 1) if scale == 0 else (24, 2))
    for scale in (1, 2):
        for prec in ("fp32", "bf16"):
            eff = by[("efficiency", scale, prec)]
            assert eff["value"] > 0 and eff["gflops"] > 0 and eff["alone_gflops"] > 0 and eff["halo_cost"] > 0
            assert eff["tiles"] == (2 ** (scale - 1)) ** 3 and eff["halo"] == 4
    table = (out / "table.md").read_text()
    assert table in proc.stdout
    for heading in ("## Peak memory", "## Training throughput", "## Tile engine efficiency"):
        assert heading in table
    assert f"| 48^3 | 2 | 48x48x48 | {by[('train_peak', 2, 'fp32')]['peak_mb']:.1f} |" in table
    assert "| 48^3 | 2 | bf16 | 24 | 4 | 8 |" in table


def test_budget_stops_early_and_keeps_the_figures_measured(torch_only, tmp_path):
    out = tmp_path / "gpu"
    out.mkdir()
    (out / "figures.jsonl").write_text('{"run": "earlier", "figure": "meta"}\n')
    proc = subprocess.run(command(out, "--budget-s", "0"), cwd=REPO, env=environment(torch_only), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(out)
    assert recs[0]["run"] == "earlier"  # appended, never truncated
    recs = [r for r in recs[1:] if r.get("of") != "efficiency"]  # the engine's own test is the one above
    assert [r["figure"] for r in recs] == ["meta", "train_peak", "stopped"]  # the first measurement always runs
    assert recs[1]["peak_mb"] > 0 and "--budget-s 0 reached" in recs[2]["reason"]
    table = (out / "table.md").read_text()
    assert f"| 24^3 | 0 | 12x12x12 | {recs[1]['peak_mb']:.1f} | - |" in table and "budget-s 0 reached" in table


def test_sigterm_writes_what_was_measured(torch_only, tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.Popen(command(out), cwd=REPO, env=environment(torch_only), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            path = out / "figures.jsonl"
            if path.exists() and len(re.findall(r'"figure": "(train|infer)_peak"', path.read_text())) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    recs = records(out)
    assert recs[-1]["figure"] == "stopped" and recs[-1]["reason"].startswith("SIGTERM")
    measured = [r for r in recs if r["figure"] in ("train_peak", "infer_peak")]
    assert len(measured) >= 2 and all(r["value"] > 0 for r in measured)
    table = (out / "table.md").read_text()
    assert "SIGTERM" in table and table in stdout


def test_ct_kernel_copy_matches_the_yaml():
    cfg = load_config(REPO / "configs" / "ct-kernel.yaml")
    assert gpu_check.ct_kernel_spec().to_dict() == cfg.spec().to_dict()
    assert {k: getattr(cfg.train, k) for k in gpu_check.CT_KERNEL_TRAIN} == gpu_check.CT_KERNEL_TRAIN
    assert cfg.train.gan_loss == "lsgan"  # what gpu_check.lsgan computes
    assert cfg.data.phantom.shape[0] // 2 ** (cfg.num_scales - 1) == gpu_check.CT_KERNEL_LR_SIDE
    spec = gpu_check.ct_kernel_spec()
    assert [s[0] for s in gpu_check.scale_shapes(512, 64, spec)] == [64, 128, 256, 512]
    assert [s[0] for s in gpu_check.scale_shapes(128, 64, spec)] == [64, 128]


@pytest.mark.parametrize(("size", "lr_side", "rule"), [(100, 64, "--sizes 100"), (32, 64, "--sizes 32"),
                                                       (96, 12, "--lr-side 12: the discriminator")])  # fmt: skip
def test_sizes_off_the_rule_are_refused(size, lr_side, rule):
    with pytest.raises(ValueError, match=re.escape(rule)):
        gpu_check.scale_shapes(size, lr_side, gpu_check.ct_kernel_spec())


@pytest.mark.parametrize("scale", [0, 1])
def test_train_step_is_the_trainers(scale):
    """One step of gpu_check.train_step and of ScaleTrainer.train_step on the same batch and weights leave the
    same networks."""
    from msgan.train import Batch, ScaleData, ScaleTrainer

    tiny = {"num_scales": 2, "train.steps_per_scale": [], "lr_generator.width": 2, "lr_generator.depth": 1,
            "hr_generator.width": 2, "hr_generator.num_blocks": 1, "discriminator.width": 2,
            "discriminator.num_layers": 2, "train.hr_patch": 12, "train.batch_size": 2}  # fmt: skip
    cfg = load_config(REPO / "configs" / "ct-kernel.yaml", tiny)
    grid = (12,) * 3 if scale == 0 else (24,) * 3
    z = np.zeros(grid, np.float32)
    data = ScaleData(scale, [z], [z], [np.zeros((12,) * 3, np.float32)] if scale else [],
                     [np.ones((12,) * 3, bool)], [z])  # fmt: skip
    trainer = ScaleTrainer(cfg, scale, data)
    spec = cfg.spec()
    ours = gpu_check.Nets.of(copy.deepcopy(trainer.generator), copy.deepcopy(trainer.discriminator),
                             {k: getattr(cfg.train, k) for k in gpu_check.CT_KERNEL_TRAIN})  # fmt: skip
    b = gpu_check.train_batch(spec, scale, trainer.generator, 2, 12, torch.device("cpu"))
    trainer.sample_batch = lambda: Batch(*b)  # the trainer's step on our batch
    m = trainer.train_step()
    g_loss, d_loss = gpu_check.train_step(ours, b, torch.device("cpu"), amp=False)
    assert (g_loss, d_loss) == pytest.approx((m.loss_g, m.loss_d), rel=1e-6)
    for mine, theirs in ((ours.g, trainer.generator), (ours.d, trainer.discriminator)):
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("context", ["upscaled", "wide"])
def test_batch_inputs_are_what_the_engine_feeds_a_generator(context):
    from msgan.engine import cpu_layout

    gen = HRGenerator(3, width=4, num_blocks=1, norm_kind="none", context=context, residual=False)
    x, c = gpu_check.batch_inputs(gen, (8, 8, 8), 2, torch.device("cpu"))
    assert x.shape == (2, len(gen.channels), *(8 + 2 * gen.halo,) * 3)
    assert x.stride() == cpu_layout(x.contiguous()).stride()
    assert (c is None) == (context != "wide")
    with torch.no_grad():
        assert gen(x, c).shape == (2, 1, 8, 8, 8)
