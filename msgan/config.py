"""Experiment configuration: frozen dataclasses loaded from YAML.

Unknown keys are rejected with the valid ones listed, ``--set a.b=c`` overrides
any field, and cross-field rules are checked at load time, before any work starts.

A :class:`Config` is a model spec (:class:`msgan.spec.ModelSpec`: the networks, what they see, the intensity
window, the inference defaults; saved with the weights) plus the run settings (seed, augmentation, training,
deployment, data, job; passed beside the model, recorded in MLflow, never saved in the model artifact).
:data:`SPEC_KEYS` says where each part of the spec lives in a config; ``Config.spec()`` and
``Config.from_spec(spec, run)`` go between the two. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from msgan.netrules import ConditionKind, Dims
from msgan.spec import (
    HR_PATCH,
    ConfigError,
    DiscriminatorConfig,
    EdgeConfig,
    HRGeneratorConfig,
    InferenceDefaults,
    IntensityConfig,
    LRGeneratorConfig,
    ModelSpec,
    RuleError,
    build,
    plain,
    require,
)

__all__ = [
    "SPEC_KEYS",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiscriminatorConfig",
    "EdgeConfig",
    "HRGeneratorConfig",
    "InferenceConfig",
    "IntensityConfig",
    "JobConfig",
    "LRGeneratorConfig",
    "ModelSpec",
    "PhantomDataConfig",
    "TrainConfig",
    "UnpairedConfig",
    "from_dict",
    "load_config",
    "parse_overrides",
]

Device = Literal["auto", "gpu", "cpu"]  # auto: a GPU when the cluster has GPUs
_INFERENCE = InferenceDefaults()


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
class UnpairedConfig:
    """Training without pairs (``train.objective: unpaired``; docs/translation.md, "Without pairs"). Scale 0
    learns the translation on whole low-resolution images, cycle-consistently (a second U-Net maps back, an
    unconditional PatchGAN per domain); every HR scale trains on target images alone, with a source
    synthesized from each target patch by the forward model fitted on the two sets (:mod:`msgan.forward_model`)
    and, with probability ``remap_p``, the patch's intensity levels remapped before it, so the generator takes
    levels from the previous scale and detail from the source. The remap's ranges are in the window's units
    (HU for CT), so they mean the same tissues under a [-1024, 1024] or a [-1024, 3072] window."""

    cycle_weight: float = 10.0  # scale 0: |F(G(s)) - s| + |G(F(t)) - t| (Zhu et al.)
    identity_weight: float = 5.0  # scale 0: |G(D(t)) - t|, the synthesized pair (D: the fitted forward model)
    remap_p: float = 0.5  # HR: probability that a synthesized source's levels are remapped
    remap_bumps: int = 3  # Gaussian bumps added to the intensity curve per remap
    # in the intensity window's units (HU for CT, normalised units with intensity.normalize), whatever the window:
    remap_amplitude: float = 300.0  # a bump's height is drawn from [-a, a]
    remap_width: tuple[float, float] = (30.0, 100.0)  # a bump's width (standard deviation) is drawn in this range
    remap_centres: tuple[float, float] = (-300.0, 600.0)  # a bump's centre is drawn here (fat to enhanced blood)
    noise: bool = True  # add the forward model's noise (off: its filter alone)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    steps_per_scale: tuple[int, ...] = ()  # one entry per scale (LR first) overrides `steps`
    batch_size: int = 4
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    gan_loss: Literal["lsgan", "bce"] = "lsgan"
    l1_weight: float = 100.0
    hr_patch: int = HR_PATCH  # output core of an HR training patch (voxels per side), even; the spec's hr_patch
    foreground_threshold: float = -0.8  # window units; patches are centred on voxels above it
    checkpoint_every: int = 200
    log_every: int = 10
    amp: bool = _INFERENCE.amp  # bf16 autocast on CUDA, in training and at inference (the spec's inference.amp)
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    objective: Literal["paired", "unpaired"] = "paired"  # unpaired: no (source, target) pairs (UnpairedConfig)
    unpaired: UnpairedConfig = field(default_factory=UnpairedConfig)


@dataclass(frozen=True)
class InferenceConfig:
    """Inference: the tile comes from a memory budget; the batch job's actor pool from the rest. The model
    carries ``memory_budget_mb`` and ``batch_size`` (its spec's inference defaults: they decide the bytes); the
    actor pool and device are run settings. A batch job may override any (``--set inference.actors=8``)."""

    memory_budget_mb: float = _INFERENCE.memory_budget_mb  # peak of one forward pass (batch_size tiles): the tile
    batch_size: int = _INFERENCE.batch_size  # tiles per forward pass
    actors: int = 2  # Ray Data actors that hold the cascade
    cpus_per_actor: float = 0.5  # fractional on small machines: the read tasks need CPU too
    gpus_per_actor: float = 1.0  # used when the cluster has GPUs; 0.5 packs two actors per GPU
    device: Device = "auto"  # the Ray Data actors' (translate-batch); see JobConfig.device for training


@dataclass(frozen=True)
class PhantomDataConfig:
    shape: tuple[int, ...] = (64, 64, 64)
    seeds: tuple[int, ...] = (1, 2, 3, 4)  # one training volume per seed
    kernel: Literal["soft", "sharp"] = "soft"
    validation_seeds: tuple[int, ...] = (1000,)  # scored while training (and translated at the end without holdout)
    holdout_seeds: tuple[int, ...] = ()  # translated and scored at the end of the job only


Align = Literal["none", "rigid", "affine"]


@dataclass(frozen=True)
class DataConfig:
    """Training volumes: synthetic phantoms; image files or DICOM folders by path or glob (targets alone:
    ``condition: edges``); (source, target) pairs named by a pairs manifest (``pairs``: a CSV with
    columns ``source,target[,split][,patient]``, local or ``s3://``; :mod:`msgan.data.pairs`); or, without
    pairs (``unpaired``, for ``train.objective: unpaired``), a set of source images and a set of target images
    (``sources`` and ``targets``: each a CSV with columns ``image[,split][,patient]`` or a folder of images;
    :mod:`msgan.data.images`), scored on the validation and held-out pairs of ``pairs`` when it is given (its
    rows ``validation`` or ``holdout``; training on pairs and images together is not supported yet).

    Three splits everywhere: training volumes; ``validation`` ones, scored while training (tuning); ``holdout``
    ones, translated and scored at the end of the job only. ``align`` says how a pair's target is put onto
    its source's grid: ``none`` (the same acquisition: the same grid, or resampled physically onto it),
    ``rigid`` or ``affine`` (separate acquisitions: registered by mutual information, :mod:`msgan.align`)."""

    source: Literal["phantom", "files", "pairs", "unpaired"] = "phantom"
    phantom: PhantomDataConfig = field(default_factory=PhantomDataConfig)
    paths: tuple[str, ...] = field(default=(), metadata={"names_data": True})
    validation_paths: tuple[str, ...] = field(default=(), metadata={"names_data": True})
    holdout_paths: tuple[str, ...] = field(default=(), metadata={"names_data": True})
    pairs: str = field(default="", metadata={"names_data": True})
    sources: str = field(default="", metadata={"names_data": True})  # unpaired: the source domain's images
    targets: str = field(default="", metadata={"names_data": True})  # unpaired: the target domain's images
    align: Align = "none"


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
        self.spec()  # the model's rules (msgan.spec), named by this config's keys
        _check_run_rules(self)

    def steps_for(self, scale: int) -> int:
        """Training steps of ``scale``: ``train.steps_per_scale[scale]`` when given, else ``train.steps``."""
        per = self.train.steps_per_scale
        return per[scale] if per else self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides, e.g. ``cfg.replace(**{"train.steps": 5})``."""
        return from_dict(self.to_dict(), overrides=overrides)

    def spec(self) -> ModelSpec:
        """The model this config defines (:data:`SPEC_KEYS`): what a saved cascade carries."""
        return spec_of(self.to_dict())

    def run_settings(self) -> dict[str, Any]:
        """Everything but the spec (plain values, nested by section): seed, augmentation, training,
        deployment, data and job settings. ``Config.from_spec(cfg.spec(), cfg.run_settings()) == cfg``."""
        tree = self.to_dict()
        for path in SPEC_KEYS.values():
            _pop_dotted(tree, path)
        return tree

    @classmethod
    def from_spec(cls, spec: ModelSpec, run: Mapping[str, Any] | None = None) -> Config:
        """The config of ``spec`` with the run settings ``run`` (nested sections or dotted keys, as
        :meth:`run_settings` gives them; defaults where absent). ``run`` may override the spec's inference
        defaults (:data:`RUN_MAY_OVERRIDE`), never the model itself (a :class:`ConfigError` names the key)."""
        tree: dict[str, Any] = {}
        values = spec.to_dict()
        for s, c in SPEC_KEYS.items():
            _set_dotted(tree, c, _get_dotted(values, s))
        over = flatten(run or {})
        if "data.phantom.shape" not in over:  # the default phantom, in the spec's dims
            over["data.phantom.shape"] = list(PhantomDataConfig().shape[: spec.dims])
        for key in over:
            owner = next((c for c in SPEC_KEYS.values() if key == c or key.startswith(c + ".")), None)
            if owner is not None and key not in RUN_MAY_OVERRIDE:
                raise ConfigError(
                    f"run setting {key}: belongs to the model spec ({owner}); a run may override only "
                    f"{', '.join(RUN_MAY_OVERRIDE)}"
                )
        return from_dict(tree, overrides=over)


# Where each part of the model spec lives in a config: spec path -> config path. Every other key of a
# config is a run setting. Every field of ModelSpec appears here (tests/test_spec.py checks it).
SPEC_KEYS: dict[str, str] = {
    "dims": "dims",
    "num_scales": "num_scales",
    "condition": "condition",
    "source_residual": "source_residual",
    "intensity": "intensity",
    "edges": "edges",
    "lr_generator": "lr_generator",
    "hr_generator": "hr_generator",
    "discriminator": "discriminator",
    "hr_patch": "train.hr_patch",
    "inference.memory_budget_mb": "inference.memory_budget_mb",
    "inference.batch_size": "inference.batch_size",
    "inference.amp": "train.amp",
}
_CONFIG_KEY = {s: c for s, c in SPEC_KEYS.items() if s != c}
# The spec's inference defaults, which a run may override (a batch job's --set inference.batch_size=4).
RUN_MAY_OVERRIDE: tuple[str, ...] = ("inference.memory_budget_mb", "inference.batch_size", "train.amp")


def spec_of(values: Mapping[str, Any]) -> ModelSpec:
    """The model spec of a config's plain values (:data:`SPEC_KEYS`; defaults where a key is absent, every
    other key ignored), checked; a broken rule names the config's key. A manifest of ``msgan-cascade/1``
    held the whole config: its model is this."""
    tree: dict[str, Any] = {}
    for s, c in SPEC_KEYS.items():
        try:
            value = _get_dotted(values, c)
        except (KeyError, TypeError, IndexError):
            continue
        _set_dotted(tree, s, value)
    try:
        return ModelSpec.from_dict(tree)
    except RuleError as err:
        raise err.renamed(_CONFIG_KEY.get(err.key, err.key)) from None


def data_path_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of the settings that name data files (they may name patients): never logged, never saved
    with a model. Marked ``metadata={"names_data": True}`` on their field."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("names_data"):
            keys.append(prefix + f.name)
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys.extend(data_path_keys(f.default_factory, f"{prefix}{f.name}."))
    return tuple(keys)


# ----------------------------------------------------------------------------- the run settings' rules


def _check_run_rules(cfg: Config) -> None:
    """Every rule of the run settings, in this order (the model's come first: :func:`msgan.spec.check_spec`)."""
    _check_augment(cfg.augment)
    _check_train(cfg)
    _check_inference(cfg.inference)
    _check_job(cfg.job)
    _check_data(cfg)


def _check_augment(aug: AugmentConfig) -> None:
    for name in ("noise_p", "blur_p", "resolution_p", "edge_noise_p"):
        p = getattr(aug, name)
        require(0.0 <= p <= 1.0, f"augment.{name}", p, "is a probability in [0, 1]")
    for name in ("noise_std", "blur_sigma", "resolution_factor", "edge_noise_std"):
        lo, hi = getattr(aug, name)
        require(0 <= lo <= hi, f"augment.{name}", (lo, hi), "must be a range [min, max] with 0 <= min <= max")
    require(
        aug.resolution_factor[0] >= 1.0,
        "augment.resolution_factor",
        aug.resolution_factor,
        "downsampling factors must be >= 1",
    )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    require(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    require(
        not t.steps_per_scale or len(t.steps_per_scale) == cfg.num_scales,
        "train.steps_per_scale",
        t.steps_per_scale,
        f"needs one entry per scale (num_scales={cfg.num_scales}) or none",
    )
    require(all(s >= 0 for s in t.steps_per_scale), "train.steps_per_scale", t.steps_per_scale, "must be >= 0")
    require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    require(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    require(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    u = t.unpaired
    for name in ("cycle_weight", "identity_weight", "remap_amplitude"):
        require(getattr(u, name) >= 0, f"train.unpaired.{name}", getattr(u, name), "must be >= 0")
    require(0.0 <= u.remap_p <= 1.0, "train.unpaired.remap_p", u.remap_p, "is a probability in [0, 1]")
    require(u.remap_bumps >= 0, "train.unpaired.remap_bumps", u.remap_bumps, "must be >= 0")
    for name in ("remap_width", "remap_centres"):
        lo, hi = getattr(u, name)
        require(lo <= hi, f"train.unpaired.{name}", (lo, hi), "must be a range [min, max] with min <= max")
    require(u.remap_width[0] > 0, "train.unpaired.remap_width", u.remap_width, "must be > 0")
    if t.objective == "unpaired":
        require(
            "image" in cfg.condition.split("+"),
            "train.objective",
            t.objective,
            f"trains a model that reads the source image (condition image or image+edges); condition={cfg.condition} "
            "(edges alone) trains on target images without pairs already",
        )


def _check_inference(inf: InferenceConfig) -> None:
    require(inf.actors >= 1, "inference.actors", inf.actors, "must be >= 1")
    require(inf.cpus_per_actor > 0, "inference.cpus_per_actor", inf.cpus_per_actor, "must be > 0")
    require(
        0 < inf.gpus_per_actor <= 1 or inf.gpus_per_actor == int(inf.gpus_per_actor),
        "inference.gpus_per_actor",
        inf.gpus_per_actor,
        "must be a fraction of one GPU or a whole number of GPUs",
    )


def _check_job(j: JobConfig) -> None:
    require(j.workers_per_scale >= 1, "job.workers_per_scale", j.workers_per_scale, "must be >= 1")
    require(j.cpus_per_worker > 0, "job.cpus_per_worker", j.cpus_per_worker, "must be > 0")
    require(j.max_failures >= -1, "job.max_failures", j.max_failures, "must be >= 0, or -1 for unlimited")
    require(bool(j.registered_model), "job.registered_model", j.registered_model, "must not be empty")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if d.source == "phantom":  # the phantom section is read only when phantoms train
        require(
            len(d.phantom.shape) == cfg.dims,
            "data.phantom.shape",
            d.phantom.shape,
            f"must have dims={cfg.dims} entries",
        )
    if d.source == "files":
        require(len(d.paths) > 0, "data.paths", d.paths, "must list at least one file when data.source=files")
    elif d.source == "pairs":
        require(bool(d.pairs), "data.pairs", d.pairs, "must name a pairs manifest (CSV) when data.source=pairs")
    elif d.source == "unpaired":
        for key in ("sources", "targets"):
            require(
                bool(getattr(d, key)),
                f"data.{key}",
                getattr(d, key),
                "must name an image set (a CSV with the column image, or a folder of images) when data.source=unpaired",
            )
        require(
            d.sources != d.targets,
            "data.targets",
            d.targets,
            "names the same set as data.sources; training without pairs needs two sets",
        )
    else:
        require(len(d.phantom.seeds) > 0, "data.phantom.seeds", d.phantom.seeds, "must list at least one seed")
    # the manifests are read by the job before any work (a config names them before they exist)
    unpaired = cfg.train.objective == "unpaired"
    require(
        unpaired == (d.source == "unpaired"),
        "data.source" if unpaired else "train.objective",
        d.source if unpaired else cfg.train.objective,
        "must be unpaired when train.objective=unpaired (data.sources and data.targets: the two sets of images)"
        if unpaired
        else "must be unpaired when data.source=unpaired (training without pairs)",
    )


# ----------------------------------------------------------------------------- loading


def _get_dotted(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _pop_dotted(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    del node[leaf]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys (lists and other values are leaves; dotted keys stay as given)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    tree = plain(dict(values))
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return build(Config, tree)


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
