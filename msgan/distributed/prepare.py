"""Prepare: training volumes -> one pyramid store per volume, in parallel as Ray tasks.

A store's name is a content fingerprint (the source's bytes or phantom recipe, plus every
setting that shapes the pyramid), so a volume prepared once is never prepared again.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msgan import storage
from msgan.config import Config, ConfigError, from_dict
from msgan.io.pyramids import pyramid_meta, write_pyramid
from msgan.io.volume import Geometry
from msgan.netrules import condition_channels
from msgan.pyramid import Pyramid, build_pyramid
from msgan.tiling import pyramid_shapes
from msgan.train import check_scale_shape

PHANTOM_RECIPE = "thorax-1"  # bump when the phantom generator changes what a seed makes


@dataclass(frozen=True)
class VolumeSource:
    """A training or validation volume: a phantom (seed + kernel), an image file, or a DICOM series folder."""

    kind: str  # "phantom" | "file" | "dicom"
    ref: str  # seed or path
    kernel: str = ""

    @property
    def label(self) -> str:
        return f"phantom seed {self.ref}" if self.kind == "phantom" else self.ref


def sources(cfg: Config, holdout: bool = False) -> list[VolumeSource]:
    """Training (or held-out) volumes named by the config; missing files, and sources that cannot give what
    the config trains on (:func:`check_source`), fail here, before any work."""
    d = cfg.data
    if d.source == "phantom":
        seeds = d.phantom.holdout_seeds if holdout else d.phantom.seeds
        out = [VolumeSource("phantom", str(s), "soft" if holdout else d.phantom.kernel) for s in seeds]
        for src in out:
            check_source(src, cfg)
        return out
    patterns = d.holdout_paths if holdout else d.paths
    out = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not matches or not all(Path(m).exists() for m in matches):
            key = "data.holdout_paths" if holdout else "data.paths"
            raise ConfigError(f"{key}: {pat!r} matches no readable file or DICOM folder")
        out += [VolumeSource("dicom" if Path(m).is_dir() else "file", m) for m in matches]
    for src in out:
        check_source(src, cfg)
    return out


def check_source(source: VolumeSource, cfg: Config) -> None:
    """A source the config can train on: an image-conditioned model (``condition`` with ``image``) trains on
    (source, target) pairs, which only 3D phantoms give so far. :class:`ConfigError` naming the source."""
    if "image" in condition_channels(cfg.condition) and (source.kind != "phantom" or cfg.dims != 3):
        what = "2D phantoms" if source.kind == "phantom" else f"{source.kind} data"
        raise ConfigError(
            f"{source.label}: condition={cfg.condition!r} trains on (source, target) pairs, which only 3D "
            f"phantoms have so far; use condition=edges for {what}"
        )


def training_pyramids(cfg: Config, holdout: bool = False) -> list[Pyramid]:
    """In-memory pyramids of the config's training (or held-out) volumes: the local path of ``msgan train``
    and ``msgan demo`` reads the very sources the Ray job prepares (phantoms, files, DICOM folders)."""
    return [source_pyramid(s, cfg)[0] for s in sources(cfg, holdout)]


def source_pyramid(source: VolumeSource, cfg: Config) -> tuple[Pyramid, Geometry, tuple[int, ...]]:
    """The training pyramid of one source, its geometry and shape: the target alone, or a (source, target)
    pair when the generators read the source image (``condition`` with ``image``; 3D phantoms: the other
    kernel's reconstruction of the same acquisition is the source)."""
    from msgan.data.phantom import phantom_image
    from msgan.pyramid import build_pair_pyramid

    check_source(source, cfg)
    image, geom = load_source(source, cfg)
    if "image" not in condition_channels(cfg.condition):
        return build_pyramid(image, cfg.num_scales, cfg.intensity, cfg.edges), geom, tuple(image.shape)
    other = phantom_image(cfg.data.phantom.shape, int(source.ref), "sharp" if source.kernel == "soft" else "soft")
    pyr = build_pair_pyramid(other, image, cfg.num_scales, cfg.intensity, cfg.edges)
    return pyr, geom, tuple(image.shape)


@dataclass(frozen=True)
class HeldOut:
    """A held-out volume to translate at the end of a job: its input and, for phantoms, the truth."""

    label: str
    stem: str  # file-name stem for its outputs
    image: np.ndarray
    geometry: Geometry
    truth: np.ndarray | None


def held_out(cfg: Config) -> Iterator[HeldOut]:
    """The held-out volumes, one at a time: a 3D phantom's sharp-kernel reconstruction with its soft-kernel
    truth, a 2D phantom radiograph (its own truth: generated from its edges), or a file without truth."""
    from msgan.data.phantom import kernel_pair, phantom_geometry, radiograph

    for src in sources(cfg, holdout=True):
        if src.kind != "phantom":
            image, geom = load_source(src, cfg)
            yield HeldOut(src.label, Path(src.ref).name.split(".")[0], image, geom, None)
            continue
        shape, seed = cfg.data.phantom.shape, int(src.ref)
        geom = phantom_geometry(shape)
        if cfg.dims == 3:
            truth, image = kernel_pair(shape, seed)
        else:
            truth = image = radiograph(shape, seed=seed, depth=min(192, max(shape)))
        yield HeldOut(src.label, f"holdout_{seed}", image, geom, truth)


def _preprocessing(cfg: Config) -> dict[str, Any]:
    c = cfg.to_dict()
    out = {"dims": c["dims"], "num_scales": c["num_scales"], "intensity": c["intensity"], "edges": c["edges"]}
    if "image" in condition_channels(cfg.condition):
        out["pairs"] = True  # (source, target) stores differ from target-only ones
    return out


def fingerprint(source: VolumeSource, cfg: Config) -> str:
    h = hashlib.sha256(json.dumps(_preprocessing(cfg), sort_keys=True).encode())
    if source.kind == "phantom":
        h.update(json.dumps([PHANTOM_RECIPE, source.ref, source.kernel, list(cfg.data.phantom.shape)]).encode())
        return h.hexdigest()[:24]
    files = (
        sorted(p for p in Path(source.ref).rglob("*") if p.is_file()) if source.kind == "dicom" else [Path(source.ref)]
    )
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def load_source(source: VolumeSource, cfg: Config) -> tuple[Any, Geometry]:
    from msgan.data.phantom import phantom_geometry, phantom_image
    from msgan.io.volume import read_volume

    if source.kind in ("file", "dicom"):
        image, geom = read_volume(source.ref) if source.kind == "file" else _read_dicom(source.ref)
        if image.ndim != cfg.dims:
            raise ValueError(f"{source.ref}: a {image.ndim}D image; the config trains {cfg.dims}D (dims)")
        return image, geom
    shape = cfg.data.phantom.shape
    image = phantom_image(shape, int(source.ref), source.kernel)
    return image, phantom_geometry(shape)


def _read_dicom(folder: str) -> tuple[Any, Geometry]:
    """The one image series of a DICOM folder (a folder with several series or none is refused)."""
    from msgan.io.dicom import read_series

    result = read_series([folder])
    if len(result.volumes) != 1:
        why = "; ".join(result.errors.values()) or f"{len(result.volumes)} series"
        raise ConfigError(f"{folder}: a training folder must hold exactly one usable series ({why})")
    return result.volumes[0].image, result.volumes[0].geometry


def prepare_one(source: VolumeSource, config: dict[str, Any], root: str) -> dict[str, Any]:
    """Prepare one volume unless its fingerprint is already stored; returns its store and shapes."""
    cfg = from_dict(config)
    fp = fingerprint(source, cfg)
    uri = storage.join(root, "pyramids", f"{fp}.zarr")
    meta = pyramid_meta(uri)
    if meta is not None:
        return {"uri": uri, "prepared": False, "shape": meta["shape"], "source": asdict(source)}
    pyr, geom, shape = source_pyramid(source, cfg)
    write_pyramid(uri, pyr, geom, {"fingerprint": fp, "source": asdict(source), "shape": list(shape)})
    return {"uri": uri, "prepared": True, "shape": list(shape), "source": asdict(source)}


def prepare(cfg: Config, volumes: Sequence[VolumeSource], root: str, use_ray: bool = True) -> list[dict[str, Any]]:
    """Prepare ``volumes`` under ``root``/pyramids, in parallel Ray tasks when Ray is running."""
    config = cfg.to_dict()
    if use_ray:
        import ray

        env = storage.env_for_workers()
        extra: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
        task = ray.remote(num_cpus=1, max_retries=2, **extra)(prepare_one)
        return list(ray.get([task.remote(v, config, root) for v in volumes]))
    return [prepare_one(v, config, root) for v in volumes]


def source_shape(source: VolumeSource, cfg: Config) -> tuple[int, ...]:
    """Array shape (numpy order) of a source without reading its pixels (a DICOM folder's series is read);
    :class:`ConfigError` when it cannot be read or has not ``dims`` axes."""
    if source.kind == "phantom":
        size = tuple(cfg.data.phantom.shape)
    elif source.kind == "dicom":
        size = tuple(_read_dicom(source.ref)[0].shape)
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(source.ref)
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            why = str(err).strip().splitlines()[-1]
            raise ConfigError(f"{source.ref}: cannot be read as an image ({why})") from err
        size = tuple(reversed(reader.GetSize()))
    if len(size) != cfg.dims:
        raise ConfigError(f"{source.label}: a {len(size)}D image; the config trains {cfg.dims}D (dims)")
    return size


def check_shapes(cfg: Config, volumes: Sequence[VolumeSource]) -> None:
    """The pre-flight of every training path, before any work starts: each source is one the config can
    train on (:func:`check_source`) and every scale of it fits the patch and the discriminator
    (:func:`msgan.train.check_scale_shape`, the rule :class:`~msgan.train.ScaleTrainer` applies)."""
    for src in volumes:
        check_source(src, cfg)
        for s, shape in enumerate(pyramid_shapes(source_shape(src, cfg), cfg.num_scales)):
            check_scale_shape(cfg, s, shape, src.label)
