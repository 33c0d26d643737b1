"""Analytic memory model of the generators, and measured peaks.

The HR inference model counts what a forward pass under ``no_grad`` keeps alive at its
widest point: the block input, the block's intermediate and output feature maps (the
residual skip holds the input while the body runs), plus the tile's input and output.
"""

from __future__ import annotations

import resource
import sys

import torch

from msgan.nets import HRGenerator, count_parameters


def hr_inference_bytes(gen: HRGenerator, core: int, dims: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Estimated peak bytes of one HR forward pass on tiles of ``core`` voxels per side."""
    width = gen.width
    side = core + 2 * gen.halo
    voxels = side**dims
    features = 3 * width * voxels  # skip + body intermediate + body output
    io = (2 + 1) * voxels  # input channels + output
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


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def peak_device_bytes(device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated on ``device`` since the last reset, or None off CUDA."""
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(d))
