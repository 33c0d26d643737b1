"""Prepare: training volumes -> one pyramid store per volume, in parallel as Ray tasks.

A store's name is a content fingerprint (the source's bytes or phantom recipe, plus every
setting that shapes the pyramid), so a volume prepared once is never prepared again.

Without pairs (``data.source: unpaired``) every image of both sets becomes a plain pyramid store (the
image alone, as ``files`` prepares a target), and the validation and held-out pairs of ``data.pairs`` pair
stores as with pairs; :func:`unpaired_sets` says which training volume belongs to which set.
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
from msgan.pyramid import Pyramid, build_pyramid, mask_pyramid
from msgan.tiling import pyramid_shapes
from msgan.train import check_scale_shape

PHANTOM_RECIPE = "thorax-1"  # bump when the phantom generator changes what a seed makes


SPLITS = ("train", "validation", "holdout")


@dataclass(frozen=True)
class VolumeSource:
    """A training, validation or held-out volume: a phantom (seed + kernel), an image file, a DICOM series
    folder, a (source, target) pair of a pairs manifest (``ref`` the source, ``target`` the target, ``row``
    its line in the CSV), or an image of a set for training without pairs (``side``: ``sources`` or
    ``targets``; any format :mod:`msgan.data.images` reads)."""

    kind: str  # "phantom" | "file" | "dicom" | "pair" | "image"
    ref: str  # seed or path (a pair's source)
    kernel: str = ""
    target: str = ""
    row: int = 0
    manifest: str = ""  # a pair's CSV (an image's set), for its label
    side: str = ""  # an image's set: "sources" or "targets"
    name: str = ""  # an image's label: "<csv> row <N>" or "<folder>/<entry>"

    @property
    def label(self) -> str:
        if self.kind == "phantom":
            return f"phantom seed {self.ref}"
        if self.kind == "pair":
            return f"{Path(self.manifest).name} row {self.row}"
        if self.kind == "image":
            return self.name or self.ref
        return self.ref


def sources(cfg: Config, split: str = "train") -> list[VolumeSource]:
    """The volumes of one split (``train``, ``validation`` or ``holdout``) named by the config; missing
    files, a refused pairs manifest and sources that cannot give what the config trains on
    (:func:`check_source`) fail here, before any work."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: must be one of {list(SPLITS)}")
    d = cfg.data
    out: list[VolumeSource]
    if d.source == "phantom":
        seeds = {"train": d.phantom.seeds, "validation": d.phantom.validation_seeds, "holdout": d.phantom.holdout_seeds}
        kernel = d.phantom.kernel if split == "train" else "soft"
        out = [VolumeSource("phantom", str(s), kernel) for s in seeds[split]]
    elif d.source == "pairs":
        from msgan.data.pairs import read_pairs

        out = [
            VolumeSource("pair", p.source, target=p.target, row=p.row, manifest=d.pairs)
            for p in read_pairs(d.pairs)
            if p.split == split
        ]
        if split == "train" and not out:
            raise ConfigError(f"data.pairs: {d.pairs} names no training pair (split train, the default)")
    elif d.source == "unpaired":
        out = _unpaired_sources(cfg, split)
    else:
        key = {"train": "data.paths", "validation": "data.validation_paths", "holdout": "data.holdout_paths"}[split]
        patterns = {"train": d.paths, "validation": d.validation_paths, "holdout": d.holdout_paths}[split]
        out = []
        for pat in patterns:
            matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
            if not matches or not all(Path(m).exists() for m in matches):
                raise ConfigError(f"{key}: {pat!r} matches no readable file or DICOM folder")
            out += [VolumeSource("dicom" if Path(m).is_dir() else "file", m) for m in matches]
    for src in out:
        check_source(src, cfg)
    return out


def _image_sources(uri: str, side: str, split: str) -> list[VolumeSource]:
    from msgan.data.images import read_images

    return [VolumeSource("image", im.ref, row=im.row, manifest=uri, side=side, name=im.label)
            for im in read_images(uri) if im.split == split]  # fmt: skip


def _scored_pairs(cfg: Config, split: str) -> list[VolumeSource]:
    """Without pairs: the validation or held-out pairs of ``data.pairs`` (none when it is not set); a training
    pair there is refused (mixed training is not supported yet)."""
    d = cfg.data
    if not d.pairs:
        return []
    from msgan.data.pairs import read_pairs

    pairs = read_pairs(d.pairs)
    mixed = [p.row for p in pairs if p.split == "train"]
    if mixed:
        raise ConfigError(
            f"data.pairs: {d.pairs} rows {', '.join(map(str, mixed[:5]))}{' ...' if len(mixed) > 5 else ''} are "
            "training pairs: mixed training (pairs plus unpaired images) is not supported yet; with "
            "data.source=unpaired the pairs manifest holds validation and holdout rows only (scoring)"
        )
    return [VolumeSource("pair", p.source, target=p.target, row=p.row, manifest=d.pairs)
            for p in pairs if p.split == split]  # fmt: skip


def _unpaired_sources(cfg: Config, split: str) -> list[VolumeSource]:
    """The volumes of one split without pairs: ``train``, both sets' training images (the source set first,
    :func:`unpaired_sets` tells them apart); ``validation``, the validation pairs; ``holdout``, the held-out
    pairs and the source set's holdout images (translated, not scored: there is no target)."""
    d = cfg.data
    pairs = _scored_pairs(cfg, split)
    if split == "validation":
        return pairs
    held_targets = _image_sources(d.targets, "targets", "holdout")  # refused for every split: msgan train too
    if held_targets:
        raise ConfigError(
            f"data.targets: {held_targets[0].label} is a holdout row; the target set trains (a target-domain "
            "image is never translated): put holdout images in data.sources, scored ones in data.pairs"
        )
    if split == "holdout":
        return pairs + _image_sources(d.sources, "sources", "holdout")
    src, tgt = _image_sources(d.sources, "sources", "train"), _image_sources(d.targets, "targets", "train")
    for key, got in (("data.sources", src), ("data.targets", tgt)):
        if not got:
            raise ConfigError(f"{key}: {getattr(d, key[5:])} names no training image (split train, the default)")
    return src + tgt


def unpaired_sets(volumes: Sequence[VolumeSource]) -> tuple[list[VolumeSource], list[VolumeSource]]:
    """The training volumes without pairs, by set: (the source set's images, the target set's images)."""
    return [v for v in volumes if v.side == "sources"], [v for v in volumes if v.side == "targets"]


def end_of_job(cfg: Config) -> tuple[str, list[VolumeSource]]:
    """What the job translates and scores at its end: the held-out volumes, or, when the config names none,
    the validation ones (labelled as such: their scores also steered nothing, but they are not held out)."""
    held = sources(cfg, "holdout")
    return ("holdout", held) if held else ("validation", sources(cfg, "validation"))


def check_source(source: VolumeSource, cfg: Config) -> None:
    """A source the config can train on: an image-conditioned model (``condition`` with ``image``) trains on
    (source, target) pairs: a pairs manifest (``data.source: pairs``) or 3D phantoms (the other kernel's
    reconstruction of the same acquisition). :class:`ConfigError` naming the source."""
    if source.kind == "image" and cfg.train.objective != "unpaired":
        raise ConfigError(f"{source.label}: an image of a set trains without pairs only (train.objective: unpaired)")
    if "image" in condition_channels(cfg.condition) and source.kind in ("file", "dicom"):
        raise ConfigError(
            f"{source.label}: condition={cfg.condition!r} trains on (source, target) pairs: name them in a pairs "
            f"manifest (data.source: pairs, data.pairs: PAIRS.csv; see `msgan find-pairs`), or use "
            f"condition=edges to train on target images alone"
        )
    if source.kind == "phantom" and cfg.intensity.normalize != "none":
        raise ConfigError(
            f"{source.label}: intensity.normalize={cfg.intensity.normalize!r} is for data without a fixed scale "
            "(MR); phantoms are CT in HU: train a normalised model on pairs or files"
        )
    if "image" in condition_channels(cfg.condition) and source.kind == "phantom" and cfg.dims != 3:
        raise ConfigError(
            f"{source.label}: condition={cfg.condition!r} trains on (source, target) pairs, which 2D phantoms do "
            f"not give; write the pairs as files and name them in a pairs manifest (data.source: pairs)"
        )


def training_pyramids(cfg: Config, split: str = "train") -> list[Pyramid]:
    """In-memory pyramids of the config's training (or validation) volumes: the local path of ``msgan train``
    and ``msgan demo`` reads the very sources the Ray job prepares (phantoms, files, DICOM folders, pairs).
    Without pairs, the training split gives the target set's (:func:`unpaired_pyramids` gives both)."""
    if cfg.data.source == "unpaired" and split == "train":
        return unpaired_pyramids(cfg)[1]
    return [source_pyramid(s, cfg)[0] for s in sources(cfg, split)]


def unpaired_pyramids(cfg: Config) -> tuple[list[Pyramid], list[Pyramid]]:
    """Without pairs, in memory: the plain pyramids of (the source set's, the target set's) training images,
    as :func:`msgan.train.train_locally` takes them (``sources=`` the first, ``pyramids`` the second)."""
    src, tgt = unpaired_sets(sources(cfg))
    return [image_pyramid(v, cfg)[0] for v in src], [image_pyramid(v, cfg)[0] for v in tgt]


def image_pyramid(source: VolumeSource, cfg: Config) -> tuple[Pyramid, Geometry, tuple[int, ...]]:
    """The plain pyramid of an image of a set (training without pairs): the image alone, as ``files`` builds
    a target's, normalised by its own body's percentiles when the model normalises. Voxels outside the
    scanner's field of view (the DICOM pixel padding value, or a CT padding constant:
    :func:`msgan.align.fov_mask`) are set to the image's 1st percentile inside it and masked at every scale."""
    from msgan import normalize
    from msgan.align import fov_mask
    from msgan.data.pairs import read_side

    image, info = read_side(source.ref)
    if image.ndim != cfg.dims:
        raise ConfigError(f"{source.label}: a {image.ndim}D image; the config trains {cfg.dims}D (dims)")
    valid = fov_mask(image, info.padding, info.modality)
    if not valid.all():
        inside = image[valid]
        image = np.where(valid, image, np.float32(np.percentile(inside, 1.0)) if inside.size else np.float32(0))
    scaling = normalize.scaling_of(image, cfg.intensity, source.label)
    if scaling is not None:
        image = normalize.apply(image, scaling, cfg.intensity)
    pyr = build_pyramid(np.asarray(image, dtype=np.float32), cfg.num_scales, cfg.intensity, cfg.edges)
    if not valid.all():
        pyr.masks = mask_pyramid(valid, cfg.num_scales)
    return pyr, info.geometry, tuple(image.shape)


@dataclass(frozen=True)
class PreparedPair:
    """A pair made ready to train: the source (physical units), the target on the source's grid, the valid
    voxels (inside both fields of view and the pair's overlap) and how the target got there."""

    source: np.ndarray  # normalised when the model normalises (the units of ``target``)
    target: np.ndarray
    valid: np.ndarray
    geometry: Geometry
    alignment: dict[str, Any]
    raw_source: np.ndarray  # as read: what a translation takes


def prepared_pair(source: VolumeSource, cfg: Config) -> PreparedPair:
    """Read both sides of a pair, refuse what cannot train (:func:`msgan.data.pairs.check_pair`), put the
    target onto the source's grid by ``data.align`` (:func:`msgan.align.align_pair`) and, for a model with
    a per-volume normalisation, normalise each side by its own body's percentiles."""
    from msgan import normalize
    from msgan.align import AlignError, align_pair
    from msgan.data.pairs import Pair, check_pair, read_side

    pair = Pair(row=source.row, source=source.ref, target=source.target, split="", patient="")
    check = check_pair(pair, cfg.dims)
    if not check.usable:
        raise ConfigError(f"{source.label}: {'; '.join(check.problems)}")
    src, src_info = read_side(source.ref)
    tgt, tgt_info = read_side(source.target)
    try:
        aligned = align_pair(
            src, src_info.geometry, tgt, tgt_info.geometry, method=cfg.data.align,
            source_padding=src_info.padding, target_padding=tgt_info.padding,
            modality=src_info.modality or tgt_info.modality, label=source.label,
        )  # fmt: skip
    except AlignError as err:
        raise ConfigError(str(err)) from None
    target = np.asarray(aligned.target, dtype=np.float32)
    raw = src = np.asarray(src, dtype=np.float32)
    scaling = normalize.scaling_of(src, cfg.intensity, f"{source.label} source")
    if scaling is not None:  # each side by its own body's percentiles (the target's as it was acquired)
        src = normalize.apply(src, scaling, cfg.intensity)
        target_scaling = normalize.scaling_of(tgt, cfg.intensity, f"{source.label} target")
        target = normalize.apply(target, target_scaling, cfg.intensity)
    target = np.where(aligned.valid, target, np.float32(cfg.intensity.low)).astype(np.float32)
    alignment = {
        "method": aligned.method, "same_grid": bool(aligned.same_grid), "overlap": float(aligned.overlap),
        "residual": float(aligned.residual), "transform": [float(v) for v in aligned.transform],
        "seconds": float(aligned.seconds),
    }  # fmt: skip
    return PreparedPair(np.asarray(src, dtype=np.float32), target, aligned.valid, src_info.geometry, alignment, raw)


def source_pyramid(source: VolumeSource, cfg: Config) -> tuple[Pyramid, Geometry, tuple[int, ...]]:
    """The training pyramid of one source, its geometry and shape: the target alone, or a (source, target)
    pair when the generators read the source image (``condition`` with ``image``): a manifest's pair (its
    valid voxels masked), or for 3D phantoms the other kernel's reconstruction of the same acquisition."""
    from msgan.data.phantom import phantom_image
    from msgan.pyramid import build_pair_pyramid

    check_source(source, cfg)
    if source.kind == "pair":
        ready = prepared_pair(source, cfg)
        return pair_pyramid(ready, cfg), ready.geometry, tuple(ready.source.shape)
    if source.kind == "image":
        return image_pyramid(source, cfg)
    image, geom = load_source(source, cfg)
    if "image" not in condition_channels(cfg.condition):
        from msgan import normalize

        scaling = normalize.scaling_of(image, cfg.intensity, source.label)
        if scaling is not None:
            image = normalize.apply(image, scaling, cfg.intensity)
        return build_pyramid(image, cfg.num_scales, cfg.intensity, cfg.edges), geom, tuple(image.shape)
    other = phantom_image(cfg.data.phantom.shape, int(source.ref), "sharp" if source.kernel == "soft" else "soft")
    pyr = build_pair_pyramid(other, image, cfg.num_scales, cfg.intensity, cfg.edges)
    return pyr, geom, tuple(image.shape)


def pair_pyramid(ready: PreparedPair, cfg: Config) -> Pyramid:
    """The training pyramid of a prepared pair, its valid voxels masked at every scale: (source, target)
    when the generators read the source image, else the target alone (``condition: edges``)."""
    from msgan.pyramid import build_pair_pyramid

    if "image" not in condition_channels(cfg.condition):
        pyr = build_pyramid(ready.target, cfg.num_scales, cfg.intensity, cfg.edges)
        pyr.masks = mask_pyramid(ready.valid, cfg.num_scales)
        return pyr
    return build_pair_pyramid(ready.source, ready.target, cfg.num_scales, cfg.intensity, cfg.edges, valid=ready.valid)


@dataclass(frozen=True)
class HeldOut:
    """A volume to translate at the end of a job: its input, its truth when there is one (a phantom's, or a
    pair's target on the input's grid) and the voxels the truth is valid on (a pair's overlap; None: all)."""

    label: str
    stem: str  # file-name stem for its outputs
    image: np.ndarray
    geometry: Geometry
    truth: np.ndarray | None
    valid: np.ndarray | None = None
    alignment: dict[str, Any] | None = None
    scored_input: np.ndarray | None = None  # the input in the truth's units (a normalised pair), for its score


def held_out(cfg: Config, volumes: Sequence[VolumeSource] | None = None) -> Iterator[HeldOut]:
    """The end-of-job volumes (:func:`end_of_job` unless ``volumes`` are given), one at a time: a 3D
    phantom's sharp-kernel reconstruction with its soft-kernel truth, a 2D phantom radiograph (its own truth:
    generated from its edges), a pair's source with its target, or a file (an image of a set) without truth."""
    from msgan.data.pairs import read_side
    from msgan.data.phantom import kernel_pair, phantom_geometry, radiograph

    for i, src in enumerate(end_of_job(cfg)[1] if volumes is None else volumes):
        # output names never carry a file name of the user's (it may name a patient; the pictures go to MLflow)
        if src.kind == "pair":
            ready = prepared_pair(src, cfg)
            yield HeldOut(src.label, f"row{src.row}", ready.raw_source, ready.geometry, ready.target, ready.valid,
                          ready.alignment, ready.source)  # fmt: skip
            continue
        if src.kind == "image":
            raw, info = read_side(src.ref)
            yield HeldOut(src.label, f"volume{i + 1}", raw, info.geometry, None)
            continue
        if src.kind != "phantom":
            image, geom = load_source(src, cfg)
            yield HeldOut(src.label, f"volume{i + 1}", image, geom, None)
            continue
        shape, seed = cfg.data.phantom.shape, int(src.ref)
        geom = phantom_geometry(shape)
        if cfg.dims == 3:
            truth, image = kernel_pair(shape, seed)
        else:
            truth = image = radiograph(shape, seed=seed, depth=min(192, max(shape)))
        yield HeldOut(src.label, f"holdout_{seed}", image, geom, truth)


def _preprocessing(cfg: Config, source: VolumeSource | None = None) -> dict[str, Any]:
    c = cfg.to_dict()
    intensity = dict(c["intensity"])
    if intensity.get("normalize", "none") == "none":  # stores prepared before normalisation existed keep their names
        intensity.pop("normalize", None)
        intensity.pop("percentiles", None)
    out = {"dims": c["dims"], "num_scales": c["num_scales"], "intensity": intensity, "edges": c["edges"]}
    kind = source.kind if source is not None else ""
    if "image" in condition_channels(cfg.condition) and kind != "image":
        out["pairs"] = True  # (source, target) stores differ from target-only ones (an image of a set is one)
    if cfg.data.source == "pairs" or kind == "pair":
        out["align"] = cfg.data.align
    if kind == "image":
        out["fov_masked"] = True  # an image of a set: padding filled and masked (image_pyramid), unlike a file's
    return out


def fingerprint(source: VolumeSource, cfg: Config) -> str:
    """The content fingerprint of a prepared store: every setting that shapes it plus the bytes of its
    source (both sides of a pair, in order)."""
    h = hashlib.sha256(json.dumps(_preprocessing(cfg, source), sort_keys=True).encode())
    if source.kind == "phantom":
        h.update(json.dumps([PHANTOM_RECIPE, source.ref, source.kernel, list(cfg.data.phantom.shape)]).encode())
        return h.hexdigest()[:24]
    for k, ref in enumerate([source.ref, source.target] if source.kind == "pair" else [source.ref]):
        h.update(f"side {k}".encode())
        _hash_content(h, ref)
    return h.hexdigest()[:24]


def _hash_content(h: Any, ref: str) -> None:
    """Feed ``h`` every file of ``ref`` (a file, a folder or an ``s3://`` prefix), in name order, each with
    its path relative to ``ref`` (a renamed member changes the fingerprint; the folder's own name does not)."""
    fs, root = storage.filesystem(storage.normalize_uri(ref))
    root = root.rstrip("/")
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]  # find lists files only
    for path in files:
        rel = path[len(root) :].lstrip("/")
        h.update(f"\0{rel}\0".encode())
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)


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
        out = {"uri": uri, "prepared": False, "shape": meta["shape"], "source": asdict(source)}
        return out | ({"alignment": meta["alignment"]} if "alignment" in meta else {})
    extra: dict[str, Any] = {}
    if source.kind == "pair":  # the alignment is recorded with the prepared data (and by the job in MLflow)
        ready = prepared_pair(source, cfg)
        pyr, geom, shape = pair_pyramid(ready, cfg), ready.geometry, tuple(ready.source.shape)
        extra["alignment"] = ready.alignment
    else:
        pyr, geom, shape = source_pyramid(source, cfg)
    write_pyramid(uri, pyr, geom, {"fingerprint": fp, "source": asdict(source), "shape": list(shape), **extra})
    return {"uri": uri, "prepared": True, "shape": list(shape), "source": asdict(source), **extra}


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
    elif source.kind in ("pair", "image"):
        from msgan.data.pairs import side_info

        size = tuple(side_info(source.ref).shape)
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
    (:func:`msgan.train.check_scale_shape`, the rule :class:`~msgan.train.ScaleTrainer` applies). Without
    pairs, both image sets are checked together and against the scored pairs first (:func:`check_unpaired`)."""
    pair_checks = check_pairs(cfg, [v for v in volumes if v.kind == "pair"])
    shapes: dict[str, tuple[int, ...]] = {}
    if any(v.kind == "image" for v in volumes):
        shapes = check_unpaired(cfg, pair_checks)
    for src in volumes:
        check_source(src, cfg)
        shape = shapes.get(src.ref) if src.kind == "image" else None
        for s, level in enumerate(pyramid_shapes(shape or source_shape(src, cfg), cfg.num_scales)):
            check_scale_shape(cfg, s, level, src.label)


def check_unpaired(cfg: Config, pair_checks: Sequence[Any] = ()) -> dict[str, tuple[int, ...]]:
    """Without pairs, before any work: every image of both sets (all splits) readable, of ``dims``
    dimensions and of one modality, no image in both sets or in a scored pair, one patient in one split across
    the sets and the pairs (:func:`msgan.data.images.check_sets`; ``pair_checks``: :func:`check_pairs`'s).
    One :class:`ConfigError` lists every unusable image; returns each image's shape by its reference."""
    from msgan.data.images import check_sets, read_images

    d = cfg.data
    checks = check_sets(read_images(d.sources), read_images(d.targets), cfg.dims, pair_checks,
                        Path(d.pairs).name if d.pairs else "pairs")  # fmt: skip
    bad = [f"{c.image.label} ({c.role}): {'; '.join(c.problems)}" for c in checks if c.problems]
    if bad:
        raise ConfigError(
            f"{len(bad)} of {len(checks)} images cannot be used (nothing was prepared):\n  " + "\n  ".join(bad)
        )
    return {c.image.ref: tuple(c.info.shape) for c in checks if c.info is not None}


def check_pairs(cfg: Config, volumes: Sequence[VolumeSource]) -> list[Any]:
    """When any of ``volumes`` is a pair, every pair of the manifest, in every split, is checked before any
    work (:func:`msgan.data.pairs.check_pairs`: readable sides, one patient, one modality, overlap, and one
    patient in one split, by the ``patient`` column or the DICOM PatientID), and sides in different frames of
    reference need ``data.align: rigid`` or ``affine``. One :class:`ConfigError` lists every unusable pair
    with its row and reasons. Returns the checks (:class:`msgan.data.pairs.PairCheck`; none without pairs)."""
    if not any(v.kind == "pair" for v in volumes):
        return []
    from msgan.data.pairs import check_pairs as check_manifest
    from msgan.data.pairs import read_pairs

    name = Path(cfg.data.pairs).name
    checks = check_manifest(read_pairs(cfg.data.pairs), cfg.dims)
    bad = []
    for c in checks:
        problems = list(c.problems)
        if c.different_frames and cfg.data.align == "none":
            problems.append(
                "its two sides lie in different frames of reference, so their coordinates say nothing of each "
                "other: set data.align: rigid (or affine) to register them"
            )
        if problems:
            bad.append(f"{name} row {c.pair.row}: {'; '.join(problems)}")
    if bad:
        raise ConfigError(
            f"{len(bad)} of {len(checks)} pairs cannot train (nothing was prepared; `msgan check-pairs` lists "
            "every pair):\n  " + "\n  ".join(bad)
        )
    return checks
