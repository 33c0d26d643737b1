"""Train one scale GAN: a plain PyTorch loop that reports through a callback.

Scale 0 trains the LR U-Net on whole low-resolution images; scale ``i >= 1`` trains an
HR generator on patches whose previous-scale condition is the *real* image of scale
``i - 1`` (corrupted by :mod:`msgan.augment`), so all scales train independently.
Ray Train's worker (:mod:`msgan.distributed.train`) drives the same :meth:`ScaleTrainer.fit` through its
hooks (``wrap``, ``on_step``, ``callback``, a :data:`Checkpointer`).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msgan import storage
from msgan.augment import Augmenter, Corruption
from msgan.config import Config, ConfigError, EdgeConfig, IntensityConfig, UnpairedConfig, from_dict
from msgan.engine import Feed, autocast, feed_box
from msgan.forward_model import ForwardModel
from msgan.forward_model import coarser as coarser_forward_model
from msgan.forward_model import fit as fit_forward_model
from msgan.metrics import ssim
from msgan.netrules import patchgan_min_size
from msgan.nets import HRGenerator, PatchDiscriminator, build_discriminator, build_generator, crop
from msgan.pyramid import Pyramid, edge_depth, edges, foreground_mask
from msgan.tiling import input_box, read_region, sample_patch_starts, upsample_region

if TYPE_CHECKING:
    from msgan.cascade import Cascade
    from msgan.console import Progress

Log = Callable[[str], None]

# ----------------------------------------------------------------------------- losses


class GANMode(StrEnum):
    LSGAN = "lsgan"
    BCE = "bce"


class GANLoss(nn.Module):
    """Adversarial loss on discriminator logits; target labels are buffers (move with the module)."""

    def __init__(self, mode: str | GANMode = GANMode.LSGAN) -> None:
        super().__init__()
        self.mode = GANMode(mode)
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))

    def forward(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        target = self.get_buffer("real_label" if real else "fake_label").to(logits.dtype).expand_as(logits)
        if self.mode is GANMode.LSGAN:
            return F.mse_loss(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target)


class GeneratorLoss(NamedTuple):
    total: torch.Tensor
    gan: torch.Tensor
    l1: torch.Tensor


class DiscriminatorLoss(NamedTuple):
    total: torch.Tensor
    real: torch.Tensor
    fake: torch.Tensor


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean absolute error over the valid voxels (all when ``valid`` is None; 0 when none is valid)."""
    if valid is None:
        return F.l1_loss(pred, target)
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- data


def remap_levels(x: np.ndarray, rng: np.random.Generator, u: UnpairedConfig, intensity: IntensityConfig) -> np.ndarray:
    """``x`` (window units) through a random smooth intensity curve: the identity plus ``u.remap_bumps``
    Gaussian bumps (centre, width and signed height drawn from ``u``'s ranges, given in the window's units and
    converted here). Voxel-wise, so it changes the levels of whole tissues (blood 40 -> 300 HU, or back) and
    never where anything is."""
    per_unit = 2.0 / (intensity.high - intensity.low)  # window units per HU (or normalised unit)
    y = np.asarray(x, dtype=np.float32).copy()
    for _ in range(u.remap_bumps):
        c = (rng.uniform(*u.remap_centres) - intensity.low) * per_unit - 1.0
        w = rng.uniform(*u.remap_width) * per_unit
        a = rng.uniform(-u.remap_amplitude, u.remap_amplitude) * per_unit
        y += np.float32(a) * np.exp(-((x - np.float32(c)) ** 2) / np.float32(2.0 * w * w)).astype(np.float32)
    return y


@dataclass(frozen=True)
class Synthesizer:
    """Without pairs, the source of a target region: the region (levels remapped with probability
    ``unpaired.remap_p``) through the forward model fitted on the two sets at this scale, clipped to the
    window, and its edges, computed on the region grown by every filter's reach so a box sees what the whole
    volume would give (:meth:`ForwardModel.margin`, :func:`msgan.pyramid.edge_depth`)."""

    forward: ForwardModel
    unpaired: UnpairedConfig
    edges: EdgeConfig
    intensity: IntensityConfig

    def margin(self, channels: Sequence[str]) -> int:
        return self.forward.margin() + (edge_depth(self.edges) if "edges" in channels else 0)

    def source(self, region: np.ndarray, rng: np.random.Generator, remap: bool) -> np.ndarray:
        """A synthesized source for a target ``region`` (the margin included: the caller crops it)."""
        x = np.asarray(region, dtype=np.float32)
        if remap and self.unpaired.remap_bumps and rng.random() < self.unpaired.remap_p:
            x = remap_levels(x, rng, self.unpaired, self.intensity)
        y = self.forward.degrade(x, rng, noise=self.unpaired.noise)
        return np.clip(y, -1.0, 1.0).astype(np.float32)

    def regions(
        self, target: Any, start: Sequence[int], stop: Sequence[int], channels: Sequence[str],
        rng: np.random.Generator, remap: bool = True,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """The source-side channels over the box ``[start, stop)`` of ``target``, by name."""
        m = self.margin(channels)
        core = tuple(slice(m, m + b - a) for a, b in zip(start, stop, strict=True))
        src = self.source(read_region(target, [a - m for a in start], [b + m for b in stop]), rng, remap)
        out = {"image": src[core]}
        if "edges" in channels:
            out["edges"] = edges(src, self.edges)[core]
        return out


@dataclass
class ScaleData:
    """What one scale trains on, per volume: the target image at this scale, its conditions (edges; the
    source image for image-conditioned models), the previous scale's target image (HR only), a
    foreground mask on the LR grid (where patches are centred) and, for pairs with voxels that must not
    train (outside their overlap or a field of view), the valid voxels at this scale (``valid``: one array or
    None per volume; empty when every voxel of every volume is valid). Arrays may be numpy or zarr."""

    scale: int
    images: list[Any]
    edges: list[Any]
    prev_images: list[Any]
    masks_lr: list[np.ndarray]
    sources: list[Any] = field(default_factory=list)
    valid: list[Any] = field(default_factory=list)
    synth: Synthesizer | None = None  # without pairs: sources are made from the targets (images)
    source_set: list[Any] = field(default_factory=list)  # without pairs: the source domain's images at this scale
    source_set_edges: list[Any] = field(default_factory=list)

    @classmethod
    def from_pyramids(cls, pyramids: Sequence[Pyramid], scale: int, foreground_threshold: float) -> ScaleData:
        if not pyramids:
            raise ValueError("no training volumes")
        for i, p in enumerate(pyramids):
            if scale >= p.num_scales:
                raise ValueError(f"volume {i} has {p.num_scales} scales; scale {scale} does not exist")
        paired = [p.sources is not None for p in pyramids]
        if any(paired) and not all(paired):
            raise ValueError(f"{paired.count(False)} of {len(pyramids)} pyramids have no source images; pairs only")
        masked = any(p.masks is not None for p in pyramids)
        masks_lr = []
        for p in pyramids:
            fg = foreground_mask(np.asarray(p.images[0]), foreground_threshold)
            if p.masks is not None:  # patches are centred where the voxels may train
                fg &= np.asarray(p.masks[0], dtype=bool)
            masks_lr.append(fg)
        return cls(
            scale=scale,
            images=[p.images[scale] for p in pyramids],
            edges=[p.edges[scale] for p in pyramids],
            prev_images=[p.images[scale - 1] for p in pyramids] if scale > 0 else [],
            masks_lr=masks_lr,
            sources=[p.sources[scale] for p in pyramids if p.sources is not None],
            valid=[p.masks[scale] if p.masks is not None else None for p in pyramids] if masked else [],
        )

    @classmethod
    def from_unpaired(
        cls, sources: Sequence[Pyramid], targets: Sequence[Pyramid], scale: int, foreground_threshold: float,
        synth: Synthesizer,
    ) -> ScaleData:  # fmt: skip
        """Training without pairs: the target domain's pyramids (what the generator must make, and at HR
        scales the previous scale), the source domain's images (scale 0's cycle) and the synthesizer of
        sources from targets at this scale."""
        if not sources:
            raise ValueError("no source-domain training volumes (training without pairs needs both sets)")
        for i, p in enumerate([*sources, *targets]):
            if p.sources is not None:
                raise ValueError(f"volume {i} is a pair; training without pairs takes plain pyramids of each set")
        data = cls.from_pyramids(targets, scale, foreground_threshold)
        data.synth = synth
        data.source_set = [p.images[scale] for p in sources]
        data.source_set_edges = [p.edges[scale] for p in sources]
        return data

    def valid_region(self, v: int, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Volume ``v``'s valid voxels in the box ``[start, stop)`` at this scale, as float32 0/1 (all ones
        when the volume has no mask)."""
        shape = tuple(b - a for a, b in zip(start, stop, strict=True))
        mask = self.valid[v] if self.valid else None
        if mask is None:
            return np.ones(shape, dtype=np.float32)
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        return np.asarray(mask[box], dtype=np.float32)

    def arrays(self, v: int) -> dict[str, Any]:
        """The named arrays of volume ``v`` a generator reads (see :mod:`msgan.engine`)."""
        if self.synth is not None:  # the source-side channels are synthesized per box (Synthesizer.regions)
            out: dict[str, Any] = {"grid": self.images[v]}
            if self.prev_images:
                out["prev"] = self.prev_images[v]
            return out
        out = {"edges": self.edges[v]}
        if self.sources:
            out["image"] = self.sources[v]
        if self.prev_images:
            out["prev"] = self.prev_images[v]
        return out


class Batch(NamedTuple):
    x: torch.Tensor  # generator input (B, Cin, core + 2*halo, ...)
    coarse: torch.Tensor | None  # wide context (B, 1, ...) or None
    cond: torch.Tensor  # discriminator conditions over the core (B, Ccond, core, ...)
    target: torch.Tensor  # (B, 1, core, ...)
    valid: torch.Tensor | None = None  # (B, 1, core, ...) 0/1: voxels that may enter a loss; None: all


def _stack(items: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(items).astype(np.float32, copy=False))


def _corruptions(gen: Any, rng: np.random.Generator, aug: Augmenter) -> dict[str, Corruption]:
    """One draw of the training corruptions: edges always (the stream stays aligned), the previous
    scale when the generator reads it."""
    out = {"edges": aug.sample_edges(rng)}
    if isinstance(gen, HRGenerator) and gen.context != "none":
        out["prev"] = aug.sample_condition(rng)
    return out


def _check_paired(data: ScaleData, gen: Any) -> None:
    if "image" in getattr(gen, "channels", ()) and not data.sources and data.synth is None:
        raise ValueError(
            "the generator reads the source image (condition includes 'image'): train on pairs "
            "(msgan.pyramid.build_pair_pyramid), not on target images alone"
        )


def sample_lr_batch(
    data: ScaleData, batch_size: int, rng: np.random.Generator, aug: Augmenter, gen: Any = None
) -> Batch:
    """Whole LR images (same-shape volumes are stacked; otherwise one volume per batch), as ``gen`` (the
    LR U-Net; default: edges alone) reads them."""
    gen = gen if gen is not None else SimpleNamespace(channels=("edges",), halo=0, context="none")  # the paper's
    _check_paired(data, gen)
    idx = [int(rng.integers(len(data.images))) for _ in range(batch_size)]
    if len({tuple(data.images[i].shape) for i in idx}) > 1:
        idx = idx[:1]
    xs = _stack([_lr_feed(data, i, gen, rng, aug) for i in idx])
    target = _stack([np.asarray(data.images[i])[None] for i in idx])
    valid = None
    if data.valid:
        valid = _stack([data.valid_region(i, [0] * data.images[i].ndim, data.images[i].shape)[None] for i in idx])
    return Batch(xs, None, xs, target, valid)


def _lr_feed(data: ScaleData, i: int, gen: Any, rng: np.random.Generator, aug: Augmenter) -> np.ndarray:
    """Volume ``i``'s whole-image input (without pairs: its synthesized source, levels not remapped)."""
    corruptions = _corruptions(gen, rng, aug)
    regions = None
    if data.synth is not None:
        shape = tuple(data.images[i].shape)
        regions = data.synth.regions(data.images[i], [0] * len(shape), shape, gen.channels, rng, remap=False)
    return feed_box(gen, data.arrays(i), corruptions=corruptions, regions=regions).x


def sample_hr_batch(
    data: ScaleData, gen: HRGenerator, patch: int, batch_size: int, rng: np.random.Generator, aug: Augmenter
) -> Batch:
    """Patches centred in the foreground, built by the inference feed (:func:`msgan.engine.feed_box`)
    with the training corruptions."""
    _check_paired(data, gen)
    xs, coarse, conds, targets, valid = [], [], [], [], []
    for _ in range(batch_size):
        v = int(rng.integers(len(data.images)))
        shape = tuple(data.images[v].shape)
        start = sample_patch_starts(data.masks_lr[v], 2**data.scale, shape, patch, 1, rng)[0]
        stop = tuple(a + patch for a in start)
        corruptions = _corruptions(gen, rng, aug)
        regions = None
        if data.synth is not None:
            in0, in1 = input_box(start, stop, gen.halo)
            regions = data.synth.regions(data.images[v], in0, in1, gen.channels, rng)
        f = feed_box(gen, data.arrays(v), start, stop, corruptions, regions)
        x = torch.from_numpy(f.x)[None]  # (1, C, P + 2h, ...)
        targets.append(read_region(data.images[v], start, stop)[None])
        if data.valid:
            valid.append(data.valid_region(v, start, stop)[None])
        xs.append(x[0])
        if f.coarse is not None:
            coarse.append(torch.from_numpy(f.coarse))
        conds.append(discriminator_condition(gen, x, f, data.prev_images[v], shape, start, stop)[0])
    return Batch(
        torch.stack(xs),
        torch.stack(coarse) if coarse else None,
        torch.stack(conds),
        _stack(targets),
        _stack(valid) if valid else None,
    )


def discriminator_condition(
    gen: HRGenerator, x: torch.Tensor, feed: Feed, prev: Any, shape: Sequence[int], start: Sequence[int],
    stop: Sequence[int],
) -> torch.Tensor:  # fmt: skip
    """The PatchGAN's conditions over the core: the previous scale upsampled, then the source-side channels
    (:func:`msgan.netrules.discriminator_channels`): ``(1, C, *core)``."""
    h = gen.halo
    if gen.context == "upscaled":
        return crop(x, h)  # (1, C, P, ...): prev first already
    if gen.context == "wide":
        assert feed.coarse is not None
        prev_core = gen.upsampled_context(
            torch.from_numpy(feed.coarse)[None], [b - a for a, b in zip(start, stop, strict=True)]
        )
    else:
        prev_core = torch.from_numpy(upsample_region(prev, shape, start, stop))[None, None]
    return torch.cat([prev_core, crop(x, h)], 1)  # (1, 1 + C, P, ...)


# ----------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class StepMetrics:
    scale: int
    step: int
    loss_g: float
    loss_g_gan: float
    loss_g_l1: float
    loss_d: float
    loss_d_real: float
    loss_d_fake: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


Callback = Callable[[StepMetrics], None]
Checkpointer = Callable[["ScaleTrainer", StepMetrics], None]
"""Called by :meth:`ScaleTrainer.fit` at each checkpoint step instead of :meth:`ScaleTrainer.save` to a path
(e.g. Ray Train's ``report`` with a checkpoint)."""
CHECKPOINT_FORMAT = "msgan-scale-checkpoint/1"


def check_scale_shape(cfg: Config, scale: int, shape: Sequence[int], label: str) -> None:
    """The one rule that a volume's grid at ``scale`` can train: ``dims`` axes, at scale 0 at least the
    discriminator's minimum per side, at scale >= 1 at least ``train.hr_patch`` per side. A
    :class:`~msgan.config.ConfigError` naming ``label`` (the volume) otherwise; the pre-flight
    (:func:`msgan.distributed.prepare.check_shapes`) and :class:`ScaleTrainer` both call it."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != cfg.dims:
        raise ConfigError(
            f"{label}: a {len(shape)}D grid {shape} at scale {scale}; the config trains {cfg.dims}D (dims)"
        )
    if scale == 0:
        need = patchgan_min_size(cfg.discriminator.num_layers)
        if min(shape) < need:
            raise ConfigError(
                f"{label}: LR grid {shape} is smaller than the {need} voxels per side the discriminator "
                f"(num_layers={cfg.discriminator.num_layers}) needs; lower num_scales or discriminator.num_layers"
            )
    elif min(shape) < cfg.train.hr_patch:
        raise ConfigError(f"train.hr_patch={cfg.train.hr_patch} is larger than scale {scale} of {label}, shape {shape}")


class ScaleTrainer:
    """Generator, discriminator, optimizers and RNG of one scale; resumable exactly."""

    def __init__(
        self,
        cfg: Config,
        scale: int,
        data: ScaleData,
        device: str | torch.device = "cpu",
        generator: nn.Module | None = None,
        rank: int = 0,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        """``rank`` gives each data-parallel worker its own patch stream; ``wrap`` (e.g. Ray's
        ``prepare_model``) wraps both networks for the training forward passes only."""
        if scale < 0 or scale >= cfg.num_scales:
            raise ValueError(f"scale {scale} is outside 0..{cfg.num_scales - 1} (num_scales={cfg.num_scales})")
        if data.scale != scale:
            raise ValueError(f"data is for scale {data.scale}, trainer for scale {scale}")
        self.cfg, self.scale, self.data, self.device = cfg, scale, data, torch.device(device)
        self._check_data()
        torch.manual_seed(cfg.seed * 1009 + scale)  # deterministic initial weights per scale
        self.generator = (generator if generator is not None else build_generator(cfg, scale)).to(self.device)
        t = cfg.train
        self.cycle = t.objective == "unpaired" and scale == 0
        if self.cycle:  # scale 0 without pairs: G (source -> target) and F (back), one PatchGAN per domain
            d = cfg.discriminator
            self.discriminator: nn.Module = PatchDiscriminator(cfg.dims, 1, d.width, d.num_layers, d.norm)
            self.discriminator.to(self.device)
            self.inverse: nn.Module | None = build_generator(cfg, scale).to(self.device)
            self.discriminator_source: nn.Module | None = PatchDiscriminator(
                cfg.dims, 1, d.width, d.num_layers, d.norm
            ).to(self.device)
            g_params = [*self.generator.parameters(), *self.inverse.parameters()]
            d_params = [*self.discriminator.parameters(), *self.discriminator_source.parameters()]
        else:
            self.discriminator = build_discriminator(cfg, scale).to(self.device)
            self.inverse = self.discriminator_source = None
            g_params, d_params = list(self.generator.parameters()), list(self.discriminator.parameters())
        self.opt_g = torch.optim.Adam(g_params, lr=t.lr, betas=t.betas)
        self.opt_d = torch.optim.Adam(d_params, lr=t.lr, betas=t.betas)
        self.gan_loss = GANLoss(t.gan_loss).to(self.device)
        self.augmenter = Augmenter(cfg.augment)
        self.rank = rank
        self.rng = np.random.default_rng([cfg.seed, scale, rank] if rank else [cfg.seed, scale])
        self._g = wrap(self.generator) if wrap is not None else self.generator
        self._d = wrap(self.discriminator) if wrap is not None else self.discriminator
        if self.inverse is not None and self.discriminator_source is not None:
            self._f = wrap(self.inverse) if wrap is not None else self.inverse
            self._ds = wrap(self.discriminator_source) if wrap is not None else self.discriminator_source
        self.step = 0

    def _check_data(self) -> None:
        unpaired = self.cfg.train.objective == "unpaired"
        if unpaired and self.data.synth is None:
            raise ValueError(
                "train.objective=unpaired: the scale's data has no source synthesizer (ScaleData.from_unpaired)"
            )
        if not unpaired and self.data.synth is not None:
            raise ValueError("the data is for training without pairs; set train.objective=unpaired")
        if unpaired and self.scale == 0 and not self.data.source_set:
            raise ValueError("train.objective=unpaired: scale 0 needs the source domain's images (source_set)")
        for i, im in enumerate(self.data.images):
            check_scale_shape(self.cfg, self.scale, tuple(im.shape), f"training volume {i}")
        for i, im in enumerate(self.data.source_set):
            check_scale_shape(self.cfg, self.scale, tuple(im.shape), f"source-domain training volume {i}")

    # -- one step

    def _autocast(self) -> Any:
        return autocast(self.device, self.cfg.train.amp)

    def sample_batch(self) -> Batch:
        t = self.cfg.train
        if self.scale == 0:
            return sample_lr_batch(self.data, t.batch_size, self.rng, self.augmenter, self.generator)
        assert isinstance(self.generator, HRGenerator)
        return sample_hr_batch(self.data, self.generator, t.hr_patch, t.batch_size, self.rng, self.augmenter)

    def train_step(self) -> StepMetrics:
        if self.cycle:
            return self._cycle_step()
        t0 = time.perf_counter()
        self._g.train()
        self._d.train()
        b = self.sample_batch()
        x, cond, target = (v.to(self.device) for v in (b.x, b.cond, b.target))
        coarse = b.coarse.to(self.device) if b.coarse is not None else None
        valid = b.valid.to(self.device) if b.valid is not None else None
        with self._autocast():
            fake = self._g(x, coarse) if isinstance(self.generator, HRGenerator) else self._g(x)
            if valid is not None:  # outside the valid voxels real and fake are one constant: no signal, no gradient
                target = target * valid - (1.0 - valid)
                fake = fake * valid - (1.0 - valid)
            d_real = self._d(torch.cat([cond, target], 1))
            d_fake = self._d(torch.cat([cond, fake.detach()], 1))
            dl_real, dl_fake = self.gan_loss(d_real, True), self.gan_loss(d_fake, False)
            d_loss = DiscriminatorLoss(0.5 * (dl_real + dl_fake), dl_real, dl_fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.total.backward()
        self.opt_d.step()
        with self._autocast():
            g_gan = self.gan_loss(self._d(torch.cat([cond, fake], 1)), True)
            g_l1 = masked_l1(fake.float(), target, valid)
            g_loss = GeneratorLoss(g_gan + self.cfg.train.l1_weight * g_l1, g_gan, g_l1)
        return self._generator_step(g_loss, d_loss, t0)

    def _generator_step(self, g_loss: GeneratorLoss, d_loss: DiscriminatorLoss, t0: float) -> StepMetrics:
        """The generators' update that ends every step (paired or not), and the step's metrics."""
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.total.backward()
        self.opt_g.step()
        self.step += 1
        return StepMetrics(
            scale=self.scale,
            step=self.step,
            loss_g=float(g_loss.total.detach()),
            loss_g_gan=float(g_loss.gan.detach()),
            loss_g_l1=float(g_loss.l1.detach()),
            loss_d=float(d_loss.total.detach()),
            loss_d_real=float(d_loss.real.detach()),
            loss_d_fake=float(d_loss.fake.detach()),
            seconds=time.perf_counter() - t0,
        )

    # -- scale 0 without pairs

    def _domain_batch(self, images: list[Any], edge_maps: list[Any]) -> torch.Tensor:
        """Whole images of one domain as a generator reads them (same-shape volumes stacked, else one)."""
        t = self.cfg.train
        idx = [int(self.rng.integers(len(images))) for _ in range(t.batch_size)]
        if len({tuple(images[i].shape) for i in idx}) > 1:
            idx = idx[:1]
        corr = [_corruptions(self.generator, self.rng, self.augmenter) for _ in idx]
        xs = [feed_box(self.generator, {"image": images[i], "edges": edge_maps[i]}, corruptions=c).x
              for i, c in zip(idx, corr, strict=True)]  # fmt: skip
        return _stack(xs).to(self.device)

    def _reads(self, image: torch.Tensor) -> torch.Tensor:
        """A generated image (B, 1, ...) as a generator's input: the image, with gradient, and its edges
        (computed without gradient, as they are at inference: :func:`msgan.pyramid.edges`)."""
        channels = []
        for name in tuple(getattr(self.generator, "channels", ())):
            if name == "image":
                channels.append(image)
            else:
                arr = image.detach().float().cpu().numpy()[:, 0]
                e = np.stack([edges(a, self.cfg.edges) for a in arr])[:, None]
                channels.append(torch.from_numpy(e).to(image.device, image.dtype))
        return torch.cat(channels, 1)

    def _cycle_step(self) -> StepMetrics:
        """One step of scale 0 without pairs: LSGAN per domain, cycle L1 both ways, and L1 of G on the
        synthesized source of a target (the forward model's pair: it anchors G where the domains agree)."""
        t0 = time.perf_counter()
        u = self.cfg.train.unpaired
        assert self.inverse is not None and self.discriminator_source is not None
        for m in (self._g, self._d, self._f, self._ds):
            m.train()
        channels: tuple[str, ...] = tuple(getattr(self.generator, "channels", ()))
        img = channels.index("image")
        x_s = self._domain_batch(self.data.source_set, self.data.source_set_edges)
        tgt = sample_lr_batch(self.data, self.cfg.train.batch_size, self.rng, self.augmenter, self.generator)
        real_s, real_t = x_s[:, img : img + 1], tgt.target.to(self.device)
        valid = tgt.valid.to(self.device) if tgt.valid is not None else None  # the targets' field of view
        shown_t = real_t if valid is None else real_t * valid - (1.0 - valid)  # padding never teaches D_t
        x_dt = tgt.x.to(self.device)  # the targets' synthesized sources
        x_tt = self._reads(real_t)  # a target as F reads it
        with self._autocast():
            fake_t, fake_s = self._g(x_s), self._f(x_tt)
            dl_real = self.gan_loss(self._d(shown_t), True) + self.gan_loss(self._ds(real_s), True)
            dl_fake = self.gan_loss(self._d(fake_t.detach()), False) + self.gan_loss(self._ds(fake_s.detach()), False)
            d_loss = DiscriminatorLoss(0.5 * (dl_real + dl_fake), dl_real, dl_fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.total.backward()
        self.opt_d.step()
        with self._autocast():
            g_gan = self.gan_loss(self._d(fake_t), True) + self.gan_loss(self._ds(fake_s), True)
            cyc = F.l1_loss(self._f(self._reads(fake_t)).float(), real_s) + masked_l1(
                self._g(self._reads(fake_s)).float(), real_t, valid
            )
            idt = masked_l1(self._g(x_dt).float(), real_t, valid)
            l1 = u.cycle_weight * cyc + u.identity_weight * idt
            g_loss = GeneratorLoss(g_gan + l1, g_gan, l1)
        return self._generator_step(g_loss, d_loss, t0)

    def fit(
        self,
        steps: int,
        callback: Callback | None = None,
        checkpoint: str | Path | Checkpointer | None = None,
        on_step: Callback | None = None,
    ) -> StepMetrics | None:
        """Train until ``self.step == steps``: ``on_step`` sees every step, ``callback`` every ``log_every``-th
        and the last; every ``checkpoint_every``-th step and the last are checkpointed (``checkpoint``: a
        path to :meth:`save` to, or a :data:`Checkpointer`). Returns the last step's metrics (None when
        ``steps`` was reached before, e.g. on a resume from the final checkpoint). The local and the Ray
        Train paths both train through this loop."""
        t = self.cfg.train
        last: StepMetrics | None = None
        while self.step < steps:
            last = m = self.train_step()
            if on_step is not None:
                on_step(m)
            if callback is not None and (m.step % t.log_every == 0 or m.step == steps):
                callback(m)
            if checkpoint is not None and (m.step % t.checkpoint_every == 0 or m.step == steps):
                if callable(checkpoint):
                    checkpoint(self, m)
                else:
                    self.save(checkpoint)
        return last

    # -- evaluation

    @torch.no_grad()
    def evaluate(self, data: ScaleData | None = None, count: int = 8, seed: int = 12345) -> dict[str, float]:
        """L1 and SSIM of the generator on ``count`` fixed patches (whole images at LR), no corruption."""
        from msgan.config import AugmentConfig

        data = self.data if data is None else data
        rng = np.random.default_rng(seed)
        clean = Augmenter(AugmentConfig(noise_p=0.0, blur_p=0.0, resolution_p=0.0, edge_noise_p=0.0))
        self.generator.eval()
        l1s, ssims = [], []
        for _ in range(count):
            if self.scale == 0:
                b = sample_lr_batch(data, 1, rng, clean, self.generator)
            else:
                assert isinstance(self.generator, HRGenerator)
                b = sample_hr_batch(data, self.generator, self.cfg.train.hr_patch, 1, rng, clean)
            x = b.x.to(self.device)
            coarse = b.coarse.to(self.device) if b.coarse is not None else None
            with self._autocast():
                y = self.generator(x, coarse) if isinstance(self.generator, HRGenerator) else self.generator(x)
            pred, truth = y.float().cpu().numpy()[0, 0], b.target.numpy()[0, 0]
            mask = b.valid.numpy()[0, 0] > 0.5 if b.valid is not None else None
            if mask is not None and not mask.any():
                continue  # nothing of this sample may be scored
            if mask is not None:  # outside the valid voxels the prediction is the target: SSIM's windows see nothing
                pred = np.where(mask, pred, truth)
            l1s.append(float(np.abs(pred - truth)[mask].mean() if mask is not None else np.abs(pred - truth).mean()))
            ssims.append(ssim(pred, truth, data_range=2.0, mask=mask, sigma=1.0))
        if not l1s:
            return {"val_l1": float("nan"), "val_ssim": float("nan")}
        return {"val_l1": float(np.mean(l1s)), "val_ssim": float(np.mean(ssims))}

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "scale": self.scale,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng_numpy": self.rng.bit_generator.state,
            "rng_torch": torch.get_rng_state(),
            **(
                {"inverse": self.inverse.state_dict(), "discriminator_source": self.discriminator_source.state_dict()}
                if self.inverse is not None and self.discriminator_source is not None
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an msgan scale checkpoint (format {state.get('format')!r})")
        if state["scale"] != self.scale:
            raise ValueError(f"checkpoint is for scale {state['scale']}, trainer for scale {self.scale}")
        saved = from_dict(state["config"])
        for section in ("dims", "num_scales", "lr_generator", "hr_generator", "discriminator"):
            if getattr(saved, section) != getattr(self.cfg, section):
                raise ValueError(
                    f"checkpoint's {section} {getattr(saved, section)!r} differs from the config's "
                    f"{getattr(self.cfg, section)!r}; it cannot be resumed with this config"
                )
        if self.inverse is not None and self.discriminator_source is not None:
            if "inverse" not in state:
                raise ValueError("checkpoint is of a paired scale 0; this trainer trains without pairs (cycle)")
            self.inverse.load_state_dict(state["inverse"])
            self.discriminator_source.load_state_dict(state["discriminator_source"])
        elif "inverse" in state:
            raise ValueError("checkpoint is of scale 0 trained without pairs; this trainer trains on pairs")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = int(state["step"])
        if self.rank == 0:
            self.rng.bit_generator.state = state["rng_numpy"]
            torch.set_rng_state(state["rng_torch"])
        else:  # checkpoints hold rank 0's streams; other ranks continue on a fresh, step-dependent one
            self.rng = np.random.default_rng([self.cfg.seed, self.scale, self.rank, self.step])

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (a crash never leaves a torn file nor a temporary)."""
        with storage.staged_file(path) as tmp:
            tmp.write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    def restore(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path), map_location=self.device, weights_only=True))


def fingerprint(pyramids: Sequence[Pyramid]) -> str:
    """Content hash of the training data: every level of every pyramid (images, edges, a pair's sources and
    valid voxels), each level zero outside its valid voxels, so what lies there never enters it."""
    h = hashlib.sha256()
    for p in pyramids:
        masks: Sequence[Any] = p.masks if p.masks is not None else [None] * p.num_scales
        for levels in (p.images, p.edges, p.sources or (), p.masks or ()):
            for s, a in enumerate(levels):
                arr = np.ascontiguousarray(a, dtype=np.float32)
                if masks[s] is not None:
                    arr = np.where(np.asarray(masks[s], dtype=bool), arr, np.float32(0.0))
                h.update(str(arr.shape).encode())
                h.update(arr.tobytes())
    return h.hexdigest()


FORWARD_CROP = 128  # voxels per side of each level a forward model is fitted on (the central crop)


def central_crop(level: Any, size: int = FORWARD_CROP) -> np.ndarray:
    """The central ``size`` voxels per side of ``level`` (all of a smaller axis), read by slicing (a zarr level
    reads only the crop)."""
    box = tuple(slice((n - min(n, size)) // 2, (n - min(n, size)) // 2 + min(n, size)) for n in level.shape)
    return np.asarray(level[box], dtype=np.float32)


def fit_forward_models(cfg: Config, sources: Sequence[Pyramid], targets: Sequence[Pyramid]) -> list[ForwardModel]:
    """Training without pairs: the forward model (target -> source) of every scale, in window units. The finest
    scale's is fitted on the two sets' images there, each cut to its central :data:`FORWARD_CROP` voxels per
    side (the spectra are per cycle/voxel, so a crop estimates them; a 512^3 level would cost GBs), its noise
    measured inside the body (voxels above ``train.foreground_threshold``). A coarser scale's filter is fitted on
    that scale's images, its noise is the finest scale's noise downsampled
    (:func:`msgan.forward_model.coarser`). The job and ``msgan train`` both fit through here."""
    if not sources or not targets:
        raise ValueError(f"training without pairs needs both sets: {len(sources)} sources, {len(targets)} targets")
    thr = cfg.train.foreground_threshold
    top = cfg.num_scales - 1

    def crops(pyramids: Sequence[Pyramid], s: int) -> list[np.ndarray]:
        return [central_crop(p.images[s]) for p in pyramids]

    src, tgt = crops(sources, top), crops(targets, top)
    finest = fit_forward_model(src, tgt, source_masks=[a > thr for a in src], target_masks=[a > thr for a in tgt])
    coarse = [coarser_forward_model(finest, top - s, crops(sources, s), crops(targets, s)) for s in range(top)]
    return [*coarse, finest]


def scale_data(
    cfg: Config, pyramids: Sequence[Pyramid], scale: int, sources: Sequence[Pyramid] = (),
    forward: Sequence[ForwardModel] = (),
) -> ScaleData:  # fmt: skip
    """What ``scale`` trains on: pairs (or targets alone, edges-only), or without pairs (``train.objective:
    unpaired``) the targets ``pyramids``, the source domain's ``sources`` and the fitted ``forward`` models."""
    thr = cfg.train.foreground_threshold
    if cfg.train.objective != "unpaired":
        return ScaleData.from_pyramids(pyramids, scale, thr)
    if len(forward) != cfg.num_scales:
        raise ValueError(
            f"training without pairs needs one forward model per scale ({cfg.num_scales}); got {len(forward)}"
        )
    synth = Synthesizer(forward[scale], cfg.train.unpaired, cfg.edges, cfg.intensity)
    return ScaleData.from_unpaired(sources, pyramids, scale, thr, synth)


def train_locally(
    cfg: Config, pyramids: Sequence[Pyramid], log: Log = print, progress: Progress | None = None,
    sources: Sequence[Pyramid] = (),
) -> Cascade:  # fmt: skip
    """Train every scale one after another in this process (the Ray job trains them at once). With a
    ``progress``, each scale shows its step, rate and ETA there; otherwise every logged step goes to ``log``.
    Without pairs (``train.objective: unpaired``), ``pyramids`` are the target domain's and ``sources`` the
    source domain's (plain pyramids of each set's images)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    forward = fit_forward_models(cfg, sources, pyramids) if cfg.train.objective == "unpaired" else []
    gens, steps = [], []
    for s in range(cfg.num_scales):
        trainer = ScaleTrainer(cfg, s, scale_data(cfg, pyramids, s, sources, forward))
        t0 = time.perf_counter()
        total = cfg.steps_for(s)
        if progress is not None:
            progress.add(s, f"[scale {s}]", total, "steps")

        def report(m: StepMetrics, t0: float = t0, total: int = total) -> None:
            note = f"G {m.loss_g:.3f} (L1 {m.loss_g_l1:.4f}) D {m.loss_d:.3f}"
            if progress is not None:
                progress.update(m.scale, m.step, note)
            else:
                log(f"  scale {m.scale} step {m.step:>5}/{total}  {note}  {time.perf_counter() - t0:6.1f}s")

        trainer.fit(total, callback=report)
        gens.append(trainer.generator.eval())
        steps.append(trainer.step)
    if progress is not None:
        progress.close()
    from msgan.cascade import Cascade  # the cascade is built on the trainers, not the other way round

    info: dict[str, Any] = {"steps": steps, "data_fingerprint": fingerprint([*pyramids, *sources])}
    if forward:
        info["forward_models"] = [m.summary() for m in forward]
    return Cascade(cfg, gens, info)
