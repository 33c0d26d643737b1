"""Analytic memory model of the generators, and measured peaks.

The HR inference model counts what a forward pass under ``no_grad`` keeps alive at its
widest point: the block input, the block's intermediate and output feature maps (the
residual skip holds the input while the body runs), plus the tile's input and output.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Sequence

import torch

from msgan.nets import HRGenerator, count_parameters

CountFn = Callable[[torch.nn.Module, torch.Tensor], int]


def hr_inference_bytes(gen: HRGenerator, core: int, dims: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Estimated peak bytes of one HR forward pass on tiles of ``core`` voxels per side."""
    width = gen.width
    side = core + 2 * gen.halo
    voxels = side**dims
    features = 3 * width * voxels  # skip + body intermediate + body output
    io = (len(gen.channels) + 1) * voxels  # input channels + output
    if gen.ctx is not None:  # coarse branch features, upsampled x2 once
        features += width * voxels
    params = count_parameters(gen)
    return int((batch * (features + io) + params) * bytes_per_value)


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


def _to_meta(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(module) if any(p.device.type != "meta" for p in module.parameters()) else module
    return clone.to("meta")


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


def peak_device_bytes(device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated on ``device`` since the last reset, or None off CUDA."""
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(d))
