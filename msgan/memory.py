"""Analytic memory model of the generators, and measured peaks.

Inference is modelled by :func:`forward_peak_bytes`: one ``no_grad`` forward pass on the ``meta``
device (shapes only), following every tensor PyTorch allocates until it is freed, so the figure is
the peak of what is alive at once, inputs included. It holds for the CPU path because every
convolution there runs through oneDNN (:func:`msgan.nets.onednn_applies`), which needs no unfold
buffer; measured against peak RSS in ``benchmarks/memory_model.py`` (docs/results.md).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from msgan.nets import HRGenerator, count_parameters

CountFn = Callable[[torch.nn.Module, torch.Tensor], int]


ONEDNN_BLOCK = 16  # channels per block of oneDNN's layout for float32 on AVX-512 (8 on AVX2: less padding)


def _padded_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` with its channels padded to a whole number of oneDNN blocks."""
    c = t.shape[1]
    return t.numel() // max(c, 1) * (-(-c // ONEDNN_BLOCK) * ONEDNN_BLOCK) * t.element_size()


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive during the ops run under it, and their peak.

    ``reorders``: the convolutions take plain (channels-first) tensors, so oneDNN copies the input
    (when it has 8 channels or more) and the output into its blocked layout while it runs, and
    copies the output back (measured one layer at a time, ``benchmarks/memory_model.py``). In
    channels-last layout (:func:`msgan.engine.cpu_layout`) it convolves in place: no copies."""

    def __init__(self, reorders: bool) -> None:
        super().__init__()
        self.reorders = reorders
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._storages:  # a view of a storage already counted
            return
        size = st.nbytes()
        self._storages.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, size)  # PyTorch keeps a storage's Python object as long as it lives

    def _free(self, key: int, size: int) -> None:
        self._storages.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        before = self.live
        out = func(*args, **(kwargs or {}))
        if self.reorders and func is torch.ops.aten.convolution.default:
            x = args[0]
            src = _padded_bytes(x) if x.shape[1] >= 8 else 0
            dst = _padded_bytes(out)
            self.peak = max(self.peak, before + dst + max(src, out.numel() * out.element_size()))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def forward_peak_bytes(module: torch.nn.Module, *shapes: Sequence[int] | None, channels_last: bool = False) -> int:
    """Peak bytes of tensors alive at once during one ``no_grad`` float32 forward pass of ``module``
    on inputs of ``shapes`` (``None`` passes ``None``), the inputs and the output included, the
    parameters not; ``channels_last``: the inputs come in that layout (no oneDNN reorders, see
    :class:`_LiveBytes`). Runs on the ``meta`` device: no memory, any size."""
    meta = _to_meta(module)
    mode = _LiveBytes(reorders=not channels_last)
    inputs = [None if s is None else torch.empty(tuple(s), device="meta") for s in shapes]
    for x in inputs:
        if x is not None:
            mode.add(x)
    with torch.no_grad(), mode:
        out = meta(*inputs)
    del out, inputs
    return mode.peak


def hr_tile_shapes(
    gen: HRGenerator, core: int, dims: int, batch: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Shapes of one HR forward's inputs for ``batch`` tiles of ``core`` voxels per side: the fine
    channels over ``core + 2 * halo``, and the coarse crop of a ``wide`` context (else ``None``)."""
    side = core + 2 * gen.halo
    x = (batch, len(gen.channels), *(side,) * dims)
    if gen.ctx is None:
        return x, None
    lo, hi = gen.context_box([0] * dims, [core] * dims)
    return x, (batch, 1, *(b - a for a, b in zip(lo, hi, strict=True)))


def hr_inference_bytes(gen: HRGenerator, core: int, dims: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Estimated peak bytes of one HR forward pass on ``batch`` tiles of ``core`` voxels per side, as
    :func:`msgan.engine.run_tiles` runs it: the tensors alive at once (:func:`forward_peak_bytes`,
    channels-last on the CPU) plus the parameters. GPU convolution workspaces are not counted."""
    x, coarse = hr_tile_shapes(gen, core, dims, batch)
    live = forward_peak_bytes(gen, x, coarse, channels_last=True)  # as msgan.engine.run_tiles feeds it
    return int(live * bytes_per_value / 4 + count_parameters(gen) * bytes_per_value)


def largest_tile(gen: HRGenerator, dims: int, budget_bytes: float, batch: int = 1, limit: int | None = None) -> int:
    """Largest even core (voxels per side) whose estimated peak fits ``budget_bytes``; at most
    ``limit`` (rounded up to even): a core as large as the volume is one tile."""

    def fits(core: int) -> bool:
        return hr_inference_bytes(gen, core, dims, batch) <= budget_bytes

    if not fits(2):
        need = hr_inference_bytes(gen, 2, dims, batch) / 2**20
        raise ValueError(
            f"inference.memory_budget_mb={budget_bytes / 2**20:.1f} is below the {need:.1f} MiB "
            f"the smallest tile (2 voxels, halo {gen.halo}) needs"
        )
    cap = None if limit is None else max(2, limit + limit % 2)
    if cap is not None and fits(cap):
        return cap
    lo, hi = 2, 4
    while fits(hi) and (cap is None or hi < cap):
        lo, hi = hi, hi * 2
    if cap is not None:
        hi = min(hi, cap)
    while hi - lo > 2:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- one training step, analytically


def _sum_over_forward(module: torch.nn.Module, inputs: Sequence[torch.Tensor | None], count: CountFn) -> int:
    """Sum of ``count(leaf, output)`` over the leaf modules of one forward pass on the ``meta`` device
    (shapes only, no memory), so any image size is free to ask about."""
    meta = _to_meta(module)
    total = 0

    def hook(m: torch.nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += count(m, out)

    handles = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta(*[None if x is None else torch.empty(x.shape, device="meta") for x in inputs])
    finally:
        for h in handles:
            h.remove()
    return total


def activation_elements(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Elements of every leaf module's output in one forward pass: the tensors autograd keeps."""
    return _sum_over_forward(module, inputs, lambda _m, out: out.numel())


def _conv_count(m: torch.nn.Module, out: torch.Tensor) -> int:
    if not isinstance(m, torch.nn.modules.conv._ConvNd):
        return 0
    return 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def conv_flops(module: torch.nn.Module, *inputs: torch.Tensor | None) -> int:
    """Floating-point operations (2 per multiply-add) of every convolution in one forward pass on
    ``inputs``' shapes (``None`` passes through, e.g. no wide context)."""
    return _sum_over_forward(module, inputs, _conv_count)


def per_voxel_flops(gen: HRGenerator) -> float:
    """Convolution FLOPs per output voxel of one pass over a whole grid: every layer once per voxel, no halos
    (the ``wide`` branch runs on the coarse grid, 2**dims times fewer voxels). ``conv_flops`` of the tiles a
    plan runs over this, times the grid's voxels, is the plan's halo cost."""
    fine = coarse = 0
    for name, m in gen.named_modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            f = 2 * m.in_channels * m.out_channels * math.prod(m.kernel_size)
            if name.startswith("ctx."):
                coarse += f
            else:
                fine += f
    return fine + coarse / 2**gen.dims


_META: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def _to_meta(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` on the ``meta`` device (made once per module; the caller's stays put)."""
    import copy

    if all(p.device.type == "meta" for p in module.parameters()):
        return module
    if module not in _META:
        _META[module] = copy.deepcopy(module).to("meta")
    return _META[module]


def training_step_bytes(
    gen: torch.nn.Module,
    disc: torch.nn.Module,
    gen_input: torch.Size | tuple[int, ...],
    disc_input: torch.Size | tuple[int, ...],
    bytes_per_value: int = 4,
) -> dict[str, int]:
    """Analytic memory of one GAN training step (batch as in the shapes), Adam on both networks.

    parameters + gradients + Adam's two moments (4 values per parameter), the activations kept for
    backward of one generator pass and two discriminator passes (real and fake), and the inputs.
    """
    params = sum(p.numel() for p in gen.parameters()) + sum(p.numel() for p in disc.parameters())
    a_gen = activation_elements(gen, torch.empty(gen_input, device="meta"))
    a_disc = activation_elements(disc, torch.empty(disc_input, device="meta"))
    images = math.prod(gen_input) + 2 * math.prod(disc_input)
    parts = {
        "parameters_and_optimizer": 4 * params,
        "activations": a_gen + 2 * a_disc,
        "images": images,
    }
    out = {k: v * bytes_per_value for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (bytes).

    Linux: the memory map's high-water mark (VmHWM), which starts afresh at exec; ``ru_maxrss``
    does not (it keeps the parent's peak across fork and exec, so a child would report its parent's).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def reset_peak_rss() -> bool:
    """Start this process's peak-RSS mark (:func:`peak_host_bytes`) afresh at its present size (Linux
    ``clear_refs`` 5): peaks measured later are what ran from now (one training loop, not the data loading
    before it; not a high-water mark a reused worker carried in). False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def current_rss() -> int:
    """Resident set size of this process now (bytes; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_device_bytes(device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated on ``device`` since the last reset, or None off CUDA."""
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(d))
