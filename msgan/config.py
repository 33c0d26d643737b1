"""Experiment configuration: frozen dataclasses loaded from YAML.

Unknown keys are rejected with the valid ones listed, ``--set a.b=c`` overrides
any field, and cross-field rules are checked at load time, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from msgan.netrules import ConditionKind, Dims, HRContext, NormKind, VoxelNorm, check_hr_options, patchgan_min_size


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key, value and rule."""


Device = Literal["auto", "gpu", "cpu"]  # auto: a GPU when the cluster has GPUs


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
    """

    low: float = -1024.0
    high: float = 1024.0
    outside: Literal["clip", "source"] = "clip"
    blend: float = 0.05  # width of the blend above the window, in window widths


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


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN on (conditions, image)."""

    width: int = 32
    num_layers: int = 3
    norm: NormKind = "instance"


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's corruptions of the previous-scale condition and of the edges.

    Each corruption fires independently with its probability; its strength is
    drawn uniformly from its ``[min, max]`` range (intensities in window units).
    """

    noise_p: float = 0.3
    noise_std: tuple[float, float] = (0.02, 0.08)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    resolution_p: float = 0.3
    resolution_factor: tuple[float, float] = (1.5, 3.0)
    edge_noise_p: float = 0.3
    edge_noise_std: tuple[float, float] = (0.02, 0.08)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    steps_per_scale: tuple[int, ...] = ()  # one entry per scale (LR first) overrides `steps`
    batch_size: int = 4
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    gan_loss: Literal["lsgan", "bce"] = "lsgan"
    l1_weight: float = 100.0
    hr_patch: int = 32  # output core of an HR training patch (voxels per side), even
    foreground_threshold: float = -0.8  # window units; patches are centred on voxels above it
    checkpoint_every: int = 200
    log_every: int = 10
    amp: bool = False  # bf16 autocast, used on CUDA devices only
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default


@dataclass(frozen=True)
class InferenceConfig:
    """Inference: the tile comes from a memory budget; the batch job's actor pool from the rest.
    A registered model carries these; a batch job may override them (``--set inference.actors=8``)."""

    memory_budget_mb: float = 2048.0  # peak of one forward pass (batch_size tiles); picks the tile size
    batch_size: int = 1  # tiles per forward pass
    actors: int = 2  # Ray Data actors that hold the cascade
    cpus_per_actor: float = 0.5  # fractional on small machines: the read tasks need CPU too
    gpus_per_actor: float = 1.0  # used when the cluster has GPUs; 0.5 packs two actors per GPU
    device: Device = "auto"  # the Ray Data actors' (translate-batch); see JobConfig.device for training


@dataclass(frozen=True)
class PhantomDataConfig:
    shape: tuple[int, ...] = (64, 64, 64)
    seeds: tuple[int, ...] = (1, 2, 3, 4)  # one training volume per seed
    kernel: Literal["soft", "sharp"] = "soft"
    holdout_seeds: tuple[int, ...] = (1000,)  # validation; the job translates their sharp kernel


@dataclass(frozen=True)
class DataConfig:
    """Training volumes: synthetic phantoms, or image files (NIfTI/MHA) by path or glob."""

    source: Literal["phantom", "files"] = "phantom"
    phantom: PhantomDataConfig = field(default_factory=PhantomDataConfig)
    paths: tuple[str, ...] = ()
    holdout_paths: tuple[str, ...] = ()  # validation volumes (files); translated at the end of the job


@dataclass(frozen=True)
class JobConfig:
    """How the Ray job runs: where it keeps things, what it asks of the cluster, what it registers."""

    name: str = ""  # empty: derived from config and data, so that resubmitting the same job resumes it
    storage: str = "runs/storage"  # local path / file:// URI, or s3://bucket/prefix
    experiment: str = "msgan"  # MLflow experiment
    registered_model: str = "msgan-cascade"
    device: Device = "auto"  # the training workers'; auto: a GPU per worker when the cluster has GPUs
    workers_per_scale: int = 1  # > 1: data-parallel (DDP) training within a scale
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # retries of a failed scale, each from its last checkpoint


@dataclass(frozen=True)
class Config:
    """An experiment. ``condition`` names what every generator sees of the source at its own scale:
    ``edges`` (the paper: generation from edges), ``image`` (the windowed source image) or
    ``image+edges``; HR scales also see the previous scale (``hr_generator.context``).
    ``source_residual``: every generator outputs the source image plus a learned correction
    (needs the image among the conditions; ``hr_generator.residual``, previous scale plus a
    correction, must then be off)."""

    dims: Dims = 3
    num_scales: int = 4  # LR scale + (num_scales - 1) HR scales, each doubling resolution
    seed: int = 0
    condition: ConditionKind = "edges"
    source_residual: bool = False
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    edges: EdgeConfig = field(default_factory=EdgeConfig)
    lr_generator: LRGeneratorConfig = field(default_factory=LRGeneratorConfig)
    hr_generator: HRGeneratorConfig = field(default_factory=HRGeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    job: JobConfig = field(default_factory=JobConfig)

    def __post_init__(self) -> None:
        _check_rules(self)

    def steps_for(self, scale: int) -> int:
        """Training steps of ``scale``: ``train.steps_per_scale[scale]`` when given, else ``train.steps``."""
        per = self.train.steps_per_scale
        return per[scale] if per else self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides, e.g. ``cfg.replace(**{"train.steps": 5})``."""
        return from_dict(self.to_dict(), overrides=overrides)


# ----------------------------------------------------------------------------- rules


def _require(ok: bool, key: str, value: object, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def _check_rules(cfg: Config) -> None:
    """Every cross-field rule, in this order (the first broken one is reported)."""
    _require(cfg.num_scales >= 1, "num_scales", cfg.num_scales, "must be >= 1 (the LR scale)")
    _check_intensity(cfg.intensity)
    _check_hr_options(cfg)
    _check_edges(cfg.edges)
    _check_network_sizes(cfg)
    _check_augment(cfg.augment)
    _check_train(cfg)
    _check_inference(cfg.inference)
    _check_patch_fits_discriminator(cfg)
    _check_job(cfg.job)
    _check_data(cfg)


def _check_intensity(i: IntensityConfig) -> None:
    _require(i.high > i.low, "intensity.high", i.high, f"must exceed intensity.low={i.low}")
    _require(i.blend >= 0, "intensity.blend", i.blend, "must be >= 0 (window widths)")


def _check_hr_options(cfg: Config) -> None:
    """The HR generator's option rules (:func:`msgan.netrules.check_hr_options`, as the network applies them)."""
    h = cfg.hr_generator
    try:
        check_hr_options(h.context, h.norm, h.residual, cfg.source_residual, cfg.condition)
    except ValueError as err:
        raise ConfigError(f"hr_generator (with condition={cfg.condition!r}, source_residual={cfg.source_residual}): "
                          f"{err}") from None  # fmt: skip


def _check_edges(e: EdgeConfig) -> None:
    _require(e.sigma >= 0, "edges.sigma", e.sigma, "must be >= 0")
    _require(e.scale > 0, "edges.scale", e.scale, "must be > 0")


def _check_network_sizes(cfg: Config) -> None:
    for name, section in (
        ("lr_generator", cfg.lr_generator),
        ("hr_generator", cfg.hr_generator),
        ("discriminator", cfg.discriminator),
    ):
        _require(section.width >= 1, f"{name}.width", section.width, "must be >= 1")
    _require(cfg.lr_generator.depth >= 0, "lr_generator.depth", cfg.lr_generator.depth, "must be >= 0")
    _require(cfg.hr_generator.num_blocks >= 0, "hr_generator.num_blocks", cfg.hr_generator.num_blocks, "must be >= 0")
    _require(
        cfg.hr_generator.context_layers >= 1,
        "hr_generator.context_layers",
        cfg.hr_generator.context_layers,
        "must be >= 1 (the wide branch needs one coarse voxel of margin)",
    )
    _require(
        cfg.discriminator.num_layers >= 1, "discriminator.num_layers", cfg.discriminator.num_layers, "must be >= 1"
    )


def _check_augment(aug: AugmentConfig) -> None:
    for name in ("noise_p", "blur_p", "resolution_p", "edge_noise_p"):
        p = getattr(aug, name)
        _require(0.0 <= p <= 1.0, f"augment.{name}", p, "is a probability in [0, 1]")
    for name in ("noise_std", "blur_sigma", "resolution_factor", "edge_noise_std"):
        lo, hi = getattr(aug, name)
        _require(0 <= lo <= hi, f"augment.{name}", (lo, hi), "must be a range [min, max] with 0 <= min <= max")
    _require(
        aug.resolution_factor[0] >= 1.0,
        "augment.resolution_factor",
        aug.resolution_factor,
        "downsampling factors must be >= 1",
    )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    _require(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    _require(
        not t.steps_per_scale or len(t.steps_per_scale) == cfg.num_scales,
        "train.steps_per_scale",
        t.steps_per_scale,
        f"needs one entry per scale (num_scales={cfg.num_scales}) or none",
    )
    _require(all(s >= 0 for s in t.steps_per_scale), "train.steps_per_scale", t.steps_per_scale, "must be >= 0")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(
        t.hr_patch >= 2 and t.hr_patch % 2 == 0,
        "train.hr_patch",
        t.hr_patch,
        "must be even and >= 2 (tiles start on even voxels so the wide context stays aligned)",
    )
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _require(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")


def _check_inference(inf: InferenceConfig) -> None:
    _require(inf.memory_budget_mb > 0, "inference.memory_budget_mb", inf.memory_budget_mb, "must be > 0")
    _require(inf.batch_size >= 1, "inference.batch_size", inf.batch_size, "must be >= 1")
    _require(inf.actors >= 1, "inference.actors", inf.actors, "must be >= 1")
    _require(inf.cpus_per_actor > 0, "inference.cpus_per_actor", inf.cpus_per_actor, "must be > 0")
    _require(
        0 < inf.gpus_per_actor <= 1 or inf.gpus_per_actor == int(inf.gpus_per_actor),
        "inference.gpus_per_actor",
        inf.gpus_per_actor,
        "must be a fraction of one GPU or a whole number of GPUs",
    )


def _check_patch_fits_discriminator(cfg: Config) -> None:
    """An HR training patch must give the PatchGAN (:func:`msgan.netrules.patchgan_min_size`) one output."""
    if cfg.num_scales <= 1:
        return
    need = patchgan_min_size(cfg.discriminator.num_layers)
    _require(
        cfg.train.hr_patch >= need,
        "train.hr_patch",
        cfg.train.hr_patch,
        f"is smaller than the {need} voxels a PatchGAN with discriminator.num_layers="
        f"{cfg.discriminator.num_layers} needs for one output; raise the patch or lower num_layers",
    )


def _check_job(j: JobConfig) -> None:
    _require(j.workers_per_scale >= 1, "job.workers_per_scale", j.workers_per_scale, "must be >= 1")
    _require(j.cpus_per_worker > 0, "job.cpus_per_worker", j.cpus_per_worker, "must be > 0")
    _require(j.max_failures >= -1, "job.max_failures", j.max_failures, "must be >= 0, or -1 for unlimited")
    _require(bool(j.registered_model), "job.registered_model", j.registered_model, "must not be empty")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _require(
        len(d.phantom.shape) == cfg.dims, "data.phantom.shape", d.phantom.shape, f"must have dims={cfg.dims} entries"
    )
    if d.source == "files":
        _require(len(d.paths) > 0, "data.paths", d.paths, "must list at least one file when data.source=files")
    else:
        _require(len(d.phantom.seeds) > 0, "data.phantom.seeds", d.phantom.seeds, "must list at least one seed")


# ----------------------------------------------------------------------------- loading

T = TypeVar("T")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
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


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown key {prefix}{key!r}; valid keys here: {', '.join(names)}.{extra}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=5", "hr_generator.context=wide"]`` -> dotted keys with YAML-parsed values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.steps=100")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def from_dict(values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    tree = _plain(dict(values))
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return _build(Config, tree)


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Load a YAML config (defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping of sections")
        values = loaded
    over = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    try:
        return from_dict(values, over)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None
