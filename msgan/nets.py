"""Networks: LR U-Net, HR valid-convolution ResNet generator, PatchGAN; 2D and 3D by ``dims``.

Shape comments use 3D names ``(B, C, D, H, W)``; in 2D drop ``D``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from msgan import tiling
from msgan.netrules import (
    LEVELS_RADIUS,
    LEVELS_SIGMA,
    ConditionKind,
    ContextKind,
    HRLevels,
    PaddingKind,
    check_hr_options,
    condition_channels,
    discriminator_channels,
    patchgan_min_size,
)

if TYPE_CHECKING:
    from msgan.config import Config
    from msgan.spec import ModelSpec

# The networks' rules (conditions and channels, HR options, PatchGAN minimum) live in the torch-free
# :mod:`msgan.netrules`, which the config checks at load; they are importable from here too.


# ----------------------------------------------------------------------------- factories


def _check_dims(dims: int) -> None:
    if dims not in (2, 3):
        raise ValueError(f"dims={dims!r}: must be 2 or 3")


def onednn_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`conv`'s layers run ``x`` through oneDNN directly: CPU float32 inference (no
    autograd, no autocast), zero padding given as numbers, and oneDNN present and enabled.

    PyTorch's own choice sends a small single-sample input (batch x channels x the first spatial
    sides <= 20480: every 3-channel head, the 1-channel tail of a small tile) to ``slow_conv3d``,
    which unfolds the input into a buffer of ``C_in x 27`` values per output voxel (125 MiB for
    one 64^3 tile's head) and runs slower (the demo head at 60^3: 48.0 against 14.5 ms on one
    thread; ``python benchmarks/memory_model.py --layers``)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.layout == torch.strided
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and getattr(conv, "padding_mode", "zeros") == "zeros"
        and not isinstance(getattr(conv, "padding", 0), str)
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
    )


def _conv_forward(m: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if onednn_applies(m, x):
        padding = cast(tuple[int, ...], m.padding)  # numbers: onednn_applies checked
        return torch.ops.aten.mkldnn_convolution(
            x, m.weight, m.bias, list(padding), list(m.stride), list(m.dilation), m.groups
        )
    return m._conv_forward(x, m.weight, m.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose CPU inference always takes oneDNN (:func:`onednn_applies`); training and
    every other device take PyTorch's usual path. Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, x)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose CPU inference always takes oneDNN (:func:`onednn_applies`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, x)


def conv(dims: int, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Module:
    _check_dims(dims)
    cls = Conv2d if dims == 2 else Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=padding)


def norm(kind: str, dims: int, channels: int) -> nn.Module:
    _check_dims(dims)
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True) if dims == 2 else nn.InstanceNorm3d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r}: must be one of ['instance', 'batch', 'none']")


def linear_mode(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


def crop(x: torch.Tensor, margin: Sequence[int] | int) -> torch.Tensor:
    """Remove ``margin`` voxels from both ends of every spatial axis (``int`` or one per axis)."""
    dims = x.ndim - 2
    m = [margin] * dims if isinstance(margin, int) else list(margin)
    index = [slice(None), slice(None)] + [slice(k, x.shape[2 + i] - k) for i, k in enumerate(m)]
    return x[tuple(index)]


def _halo_of(module: nn.Module) -> int:
    """Receptive-field radius of a chain of stride-1 convolutions: sum of dilation * (kernel - 1) / 2."""
    total = 0
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            k, d = m.kernel_size[0], m.dilation[0]
            total += d * (k - 1) // 2
    return total


# ----------------------------------------------------------------------------- LR U-Net


class ConvBlock(nn.Sequential):
    """Two padded 3x3(x3) convolutions, each with norm and LeakyReLU."""

    def __init__(self, dims: int, cin: int, cout: int, norm_kind: str) -> None:
        super().__init__(
            conv(dims, cin, cout, 3, padding=1),
            norm(norm_kind, dims, cout),
            nn.LeakyReLU(0.2),
            conv(dims, cout, cout, 3, padding=1),
            norm(norm_kind, dims, cout),
            nn.LeakyReLU(0.2),
        )


class UNet(nn.Module):
    """U-Net on a whole low-resolution image; any input size (padded to a multiple of 2**depth).

    ``noise_channels`` > 0 appends Gaussian noise channels in training mode (the
    paper's ``z``); in eval mode they are zeros so that a translation is reproducible.
    ``channels`` names the input channels (see :func:`condition_channels`); with
    ``source_residual`` the output is the ``image`` channel plus a learned correction.
    """

    halo = 0  # a whole-image network: no tiles
    context = "none"

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int = 1,
        width: int = 32,
        depth: int = 4,
        norm_kind: str = "instance",
        noise_channels: int = 0,
        max_width: int = 256,
        channels: Sequence[str] | None = None,
        source_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(dims)
        self.channels = tuple(channels) if channels is not None else ("edges",) * in_channels
        if len(self.channels) != in_channels:
            raise ValueError(
                f"channels {list(self.channels)}: {len(self.channels)} names for in_channels={in_channels}"
            )
        if source_residual and "image" not in self.channels:
            raise ValueError(f"source_residual=True needs an 'image' input channel, channels are {list(self.channels)}")
        self.source_residual = source_residual
        self.dims, self.depth, self.noise_channels, self.norm_kind = dims, depth, noise_channels, norm_kind
        widths = [min(width * 2**i, max_width) for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels + noise_channels
        for w in widths:
            self.down.append(ConvBlock(dims, cin, w, norm_kind))
            cin = w
        self.up = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.up.append(ConvBlock(dims, cin + w_skip, w_skip, norm_kind))
            cin = w_skip
        self.head = conv(dims, cin, out_channels, 1)
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]  # (D, H, W)
        m = 2**self.depth
        pad_to = [-(-s // m) * m for s in size]
        if self.norm_kind == "instance" and all(p == m for p in pad_to) and self.depth > 0:
            raise ValueError(
                f"input {tuple(size)} leaves a single bottleneck voxel at lr_generator.depth={self.depth}; "
                f"instance norm needs more: use a larger LR grid or a smaller depth"
            )
        pads: list[int] = []
        for s, p in zip(reversed(size), reversed(pad_to), strict=True):
            pads += [0, p - s]
        src = x[:, self.channels.index("image")][:, None] if self.source_residual else None  # (B, 1, D, H, W)
        if any(pads):
            x = F.pad(x, pads, mode="replicate")  # (B, Cin, D', H', W'), multiples of 2**depth
        if self.noise_channels:
            shape = (x.shape[0], self.noise_channels, *x.shape[2:])
            z = torch.randn(shape, device=x.device, dtype=x.dtype) if self.training else x.new_zeros(shape)
            x = torch.cat([x, z], dim=1)  # (B, Cin + Cz, D', H', W')
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)  # (B, w_i, D'/2^i, ...)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)  # (B, w_i, D'/2^(i+1), ...)
        for block in self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, w, 2x spatial)
            x = block(torch.cat([x, skips.pop()], dim=1))  # (B, w_skip, ...)
        y = torch.tanh(self.head(x))  # (B, Cout, D', H', W')
        y = y[(slice(None), slice(None), *(slice(0, s) for s in size))]  # (B, Cout, D, H, W)
        return y if src is None else src + y  # (B, Cout, D, H, W)


# ----------------------------------------------------------------------------- HR generator


class ValidResBlock(nn.Module):
    """conv-norm-act-conv-norm with valid 3x3 convolutions; the skip is cropped to match."""

    def __init__(self, dims: int, width: int, norm_kind: str, padding: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(dims, width, width, 3, padding=padding),
            norm(norm_kind, dims, width),
            nn.ReLU(),
            conv(dims, width, width, 3, padding=padding),
            norm(norm_kind, dims, width),
        )
        self.trim = 0 if padding else _halo_of(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crop(x, self.trim) + self.body(x)  # (B, W, n - 2*trim, ...)


class HRGenerator(nn.Module):
    """ResNet-block generator for one HR scale; no down/upsampling.

    Inputs: ``x`` holds the fine channels named by :attr:`channels` over ``core + 2*halo``
    (build them with :func:`msgan.engine.feed_box`); ``context`` says how the previous
    scale comes in:
      - ``upscaled``: as the first fine channel ``prev`` (upsampled x2);
      - ``wide``: as ``coarse``, at its own resolution over :meth:`context_box` (a wider
        field of view), through a coarse branch;
      - ``none``: not at all (the plain patch-wise baseline).
    ``condition`` names the source-side channels at this scale (``edges``, ``image`` or
    ``image+edges``; see :func:`condition_channels`).
    With ``padding="valid"`` (the default) the network is tile-exact: an output voxel
    depends only on inputs within ``halo`` of it. ``padding="same"`` exists only for the
    patch-wise baseline, whose per-patch zero padding is what makes its seams.
    ``residual`` adds the upsampled previous scale to the output (learn the detail only);
    ``source_residual`` adds the source image instead (output = source + correction).
    """

    def __init__(
        self,
        dims: int,
        width: int = 32,
        num_blocks: int = 6,
        norm_kind: str = "batch",
        context: ContextKind = "upscaled",
        context_layers: int = 4,
        residual: bool = True,
        padding: PaddingKind = "valid",
        condition: ConditionKind = "edges",
        source_residual: bool = False,
        levels: HRLevels = "source",
    ) -> None:
        super().__init__()
        _check_dims(dims)
        check_hr_options(context, norm_kind, residual, source_residual, condition, padding, levels)
        self.dims, self.context, self.residual, self.padding = dims, context, residual, padding
        self.condition, self.source_residual, self.levels = condition, source_residual, levels
        self.channels: tuple[str, ...] = (("prev",) if context == "upscaled" else ()) + condition_channels(condition)
        self.width = width
        p = 1 if padding == "same" else 0
        in_channels = len(self.channels)
        self.head = nn.Sequential(conv(dims, in_channels, width, 3, padding=p), norm(norm_kind, dims, width), nn.ReLU())
        self.blocks = nn.Sequential(*(ValidResBlock(dims, width, norm_kind, padding=p) for _ in range(num_blocks)))
        self.tail = conv(dims, width, 1, 3, padding=p)
        self.ctx: nn.Module | None = None
        if context == "wide":
            layers: list[nn.Module] = []
            for i in range(context_layers):
                layers += [conv(dims, 1 if i == 0 else width, width, 3), norm(norm_kind, dims, width), nn.ReLU()]
            self.ctx = nn.Sequential(*layers)
        t = torch.arange(-LEVELS_RADIUS, LEVELS_RADIUS + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / LEVELS_SIGMA) ** 2)
        self.register_buffer("_levels_kernel", g / g.sum(), persistent=False)  # fixed: not in the weights
        if levels == "previous" and self.halo < LEVELS_RADIUS:
            raise ValueError(
                f"levels='previous' needs a halo of at least {LEVELS_RADIUS} voxels, this one has {self.halo}"
            )

    @property
    def halo(self) -> int:
        """Receptive-field radius of the fine path: input tile = output core + 2 * halo (0 if padded)."""
        if self.padding == "same":
            return 0
        return _halo_of(self.head) + _halo_of(self.blocks) + _halo_of(self.tail)

    @property
    def head_halo(self) -> int:
        """Receptive-field radius of the head alone (where the coarse branch joins the fine path)."""
        return _halo_of(self.head)

    @property
    def context_halo(self) -> int:
        """Receptive-field radius of the coarse branch, in coarse voxels (``wide`` only)."""
        return 0 if self.ctx is None else _halo_of(self.ctx)

    def context_box(self, start: Sequence[int], stop: Sequence[int]) -> tuple[list[int], list[int]]:
        """Coarse box the ``wide`` branch needs for the fine core [start, stop): :func:`msgan.tiling.context_box`."""
        if self.context != "wide":
            raise ValueError(f"context_box is for context='wide', this generator has context={self.context!r}")
        return tiling.context_box(start, stop, self.halo, self.head_halo, self.context_halo)

    def forward(self, x: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        h = self.halo
        f = self.head(x)  # (B, W, core + 2(h - 1), ...)
        if self.ctx is not None:
            if coarse is None:
                raise ValueError("context='wide' needs the coarse previous-scale crop as `coarse`")
            hh = _halo_of(self.head)
            off = (hh - h) % 2  # fine offset of the head output inside the upsampled coarse grid
            c = F.interpolate(self.ctx(coarse), scale_factor=2, mode="nearest")  # (B, W, 2m, ...)
            n = f.shape[2:]
            if any(off + k > ck for k, ck in zip(n, c.shape[2:], strict=True)):
                raise ValueError(
                    f"coarse crop {tuple(coarse.shape[2:])} is too small for fine input {tuple(x.shape[2:])}"
                )
            f = f + c[(slice(None), slice(None), *(slice(off, off + k) for k in n))]  # (B, W, n...)
        y = self.tail(self.blocks(f))  # (B, 1, core, ...)
        if self.source_residual:
            i = self.channels.index("image")
            src = crop(x[:, i : i + 1], h)  # (B, 1, core, ...)
            if self.levels == "previous":  # the previous scale's low frequencies replace the source's
                r = LEVELS_RADIUS
                src = src + self._smooth(crop(x[:, :1] - x[:, i : i + 1], h - r))
            return src + y  # (B, 1, core, ...): the source image (on the previous scale's levels) + correction
        if not self.residual:
            return torch.tanh(y)
        if self.context == "upscaled":
            base = crop(x[:, :1], h)  # (B, 1, core, ...): the upsampled previous scale
        else:
            assert coarse is not None
            base = self.upsampled_context(coarse, y.shape[2:])  # (B, 1, core, ...)
        return base + y  # (B, 1, core, ...)

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, ...) through the fixed separable Gaussian of ``levels='previous'``, valid convolutions:
        each side loses :data:`LEVELS_RADIUS` voxels (tile-exact, like every other layer)."""
        k = cast(torch.Tensor, self._levels_kernel).to(x.dtype)
        for axis in range(self.dims):
            shape = [1, 1] + [1] * self.dims
            shape[2 + axis] = k.numel()
            w = k.reshape(shape)
            x = F.conv2d(x, w) if self.dims == 2 else F.conv3d(x, w)
        return x

    def upsampled_context(self, coarse: torch.Tensor, core: Sequence[int]) -> torch.Tensor:
        """The coarse crop of :meth:`context_box` upsampled x2 (linear) over the core: ``(B, 1, *core)``."""
        up = F.interpolate(coarse, scale_factor=2, mode=linear_mode(self.dims), align_corners=False)
        lead = 2 * self.context_halo - 2 * ((_halo_of(self.head) - self.halo) // 2)  # core offset in `up`
        return up[(slice(None), slice(None), *(slice(lead, lead + k) for k in core))]


# ----------------------------------------------------------------------------- PatchGAN


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``num_layers`` stride-2 4x4 convolutions, two stride-1 ones, one logit per patch."""

    def __init__(self, dims: int, in_channels: int, width: int = 64, num_layers: int = 3, norm_kind: str = "instance"):
        super().__init__()
        _check_dims(dims)
        layers: list[nn.Module] = [conv(dims, in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        cin = width
        for i in range(1, num_layers):
            cout = width * min(2**i, 8)
            layers += [conv(dims, cin, cout, 4, stride=2, padding=1), norm(norm_kind, dims, cout), nn.LeakyReLU(0.2)]
            cin = cout
        cout = width * min(2**num_layers, 8)
        layers += [conv(dims, cin, cout, 4, stride=1, padding=1), norm(norm_kind, dims, cout), nn.LeakyReLU(0.2)]
        layers += [conv(dims, cout, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)
        self.num_layers = num_layers

    @property
    def receptive_field(self) -> int:
        rf = 1
        convs = [m for m in self.net if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        for m in reversed(convs):
            rf = (rf - 1) * m.stride[0] + m.kernel_size[0]
        return rf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        need = patchgan_min_size(self.num_layers)
        if min(x.shape[2:]) < need:
            raise ValueError(
                f"discriminator input {tuple(x.shape[2:])} is smaller than the {need} voxels per side that "
                f"num_layers={self.num_layers} needs (receptive field {self.receptive_field})"
            )
        return self.net(x)  # (B, 1, d, h, w): one logit per patch


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- construction from a config


def build_generator(cfg: Config | ModelSpec, scale: int) -> nn.Module:
    """The generator of ``scale`` as the model spec (or a config) describes it (scale 0: U-Net, else HR ResNet)."""
    if scale == 0:
        g = cfg.lr_generator
        names = condition_channels(cfg.condition)
        return UNet(cfg.dims, len(names), 1, g.width, g.depth, g.norm, g.noise_channels, channels=names,
                    source_residual=cfg.source_residual)  # fmt: skip
    h = cfg.hr_generator
    return HRGenerator(cfg.dims, h.width, h.num_blocks, h.norm, h.context, h.context_layers, h.residual,
                       condition=cfg.condition, source_residual=cfg.source_residual, levels=h.levels)  # fmt: skip


def build_discriminator(cfg: Config | ModelSpec, scale: int) -> PatchDiscriminator:
    """PatchGAN on (conditions, image) for the generator of ``scale`` (see :func:`discriminator_channels`)."""
    d = cfg.discriminator
    return PatchDiscriminator(cfg.dims, discriminator_channels(scale, cfg.condition), d.width, d.num_layers, d.norm)
