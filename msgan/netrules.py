"""The networks' rules without the networks: conditioning values and channels, the HR generator's option
rules, the PatchGAN's minimum input. Torch-free (standard library only), so that the configuration
checks them at load without importing torch; :mod:`msgan.nets` builds its networks on these same rules.
"""

from __future__ import annotations

import typing
from typing import Literal

Dims = Literal[2, 3]
NormKind = Literal["instance", "batch", "none"]
VoxelNorm = Literal["batch", "none"]  # norms that act voxel by voxel at inference: tile-exact
ContextKind = Literal["upscaled", "wide", "none"]
HRContext = Literal["upscaled", "wide"]  # what a configured HR scale may use ("none" is the baseline's)
ConditionKind = Literal["edges", "image", "image+edges"]
PaddingKind = Literal["valid", "same"]
HRLevels = Literal["source", "previous"]  # where a source-residual HR output takes its low frequencies from

CONDITIONS: tuple[str, ...] = typing.get_args(ConditionKind)
CONTEXTS: tuple[str, ...] = typing.get_args(ContextKind)
VOXEL_NORMS: tuple[str, ...] = typing.get_args(VoxelNorm)
PADDINGS: tuple[str, ...] = typing.get_args(PaddingKind)
LEVELS: tuple[str, ...] = typing.get_args(HRLevels)
LEVELS_SIGMA = 1.0  # voxels: the Gaussian that splits levels (low frequencies) from detail, levels='previous'
LEVELS_RADIUS = 2  # voxels: where that Gaussian is cut (valid convolutions: the tile's halo must cover it)


def condition_channels(condition: str) -> tuple[str, ...]:
    """Names of the source-side inputs a generator reads at its own scale, in channel order:
    ``image`` (the source image, window units) and/or ``edges`` (its edge image)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition={condition!r}: must be one of {list(CONDITIONS)}")
    return tuple(n for n in ("image", "edges") if n in condition.split("+"))


def discriminator_channels(scale: int, condition: str) -> int:
    """Input channels of the PatchGAN of ``scale``: its conditions over the core (HR scales: the previous
    scale upsampled first, whatever the context) then the source-side channels, plus the image."""
    return len(condition_channels(condition)) + (1 if scale == 0 else 2)


def check_hr_options(
    context: str, norm_kind: str, residual: bool, source_residual: bool, condition: str, padding: str = "valid",
    levels: str = "source",
) -> None:  # fmt: skip
    """The rules an HR generator's options obey (the config checks them at load through this same function)."""
    if context not in CONTEXTS:
        raise ValueError(f"context={context!r}: must be one of {list(CONTEXTS)}")
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r}: must be 'valid' or 'same'")
    if padding == "valid" and norm_kind not in VOXEL_NORMS:
        raise ValueError(
            f"norm={norm_kind!r}: a tile-exact HR generator needs a voxel-wise norm ('batch' or 'none'); "
            f"{norm_kind} norm uses per-tile statistics, so the output would depend on the tiling"
        )
    if residual and context == "none":
        raise ValueError("residual=True needs the previous scale: use context 'upscaled' or 'wide'")
    if residual and source_residual:
        raise ValueError(
            "residual=True and source_residual=True: an output is one base plus a correction, the previous "
            "scale (residual) or the source (source_residual); set residual=false"
        )
    if source_residual and "image" not in condition_channels(condition):
        raise ValueError(
            f"source_residual=True needs the source image among the conditions: condition={condition!r} "
            f"(use 'image' or 'image+edges')"
        )
    if context == "wide" and padding == "same":
        raise ValueError("context='wide' needs padding='valid'")
    if levels not in LEVELS:
        raise ValueError(f"levels={levels!r}: must be one of {list(LEVELS)}")
    if levels == "previous" and not (source_residual and context == "upscaled" and padding == "valid"):
        raise ValueError(
            "levels='previous' (the source's detail on the previous scale's levels) needs source_residual=True, "
            "context='upscaled' and padding='valid'"
        )


def patchgan_min_size(num_layers: int) -> int:
    """Smallest input side that gives a PatchGAN with ``num_layers`` stride-2 layers one output."""
    return 3 * 2**num_layers
