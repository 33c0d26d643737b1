"""3D versions of the paper's memory baselines (Fig. 2): DCGAN (3D-GAN of Wu et al.), Pix2Pix
(U-Net generator + PatchGAN), and the final stage of PGGAN; straight 2D->3D translations as in the paper."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msgan.nets import PatchDiscriminator


def _levels(n: int, base: int = 4) -> int:
    k = round(math.log2(n / base))
    if base * 2**k != n:
        raise ValueError(f"side {n} is not {base} * 2^k")
    return k


class DCGAN3D(nn.Module):
    """Generator: z (200) -> 4^3 x 512 -> ... -> N^3 x 1 by stride-2 transposed convolutions."""

    def __init__(self, n: int, z: int = 200) -> None:
        super().__init__()
        k = _levels(n)
        ch = [max(512 >> i, 8) for i in range(k)] + [1]
        layers: list[nn.Module] = [nn.ConvTranspose3d(z, ch[0], 4), nn.BatchNorm3d(ch[0]), nn.ReLU()]
        for i in range(k):
            layers.append(nn.ConvTranspose3d(ch[i], ch[i + 1], 4, stride=2, padding=1))
            layers += [nn.BatchNorm3d(ch[i + 1]), nn.ReLU()] if i < k - 1 else [nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, 1, N, N, N)


class DCGANDisc3D(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        k = _levels(n)
        ch = [1] + [min(512, 512 >> (k - 1 - i)) for i in range(k)]
        layers: list[nn.Module] = []
        for i in range(k):
            layers += [
                nn.Conv3d(ch[i], ch[i + 1], 4, stride=2, padding=1),
                nn.BatchNorm3d(ch[i + 1]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv3d(ch[-1], 1, 4))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, 1, 1, 1)


class _UBlock(nn.Module):
    """pix2pix's skip block: down, (inner), up, concatenated with its input."""

    def __init__(self, outer: int, inner: int, sub: nn.Module | None, outermost: bool = False, cin: int = 0):
        super().__init__()
        cin = cin or outer
        self.down = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv3d(cin, inner, 4, stride=2, padding=1))
        if not outermost and sub is not None:
            self.down.append(nn.BatchNorm3d(inner))
        self.sub = sub
        up_in = inner * 2 if sub is not None else inner
        self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose3d(up_in, outer, 4, stride=2, padding=1))
        self.up.append(nn.Tanh() if outermost else nn.BatchNorm3d(outer))
        self.outermost = outermost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        if self.sub is not None:
            y = self.sub(y)
        y = self.up(y)
        return y if self.outermost else torch.cat([x, y], 1)


class Pix2PixUNet3D(nn.Module):
    """pix2pix U-Net (ngf 64, down to 1 voxel: log2(N) levels), 1 channel in and out."""

    def __init__(self, n: int, ngf: int = 64) -> None:
        super().__init__()
        depth = _levels(n, 1)
        widths = [min(ngf * 2**i, ngf * 8) for i in range(depth)]
        block: nn.Module | None = None
        for i in reversed(range(1, depth)):
            block = _UBlock(widths[i - 1], widths[i], block)
        self.net = _UBlock(1, widths[0], block, outermost=True, cin=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PGGANGen3D(nn.Module):
    """PGGAN generator at its final stage: 4^3 -> N^3, two 3^3 convolutions per resolution."""

    def __init__(self, n: int, z: int = 512) -> None:
        super().__init__()
        k = _levels(n)
        self.ch = [min(512, 16384 >> (i + 5)) if i > 2 else 512 for i in range(k + 1)]  # 512 up to 32^3, then halving
        self.fc = nn.Linear(z, self.ch[0] * 64)
        self.first = nn.Conv3d(self.ch[0], self.ch[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(self.ch[i], self.ch[i + 1], 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv3d(self.ch[i + 1], self.ch[i + 1], 3, padding=1),
                nn.LeakyReLU(0.2),
            )
            for i in range(k)
        )
        self.to_rgb = nn.Conv3d(self.ch[-1], 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.fc(z.flatten(1)), 0.2).view(z.shape[0], self.ch[0], 4, 4, 4)
        x = F.leaky_relu(self.first(x), 0.2)
        for b in self.blocks:
            x = b(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.to_rgb(x)  # (B, 1, N, N, N)


class PGGANDisc3D(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        k = _levels(n)
        ch = [min(512, 16384 >> (i + 5)) if i > 2 else 512 for i in range(k + 1)][::-1]
        self.from_rgb = nn.Conv3d(1, ch[0], 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(ch[i], ch[i], 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv3d(ch[i], ch[i + 1], 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.AvgPool3d(2),
            )
            for i in range(k)
        )
        self.last = nn.Sequential(nn.Conv3d(ch[-1], ch[-1], 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
                                  nn.Linear(ch[-1] * 64, 1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.from_rgb(x), 0.2)
        for b in self.blocks:
            x = b(x)
        return self.last(x)


def build(name: str, n: int) -> tuple[nn.Module, nn.Module, tuple[int, ...], tuple[int, ...], bool]:
    """(G, D, G input shape, D input shape, conditional) for a model name at image side ``n``."""
    from msgan.nets import HRGenerator, UNet

    if name == "DCGAN":
        return DCGAN3D(n), DCGANDisc3D(n), (1, 200, 1, 1, 1), (1, 1, n, n, n), False
    if name == "Pix2Pix":
        return Pix2PixUNet3D(n), PatchDiscriminator(3, 2, 64, 3, "batch"), (1, 1, n, n, n), (1, 2, n, n, n), True
    if name == "PGGAN":
        return PGGANGen3D(n), PGGANDisc3D(n), (1, 512), (1, 1, n, n, n), False
    if name == "Ours LR 64":  # the whole image at 64^3, whatever the full size
        return (
            UNet(3, 1, 1, 32, 4, "instance"),
            PatchDiscriminator(3, 2, 32, 3),
            (1, 1, 64, 64, 64),
            (1, 2, 64, 64, 64),
            True,
        )
    if name == "Ours HR 32":  # 32^3 patches (+ halo), whatever the full size
        g = HRGenerator(3, 32, 6, "none")
        s = 32 + 2 * g.halo
        return g, PatchDiscriminator(3, 3, 32, 3), (1, 2, s, s, s), (1, 3, 32, 32, 32), True
    raise ValueError(f"model {name!r}: one of DCGAN, Pix2Pix, PGGAN, Ours LR 64, Ours HR 32")


MODELS = ("DCGAN", "Pix2Pix", "PGGAN", "Ours LR 64", "Ours HR 32")
