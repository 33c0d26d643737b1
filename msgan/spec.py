"""The model spec: what defines a cascade's networks and what the model needs to translate, saved with its
weights (``manifest.json``); never the run that made it (training, deployment, data, job settings).

:class:`ModelSpec` holds the dimensions, the scales, the conditioning, the intensity window and its outside
rule, the edges, the three networks, the training patch the networks were made for (resume, fine-tune) and
the inference defaults that decide output bytes (:class:`InferenceDefaults`, which a run may override). It
owns the networks' rules (:mod:`msgan.netrules`): a spec that breaks one cannot be built. Torch-free
(standard library and :mod:`msgan.netrules` only), so that a spec loads and checks without torch.

:mod:`msgan.config` loads a YAML experiment (the spec plus its run settings) on the same sections and the
same loader (:func:`build`): ``Config.spec()`` is the spec, ``Config.from_spec(spec, run)`` the experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from msgan.netrules import (
    ConditionKind,
    Dims,
    HRContext,
    HRLevels,
    NormKind,
    VoxelNorm,
    check_hr_options,
    condition_channels,
    patchgan_min_size,
)


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key, value and rule."""


class RuleError(ConfigError):
    """One value breaking one rule: ``KEY=VALUE: RULE``. Keeps its parts, so that a :class:`msgan.config.Config`
    names the key as its YAML spells it (the spec's ``hr_patch`` is a config's ``train.hr_patch``)."""

    def __init__(self, key: str, value: object, rule: str) -> None:
        super().__init__(f"{key}={value!r}: {rule}")
        self.key, self.value, self.rule = key, value, rule

    def renamed(self, key: str) -> RuleError:
        return RuleError(key, self.value, self.rule)


# ----------------------------------------------------------------------------- the sections of a spec


@dataclass(frozen=True)
class IntensityConfig:
    """Window (in input units, HU for CT) mapped linearly onto [-1, 1]; the networks see and make
    values clipped to it.

    ``outside`` says what a translation holds where the source lies outside the window:
    ``clip``: the window's ends (the paper; bone above ``high`` comes out at ``high``);
    ``source``: the full range is kept: the output is ``w * translated + (1 - w) * source``,
    with ``w = 1`` inside and below the window falling smoothly (a half cosine) to 0 over ``blend``
    window widths above it, so dense bone and metal pass through untranslated; below the window
    (air and noise) the translation holds, clipped to ``low``.

    ``normalize`` says what units the window is in. ``none``: the input's own (HU for CT: a fixed
    scale). ``percentile`` (data without a fixed scale, MR): every volume, source and target alike,
    is first mapped linearly so that the ``percentiles`` [low, high] of its body become 0 and 1000
    "normalised units" (:mod:`msgan.normalize`), at training and at inference; the window is then in
    normalised units and so is a translation. Needs ``outside: clip``.
    """

    low: float = -1024.0
    high: float = 1024.0
    outside: Literal["clip", "source"] = "clip"
    blend: float = 0.05  # width of the blend above the window, in window widths
    normalize: Literal["none", "percentile"] = "none"
    percentiles: tuple[float, float] = (1.0, 99.0)  # of the body; mapped onto 0 and 1000 normalised units


@dataclass(frozen=True)
class EdgeConfig:
    """Edge images that condition every scale, extracted from the windowed image at that scale.

    ``gradient``: magnitude of the Gaussian-smoothed gradient, squashed by ``tanh(g / scale)``.
    ``canny``: SimpleITK's Canny detector on the smoothed image (binary edges).
    """

    method: Literal["gradient", "canny"] = "gradient"
    sigma: float = 1.0  # Gaussian smoothing in voxels of the scale
    scale: float = 0.15  # gradient magnitude (intensity units per voxel) that maps to tanh(1)
    canny_lower: float = 0.05
    canny_upper: float = 0.15


@dataclass(frozen=True)
class LRGeneratorConfig:
    """U-Net on the whole low-resolution edge image (padded convolutions)."""

    width: int = 32
    depth: int = 4
    norm: NormKind = "instance"
    noise_channels: int = 0


@dataclass(frozen=True)
class HRGeneratorConfig:
    """ResNet-block generator with valid convolutions: tile-exact by construction.

    ``context``: ``upscaled`` feeds the previous scale upsampled x2 over the same
    patch (the paper); ``wide`` feeds the previous scale at its own resolution over a
    wider field of view through a coarse branch of ``context_layers`` valid convolutions.
    ``norm`` must act voxel by voxel at inference (``batch`` or ``none``): a norm with
    per-tile statistics would make the output depend on the tiling. ``none`` is the
    default: in our runs batch norm's train/eval gap cost far more than it gave.
    """

    width: int = 32
    num_blocks: int = 6
    norm: VoxelNorm = "none"
    context: HRContext = "upscaled"
    context_layers: int = 4
    residual: bool = True
    # with source_residual: "source" = source + correction; "previous" = the source's detail on the previous
    # scale's levels + correction (source + G_sigma * (previous - source) + correction; sigma netrules.LEVELS_SIGMA)
    levels: HRLevels = "source"


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN on (conditions, image)."""

    width: int = 32
    num_layers: int = 3
    norm: NormKind = "instance"


HR_PATCH = 32  # default output core of an HR training patch (voxels per side)


@dataclass(frozen=True)
class InferenceDefaults:
    """What decides a translation's bytes besides the weights, the input and the device: the memory budget
    picks the tile, tiles run ``batch_size`` per forward pass (:mod:`msgan.engine`), ``amp`` runs them in bf16
    autocast on CUDA (the ``train.amp`` the model was trained with). The model carries them; a run may
    override them (``--set inference.batch_size=4``)."""

    memory_budget_mb: float = 2048.0  # peak of one forward pass (batch_size tiles); picks the tile size
    batch_size: int = 1  # tiles per forward pass
    amp: bool = False  # bf16 autocast, on CUDA devices only


@dataclass(frozen=True)
class ModelSpec:
    """A cascade's definition: ``num_scales`` generators (an LR U-Net, then HR generators each doubling the
    resolution) reading ``condition`` of the source (``edges``, ``image`` or ``image+edges``) at their own
    scale; ``source_residual``: every generator outputs the source plus a correction. ``hr_patch`` is the HR
    training patch the discriminator was built for (resume, fine-tune). Checked at construction."""

    dims: Dims = 3
    num_scales: int = 4
    condition: ConditionKind = "edges"
    source_residual: bool = False
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    edges: EdgeConfig = field(default_factory=EdgeConfig)
    lr_generator: LRGeneratorConfig = field(default_factory=LRGeneratorConfig)
    hr_generator: HRGeneratorConfig = field(default_factory=HRGeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    hr_patch: int = HR_PATCH
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)

    def __post_init__(self) -> None:
        check_spec(self)

    @property
    def channels(self) -> tuple[str, ...]:
        """The source-side inputs every generator reads, in channel order (netrules.condition_channels)."""
        return condition_channels(self.condition)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        """A spec from plain values (a manifest's ``spec``): unknown keys, wrong types and broken rules are a
        :class:`ConfigError` naming the key."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"expected a mapping of ModelSpec fields, got a {type(values).__name__}")
        return build(cls, plain(dict(values)))


# ----------------------------------------------------------------------------- the networks' rules


def require(ok: bool, key: str, value: object, rule: str) -> None:
    """Raise :class:`RuleError` (``key``, ``value``, ``rule``) unless ``ok``."""
    if not ok:
        raise RuleError(key, value, rule)


def check_spec(spec: ModelSpec) -> None:
    """Every rule of a spec, in this order (the first broken one is reported)."""
    require(spec.num_scales >= 1, "num_scales", spec.num_scales, "must be >= 1 (the LR scale)")
    require(spec.dims in (2, 3), "dims", spec.dims, "must be 2 or 3")
    _check_intensity(spec.intensity)
    _check_hr_options(spec)
    _check_edges(spec.edges)
    _check_network_sizes(spec)
    require(
        spec.hr_patch >= 2 and spec.hr_patch % 2 == 0,
        "hr_patch",
        spec.hr_patch,
        "must be even and >= 2 (tiles start on even voxels so the wide context stays aligned)",
    )
    inf = spec.inference
    require(inf.memory_budget_mb > 0, "inference.memory_budget_mb", inf.memory_budget_mb, "must be > 0")
    require(inf.batch_size >= 1, "inference.batch_size", inf.batch_size, "must be >= 1")
    _check_patch_fits_discriminator(spec)


def _check_intensity(i: IntensityConfig) -> None:
    require(i.high > i.low, "intensity.high", i.high, f"must exceed intensity.low={i.low}")
    require(i.blend >= 0, "intensity.blend", i.blend, "must be >= 0 (window widths)")
    p_low, p_high = i.percentiles
    require(
        0.0 < p_low < p_high < 100.0,
        "intensity.percentiles",
        list(i.percentiles),
        "must be [low, high] with 0 < low < high < 100 (percentiles of the body)",
    )
    require(
        i.normalize == "none" or i.outside == "clip",
        "intensity.outside",
        i.outside,
        f"must be 'clip' with intensity.normalize={i.normalize!r}: a translation is in normalised units, "
        "a source passed through would keep its own",
    )


def _check_hr_options(spec: ModelSpec) -> None:
    """The HR generator's option rules (:func:`msgan.netrules.check_hr_options`, as the network applies them)."""
    h = spec.hr_generator
    try:
        check_hr_options(h.context, h.norm, h.residual, spec.source_residual, spec.condition, levels=h.levels)
    except ValueError as err:
        raise ConfigError(f"hr_generator (with condition={spec.condition!r}, source_residual={spec.source_residual}): "
                          f"{err}") from None  # fmt: skip


def _check_edges(e: EdgeConfig) -> None:
    require(e.sigma >= 0, "edges.sigma", e.sigma, "must be >= 0")
    require(e.scale > 0, "edges.scale", e.scale, "must be > 0")


def _check_network_sizes(spec: ModelSpec) -> None:
    for name, section in (
        ("lr_generator", spec.lr_generator),
        ("hr_generator", spec.hr_generator),
        ("discriminator", spec.discriminator),
    ):
        require(section.width >= 1, f"{name}.width", section.width, "must be >= 1")
    require(spec.lr_generator.depth >= 0, "lr_generator.depth", spec.lr_generator.depth, "must be >= 0")
    require(spec.hr_generator.num_blocks >= 0, "hr_generator.num_blocks", spec.hr_generator.num_blocks, "must be >= 0")
    require(
        spec.hr_generator.context_layers >= 1,
        "hr_generator.context_layers",
        spec.hr_generator.context_layers,
        "must be >= 1 (the wide branch needs one coarse voxel of margin)",
    )
    require(
        spec.discriminator.num_layers >= 1, "discriminator.num_layers", spec.discriminator.num_layers, "must be >= 1"
    )


def _check_patch_fits_discriminator(spec: ModelSpec) -> None:
    """An HR training patch must give the PatchGAN (:func:`msgan.netrules.patchgan_min_size`) one output."""
    if spec.num_scales <= 1:
        return
    need = patchgan_min_size(spec.discriminator.num_layers)
    require(
        spec.hr_patch >= need,
        "hr_patch",
        spec.hr_patch,
        f"is smaller than the {need} voxels a PatchGAN with discriminator.num_layers="
        f"{spec.discriminator.num_layers} needs for one output; raise the patch or lower num_layers",
    )


# ----------------------------------------------------------------------------- loading plain values

T = TypeVar("T")


def plain(value: Any) -> Any:
    """Dicts and lists all the way down (tuples become lists), as JSON and YAML hold them."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key + ".")
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options:
            hint = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{key}={value!r}: must be one of {list(options)}{extra}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    return value


def build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """``cls`` (a frozen dataclass of sections) from plain ``values``: unknown keys are refused with the valid
    ones listed, every value is checked against its field's type, then ``cls`` checks its own rules."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown key {prefix}{key!r}; valid keys here: {', '.join(names)}.{extra}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in values.items()}
    return cls(**kwargs)
