"""Corruptions of the previous-scale condition and of the edges (the paper's augmentation).

Replayable: :meth:`Augmenter.sample` draws the parameters, :func:`corrupt` applies them
deterministically (noise comes from a seed among the parameters), so a training step
can be logged and reproduced exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from msgan.nets import linear_mode

if TYPE_CHECKING:  # the annotation only: the tile engine imports without yaml (benchmarks/gpu_check.py)
    from msgan.config import AugmentConfig


@dataclass(frozen=True)
class Corruption:
    """Parameters of one corruption; ``None`` means that part did not fire."""

    resolution_factor: float | None = None
    blur_sigma: float | None = None
    noise_std: float | None = None
    seed: int = 0

    @property
    def fired(self) -> bool:
        return any(v is not None for v in (self.resolution_factor, self.blur_sigma, self.noise_std))


class Augmenter:
    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    @staticmethod
    def _maybe(rng: np.random.Generator, p: float, lo_hi: tuple[float, float]) -> float | None:
        fire = rng.random() < p
        value = float(rng.uniform(*lo_hi))  # always drawn: the stream stays aligned across outcomes
        return value if fire else None

    def sample_condition(self, rng: np.random.Generator) -> Corruption:
        c = self.cfg
        return Corruption(
            resolution_factor=self._maybe(rng, c.resolution_p, c.resolution_factor),
            blur_sigma=self._maybe(rng, c.blur_p, c.blur_sigma),
            noise_std=self._maybe(rng, c.noise_p, c.noise_std),
            seed=int(rng.integers(2**31)),
        )

    def sample_edges(self, rng: np.random.Generator) -> Corruption:
        c = self.cfg
        return Corruption(noise_std=self._maybe(rng, c.edge_noise_p, c.edge_noise_std), seed=int(rng.integers(2**31)))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` with replicate borders; same shape out."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    dims = x.ndim - 2
    b, c = x.shape[:2]
    y = x.reshape(b * c, 1, *x.shape[2:])
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = radius
        pad[2 * (dims - 1 - axis) + 1] = radius
        y = F.pad(y, pad, mode="replicate")
        y = F.conv2d(y, k.reshape(shape)) if dims == 2 else F.conv3d(y, k.reshape(shape))
    return y.reshape(x.shape)


def corrupt(x: torch.Tensor, params: Corruption) -> torch.Tensor:
    """Apply a :class:`Corruption` to ``(B, C, *spatial)``: resolution change, then blur, then noise."""
    dims = x.ndim - 2
    if params.resolution_factor is not None and params.resolution_factor > 1.0:
        size = x.shape[2:]
        small = [max(1, round(s / params.resolution_factor)) for s in size]
        x = F.interpolate(x, size=small, mode="area")
        x = F.interpolate(x, size=list(size), mode=linear_mode(dims), align_corners=False)
    if params.blur_sigma is not None and params.blur_sigma > 0:
        x = gaussian_blur(x, params.blur_sigma)
    if params.noise_std is not None and params.noise_std > 0:
        g = torch.Generator(device="cpu").manual_seed(params.seed)
        x = x + params.noise_std * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x
