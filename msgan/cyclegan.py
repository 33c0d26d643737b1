"""The unpaired baseline: a patch CycleGAN (Zhu, Park, Isola & Efros, ICCV 2017), 2D or 3D.

Two ResNet generators (source -> target ``g_st`` and target -> source ``g_ts``) and two PatchGAN
discriminators train on unpaired patches of two sets of volumes (different subjects), in window units
([-1, 1]: the caller windows HU). The objective is the paper's: least-squares GAN losses, cycle
consistency L1 both ways (weight 10), identity L1 (weight 0.5 x the cycle weight), Adam (2e-4,
betas 0.5/0.999), a pool of 50 earlier generated patches for each discriminator, a constant learning
rate for the first half of training and a linear decay to zero over the second half, weights drawn
from N(0, 0.02). Only the sizes are scaled to a CPU: 8 base filters instead of 64 (about 0.4 M
parameters per 3D generator instead of 8-11 M in 2D), 3D patches of 32^3 instead of 256^2 images, and
PatchGANs of 2 stride-2 layers instead of 3 (receptive field 34 voxels: about the 32^3 patch, where
the paper's 70 x 70 patches judge a quarter of its 256^2 crops per side; a 3-layer PatchGAN would need
24-voxel patches just to give one output).

Whole volumes are translated tile by tile with linearly blended overlaps: the generators are
fully convolutional but use padded convolutions and instance normalisation, so they are not tile-exact
(unlike the cascade's HR generators) and seams are averaged out instead. Instance norm takes each tile's
own statistics, so a tile much larger or smaller than the training patch sees statistics training never
showed it: pick the tile on validation data (the training patch, or somewhat more, is the usual choice).

On CPUs the generators' single-channel 7^3 layers (first and last) run partly through the FFT, where
oneDNN is about 20x slower than for the same arithmetic with many channels (:class:`_SingleChannelConv3d`):
the same network and results, a third of the training time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft as sfft
from torch import nn

from msgan.netrules import patchgan_min_size
from msgan.nets import Conv3d, PatchDiscriminator, conv
from msgan.tiling import read_region


@dataclass(frozen=True)
class CycleGANConfig:
    """Sizes and training schedule of the CycleGAN baseline (Zhu et al.'s values where the paper gives
    one; sizes scaled to this machine)."""

    dims: int = 3
    width: int = 8  # base filters (Zhu: 64); the discriminators' first layer has as many (as in Zhu)
    blocks: int = 6  # ResNet blocks (Zhu: 6 at 128^2, 9 at 256^2)
    patch: int = 32  # training patch per side (>= our HR patch); a multiple of 4
    batch_size: int = 4
    steps: int = 2700
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    cycle_weight: float = 10.0
    identity_weight: float = 5.0  # Zhu: 0.5 x cycle
    pool_size: int = 50  # image pool of generated patches for D (Zhu)
    disc_layers: int = 2  # PatchGAN depth for small patches
    foreground_threshold: float = -0.8  # patches centred on voxels above it (the body)
    decay_from: float = 0.5  # lr linearly to 0 over the last half of the steps (Zhu's schedule, scaled)
    seed: int = 0
    threads: int = 0  # torch threads while training (0: leave as is)

    def check(self) -> None:
        """Refuse settings the networks or the schedule cannot run with, naming the field and the rule."""
        if self.dims not in (2, 3):
            raise ValueError(f"CycleGANConfig.dims={self.dims!r}: must be 2 or 3")
        for name in ("width", "blocks", "batch_size", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CycleGANConfig.{name}={getattr(self, name)!r}: must be at least 1")
        need = max(8, patchgan_min_size(self.disc_layers))
        if self.patch % 4 or self.patch < need:
            raise ValueError(
                f"CycleGANConfig.patch={self.patch}: must be a multiple of 4 (two stride-2 levels) and at least "
                f"{need} (the ResNet blocks' reflect padding and a PatchGAN of {self.disc_layers} layers)"
            )
        if self.disc_layers < 1:
            raise ValueError(f"CycleGANConfig.disc_layers={self.disc_layers}: must be at least 1")
        if self.pool_size < 0:
            raise ValueError(f"CycleGANConfig.pool_size={self.pool_size}: must be >= 0 (0: no pool)")
        if not 0.0 <= self.decay_from <= 1.0:
            raise ValueError(f"CycleGANConfig.decay_from={self.decay_from}: must be in [0, 1]")
        if self.lr <= 0 or self.cycle_weight < 0 or self.identity_weight < 0:
            raise ValueError("CycleGANConfig: lr must be > 0 and the loss weights >= 0")
        if self.threads < 0:
            raise ValueError(f"CycleGANConfig.threads={self.threads}: must be >= 0 (0: leave torch's setting)")


# ----------------------------------------------------------------------------- networks


def _reflect_pad(dims: int, p: int) -> nn.Module:
    return nn.ReflectionPad2d(p) if dims == 2 else nn.ReflectionPad3d(p)


def _instance_norm(dims: int, channels: int) -> nn.Module:
    # Zhu et al.'s generator: instance normalisation without affine parameters (the convs carry biases)
    return nn.InstanceNorm2d(channels) if dims == 2 else nn.InstanceNorm3d(channels)


class _ResBlock(nn.Module):
    """R(k): two reflect-padded 3x3 convolutions with instance norm, ReLU between, plus the input."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _reflect_pad(dims, 1), conv(dims, channels, channels, 3), _instance_norm(dims, channels), nn.ReLU(True),
            _reflect_pad(dims, 1), conv(dims, channels, channels, 3), _instance_norm(dims, channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _fft_correlate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid cross-correlation of ``x`` (B, C, *S) with ``weight`` (O, C, *K) through the FFT: what a
    padding-free, stride-1 convolution computes (to float rounding). The transforms are zero-padded to
    fast sizes >= ``S``: a circular correlation then wraps only into outputs past ``S - K``, cropped."""
    dims = tuple(range(2, x.ndim))
    size = [sfft.next_fast_len(n, real=True) for n in x.shape[2:]]
    xf = torch.fft.rfftn(x, s=size, dim=dims)[:, None]  # (B, 1, C, ...)
    wf = torch.fft.rfftn(weight, s=size, dim=dims).conj()[None]  # (1, O, C, ...)
    y = torch.fft.irfftn((xf * wf).sum(2), s=size, dim=dims)
    valid = (slice(0, n - k + 1) for n, k in zip(x.shape[2:], weight.shape[2:], strict=True))
    y = y[(slice(None), slice(None), *valid)]
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * len(dims)))
    return y


class _SingleChannelConv3d(Conv3d):
    """A 7^3 convolution with one input or one output channel (the generator's first and last layers),
    whose single-channel side oneDNN computes slowly on CPUs: the forward pass of a one-output-channel
    layer and the input gradient of a one-input-channel layer (each about 20x slower than the same
    arithmetic with the channels the other way round). Those run through the FFT (:func:`_fft_correlate`);
    the rest, and every other device, take the usual path. Same parameters and results as ``nn.Conv3d``
    (float rounding aside); no padding (a reflection pad precedes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slow = self.out_channels == 1 or (self.in_channels == 1 and x.requires_grad and torch.is_grad_enabled())
        if x.device.type != "cpu" or not slow:
            return super().forward(x)
        return _fft_correlate(x, self.weight, self.bias)


class ResnetGenerator(nn.Module):
    """Zhu et al.'s generator (after Johnson et al.): c7s1-w, d(2w), d(4w), ``blocks`` x R(4w), u(2w),
    u(w), c7s1-1, tanh. ``c7s1-k``: reflect-padded 7^n convolution, instance norm, ReLU; ``d(k)``: 3^n
    convolution of stride 2; ``u(k)``: 3^n transposed convolution of stride 1/2. One channel in and out
    (window units, [-1, 1]). Keeps the shape of inputs whose sides are multiples of 4 and at least 8."""

    def __init__(self, dims: int, width: int = 8, blocks: int = 6) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims={dims!r}: must be 2 or 3")
        if width < 1 or blocks < 0:
            raise ValueError(f"width={width}, blocks={blocks}: need width >= 1 and blocks >= 0")
        self.dims = dims
        tconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        w = width
        c7 = (
            (lambda cin, cout: conv(dims, cin, cout, 7))
            if dims == 2
            else (lambda cin, cout: _SingleChannelConv3d(cin, cout, 7))
        )
        layers: list[nn.Module] = [_reflect_pad(dims, 3), c7(1, w), _instance_norm(dims, w), nn.ReLU(True)]
        for cin, cout in ((w, 2 * w), (2 * w, 4 * w)):
            layers += [conv(dims, cin, cout, 3, stride=2, padding=1), _instance_norm(dims, cout), nn.ReLU(True)]
        layers += [_ResBlock(dims, 4 * w) for _ in range(blocks)]
        for cin, cout in ((4 * w, 2 * w), (2 * w, w)):
            layers += [
                tconv(cin, cout, 3, stride=2, padding=1, output_padding=1), _instance_norm(dims, cout), nn.ReLU(True)
            ]  # fmt: skip
        layers += [_reflect_pad(dims, 3), c7(w, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sides = tuple(x.shape[2:])
        if any(s % 4 or s < 8 for s in sides):
            raise ValueError(f"generator input {sides}: every side must be a multiple of 4 and at least 8")
        return self.net(x)  # (B, 1, D, H, W), in [-1, 1]


def resnet_generator(dims: int, width: int = 8, blocks: int = 6) -> nn.Module:
    """Zhu et al.'s ResNet generator (:class:`ResnetGenerator`), weights drawn from N(0, 0.02)."""
    g = ResnetGenerator(dims, width, blocks)
    _init_weights(g)
    return g


def _init_weights(module: nn.Module) -> None:
    """Zhu et al.'s initialisation: convolution weights ~ N(0, 0.02), biases 0; norm scales ~ N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def parameter_count(m: nn.Module) -> int:
    """Number of trainable parameters of ``m``."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- training


class _ImagePool:
    """Zhu et al.'s history of generated images (after Shrivastava et al.): the discriminator sees, for
    each new fake, with probability 1/2 an older fake from the pool (which the new one replaces), so it
    does not chase the generator's latest output. Draws come from ``rng`` (deterministic)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.items: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for x in fakes.detach():
            x = x.clone()
            if len(self.items) < self.size:
                self.items.append(x)
                out.append(x)
            elif self.rng.random() < 0.5:
                i = int(self.rng.integers(self.size))
                out.append(self.items[i])
                self.items[i] = x
            else:
                out.append(x)
        return torch.stack(out)


@dataclass
class CycleGAN:
    """The trained pair of generators (``g_st``: source -> target, the one a baseline uses), the config
    and the training history (one dict per ``log_every`` steps: mean losses over those steps)."""

    g_st: nn.Module
    g_ts: nn.Module
    config: CycleGANConfig
    history: list[dict[str, float]] = field(default_factory=list)


def _checked_volumes(volumes: Sequence[np.ndarray], name: str, cfg: CycleGANConfig) -> list[np.ndarray]:
    if len(volumes) == 0:
        raise ValueError(f"no {name} volumes to train the CycleGAN on")
    out = []
    for i, v in enumerate(volumes):
        a = np.asarray(v, dtype=np.float32)
        if a.ndim != cfg.dims:
            raise ValueError(f"{name} {i} is {a.ndim}D (shape {a.shape}); CycleGANConfig.dims is {cfg.dims}")
        if min(a.shape) < cfg.patch:
            raise ValueError(f"{name} {i} of shape {a.shape} is smaller than the training patch of {cfg.patch}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} {i} holds non-finite values (NaN or inf)")
        out.append(np.ascontiguousarray(a))
    return out


class _PatchSampler:
    """Random patches of a set of volumes: a random volume, a centre on a random voxel above the
    foreground threshold (anywhere when a volume has none), clipped into the volume, then flipped
    along each spatial axis independently with probability 1/2 (mirroring, as Zhu et al. augment;
    kernel, dose and contrast differences do not depend on orientation, and both domains get the same)."""

    def __init__(self, volumes: list[np.ndarray], patch: int, threshold: float, rng: np.random.Generator) -> None:
        self.volumes, self.patch, self.rng = volumes, patch, rng
        self.centres = []
        for v in volumes:
            c = np.flatnonzero(v > threshold)
            self.centres.append(c if c.size else np.arange(v.size))

    def batch(self, n: int) -> torch.Tensor:
        p, out = self.patch, []
        for _ in range(n):
            k = int(self.rng.integers(len(self.volumes)))
            v, c = self.volumes[k], self.centres[k]
            centre = np.unravel_index(int(c[self.rng.integers(c.size)]), v.shape)
            start = [min(max(int(ci) - p // 2, 0), side - p) for ci, side in zip(centre, v.shape, strict=True)]
            x = v[tuple(slice(a, a + p) for a in start)]
            flips = [axis for axis in range(v.ndim) if self.rng.random() < 0.5]
            if flips:
                x = np.flip(x, axis=tuple(flips))
            out.append(np.ascontiguousarray(x))
        return torch.from_numpy(np.stack(out))[:, None]  # (B, 1, P, P, P)


def _lr_factor(step: int, steps: int, decay_from: float) -> float:
    """Learning-rate factor of 0-based ``step``: 1 for the first ``decay_from`` of the steps, then
    falling linearly towards 0 (Zhu et al.: constant for 100 epochs, linearly to 0 over the next 100)."""
    constant = round(decay_from * steps)
    if step < constant:
        return 1.0
    return 1.0 - (step - constant + 1) / (steps - constant + 1)


def _lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al.), as Zhu et al. use: (D(x) - 1)^2 for real, D(x)^2 for fake."""
    return F.mse_loss(pred, torch.ones_like(pred) if real else torch.zeros_like(pred))


def train_cyclegan(
    sources: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    cfg: CycleGANConfig,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
) -> CycleGAN:
    """Train a CycleGAN on unpaired volumes (window units): each step draws ``batch_size`` patches of
    random source volumes and, independently, of random target volumes (see :class:`_PatchSampler`),
    then takes one Adam step of both generators (LSGAN + cycle L1 both ways + identity L1) and one of
    both discriminators (LSGAN on real patches and pooled fakes, halved, as Zhu et al.). Deterministic
    given ``cfg.seed`` (and the thread count). With ``checkpoint`` (a file path), the whole state (networks,
    optimizers, schedules, image pools, random streams) is written there every ``checkpoint_every`` steps,
    atomically, and a training that finds one resumes from it exactly: an hour of CPU survives a stop."""
    cfg.check()
    if log_every < 1:
        raise ValueError(f"log_every={log_every}: must be at least 1")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every}: must be at least 1")
    src = _checked_volumes(sources, "source", cfg)
    tgt = _checked_volumes(targets, "target", cfg)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(src, tgt, cfg, log, log_every, Path(checkpoint) if checkpoint else None, checkpoint_every)
    finally:
        torch.set_num_threads(old_threads)


def _train(
    src: list[np.ndarray],
    tgt: list[np.ndarray],
    cfg: CycleGANConfig,
    log: Callable[[str], None] | None,
    log_every: int,
    checkpoint: Path | None = None,
    checkpoint_every: int = 200,
) -> CycleGAN:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    g_st = resnet_generator(cfg.dims, cfg.width, cfg.blocks)
    g_ts = resnet_generator(cfg.dims, cfg.width, cfg.blocks)
    d_t = PatchDiscriminator(cfg.dims, 1, cfg.width, cfg.disc_layers, "instance")  # judges target patches
    d_s = PatchDiscriminator(cfg.dims, 1, cfg.width, cfg.disc_layers, "instance")  # judges source patches
    for d in (d_t, d_s):
        _init_weights(d)
    gens, discs = [*g_st.parameters(), *g_ts.parameters()], [*d_t.parameters(), *d_s.parameters()]
    opt_g = torch.optim.Adam(gens, lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(discs, lr=cfg.lr, betas=cfg.betas)
    schedule = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: _lr_factor(s, cfg.steps, cfg.decay_from)) for o in (opt_g, opt_d)
    ]
    sample_s = _PatchSampler(src, cfg.patch, cfg.foreground_threshold, rng)
    sample_t = _PatchSampler(tgt, cfg.patch, cfg.foreground_threshold, rng)
    pool_t, pool_s = _ImagePool(cfg.pool_size, rng), _ImagePool(cfg.pool_size, rng)  # fakes of each domain
    model = CycleGAN(g_st, g_ts, cfg, [])
    for m in (g_st, g_ts, d_t, d_s):
        m.train()
    sums: dict[str, float] = {}
    nets = {"g_st": g_st, "g_ts": g_ts, "d_t": d_t, "d_s": d_s}
    first = 1
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("config") != dataclasses.asdict(cfg):
            raise ValueError(f"{checkpoint}: a checkpoint of another CycleGAN config; remove it to start over")
        for name, net in nets.items():
            net.load_state_dict(state[name])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        for sch, st in zip(schedule, state["schedules"], strict=True):
            sch.load_state_dict(st)
        pool_t.items, pool_s.items = list(state["pool_t"]), list(state["pool_s"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        model.history, sums, first = list(state["history"]), dict(state["sums"]), int(state["step"]) + 1
        if log is not None:
            log(f"cyclegan: resumed at step {first - 1} from {checkpoint.name}")
    t0 = t_window = time.perf_counter()
    for step in range(first, cfg.steps + 1):
        real_s, real_t = sample_s.batch(cfg.batch_size), sample_t.batch(cfg.batch_size)
        lr_now = opt_g.param_groups[0]["lr"]

        # generators: fool both discriminators, close both cycles, leave the other domain's images alone
        for p in discs:
            p.requires_grad_(False)
        fake_t, fake_s = g_st(real_s), g_ts(real_t)
        gan = _lsgan(d_t(fake_t), True) + _lsgan(d_s(fake_s), True)
        cycle = F.l1_loss(g_ts(fake_t), real_s) + F.l1_loss(g_st(fake_s), real_t)
        loss = gan + cfg.cycle_weight * cycle
        identity = torch.zeros(())
        if cfg.identity_weight > 0:
            identity = F.l1_loss(g_st(real_t), real_t) + F.l1_loss(g_ts(real_s), real_s)
            loss = loss + cfg.identity_weight * identity
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()

        # discriminators: real patches against (pooled) generated ones; halved to slow D against G
        for p in discs:
            p.requires_grad_(True)
        d_loss_t = 0.5 * (_lsgan(d_t(real_t), True) + _lsgan(d_t(pool_t.query(fake_t)), False))
        d_loss_s = 0.5 * (_lsgan(d_s(real_s), True) + _lsgan(d_s(pool_s.query(fake_s)), False))
        opt_d.zero_grad(set_to_none=True)
        (d_loss_t + d_loss_s).backward()
        opt_d.step()
        for s in schedule:
            s.step()

        values = {
            "gan": float(gan.detach()) / 2,  # per direction
            "cycle_l1": float(cycle.detach()) / 2,
            "identity_l1": float(identity.detach()) / 2,
            "d": float((d_loss_t + d_loss_s).detach()) / 2,
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if step % log_every == 0 or step == cfg.steps:
            n = log_every if step % log_every == 0 else step % log_every
            now = time.perf_counter()
            entry = {"step": float(step), **{k: v / n for k, v in sums.items()}, "lr": lr_now}
            entry["seconds_per_step"] = (now - t_window) / n
            model.history.append(entry)
            if log is not None:
                log(
                    f"cyclegan step {step}/{cfg.steps}: G {entry['gan']:.3f}, cycle L1 {entry['cycle_l1']:.4f}, "
                    f"identity L1 {entry['identity_l1']:.4f}, D {entry['d']:.3f}, lr {lr_now:.2e}, "
                    f"{entry['seconds_per_step']:.2f} s/step"
                )
            sums, t_window = {}, now
        if checkpoint is not None and (step % checkpoint_every == 0 or step == cfg.steps):
            state = {name: net.state_dict() for name, net in nets.items()}
            state |= {"step": step, "config": dataclasses.asdict(cfg), "opt_g": opt_g.state_dict(),
                      "opt_d": opt_d.state_dict(), "schedules": [sch.state_dict() for sch in schedule],
                      "pool_t": pool_t.items, "pool_s": pool_s.items, "rng": rng.bit_generator.state,
                      "torch_rng": torch.get_rng_state(), "history": model.history, "sums": sums}  # fmt: skip
            tmp = checkpoint.with_name(checkpoint.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, checkpoint)
    for m in (g_st, g_ts):
        m.eval()
    if log is not None:
        log(f"cyclegan: {cfg.steps} steps in {time.perf_counter() - t0:.0f} s")
    return model


# ----------------------------------------------------------------------------- inference


def _starts(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    return [*range(0, n - tile, step), n - tile]


def _ramp(n: int, overlap: int) -> np.ndarray:
    """1D blending weight of a tile: rises linearly over ``overlap`` voxels at each end, never zero."""
    i = np.arange(n, dtype=np.float64)
    return np.minimum(1.0, np.minimum(i + 1, n - i) / (overlap + 1))


@torch.no_grad()
def cyclegan_translate(gen: nn.Module, image: np.ndarray, tile: int = 48, overlap: int = 8) -> np.ndarray:
    """Translate a whole image (window units) with a generator, tile by tile.

    Tiles of ``tile`` voxels per side (a multiple of 4, at least 8) overlap by ``overlap`` voxels and
    are blended with linear ramps (padded convolutions and instance norm make each tile's output depend
    on the tile, so seams are averaged out). Along an axis shorter than the tile, one tile covers the
    axis, reflect-padded at the volume borders up to a multiple of 4 (at least 8) and cropped back: so
    where one tile covers the whole image the result is one whole-image forward pass. Eval mode,
    float32, the image's shape."""
    if tile % 4 or tile < 8:
        raise ValueError(f"tile {tile}: must be a multiple of 4 and at least 8 (the generator's two stride-2 levels)")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
    x = np.asarray(image, dtype=np.float32)
    dims = getattr(gen, "dims", x.ndim)
    if x.ndim != dims:
        raise ValueError(f"image of shape {x.shape} is {x.ndim}D; the generator is {dims}D")
    if x.size == 0:
        raise ValueError(f"image of shape {x.shape} is empty")
    if not np.isfinite(x).all():
        raise ValueError("image holds non-finite values (NaN or inf)")
    was_training = gen.training
    gen.eval()
    device = next(iter(gen.parameters()), torch.empty(0)).device
    acc = np.zeros(x.shape, np.float64)
    weight = np.zeros(x.shape, np.float64)
    sizes = [min(tile, n) for n in x.shape]
    pads = []  # (before, after) per axis: only where a tile covers the whole axis (so only at the borders)
    for t in sizes:
        need = max(8, 4 * math.ceil(t / 4)) - t
        pads.append((need // 2, need - need // 2))
    ramps = [_ramp(t, overlap if t < n else 0) for t, n in zip(sizes, x.shape, strict=True)]
    w = np.ones(1)
    for axis, r in enumerate(ramps):
        shape = [1] * x.ndim
        shape[axis] = len(r)
        w = w * r.reshape(shape)
    try:
        for start in itertools.product(*(_starts(n, t, t - overlap) for n, t in zip(x.shape, sizes, strict=True))):
            lo = [a - p[0] for a, p in zip(start, pads, strict=True)]
            hi = [a + t + p[1] for a, t, p in zip(start, sizes, pads, strict=True)]
            region = read_region(x, lo, hi)  # reflected outside the image
            y = gen(torch.from_numpy(np.ascontiguousarray(region))[None, None].to(device)).float().cpu().numpy()[0, 0]
            y = y[tuple(slice(p[0], p[0] + t) for p, t in zip(pads, sizes, strict=True))]
            sl = tuple(slice(a, a + t) for a, t in zip(start, sizes, strict=True))
            acc[sl] += y * w
            weight[sl] += w
    finally:
        gen.train(was_training)
    return (acc / weight).astype(np.float32)
