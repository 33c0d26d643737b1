"""Cascaded, tile-exact inference over array stores, and the cascade as a saved model.

Scale 0 runs on the whole LR grid. Each HR scale tiles its grid; a tile's inputs are built
by :func:`msgan.engine.feed_box` from named arrays (``prev``: the previous output, ``image``
and/or ``edges`` at this scale) with the shared reflect border rule, run by
:func:`msgan.engine.run_tiles`, and its output core is written in place. The result equals
one whole-volume forward pass, whatever the tile size.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msgan import __version__, storage
from msgan.config import Config, ConfigError, spec_of
from msgan.engine import array_writer, run_tiles, run_whole, tile_feed
from msgan.memory import largest_tile
from msgan.nets import HRGenerator, build_generator, count_parameters
from msgan.normalize import Scaling, apply, scaling_of
from msgan.pyramid import build_pyramid, output_units
from msgan.scale_loop import Progress, check_same_shape  # Progress: (scale, tiles done, tiles total)
from msgan.spec import ModelSpec
from msgan.storage import staged_dir
from msgan.tiling import plan_core, tile_grid

MANIFEST = "manifest.json"
FORMAT = "msgan-cascade/2"  # the model spec ("spec"), never the run settings
FORMAT_V1 = "msgan-cascade/1"  # before the model spec: the whole config ("config"), still loaded
FORMATS = (FORMAT, FORMAT_V1)
_MODEL_KEY = {FORMAT: "spec", FORMAT_V1: "config"}  # where a format keeps the model's definition


def run_lr(gen: nn.Module, lr: Any, device: str | torch.device = "cpu", amp: bool = False) -> np.ndarray:
    """Scale 0: the whole LR grid through the U-Net. ``lr``: the named LR arrays (``image`` / ``edges``),
    or the LR edge image alone."""
    arrays = lr if isinstance(lr, Mapping) else {"edges": lr}
    return run_whole(gen, arrays, device, amp)


def run_scale(
    gen: HRGenerator,
    arrays: Mapping[str, Any],
    out: Any,
    core: int | Sequence[int],
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """One HR scale, tile by tile: reads the named ``arrays`` (``prev`` = scale i-1, ``image`` /
    ``edges`` at scale i), writes every core into ``out`` (numpy, zarr). Returns the number of tiles."""
    shape = tuple(out.shape)
    check_same_shape(arrays, shape)
    tiles = tile_grid(shape, core)
    return run_tiles(gen, tiles, tile_feed(gen, arrays), array_writer(out), batch_size, device, amp, progress)


def run_hr(gen: HRGenerator, prev: Any, edges: Any, out: Any, core: int | Sequence[int], batch_size: int = 1,
           device: str | torch.device = "cpu", amp: bool = False,
           progress: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
    """:func:`run_scale` of an edges-conditioned generator (the paper's inputs)."""
    return run_scale(gen, {"prev": prev, "edges": edges}, out, core, batch_size, device, amp, progress)


def run_scale_whole(gen: HRGenerator, arrays: Mapping[str, Any], device: str | torch.device = "cpu") -> np.ndarray:
    """Reference: one forward pass over the whole (reflect-padded) grid."""
    return run_whole(gen, arrays, device)


def run_hr_whole(gen: HRGenerator, prev: Any, edges: Any, device: str | torch.device = "cpu") -> np.ndarray:
    """:func:`run_scale_whole` of an edges-conditioned generator."""
    return run_whole(gen, {"prev": prev, "edges": edges}, device)


# ----------------------------------------------------------------------------- the cascade as a model
#
# A cascade folder is untrusted input (DESIGN invariant 7): ``manifest.json`` names the weight files, and
# every name must be a plain file name inside the folder; each file must be a regular file (never a
# symbolic link, FIFO, device or directory) under a size cap; its bytes are read once, checked against the
# manifest's sha256 and only those bytes reach ``torch.load(weights_only=True)``.

MANIFEST_MAX_BYTES = 1 << 20  # manifest.json: a few KB in practice
WEIGHTS_MAX_BYTES = 2 << 30  # one scale_<i>.pt: read whole into memory, so capped (tiny nets are ~100 KB)
MAX_FILE_NAME = 255  # characters of a file name the manifest gives
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)  # a symbolic link swapped in after the check is refused by the kernel
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO can never block the open
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class CascadeError(ValueError):
    """A cascade (model) folder or artifact that is not a sound msgan cascade; the message names the model's
    file and the rule it breaks."""


class ManifestChangedError(CascadeError):
    """A pinned cascade's manifest no longer has the hash it was pinned with."""

    def __init__(self, got: str, pinned: str) -> None:
        super().__init__(f"manifest sha256 {got[:12]}, pinned {pinned[:12]}")
        self.got, self.pinned = got, pinned


class CascadeNotFoundError(CascadeError, FileNotFoundError):
    """The folder holds no ``manifest.json``."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_file_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (what a manifest may name inside its own folder), else
    :class:`CascadeError`: no path separators, no ``..``, no drive or NUL/control characters, not empty,
    at most :data:`MAX_FILE_NAME` characters."""
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= MAX_FILE_NAME
        and name not in (".", MANIFEST)
        and ".." not in name
        and not any(c in name for c in "/\\:")
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if not ok:
        shown = repr(name)[:120] if isinstance(name, str) else f"a {type(name).__name__}"
        raise CascadeError(
            f"{where} names {shown}; a model file must be a plain file name inside the model folder "
            f"(1-{MAX_FILE_NAME} characters, no '/', '\\', ':', '..', NUL or control characters, not {MANIFEST})"
        )
    return name


def read_model_file(path: str | Path, cap: int, where: str, what: str = "weights file") -> bytes:
    """The whole content of ``path``, a regular file of at most ``cap`` bytes, read once; else
    :class:`CascadeError` naming ``where``. Symbolic links (even to a file beside it), FIFOs, devices and
    directories are refused before anything is read; a FIFO is never opened blocking."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CascadeError(f"{where}: missing (the manifest names it)") from None
    except OSError as err:
        raise CascadeError(f"{where}: cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CascadeError(f"{where}: {_kind(st.st_mode)}; a model file must be a regular file inside the folder")
    limit = f"the cap of {cap} bytes ({_size(cap)}) per {what}"
    if st.st_size > cap:
        raise CascadeError(f"{where}: {st.st_size} bytes, above {limit}; refused before reading it")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CascadeError(f"{where}: a symbolic link; a model file must be a regular file") from None
        raise CascadeError(f"{where}: cannot be opened ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # what was opened, whatever the name points at now
        if not stat.S_ISREG(st.st_mode):
            raise CascadeError(f"{where}: {_kind(st.st_mode)}; a model file must be a regular file inside the folder")
        if st.st_size > cap:
            raise CascadeError(f"{where}: {st.st_size} bytes, above {limit}; refused before reading it")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise CascadeError(f"{where}: grew beyond {limit} while being read")
    return data


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A cascade manifest's content, checked: a JSON object of a known format (:data:`FORMATS`) holding the
    model's definition (``spec``; ``config`` before :data:`FORMAT`), whose ``weights`` list scales 0..n-1 in
    order, each with a plain ``file`` name (:func:`check_file_name`, no two alike) and a sha256."""
    try:
        content = storage.json_object(raw)
        fmt = content.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise CascadeError(f"{where}: format {str(fmt)[:80]!r}, expected one of {list(FORMATS)}")
        model_key = _MODEL_KEY.get(str(fmt), "spec")  # the format is absent or known here
        storage.require_keys(content, ("format", model_key, "weights"))
        manifest = content
    except ValueError as err:
        if isinstance(err, CascadeError):
            raise
        raise CascadeError(f"{where}: malformed cascade manifest: {err}") from None
    if not isinstance(manifest[model_key], dict):
        raise CascadeError(f"{where}: {model_key!r} is a {type(manifest[model_key]).__name__}, expected an object")
    if not isinstance(manifest.get("meta", {}), dict):
        raise CascadeError(f"{where}: 'meta' is a {type(manifest['meta']).__name__}, expected an object")
    weights = manifest["weights"]
    if not isinstance(weights, list) or not weights:
        raise CascadeError(f"{where}: 'weights' must be a non-empty list of {{scale, file, sha256}} entries")
    seen: set[str] = set()
    for i, entry in enumerate(weights):
        at = f"{where}: weights[{i}]"
        if not isinstance(entry, dict):
            raise CascadeError(f"{at} is a {type(entry).__name__}, expected {{scale, file, sha256}}")
        scale = entry.get("scale")
        if type(scale) is not int or scale != i:
            raise CascadeError(f"{at} has scale {str(scale)[:40]!r}; entries must list scales 0, 1, ... in order")
        name = check_file_name(entry.get("file"), at)
        if name in seen:
            raise CascadeError(f"{at} names {name!r} a second time")
        seen.add(name)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CascadeError(f"{at} ({name}) has no sha256 (64 lowercase hex digits) to check the file by")
    return manifest


def _at(directory: Path, label: str | None, name: str) -> str:
    """How messages name a model's file: ``folder/name``, or ``LABEL: name`` for a downloaded artifact."""
    return f"{label}: {name}" if label is not None else str(directory / name)


def read_manifest_raw(folder: str | Path, label: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """(bytes, checked content) of a cascade folder's ``manifest.json`` (:func:`read_model_file` with
    :data:`MANIFEST_MAX_BYTES`, then :func:`parse_manifest`); :class:`CascadeNotFoundError` when absent."""
    d = Path(folder)
    where = _at(d, label, MANIFEST)
    try:
        os.lstat(d / MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        raise CascadeNotFoundError(f"{label or d}: not a cascade folder (no {MANIFEST})") from None
    except OSError as err:
        raise CascadeError(f"{where}: cannot be read ({err.strerror or err})") from None
    raw = read_model_file(d / MANIFEST, MANIFEST_MAX_BYTES, where, "manifest")
    return raw, parse_manifest(raw, where)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A cascade folder's manifest under the same rules :meth:`Cascade.load` applies (for ``msgan info``)."""
    return read_manifest_raw(folder)[1]


def manifest_spec(manifest: Mapping[str, Any], where: str) -> ModelSpec:
    """The model spec a checked manifest (:func:`parse_manifest`) holds: its ``spec``, or for a manifest of
    :data:`FORMAT_V1` the spec's part of its ``config`` (its run settings are ignored, never carried on).
    A :class:`CascadeError` naming ``where`` when it breaks a rule."""
    try:
        if manifest["format"] == FORMAT_V1:
            return spec_of(manifest["config"])
        return ModelSpec.from_dict(manifest["spec"])
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CascadeError(f"{where}: invalid {_MODEL_KEY[manifest['format']]} ({err})") from None


def config_halos(config: Config) -> list[int]:
    """Every scale's halo (:attr:`Cascade.halos`) from the networks ``config`` builds, on the meta device: no
    weights, no memory."""
    with torch.device("meta"):
        return [0] + [int(build_generator(config, s).halo) for s in range(1, config.num_scales)]  # type: ignore[arg-type]


def summary_problem(manifest: Mapping[str, Any], spec: ModelSpec, halos: Sequence[int] | None = None) -> str | None:
    """What a manifest's summary (the fields ``msgan info`` shows) says against its spec, which is what loads
    (None when they agree). A field the manifest leaves out is not compared."""
    said: dict[str, Any] = {"dims": spec.dims, "num_scales": spec.num_scales, "hr_patch": spec.hr_patch}
    if halos is not None:
        said["halos"] = list(halos)
    wrong = [f"{k} {manifest[k]!r} (its spec: {v!r})" for k, v in said.items() if k in manifest and manifest[k] != v]
    got = manifest.get("intensity")
    if isinstance(got, Mapping):
        want = {"low": spec.intensity.low, "high": spec.intensity.high, "normalize": spec.intensity.normalize}
        wrong += [f"intensity.{k} {got[k]!r} (its spec: {v!r})" for k, v in want.items() if k in got and got[k] != v]
    elif got is not None:
        wrong.append(f"intensity {got!r} (its spec: an object)")
    return f"its summary says {', '.join(wrong)}: an edited manifest" if wrong else None


def manifest_config(manifest: Mapping[str, Any], where: str) -> Config:
    """The config a loaded cascade runs with: the manifest's spec (:func:`manifest_spec`) and default run
    settings, refused when the manifest's summary contradicts that spec (:func:`summary_problem`; the halos
    from the networks built on the meta device, before any weight is read)."""
    spec = manifest_spec(manifest, where)
    try:
        config = Config.from_spec(spec)
    except ConfigError as err:  # a spec that breaks a rule only a whole config checks
        raise CascadeError(f"{where}: invalid {_MODEL_KEY[manifest['format']]} ({err})") from None
    if problem := summary_problem(manifest, spec, config_halos(config)):
        raise CascadeError(f"{where}: {problem}")
    return config


_TORCH_ADVICE = ("weights_only", "weights only load failed", "documentation", "file an issue", "add_safe_globals")


def _load_reason(err: BaseException) -> str:
    """What torch said about a file it refused, without its advice (never to load with weights_only=False)."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    kept = [ln for ln in lines if ln and not any(a in ln.lower() for a in _TORCH_ADVICE)]
    text = "; ".join(kept)
    if isinstance(err, RuntimeError):
        text = text.split(". ", 1)[0]  # miniz's first sentence; the rest is boilerplate
    text = text.replace("WeightsUnpickler error:", "").strip(" ;")
    text = text[:300] if text else "the file ends early" if isinstance(err, EOFError) else "no detail"
    return f"{type(err).__name__}: {text}"


def _load_weights(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        ImportError,
        MemoryError,
        OverflowError,
        AssertionError,  # torch's unpickler asserts on a malformed persistent id
    ) as err:
        raise CascadeError(
            f"{where}: not a weights file torch can load weights-only ({_load_reason(err)}); "
            "a model file holds tensors, never code"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CascadeError(f"{where}: holds a {type(state).__name__}, not a dict of named tensors (a state dict)")
    for name, t in state.items():  # a generator's weights: dense, real, on the CPU, finite
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_complex():
            raise CascadeError(f"{where}: tensor {name!r} is {t.layout} {t.dtype} on {t.device}; weights are dense "
                               "real tensors")  # fmt: skip
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CascadeError(f"{where}: tensor {name!r} holds NaN or infinite weights (a diverged or damaged model)")
    return state


def load_generator(config: Config, scale: int, data: bytes, where: str) -> nn.Module:
    """Scale ``scale``'s generator of ``config`` from the bytes of its weights file (weights only, names and
    shapes checked against the network on the meta device first); errors name ``where``. The one weights
    loader: :meth:`Cascade.load` and the Ray trainer's final weights both come through here."""
    return _build(config, scale, _load_weights(data, where), where)


def _build(config: Config, scale: int, state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """Scale ``scale``'s generator holding ``state``. Its shape is checked on the meta device first, so a
    config that declares a huge network allocates nothing beyond what the (capped) file holds."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_generator(config, scale).state_dict().items()}
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, IndexError, ZeroDivisionError) as err:
        raise CascadeError(f"{where}: the manifest's config cannot build scale {scale} ({err})") from None
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != shapes:
        missing = sorted(set(shapes) - set(got))[:3]
        extra = sorted(set(got) - set(shapes))[:3]
        wrong = [f"{k} {got[k]} != {shapes[k]}" for k in shapes if k in got and got[k] != shapes[k]][:3]
        raise CascadeError(
            f"{where}: the weights do not fit scale {scale} of the manifest's config "
            f"(missing {missing}, unexpected {extra}, shapes {wrong})"
        )
    gen = build_generator(config, scale)
    gen.load_state_dict(state)
    return gen


@dataclass
class Cascade:
    """Every scale's generator plus the manifest that says how to feed them."""

    config: Config
    generators: list[nn.Module]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.generators) != self.config.num_scales:
            raise ValueError(f"{len(self.generators)} generators for num_scales={self.config.num_scales}")

    @classmethod
    def untrained(cls, config: Config, seed: int = 0) -> Cascade:
        torch.manual_seed(seed)
        return cls(config, [build_generator(config, s) for s in range(config.num_scales)], {"seed": seed})

    @property
    def halos(self) -> list[int]:
        return [0] + [g.halo for g in self.generators[1:]]  # type: ignore[misc]

    def to(self, device: str | torch.device) -> Cascade:
        for g in self.generators:
            g.to(device)
        return self

    @property
    def spec(self) -> ModelSpec:
        """The model's definition (:meth:`msgan.config.Config.spec`), with the inference defaults of
        :attr:`config` (a run's overrides included): what :meth:`save` writes."""
        return self.config.spec()

    def manifest(self) -> dict[str, Any]:
        """What ``manifest.json`` holds besides the weights: the spec and a summary of it (``msgan info``),
        never the run settings (training, deployment, data paths, job)."""
        spec = self.spec
        values = spec.to_dict()
        return {
            "format": FORMAT,
            "code_version": __version__,
            "dims": spec.dims,
            "num_scales": spec.num_scales,
            "halos": self.halos,
            "hr_patch": spec.hr_patch,
            "intensity": {
                "low": spec.intensity.low,
                "high": spec.intensity.high,
                "normalize": spec.intensity.normalize,
            },
            "edges": values["edges"],
            "parameters": [count_parameters(g) for g in self.generators],
            "spec": values,
            "meta": self.meta,
        }

    def save(self, directory: str | Path, replace: bool = False) -> Path:
        """Write ``manifest.json`` and ``scale_<i>.pt`` into ``directory`` atomically (staging + rename). An
        existing ``directory`` is replaced only when it is a cascade folder (its manifest reads) and ``replace``
        is given; anything else there is refused, never removed."""
        d = Path(directory)
        if d.exists() or d.is_symlink():
            try:
                read_manifest_raw(d)
                ours = d.is_dir() and not d.is_symlink()
            except (CascadeError, OSError):
                ours = False
            if not ours or not replace:
                from msgan.io.outputs import OutputError, describe
                from msgan.storage import normalize_uri

                raise OutputError(
                    f"{directory}: exists ({describe(normalize_uri(d))}); "
                    + (
                        "pass --replace to replace this cascade folder"
                        if ours
                        else "not a cascade folder: never replaced; give a new folder"
                    )
                )
        with staged_dir(directory, replace=replace) as stage:
            manifest = self.manifest()
            files = []
            for i, g in enumerate(self.generators):
                name = f"scale_{i}.pt"
                torch.save({k: v.detach().cpu() for k, v in g.state_dict().items()}, stage / name)
                files.append({"scale": i, "file": name, "sha256": _sha256(stage / name)})
            manifest["weights"] = files
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return Path(directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        label: str | None = None,
        manifest_sha256: str | None = None,
    ) -> Cascade:
        """The cascade saved in ``directory``, checked as untrusted input (:func:`read_manifest_raw`,
        :func:`read_model_file`, sha256 before torch sees a byte, weights only). Every refusal is a
        :class:`CascadeError` naming the file (``label: file`` when ``label`` is given, e.g. a registry URI
        whose artifact was downloaded into a temporary folder). With ``manifest_sha256`` (a pinned model) the
        manifest bytes read must have that hash (:class:`ManifestChangedError`): what loads is what was pinned."""
        d = Path(directory)
        raw, manifest = read_manifest_raw(d, label)
        mwhere = _at(d, label, MANIFEST)
        if manifest_sha256 is not None and (got := hashlib.sha256(raw).hexdigest()) != manifest_sha256:
            raise ManifestChangedError(got, manifest_sha256)
        cfg = manifest_config(manifest, mwhere)
        weights = manifest["weights"]
        if len(weights) != cfg.num_scales:
            raise CascadeError(f"{mwhere}: lists {len(weights)} weight files; its config has {cfg.num_scales} scales")
        gens = []
        for entry in weights:
            where = _at(d, label, entry["file"])
            data = read_model_file(d / entry["file"], WEIGHTS_MAX_BYTES, where)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CascadeError(f"{where}: checksum does not match the manifest (corrupt or replaced file)")
            g = load_generator(cfg, entry["scale"], data, where)
            del data
            gens.append(g.to(device).eval())
        return cls(cfg, gens, manifest.get("meta", {}))

    # -- inference

    def tile_size(self, scale: int, shape: Sequence[int]) -> int:
        """Tile core for ``scale``: within the config's memory budget (and at most the volume's side), the
        core whose plan runs the least work (:func:`msgan.tiling.plan_core`)."""
        gen = self.generators[scale]
        assert isinstance(gen, HRGenerator)
        inf = self.config.inference
        budget = largest_tile(gen, self.config.dims, inf.memory_budget_mb * 2**20, inf.batch_size, max(shape))
        return plan_core(shape, budget, gen.halo)

    def translate_arrays(
        self,
        levels: Sequence[Mapping[str, Any]],
        outputs: Sequence[Any] | None = None,
        tile: int | None = None,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Run the cascade on named arrays per scale (LR first): ``image`` (the windowed source, normalised
        first when the spec says so: :meth:`levels`) and/or ``edges``, as the config's ``condition`` needs.
        ``outputs`` receive each scale's image (window units); numpy arrays are made when not given. Returns
        (outputs, timings)."""
        from msgan.scale_loop import ArrayTarget, InProcess, run_cascade  # the one per-scale driver

        def core(scale: int, shape: tuple[int, ...]) -> int:
            return tile if tile is not None else self.tile_size(scale, shape)

        target = ArrayTarget(levels, self.config, core, outputs)
        scales = run_cascade(self.config.num_scales, InProcess(self, target, device), progress)
        return target.outputs, {"scales": scales}

    def scaling_of(self, image: Any, name: str = "image") -> Scaling | None:
        """The source's intensity scaling by this model's spec (:func:`msgan.normalize.scaling_of`: None when
        ``intensity.normalize`` is ``none``); every inference path computes it from the same strided sample."""
        return scaling_of(image, self.config.intensity, name)

    def levels(
        self, image: np.ndarray, scaling: Scaling | None = None
    ) -> tuple[list[dict[str, np.ndarray]], np.ndarray, Scaling | None]:
        """What :meth:`translate_arrays` reads for a raw image (input units): the named arrays per scale (LR
        first), the image in the units the window is in (normalised by ``scaling``, else by the image's own
        :meth:`scaling_of`, when the spec says so; else the image itself) and that scaling."""
        cfg = self.config
        if image.ndim != cfg.dims:
            raise ValueError(f"image has {image.ndim} dimensions {image.shape}; the cascade is {cfg.dims}D")
        if scaling is None:
            scaling = self.scaling_of(image)
        x = apply(image, scaling, cfg.intensity)
        pyr = build_pyramid(x, cfg.num_scales, cfg.intensity, cfg.edges)
        return [{"image": im, "edges": e} for im, e in zip(pyr.images, pyr.edges, strict=True)], x, scaling

    def translate(
        self,
        image: np.ndarray,
        tile: int | None = None,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
        scaling: Scaling | None = None,
    ) -> np.ndarray:
        """Translate a raw image (HU for CT) held in memory; returns the finest scale in input units (outside
        the intensity window as ``intensity.outside`` says). With ``intensity.normalize: percentile`` the image
        is first normalised by ``scaling`` (default: its own, :meth:`scaling_of`) and the result is in the
        target domain's normalised units (:mod:`msgan.normalize`)."""
        levels, x, _ = self.levels(image, scaling)
        outs, _ = self.translate_arrays(levels, tile=tile, device=device, progress=progress)
        return output_units(outs[-1], self.config.intensity, source=x)
