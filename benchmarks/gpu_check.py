"""A GPU check of ``configs/ct-kernel.yaml``'s networks on synthetic arrays (issue 23), in at most 5 minutes.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--sizes 128 256 512] [--lr-side 64]
                                   [--budget-s 240] [--min-seconds 2] [--quick]

Figures, in this order (the cheap and unique ones first, so a run cut short keeps the most):

1. ``train_peak`` / ``infer_peak``: peak device memory (MiB; CUDA ``max_memory_allocated``, parameters,
   optimizer state and inputs included; ``max_memory_reserved`` beside it) of one training step and of one
   inference tile batch, per volume size and scale, fp32 and bf16, beside the analytic model of
   :mod:`msgan.memory` (fp32; tensors only: no cuDNN workspace, no allocator rounding). On a CPU the peak is
   that of the tensor bytes alive (:class:`Peak`), the model's own terms. The training step is measured after one
   warm-up step (Adam's moments exist, cuDNN has picked its algorithms). A tile batch is
   ``inference.batch_size`` tiles of the core :meth:`msgan.cascade.Cascade.tile_size` picks from the memory
   budget (:func:`tile_core`); scale 0 is one pass over its whole grid.
2. ``throughput``: training steps per second per scale of the largest size, fp32 and bf16 (after two
   warm-up steps, for at least ``--min-seconds``); every step ends in a host sync, as the trainer's
   loss read-out does.
3. ``efficiency``: the tile engine's ratio per HR scale of the largest size (bf16 when the config's
   inference uses it, then fp32), with the definitions of ``benchmarks/engine_efficiency.py``: achieved
   GFLOP/s of :func:`msgan.engine.run_tiles` over the whole scale (convolution FLOPs of every tile run,
   halos and the padded last batch included, over the wall time including every read and write) divided by
   the generator alone on the same batch shape fed from device memory (median of ``--repeats``); halo
   cost = FLOPs run / FLOPs of one pass over the scale's voxels - 1. The time spent building the tiles'
   inputs (``feed_s``) and writing their cores (``write_s``) is reported beside it: on a GPU these run on
   the host.

Scale rule: the LR grid stays ct-kernel's (its 512^3 phantom with 4 scales: 64^3), so a size N^3 has
log2(N / 64) + 1 scales: 128^3 two, 256^3 three, 512^3 four. The HR training patch and batch are the
config's at every size, so an HR scale's training step is the same network on the same shapes at every
size and scale; its inference tile depends on the scale's grid only through :func:`msgan.tiling.plan_core`.
``fp32`` is PyTorch's default precision (cuDNN may use TF32; the flags are in the ``meta`` figure); ``bf16`` is
the autocast of :func:`msgan.engine.autocast` (CUDA only: on a CPU it changes nothing).

Output: every figure is one JSON line appended to ``DIR/figures.jsonl`` and flushed (and fsynced) as soon as
it is measured; ``DIR/table.md`` is rewritten after each figure and printed at the end. ``--budget-s`` stops
starting new measurements once that many seconds have passed since the start (the first always runs); an
engine run whose predicted time does not fit in what is left is skipped with its prediction. SIGTERM or
SIGINT ends the run after writing a ``stopped`` figure and the table (exit status 128 + the signal). A
measurement that fails (out of device memory, say) is an ``error`` figure and the run goes on.

Needs only torch and numpy besides msgan: it imports msgan.spec, msgan.netrules, msgan.nets, msgan.memory,
msgan.tiling and msgan.engine, never msgan.config (YAML), msgan.pyramid (dask, SimpleITK) or msgan.train.
Should msgan.engine not import there, parts 1 and 2 still run and part 3 is a ``skipped`` figure naming why.
The ct-kernel model spec is therefore held here (:data:`CT_KERNEL`, :data:`CT_KERNEL_TRAIN`);
tests/test_gpu_check.py checks it against the YAML, and :func:`train_step` against
:meth:`msgan.train.ScaleTrainer.train_step`. ``--device cpu --quick`` runs tiny networks and sizes in seconds
(the test).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msgan.memory import (
    _LiveBytes,
    conv_flops,
    forward_peak_bytes,
    hr_inference_bytes,
    hr_tile_shapes,
    largest_tile,
    per_voxel_flops,
    training_step_bytes,
)
from msgan.netrules import discriminator_channels, patchgan_min_size
from msgan.nets import HRGenerator, build_discriminator, build_generator, count_parameters
from msgan.spec import ModelSpec
from msgan.tiling import Tile, batches_of, plan_core, pyramid_shapes, tile_grid

# configs/ct-kernel.yaml's model spec (``load_config(...).spec()``; the keys left out take ModelSpec's defaults)
CT_KERNEL: dict[str, Any] = {
    "dims": 3,
    "num_scales": 4,
    "condition": "image+edges",
    "source_residual": True,
    "intensity": {"low": -1024.0, "high": 3072.0, "outside": "source"},
    "edges": {"method": "gradient", "sigma": 1.0, "scale": 0.15},
    "lr_generator": {"width": 32, "depth": 4, "norm": "instance"},
    "hr_generator": {"width": 32, "num_blocks": 6, "norm": "none", "context": "upscaled", "residual": False},
    "discriminator": {"width": 32, "num_layers": 3, "norm": "instance"},
    "hr_patch": 32,
    "inference": {"memory_budget_mb": 4096.0, "batch_size": 4, "amp": True},
}
# ... and the training settings one step depends on (``load_config(...).train``)
CT_KERNEL_TRAIN: dict[str, Any] = {"batch_size": 4, "lr": 2e-4, "betas": (0.5, 0.999), "l1_weight": 1000.0}
CT_KERNEL_LR_SIDE = 64  # its LR grid: the 512^3 phantom (data.phantom.shape) at num_scales=4

# --quick: the same code on tiny networks and sizes (seconds on a CPU)
QUICK: dict[str, Any] = {
    "lr_generator": {"width": 2, "depth": 2, "norm": "instance"},
    "hr_generator": {**CT_KERNEL["hr_generator"], "width": 2, "num_blocks": 1},
    "discriminator": {"width": 2, "num_layers": 2, "norm": "instance"},
    "hr_patch": 12,
    "inference": {"memory_budget_mb": 2.0, "batch_size": 2, "amp": True},
}
QUICK_TRAIN = {**CT_KERNEL_TRAIN, "batch_size": 2}
QUICK_SIZES, QUICK_LR_SIDE = (24, 48), 12

PRECISIONS = ("fp32", "bf16")
MiB = 2**20


def ct_kernel_spec(quick: bool = False) -> ModelSpec:
    """The model spec the check runs: ct-kernel's, or its tiny ``--quick`` version."""
    return ModelSpec.from_dict({**CT_KERNEL, **(QUICK if quick else {})})


def scale_shapes(size: int, lr_side: int, spec: ModelSpec) -> list[tuple[int, ...]]:
    """The grids of a ``size``^dims volume, LR first, by the scale rule (the LR grid stays ``lr_side``); a
    :class:`ValueError` naming the size or LR side that breaks it or cannot train (as
    :func:`msgan.train.check_scale_shape` refuses it)."""
    need = patchgan_min_size(spec.discriminator.num_layers)
    if lr_side < need:
        raise ValueError(f"--lr-side {lr_side}: the discriminator (num_layers={spec.discriminator.num_layers}) "
                         f"needs at least {need} voxels per side at scale 0")  # fmt: skip
    k = math.log2(size / lr_side) if size >= lr_side else -1.0
    if k < 0 or k != int(k):
        raise ValueError(f"--sizes {size}: must be --lr-side={lr_side} times a power of two (the LR grid stays)")
    if k >= 1 and 2 * lr_side < spec.hr_patch:
        raise ValueError(
            f"--lr-side {lr_side}: scale 1's grid ({2 * lr_side}) is smaller than hr_patch={spec.hr_patch}"
        )
    return pyramid_shapes((size,) * spec.dims, int(k) + 1)


def engine_import_error() -> str | None:
    """Why :mod:`msgan.engine` (the tile engine) does not import here, or None when it does."""
    try:
        import msgan.engine  # noqa: F401
    except ImportError as err:
        return f"msgan.engine does not import here: {type(err).__name__}: {err}"
    return None


def autocast(device: torch.device, amp: bool) -> Any:
    """:func:`msgan.engine.autocast` (bf16 on CUDA when ``amp``); its rule restated when the engine does not
    import (the training and peak figures need no engine)."""
    if "msgan.engine" in sys.modules:
        return sys.modules["msgan.engine"].autocast(device, amp)
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()


def tile_core(gen: HRGenerator, spec: ModelSpec, grid: Sequence[int]) -> int:
    """The tile core :meth:`msgan.cascade.Cascade.tile_size` picks for ``grid`` (budget, then least work)."""
    inf = spec.inference
    budget = largest_tile(gen, spec.dims, inf.memory_budget_mb * MiB, inf.batch_size, max(grid))
    return plan_core(grid, budget, gen.halo)


# ----------------------------------------------------------------------------- one training step


class Batch(NamedTuple):
    """A training batch as :class:`msgan.train.Batch` holds it."""

    x: torch.Tensor  # generator input (B, Cin, core + 2*halo, ...)
    coarse: torch.Tensor | None  # wide context (B, 1, ...) or None
    cond: torch.Tensor  # discriminator conditions over the core (B, Ccond, core, ...)
    target: torch.Tensor  # (B, 1, core, ...)


@dataclass
class Nets:
    """One scale's generator, discriminator and their Adam optimizers, as :class:`msgan.train.ScaleTrainer`
    makes them."""

    g: nn.Module
    d: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    l1_weight: float

    @classmethod
    def of(cls, g: nn.Module, d: nn.Module, train: dict[str, Any]) -> Nets:
        lr, betas = train["lr"], tuple(train["betas"])
        return cls(g, d, torch.optim.Adam(g.parameters(), lr=lr, betas=betas),
                   torch.optim.Adam(d.parameters(), lr=lr, betas=betas), float(train["l1_weight"]))  # fmt: skip


def lsgan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """:class:`msgan.train.GANLoss` in its default ``lsgan`` mode."""
    target = torch.tensor(1.0 if real else 0.0, device=logits.device).to(logits.dtype).expand_as(logits)
    return F.mse_loss(logits, target)


def train_step(nets: Nets, b: Batch, device: torch.device, amp: bool) -> tuple[float, float]:
    """One GAN step exactly as :meth:`msgan.train.ScaleTrainer.train_step` runs it on a sampled batch:
    discriminator on real and detached fake, its step, then the generator's adversarial + L1 loss and its
    step; the losses are read back to the host (a sync). Returns (generator loss, discriminator loss)."""
    g, d = nets.g, nets.d
    g.train()
    d.train()
    x, cond, target = (v.to(device) for v in (b.x, b.cond, b.target))
    coarse = b.coarse.to(device) if b.coarse is not None else None
    with autocast(device, amp):
        fake = g(x, coarse) if isinstance(g, HRGenerator) else g(x)
        d_real = d(torch.cat([cond, target], 1))
        d_fake = d(torch.cat([cond, fake.detach()], 1))
        d_loss = 0.5 * (lsgan(d_real, True) + lsgan(d_fake, False))
    nets.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    nets.opt_d.step()
    with autocast(device, amp):
        g_gan = lsgan(d(torch.cat([cond, fake], 1)), True)
        g_l1 = F.l1_loss(fake.float(), target)
        g_loss = g_gan + nets.l1_weight * g_l1
    nets.opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    nets.opt_g.step()
    return float(g_loss.detach()), float(d_loss.detach())


def train_batch(spec: ModelSpec, scale: int, gen: nn.Module, batch: int, lr_side: int, device: torch.device) -> Batch:
    """A random batch of the shapes scale ``scale`` trains on: LR whole grids of ``lr_side``, HR patches of
    ``spec.hr_patch`` (plus the halo, and the wide context's crop)."""
    g = torch.Generator().manual_seed(scale)
    dc = discriminator_channels(scale, spec.condition) - 1
    if scale == 0:
        side = (lr_side,) * spec.dims
        x = torch.randn(batch, len(gen.channels), *side, generator=g)  # type: ignore[arg-type]
        return Batch(x.to(device), None, x.to(device), torch.randn(batch, 1, *side, generator=g).to(device))
    assert isinstance(gen, HRGenerator)
    xs, cs = hr_tile_shapes(gen, spec.hr_patch, spec.dims, batch)
    core = (spec.hr_patch,) * spec.dims
    coarse = None if cs is None else torch.randn(cs, generator=g).to(device)
    return Batch(torch.randn(xs, generator=g).to(device), coarse, torch.randn(batch, dc, *core, generator=g).to(device),
                 torch.randn(batch, 1, *core, generator=g).to(device))  # fmt: skip


def make_nets(spec: ModelSpec, scale: int, train: dict[str, Any]) -> Nets:
    """Scale ``scale``'s networks on the CPU (seeded), with their optimizers."""
    torch.manual_seed(1009 + scale)
    return Nets.of(build_generator(spec, scale), build_discriminator(spec, scale), train)


def to_device(nets: Nets, device: torch.device, train: dict[str, Any]) -> Nets:
    """``nets`` moved to ``device`` with fresh optimizers (Adam's state is made on the first step there)."""
    return Nets.of(nets.g.to(device), nets.d.to(device), train)


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory of the work done inside ``with``, everything alive included: on CUDA the allocator's peak of
    allocated (and reserved) bytes; on a CPU the peak of the tensor bytes alive (:class:`msgan.memory._LiveBytes`
    following every op run inside, from the tensors in ``alive``: parameters, gradients, optimizer state,
    inputs), which, unlike the process's RSS, the allocator's reuse of freed pages does not hide."""

    def __init__(self, device: torch.device, alive: Iterable[torch.Tensor | None] = ()) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "tensor bytes alive (CPU)"
        self.bytes = 0
        self.reserved: int | None = None
        self._alive = [t for t in alive if t is not None]
        self._mode: _LiveBytes | None = None

    def __enter__(self) -> Peak:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _LiveBytes(reorders=False)
            for t in self._alive:
                self._mode.add(t)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.bytes = self._mode.peak
        else:
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.reserved = int(torch.cuda.max_memory_reserved(self.device))


def state_tensors(nets: Nets) -> list[torch.Tensor]:
    """What a training step finds alive: parameters, their gradients, the optimizers' state."""
    out: list[torch.Tensor] = []
    for opt in (nets.opt_g, nets.opt_d):
        for group in opt.param_groups:
            for p in group["params"]:
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
                out += [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return out


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


class Stop(Exception):
    """A signal asked the run to end (SIGTERM, SIGINT)."""


class Log:
    """The output folder: one JSON line per figure (appended, flushed, fsynced), the Markdown table rewritten
    after each figure (atomically) and the figure's line printed."""

    def __init__(self, out: Path, meta: dict[str, Any], budget_s: float) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.budget_s, self.t0 = out, budget_s, time.monotonic()
        self.run = meta["run"]
        self.records: list[dict[str, Any]] = []
        self._f = open(out / "figures.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        self.measured = 0
        self.write({"figure": "meta", **meta})

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def may_start(self) -> bool:
        """Whether a new measurement may start: within the budget, or none has run yet."""
        return self.measured == 0 or self.left() > 0

    def write(self, rec: dict[str, Any]) -> None:
        rec = {"run": self.run, **rec, "t_s": round(self.elapsed(), 2)}
        self.records.append(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        with contextlib.suppress(OSError):
            os.fsync(self._f.fileno())
        if rec["figure"] not in ("meta",):
            print(json.dumps({k: v for k, v in rec.items() if k != "run"}), flush=True)
        self.write_table()

    def figure(self, rec: dict[str, Any]) -> None:
        self.measured += 1
        self.write(rec)

    def write_table(self) -> str:
        text = table_markdown(self.records)
        tmp = self.out / "table.md.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.out / "table.md")
        return text

    def close(self) -> None:
        self._f.close()


def measure(log: Log, what: dict[str, Any], fn: Callable[[], dict[str, Any] | None], device: torch.device) -> bool:
    """Run one measurement if the budget allows: its figure (``what`` + what ``fn`` returns; ``fn`` returning
    None has written its own), or an ``error`` figure when it fails. False when the budget stopped it."""
    stop_if_signalled()
    if not log.may_start():
        return False
    try:
        rec = fn()
    except Stop:
        raise
    except Exception as err:  # one failed figure (out of memory, say) must not cost the others
        log.figure({**what, "figure": "error", "of": what.get("figure"), "error": f"{type(err).__name__}: {err}"})
        rec = None
    else:
        if rec is not None:
            log.figure({**what, **rec})
    finally:
        if device.type == "cuda":  # free what the figure held before the next one measures its peak
            gc.collect()
            torch.cuda.empty_cache()
    return True


# ----------------------------------------------------------------------------- the three parts


def train_peak(spec: ModelSpec, scale: int, train: dict[str, Any], lr_side: int, device: torch.device,
               amp: bool) -> dict[str, Any]:  # fmt: skip
    nets = make_nets(spec, scale, train)
    b = train_batch(spec, scale, nets.g, train["batch_size"], lr_side, device)
    model = None
    if b.coarse is None and not amp:  # the analytic model (fp32, one input), on the CPU copy
        din = (b.cond.shape[0], b.cond.shape[1] + 1, *b.cond.shape[2:])
        model = training_step_bytes(nets.g, nets.d, tuple(b.x.shape), din)["total"]
    nets = to_device(nets, device, train)
    train_step(nets, b, device, amp)  # warm-up: Adam's moments, cuDNN's algorithms
    with Peak(device, [*state_tensors(nets), *b]) as p:
        train_step(nets, b, device, amp)
    return {
        "value": mib(p.bytes),
        "unit": "MiB",
        "peak_mb": mib(p.bytes),
        "reserved_mb": mib(p.reserved),
        "model_mb": mib(model),
        "peak_bytes": p.bytes,
        "model_bytes": model,
        "peak_kind": p.kind,
        "input": list(b.x.shape),
        "parameters": count_parameters(nets.g) + count_parameters(nets.d),
    }


@torch.no_grad()
def infer_peak(spec: ModelSpec, scale: int, grid: Sequence[int], device: torch.device, amp: bool) -> dict[str, Any]:
    torch.manual_seed(1009 + scale)
    gen = build_generator(spec, scale).eval()
    model = None
    if scale == 0:  # one pass over the whole LR grid (msgan.engine.run_whole)
        xs, cs, core, batch = (1, len(gen.channels), *grid), None, None, 1  # type: ignore[arg-type]
        if not amp:  # tensors only, as Peak counts them (no oneDNN copies on a CPU, no cuDNN workspace)
            model = forward_peak_bytes(gen, xs, channels_last=True) + 4 * count_parameters(gen)
    else:  # one batch of the engine's tiles (msgan.engine.run_tiles)
        assert isinstance(gen, HRGenerator)
        core, batch = tile_core(gen, spec, grid), spec.inference.batch_size
        run = min(core, max(grid))
        xs, cs = hr_tile_shapes(gen, run, spec.dims, batch)
        model = None if amp else hr_inference_bytes(gen, run, spec.dims, batch)
    gen = gen.to(device)
    x = layout(torch.randn(xs).to(device)) if scale else torch.randn(xs).to(device)
    c = None if cs is None else layout(torch.randn(cs).to(device))
    with autocast(device, amp):
        gen(x, c) if c is not None else gen(x)  # warm-up
    with Peak(device, [*gen.parameters(), x, c]) as p, autocast(device, amp):
        y = gen(x, c) if c is not None else gen(x)
        y = y.float()
    return {
        "value": mib(p.bytes),
        "unit": "MiB",
        "peak_mb": mib(p.bytes),
        "reserved_mb": mib(p.reserved),
        "model_mb": mib(model),
        "peak_bytes": p.bytes,
        "model_bytes": model,
        "peak_kind": p.kind,
        "tile": core,
        "batch": batch,
        "input": list(xs),
    }


def layout(t: torch.Tensor) -> torch.Tensor:
    """:func:`msgan.engine.cpu_layout` (channels-last on a CPU, as the engine feeds tiles), when it imports."""
    engine = sys.modules.get("msgan.engine")
    return t if engine is None else engine.cpu_layout(t)


def throughput(spec: ModelSpec, scale: int, train: dict[str, Any], lr_side: int, device: torch.device, amp: bool,
               min_seconds: float, min_steps: int = 3, max_steps: int = 500) -> dict[str, Any]:  # fmt: skip
    nets = make_nets(spec, scale, train)
    b = train_batch(spec, scale, nets.g, train["batch_size"], lr_side, device)
    nets = to_device(nets, device, train)
    for _ in range(2):
        train_step(nets, b, device, amp)
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_steps or (time.perf_counter() - t0 < min_seconds and n < max_steps):
        train_step(nets, b, device, amp)
        n += 1
    sync(device)
    dt = time.perf_counter() - t0
    return {"value": round(n / dt, 3), "unit": "steps/s", "steps": n, "seconds": round(dt, 3),
            "batch": train["batch_size"], "input": list(b.x.shape)}  # fmt: skip


def batch_inputs(gen: HRGenerator, run: Sequence[int], batch: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Random inputs of the shape (and layout) of every forward pass of a plan (also engine_efficiency.py's)."""
    h = gen.halo
    x = layout(torch.randn(batch, len(gen.channels), *(r + 2 * h for r in run)).to(device))
    c = None
    if gen.context == "wide":
        c0, c1 = gen.context_box([0] * len(run), list(run))
        c = layout(torch.randn(batch, 1, *(b - a for a, b in zip(c0, c1, strict=True))).to(device))
    return x, c


@torch.no_grad()
def generator_alone(gen: HRGenerator, x: torch.Tensor, c: torch.Tensor | None, repeats: int, device: torch.device,
                    amp: bool) -> float:  # fmt: skip
    """Median seconds of one forward pass on ``x`` (after a warm-up pass), synchronised on the device."""
    gen.eval()
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            gen(x, c)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def efficiency(log: Log, what: dict[str, Any], spec: ModelSpec, scale: int, shapes: Sequence[Sequence[int]],
               device: torch.device, amp: bool, repeats: int) -> dict[str, Any] | None:  # fmt: skip
    """The tile engine over a whole synthetic scale against the generator alone; a ``skipped`` figure instead when
    the predicted run does not fit in the budget left."""
    from msgan.engine import array_writer, needed_arrays, run_tiles, tile_feed

    torch.manual_seed(1009 + scale)
    gen = build_generator(spec, scale).eval()
    assert isinstance(gen, HRGenerator)
    grid, bs = tuple(shapes[scale]), spec.inference.batch_size
    core = tile_core(gen, spec, grid)
    tiles = tile_grid(grid, core)
    batches = batches_of(tiles, bs)
    x, c = batch_inputs(gen, tiles[0].run_shape, bs, torch.device("meta"))
    per_batch = conv_flops(gen, x, c)  # shapes only, on the CPU copy
    gen = gen.to(device)
    x, c = batch_inputs(gen, tiles[0].run_shape, bs, device)
    alone_s = generator_alone(gen, x, c, repeats, device, amp)
    del x, c
    rng = np.random.default_rng(scale)
    arrays = {}
    for name in needed_arrays(gen):
        arrays[name] = rng.random(tuple(shapes[scale - 1]) if name == "prev" else grid, dtype=np.float32)
    feed = tile_feed(gen, arrays)
    t0 = time.perf_counter()
    for t in batches[0]:
        feed(t)
    feed_batch_s = time.perf_counter() - t0
    predicted = len(batches) * (alone_s + feed_batch_s)
    if predicted > log.left():
        log.write({**what, "figure": "skipped", "of": "efficiency", "predicted_s": round(predicted, 1),
                   "left_s": round(log.left(), 1), "tiles": len(tiles)})  # fmt: skip
        return None
    out = np.zeros(grid, np.float32)
    spent = {"feed": 0.0, "write": 0.0}

    def timed_feed(t: Tile) -> Any:
        t0 = time.perf_counter()
        try:
            return feed(t)
        finally:
            spent["feed"] += time.perf_counter() - t0

    write = array_writer(out)

    def timed_write(t: Tile, core_out: np.ndarray) -> None:
        t0 = time.perf_counter()
        write(t, core_out)
        spent["write"] += time.perf_counter() - t0

    sync(device)
    t0 = time.perf_counter()
    run_tiles(gen, tiles, timed_feed, timed_write, bs, device, amp)
    sync(device)
    wall = time.perf_counter() - t0
    flops = per_batch * len(batches)
    achieved, alone = flops / wall, per_batch / alone_s
    useful = per_voxel_flops(gen) * math.prod(grid)
    return {"value": round(achieved / alone, 3), "unit": "ratio", "tile": core, "halo": gen.halo, "batch": bs,
            "tiles": len(tiles), "gflop": round(flops / 1e9, 2), "wall_s": round(wall, 3),
            "gflops": round(achieved / 1e9, 2), "alone_gflops": round(alone / 1e9, 2),
            "halo_cost": round(flops / useful - 1, 3), "feed_s": round(spent["feed"], 3),
            "write_s": round(spent["write"], 3), "predicted_s": round(predicted, 1)}  # fmt: skip


# ----------------------------------------------------------------------------- the table


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The Markdown tables of one run's figures (whatever of them exists)."""
    meta = next((r for r in records if r.get("figure") == "meta"), {})
    by = {(r.get("figure"), r.get("size"), r.get("scale"), r.get("precision")): r for r in records}
    lines = [f"# GPU check: {meta.get('card', '?')}", ""]
    lines.append(f"{meta.get('networks', '')} torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '-')}, "
                 f"run {meta.get('run', '?')}. {meta.get('rule', '')}")  # fmt: skip
    lines += ["", f"## Peak memory (MiB; {meta.get('peak_kind', '')}; model: msgan.memory, fp32)", ""]
    lines.append("| size | scale | grid | train fp32 | train bf16 | train model | tile x batch | infer fp32 "
                 "| infer bf16 | infer model |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["size"], r["scale"]) for r in records if r.get("figure") in ("train_peak", "infer_peak")})
    for size, scale in keys:
        t32, t16 = by.get(("train_peak", size, scale, "fp32"), {}), by.get(("train_peak", size, scale, "bf16"), {})
        i32, i16 = by.get(("infer_peak", size, scale, "fp32"), {}), by.get(("infer_peak", size, scale, "bf16"), {})
        grid = "x".join(map(str, (meta.get("grids", {}).get(str(size)) or [["?"]] * (scale + 1))[scale]))
        tile = i32.get("tile") or i16.get("tile")
        tb = "whole" if scale == 0 else f"{_fmt(tile)}^3 x {_fmt(i32.get('batch') or i16.get('batch'))}"
        lines.append(f"| {size}^3 | {scale} | {grid} | {_fmt(t32.get('peak_mb'))} | {_fmt(t16.get('peak_mb'))} | "
                     f"{_fmt(t32.get('model_mb'))} | {tb} | {_fmt(i32.get('peak_mb'))} | {_fmt(i16.get('peak_mb'))} | "
                     f"{_fmt(i32.get('model_mb'))} |")  # fmt: skip
    lines += ["", f"## Training throughput (steps/s, batch {meta.get('train_batch', '?')})", ""]
    lines += ["| size | scale | input | fp32 | bf16 | bf16 / fp32 |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["size"], r["scale"]) for r in records if r.get("figure") == "throughput"})
    for size, scale in keys:
        a, b = by.get(("throughput", size, scale, "fp32"), {}), by.get(("throughput", size, scale, "bf16"), {})
        ratio = b["value"] / a["value"] if a.get("value") and b.get("value") else None
        shape = "x".join(map(str, (a or b).get("input", [])))
        lines.append(f"| {size}^3 | {scale} | {shape} | {_fmt(a.get('value'), 2)} | {_fmt(b.get('value'), 2)} | "
                     f"{_fmt(ratio, 2)} |")  # fmt: skip
    lines += ["", "## Tile engine efficiency (benchmarks/engine_efficiency.py's ratio)", ""]
    lines += ["| size | scale | precision | tile | halo | tiles | GFLOP | wall s | feed s | write s | GFLOP/s | alone "
              "| ratio | halo cost |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        if r.get("figure") == "efficiency":
            lines.append(f"| {r['size']}^3 | {r['scale']} | {r['precision']} | {r['tile']} | {r['halo']} | "
                         f"{r['tiles']} | {_fmt(r['gflop'])} | {_fmt(r['wall_s'], 2)} | {_fmt(r['feed_s'], 2)} | "
                         f"{_fmt(r['write_s'], 2)} | {_fmt(r['gflops'])} | {_fmt(r['alone_gflops'])} | "
                         f"{_fmt(r['value'], 2)} | {_fmt(r['halo_cost'], 2)} |")  # fmt: skip
    notes = [r for r in records if r.get("figure") in ("skipped", "error", "stopped")]
    if notes:
        lines += ["", "## Not measured", ""]
        for r in notes:
            where = ", ".join(f"{k} {r[k]}" for k in ("size", "scale", "precision") if k in r)
            why = r.get("error") or r.get("reason") or f"predicted {r.get('predicted_s')} s, {r.get('left_s')} s left"
            lines.append(f"- {r['figure']} {r.get('of', '')} {where}: {why}".replace("  ", " "))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def device_meta(device: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "numpy": np.__version__,
                            "python": platform.python_version(), "threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(card=p.name, memory_mb=mib(p.total_memory), capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cudnn_tf32=torch.backends.cudnn.allow_tf32, matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)  # fmt: skip
    else:
        meta.update(card=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return meta


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for figures.jsonl and table.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny networks and sizes (a CPU test in seconds)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="volume sides (default 128 256 512)")
    p.add_argument("--lr-side", type=int, default=None, help=f"LR grid side (default {CT_KERNEL_LR_SIDE})")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no measurement after this many seconds")
    p.add_argument("--min-seconds", type=float, default=None, help="timed seconds per throughput (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="forward passes timed for the generator alone (median)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    args.sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else (128, 256, 512)))
    args.lr_side = args.lr_side or (QUICK_LR_SIDE if args.quick else CT_KERNEL_LR_SIDE)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else 2.0)
    return args


_SIGNALLED: list[str] = []  # the signals received: a Stop raised inside a finalizer is ignored by Python


def _on_signal(signum: int, _frame: object) -> None:
    _SIGNALLED.append(signal.Signals(signum).name)
    raise Stop(_SIGNALLED[-1])


def stop_if_signalled() -> None:
    """Raise the Stop a signal asked for, if Python swallowed it (it arrived while a finalizer ran)."""
    if _SIGNALLED:
        raise Stop(_SIGNALLED[0])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(
    args: argparse.Namespace,
    log: Log,
    spec: ModelSpec,
    train: dict[str, Any],
    device: torch.device,
    engine: bool = True,
) -> bool:
    """The three parts in order, each figure when the budget allows (``engine``: whether part 3 can run).
    False when the budget stopped it."""
    sizes, lr = sorted(args.sizes), args.lr_side
    for size in sizes:  # 1. peak memory per size and scale
        shapes = scale_shapes(size, lr, spec)
        for scale in range(len(shapes)):
            for fig in ("train_peak", "infer_peak"):
                for prec in PRECISIONS:
                    what = {"figure": fig, "size": size, "scale": scale, "precision": prec}
                    amp = prec == "bf16"
                    fn: Callable[[], dict[str, Any] | None]
                    if fig == "train_peak":
                        fn = functools.partial(train_peak, spec, scale, train, lr, device, amp)
                    else:
                        fn = functools.partial(infer_peak, spec, scale, shapes[scale], device, amp)
                    if not measure(log, what, fn, device):
                        return False
    size = sizes[-1]
    shapes = scale_shapes(size, lr, spec)
    for scale in range(len(shapes)):  # 2. training throughput per scale of the largest size
        for prec in PRECISIONS:
            what = {"figure": "throughput", "size": size, "scale": scale, "precision": prec}
            fn = functools.partial(throughput, spec, scale, train, lr, device, prec == "bf16", args.min_seconds)
            if not measure(log, what, fn, device):
                return False
    if not engine:
        return True
    for prec in ("bf16", "fp32") if spec.inference.amp else ("fp32", "bf16"):  # 3. the tile engine, per HR scale
        for scale in range(1, len(shapes)):
            what = {"figure": "efficiency", "size": size, "scale": scale, "precision": prec}
            fn = functools.partial(efficiency, log, what, spec, scale, shapes, device, prec == "bf16", args.repeats)
            if not measure(log, what, fn, device):
                return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); "
                         "use --device cpu --quick for the CPU test")  # fmt: skip
    spec = ct_kernel_spec(args.quick)
    train = QUICK_TRAIN if args.quick else CT_KERNEL_TRAIN
    try:  # refuse a size off the rule before anything runs
        for size in args.sizes:
            scale_shapes(size, args.lr_side, spec)
    except ValueError as err:
        raise SystemExit(f"gpu_check: {err}") from None
    engine_error = engine_import_error()
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"run": run_id, **device_meta(device), "quick": args.quick, "budget_s": args.budget_s,
            "networks": ("configs/ct-kernel.yaml networks" + (" (--quick: tiny)" if args.quick else "") + ":"
                         f" LR U-Net width {spec.lr_generator.width} depth {spec.lr_generator.depth}, HR"
                         f" width {spec.hr_generator.width} x {spec.hr_generator.num_blocks} blocks"
                         f" ({spec.hr_generator.context}), PatchGAN width {spec.discriminator.width};"
                         f" HR patch {spec.hr_patch}, train batch {train['batch_size']}, inference budget"
                         f" {spec.inference.memory_budget_mb:g} MB x batch {spec.inference.batch_size}."),
            "rule": f"Scales: the LR grid stays {args.lr_side}^3 (" + ", ".join(
                f"{s}^3: {len(scale_shapes(s, args.lr_side, spec))}" for s in sorted(args.sizes)) + " scales).",
            "grids": {str(s): [list(g) for g in scale_shapes(s, args.lr_side, spec)] for s in args.sizes},
            "train_batch": train["batch_size"], "peak_kind": Peak(device).kind, "spec": spec.to_dict()}  # fmt: skip
    log = Log(args.out, meta, args.budget_s)
    rc = 0
    try:
        with stop_on_signals():
            if engine_error:
                log.write({"figure": "skipped", "of": "efficiency", "reason": engine_error})
            finished = run(args, log, spec, train, device, engine=engine_error is None)
            stop_if_signalled()
            if not finished:
                log.write({"figure": "stopped", "reason": f"--budget-s {args.budget_s:g} reached"})
    except Stop as sig:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.write({"figure": "stopped", "reason": f"{sig} after {log.elapsed():.1f} s"})
        rc = 128 + signal.Signals[str(sig)].value
    finally:
        text = log.write_table()
        log.close()
    print(text, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
