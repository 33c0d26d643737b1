"""The paper's comparison methods: small generation upscaled, plain patch-wise generation with
stitching, and non-local means filtering of the input."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from skimage.restoration import denoise_nl_means, estimate_sigma

from msgan.config import Config
from msgan.nets import HRGenerator
from msgan.pyramid import upsample2
from msgan.tiling import pyramid_shapes


def upscale_small(lr_image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Small generation, upscaled: the LR output upsampled x2 per scale (linear) up to ``shape``."""
    n = 1
    while (shapes := pyramid_shapes(shape, n))[0] != tuple(lr_image.shape):
        if max(shapes[0]) == 1:
            raise ValueError(f"{tuple(shape)} is not reached from {tuple(lr_image.shape)} by doubling")
        n += 1
    x = np.asarray(lr_image, dtype=np.float32)
    for fine in shapes[1:]:
        x = upsample2(x, fine)
    return x


def patch_generator(cfg: Config) -> HRGenerator:
    """The plain patch-wise HR generator: edges only, padded convolutions, instance norm."""
    h = cfg.hr_generator
    return HRGenerator(cfg.dims, h.width, h.num_blocks, "instance", "none", residual=False, padding="same")


def _starts(n: int, patch: int, step: int) -> list[int]:
    if n <= patch:
        return [0]
    s = list(range(0, n - patch, step))
    return [*s, n - patch]


@torch.no_grad()
def patchwise_translate(
    gen: HRGenerator, edges: np.ndarray, patch: int, overlap: int = 5, device: str = "cpu"
) -> np.ndarray:
    """Patch-wise generation stitched by averaging overlaps of ``overlap`` voxels (the paper: 5)."""
    if overlap >= patch:
        raise ValueError(f"overlap {overlap} must be smaller than the patch {patch}")
    gen.eval()
    acc = np.zeros(edges.shape, np.float64)
    weight = np.zeros(edges.shape, np.float64)
    for start in itertools.product(*(_starts(n, patch, patch - overlap) for n in edges.shape)):
        sl = tuple(slice(a, a + patch) for a in start)
        x = torch.from_numpy(np.ascontiguousarray(edges[sl], dtype=np.float32))[None, None].to(device)
        y = gen(x).float().cpu().numpy()[0, 0]
        acc[sl] += y
        weight[sl] += 1.0
    return (acc / weight).astype(np.float32)


def nlm_filter(image: np.ndarray, patch_size: int = 5, patch_distance: int = 6, h_factor: float = 0.8) -> np.ndarray:
    """Non-local means filtering (scikit-image, fast mode) with the noise level estimated from the image."""
    x = np.asarray(image, dtype=np.float32)
    sigma = float(np.mean(estimate_sigma(x, channel_axis=None)))
    return denoise_nl_means(
        x, patch_size=patch_size, patch_distance=patch_distance, h=h_factor * sigma, sigma=sigma,
        fast_mode=True, channel_axis=None,
    ).astype(np.float32)  # fmt: skip
