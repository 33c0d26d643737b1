"""Cascaded, tile-exact inference over array stores, and the cascade as a saved model.

Scale 0 runs on the whole LR grid. Each HR scale tiles its grid; a tile's inputs are built
by :func:`msgan.engine.feed_box` from named arrays (``prev``: the previous output, ``image``
and/or ``edges`` at this scale) with the shared reflect border rule, run by
:func:`msgan.engine.run_tiles`, and its output core is written in place. The result equals
one whole-volume forward pass, whatever the tile size.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msgan import __version__
from msgan.config import Config, from_dict
from msgan.engine import array_writer, run_tiles, run_whole, tile_feed
from msgan.memory import largest_tile
from msgan.nets import HRGenerator, build_generator, count_parameters
from msgan.pyramid import build_pyramid, output_units
from msgan.storage import staged_dir
from msgan.tiling import plan_core, tile_grid

MANIFEST = "manifest.json"
FORMAT = "msgan-cascade/1"

Progress = Callable[[int, int, int], None]  # (scale, tiles done, tiles total)


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
    for name, a in arrays.items():
        if name != "prev" and tuple(a.shape) != shape:
            raise ValueError(f"output shape {shape} differs from array {name!r}'s {tuple(a.shape)}")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

    def manifest(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": FORMAT,
            "code_version": __version__,
            "dims": cfg.dims,
            "num_scales": cfg.num_scales,
            "halos": self.halos,
            "hr_patch": cfg.train.hr_patch,
            "intensity": {"low": cfg.intensity.low, "high": cfg.intensity.high},
            "edges": cfg.to_dict()["edges"],
            "parameters": [count_parameters(g) for g in self.generators],
            "config": cfg.to_dict(),
            "meta": self.meta,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` and ``scale_<i>.pt`` into ``directory`` atomically (staging + rename)."""
        with staged_dir(directory) as stage:
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
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Cascade:
        d = Path(directory)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{d}: not a cascade directory (no {MANIFEST})")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        cfg = from_dict(manifest["config"])
        gens = []
        for entry in manifest["weights"]:
            wpath = d / entry["file"]
            if _sha256(wpath) != entry["sha256"]:
                raise ValueError(f"{wpath}: checksum does not match the manifest (corrupt or replaced file)")
            g = build_generator(cfg, entry["scale"])
            g.load_state_dict(torch.load(wpath, map_location="cpu", weights_only=True))
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
        """Run the cascade on named arrays per scale (LR first): ``image`` (the windowed source) and/or
        ``edges``, as the config's ``condition`` needs. ``outputs`` receive each scale's image (window
        units); numpy arrays are made when not given. Returns (outputs, timings)."""
        cfg = self.config
        if len(levels) != cfg.num_scales:
            raise ValueError(f"{len(levels)} levels given; the cascade has {cfg.num_scales} scales")
        shapes = []
        for s, arrays in enumerate(levels):
            named = [a for k, a in arrays.items() if k != "prev"]
            if not named:
                raise ValueError(f"level {s} holds no image or edges array")
            shape = tuple(named[0].shape)
            if len(shape) != cfg.dims:
                raise ValueError(f"level {s} has shape {shape}; the cascade is {cfg.dims}D")
            shapes.append(shape)
        outs = list(outputs) if outputs is not None else [np.zeros(sh, np.float32) for sh in shapes]
        stats: dict[str, Any] = {"scales": []}
        t0 = time.perf_counter()
        outs[0][...] = run_lr(self.generators[0], levels[0], device, cfg.train.amp)
        stats["scales"].append({"scale": 0, "tiles": 1, "seconds": time.perf_counter() - t0})
        for s in range(1, cfg.num_scales):
            gen = self.generators[s]
            assert isinstance(gen, HRGenerator)
            core = tile if tile is not None else self.tile_size(s, shapes[s])
            t0 = time.perf_counter()

            def report(done: int, total: int, s: int = s) -> None:
                if progress is not None:
                    progress(s, done, total)

            arrays = {**levels[s], "prev": outs[s - 1]}
            n = run_scale(gen, arrays, outs[s], core, cfg.inference.batch_size, device, cfg.train.amp, report)
            stats["scales"].append({"scale": s, "tiles": n, "tile": core, "seconds": time.perf_counter() - t0})
        return outs, stats

    def translate(
        self,
        image: np.ndarray,
        tile: int | None = None,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Translate a raw image (HU for CT) held in memory; returns the finest scale in input units
        (outside the intensity window as ``intensity.outside`` says)."""
        cfg = self.config
        if image.ndim != cfg.dims:
            raise ValueError(f"image has {image.ndim} dimensions {image.shape}; the cascade is {cfg.dims}D")
        pyr = build_pyramid(image, cfg.num_scales, cfg.intensity, cfg.edges)
        levels = [{"image": im, "edges": e} for im, e in zip(pyr.images, pyr.edges, strict=True)]
        outs, _ = self.translate_arrays(levels, tile=tile, device=device, progress=progress)
        return output_units(outs[-1], cfg.intensity, source=image)
