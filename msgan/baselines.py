"""Comparison methods. The paper's: small generation upscaled, plain patch-wise generation with
stitching, non-local means of the input. The field's, for translation tasks (all trained on the same
(input, target) pairs): a radially symmetric linear filter fitted by least squares in the Fourier
domain, and the supervised CNN of the kernel-conversion literature (a residual U-Net trained with L1
on patches, stitched with overlap)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import fft as sfft
from skimage.restoration import denoise_nl_means, estimate_sigma
from torch import nn

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


def nlm_filter(
    image: np.ndarray,
    patch_size: int = 5,
    patch_distance: int = 6,
    h_factor: float = 0.8,
    workers: int = 1,
    sigma: float | None = None,
) -> np.ndarray:
    """Non-local means filtering (scikit-image, fast mode), ``h = h_factor * sigma``, with the noise
    level ``sigma`` given (image units) or else estimated from the image (wavelet MAD: it sees little
    of a soft kernel's low-frequency noise).

    ``workers`` > 1 (0: all cores) filters slabs along the first axis in threads (scikit-image releases
    the GIL), each read with a margin of ``patch_distance + patch_size`` so that a voxel sees the same
    neighbourhood as in one whole pass; the noise level is estimated once on the whole image."""
    x = np.asarray(image, dtype=np.float32)
    if sigma is None:
        sigma = float(np.mean(estimate_sigma(x, channel_axis=None)))

    def run(block: np.ndarray) -> np.ndarray:
        return denoise_nl_means(
            block, patch_size=patch_size, patch_distance=patch_distance, h=h_factor * sigma, sigma=sigma,
            fast_mode=True, channel_axis=None,
        ).astype(np.float32)  # fmt: skip

    n = (os.cpu_count() or 1) if workers == 0 else workers
    margin = patch_distance + patch_size
    step = -(-x.shape[0] // max(n, 1))
    if n <= 1 or step <= margin:
        return run(x)
    out = np.empty_like(x)
    bounds = [(a, min(a + step, x.shape[0])) for a in range(0, x.shape[0], step)]

    def slab(ab: tuple[int, int]) -> None:
        a, b = ab
        lo, hi = max(0, a - margin), min(x.shape[0], b + margin)
        out[a:b] = run(x[lo:hi])[a - lo : a - lo + (b - a)]

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(slab, bounds))
    return out


# ----------------------------------------------------------------------------- fitted linear filter


def _radial_frequency(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """|f| (cycles/voxel) on the ``rfftn`` grid of ``shape``, and each coefficient's weight in the sum
    of squares over the full spectrum (2 for the half-spectrum columns that stand for a conjugate pair)."""
    axes = [sfft.fftfreq(n) for n in shape[:-1]] + [sfft.rfftfreq(shape[-1])]
    f2 = sum(np.meshgrid(*[a**2 for a in axes], indexing="ij", sparse=True))
    last = len(axes[-1])
    w = np.full(last, 2.0)
    w[0] = 1.0
    if shape[-1] % 2 == 0:
        w[-1] = 1.0
    return np.sqrt(np.asarray(f2, dtype=np.float64)), w


@dataclass(frozen=True)
class RadialFilter:
    """A shift-invariant, radially symmetric linear filter: gain per band of |f| (cycles/voxel)."""

    edges: np.ndarray  # band edges, ascending, from 0 to beyond the corner frequency
    gain: np.ndarray  # one real gain per band

    def response(self, f: np.ndarray) -> np.ndarray:
        band = np.clip(np.searchsorted(self.edges, f, side="right") - 1, 0, len(self.gain) - 1)
        return self.gain[band]

    def apply(self, image: np.ndarray, workers: int = -1) -> np.ndarray:
        x = np.asarray(image, dtype=np.float64)
        f, _ = _radial_frequency(x.shape)
        y = sfft.irfftn(sfft.rfftn(x, workers=workers) * self.response(f), s=x.shape, workers=workers)
        return y.astype(np.float32)


def fit_radial_filter(pairs: Iterable[tuple[np.ndarray, np.ndarray]], bands: int = 128) -> RadialFilter:
    """Least-squares fit of ``target ~ H * input`` over all training pairs, with ``H`` real and constant
    on each of ``bands`` equal bands of |f| from 0 to the corner frequency (sqrt(dims) / 2): per band,
    ``H = sum Re(conj(X) Y) / sum |X|^2`` over every pair's Fourier coefficients in that band (bands
    that hold no training frequency are interpolated from their neighbours)."""
    num, den = np.zeros(bands), np.zeros(bands)
    dims = 0
    for count, (x, y) in enumerate(pairs):
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if xa.shape != ya.shape:
            raise ValueError(f"training pair {count}: input {xa.shape} and target {ya.shape} differ in shape")
        if dims and xa.ndim != dims:
            raise ValueError(f"training pair {count} is {xa.ndim}D, the first was {dims}D")
        dims = xa.ndim
        edges = np.linspace(0.0, np.sqrt(dims) / 2 + 1e-9, bands + 1)
        f, w = _radial_frequency(xa.shape)
        band = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, bands - 1)
        xf, yf = sfft.rfftn(xa), sfft.rfftn(ya)
        weight = np.broadcast_to(w, xf.shape)
        num += np.bincount(band.ravel(), (weight * (np.conj(xf) * yf).real).ravel(), bands)
        den += np.bincount(band.ravel(), (weight * np.abs(xf) ** 2).ravel(), bands)
    if not dims:
        raise ValueError("no training pairs to fit the linear filter on")
    seen = den > 0
    centres = (edges[:-1] + edges[1:]) / 2
    gain = np.interp(centres, centres[seen], num[seen] / den[seen])  # bands no training frequency fell in
    return RadialFilter(edges, gain)


# ----------------------------------------------------------------------------- supervised CNN


class ResidualUNet(nn.Module):
    """The field's supervised translation CNN: output = input + U-Net(input) (padded convolutions,
    no normalisation, so patches stitch without per-patch statistics); the U-Net's last layer starts at
    zero, so training starts from the identity."""

    def __init__(self, dims: int, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        from msgan.nets import UNet

        self.dims, self.depth = dims, depth
        self.body = UNet(dims, 1, 1, width=width, depth=depth, norm_kind="none")
        head = self.body.head
        assert isinstance(head, (nn.Conv2d, nn.Conv3d))
        nn.init.zeros_(head.weight)  # starts as the identity: the residual learns only the correction
        nn.init.zeros_(head.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)  # (B, 1, D, H, W)


def cnn_for_budget(dims: int, min_parameters: int, depth: int = 2) -> ResidualUNet:
    """The narrowest residual U-Net of ``depth`` with at least ``min_parameters`` parameters."""
    width = 4
    while True:
        net = ResidualUNet(dims, width, depth)
        if sum(p.numel() for p in net.parameters()) >= min_parameters:
            return net
        width += 2


CNN_SCALE = 1000.0  # HU / CNN_SCALE is what the CNN sees: no window, so the full HU range survives


def body_centres(target: np.ndarray) -> np.ndarray:
    """Flat indices of a target's body voxels (above -500 HU), in C order: a patch centre is drawn from them.
    int32 where the volume allows: a third of ``np.argwhere``'s coordinates, a sixth where it is int32."""
    flat = np.flatnonzero(np.asarray(target) > -500.0)
    return flat.astype(np.int32) if np.asarray(target).size <= np.iinfo(np.int32).max else flat


def train_cnn(
    net: ResidualUNet,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    steps: int,
    patch: int,
    batch_size: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    log_every: int = 200,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    tag: dict[str, object] | None = None,
    centres: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Train with L1 on random patches of (input, target) pairs in HU (scaled by :data:`CNN_SCALE`);
    patches are drawn with their centre inside the body (target above -500 HU).

    With ``checkpoint`` (a file path), the network, Adam, the patch sampler's state and the seconds spent are
    saved there every ``checkpoint_every`` steps and at the end, and a run that finds the file resumes from it:
    a stopped run continues on the same stream of patches. A checkpoint of another run (other steps, patch,
    batch, learning rate, seed, network or ``tag``, the caller's name for its data) is refused with an error
    naming it. ``seconds`` in the result is the training time of all runs together. ``centres``: each pair's
    :func:`body_centres`, where the caller computed them (to keep them out of a measured peak)."""
    if patch % 2**net.depth:
        raise ValueError(f"CNN patch {patch} must be a multiple of 2**depth = {2**net.depth}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    centres = list(centres) if centres is not None else [body_centres(t) for _, t in pairs]
    run = {"steps": steps, "patch": patch, "batch_size": batch_size, "lr": lr, "seed": seed,
           "parameters": sum(p.numel() for p in net.parameters()), "pairs": len(pairs), "tag": tag}  # fmt: skip
    start, spent, loss_sum = 0, 0.0, 0.0
    if checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        if state.get("run") != run:
            raise ValueError(f"CNN checkpoint {os.fspath(checkpoint)} is of another run ({state.get('run')}, "
                             f"this one is {run}): remove it to start afresh")  # fmt: skip
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        start, spent, loss_sum = int(state["step"]), float(state["seconds"]), float(state["loss_sum"])

    def save(step: int) -> None:
        if checkpoint is None:
            return
        tmp = f"{os.fspath(checkpoint)}.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
        torch.save({"run": run, "net": net.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                    "step": step, "seconds": spent + time.perf_counter() - t0, "loss_sum": loss_sum}, tmp)  # fmt: skip
        os.replace(tmp, checkpoint)

    net.train()
    t0 = time.perf_counter()
    for step in range(start + 1, steps + 1):
        xs, ys = [], []
        for _ in range(batch_size):
            v = int(rng.integers(len(pairs)))
            x, y = pairs[v]
            c = np.unravel_index(int(centres[v][int(rng.integers(len(centres[v])))]), x.shape)
            begin = [int(np.clip(ci - patch // 2, 0, n - patch)) for ci, n in zip(c, x.shape, strict=True)]
            sl = tuple(slice(a, a + patch) for a in begin)
            xs.append(np.asarray(x[sl], np.float32) / CNN_SCALE)
            ys.append(np.asarray(y[sl], np.float32) / CNN_SCALE)
        xb = torch.from_numpy(np.stack(xs))[:, None]  # (B, 1, P, P, P)
        yb = torch.from_numpy(np.stack(ys))[:, None]
        loss = torch.nn.functional.l1_loss(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach())
        if log is not None and step % log_every == 0:
            log(f"cnn step {step}/{steps}: L1 {loss_sum / log_every * CNN_SCALE:.1f} HU")
        if step % log_every == 0:
            loss_sum = 0.0
        if step % checkpoint_every == 0 or step == steps:
            save(step)
    net.eval()
    return {"steps": steps, "seconds": spent + time.perf_counter() - t0}


def _ramp(n: int, overlap: int) -> np.ndarray:
    """1D blending weight of a tile: rises over ``overlap`` voxels at each end, never zero."""
    i = np.arange(n, dtype=np.float64)
    return np.minimum(1.0, np.minimum(i + 1, n - i) / (overlap + 1))


@torch.no_grad()
def cnn_translate(net: ResidualUNet, image: np.ndarray, tile: int = 48, overlap: int = 8) -> np.ndarray:
    """Translate an image (HU) tile by tile; tiles overlap by ``overlap`` voxels and are blended with
    linear ramps (a padded-convolution network is not tile-exact, so seams are averaged out)."""
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    net.eval()
    x = np.asarray(image, np.float32) / CNN_SCALE
    acc = np.zeros(x.shape, np.float64)
    weight = np.zeros(x.shape, np.float64)
    sizes = [min(tile, n) for n in x.shape]
    for start in itertools.product(*(_starts(n, t, t - overlap) for n, t in zip(x.shape, sizes, strict=True))):
        sl = tuple(slice(a, a + t) for a, t in zip(start, sizes, strict=True))
        y = net(torch.from_numpy(np.ascontiguousarray(x[sl]))[None, None]).numpy()[0, 0]
        w = np.ones(1)
        for axis, t in enumerate(sizes):
            shape = [1] * x.ndim
            shape[axis] = t
            w = w * _ramp(t, overlap if t < x.shape[axis] else 0).reshape(shape)
        acc[sl] += y * w
        weight[sl] += w
    return (acc / weight * CNN_SCALE).astype(np.float32)
