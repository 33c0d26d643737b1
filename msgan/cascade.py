"""Cascaded, tile-exact inference over array stores, and the cascade as a saved model.

Scale 0 runs on the whole LR edge image. Each HR scale tiles its grid; a tile's input is
``core + 2*halo`` voxels of (previous output upsampled x2, edges), read with the shared
reflect border rule (:mod:`msgan.tiling`), and its output core is written in place. The
result equals one whole-volume forward pass, whatever the tile size.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msgan import __version__
from msgan.config import Config, from_dict
from msgan.memory import largest_tile
from msgan.nets import HRGenerator, count_parameters
from msgan.pyramid import build_pyramid, unwindow
from msgan.storage import staged_dir
from msgan.tiling import Tile, iter_batches, read_region, tile_grid, upsample_region

MANIFEST = "manifest.json"
FORMAT = "msgan-cascade/1"

Progress = Callable[[int, int, int], None]  # (scale, tiles done, tiles total)


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


@torch.no_grad()
def run_lr(gen: nn.Module, edges_lr: Any, device: str | torch.device = "cpu", amp: bool = False) -> np.ndarray:
    """Scale 0: the whole LR edge image through the U-Net."""
    d = torch.device(device)
    gen.eval()
    x = torch.from_numpy(np.asarray(edges_lr, dtype=np.float32))[None, None].to(d)  # (1, 1, D, H, W)
    with _autocast(d, amp):
        y = gen(x)
    return y.float().cpu().numpy()[0, 0]


def tile_inputs(gen: HRGenerator, prev: Any, edges: Any, tile: Tile) -> tuple[np.ndarray, np.ndarray | None]:
    """Generator inputs for one tile: ``x`` (C, core + 2*halo, ...) and the wide context crop (or None)."""
    h, shape = gen.halo, tuple(edges.shape)
    in0, in1 = [a - h for a in tile.start], [b + h for b in tile.stop]
    e = read_region(edges, in0, in1)
    if gen.context == "upscaled":
        return np.stack([upsample_region(prev, shape, in0, in1), e]), None
    if gen.context == "wide":
        c0, c1 = gen.context_box(tile.start, tile.stop)
        return e[None], read_region(prev, c0, c1)[None]
    return e[None], None


@torch.no_grad()
def run_hr(
    gen: HRGenerator,
    prev: Any,
    edges: Any,
    out: Any,
    core: int | Sequence[int],
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """One HR scale, tile by tile: reads ``prev`` (scale i-1) and ``edges`` (scale i), writes every
    core into ``out`` (any array with slice assignment: numpy, zarr). Returns the number of tiles."""
    if gen.padding != "valid":
        raise ValueError("tiled inference needs a valid-convolution generator (padding='valid')")
    if tuple(out.shape) != tuple(edges.shape):
        raise ValueError(f"output shape {tuple(out.shape)} differs from the edge image's {tuple(edges.shape)}")
    d = torch.device(device)
    gen.eval()
    tiles = tile_grid(tuple(out.shape), core)
    done = 0
    for batch in iter_batches(tiles, batch_size):
        inputs = [tile_inputs(gen, prev, edges, t) for t in batch]
        x = torch.from_numpy(np.stack([i[0] for i in inputs])).to(d)  # (B, C, core + 2h, ...)
        c = torch.from_numpy(np.stack([i[1] for i in inputs])).to(d) if inputs[0][1] is not None else None  # type: ignore[misc]
        with _autocast(d, amp):
            y = gen(x, c)  # (B, 1, core, ...)
        y_np = y.float().cpu().numpy()
        for t, yi in zip(batch, y_np, strict=True):
            out[t.slices] = yi[0]
        done += len(batch)
        if progress is not None:
            progress(done, len(tiles))
    return len(tiles)


def run_hr_whole(gen: HRGenerator, prev: Any, edges: Any, device: str | torch.device = "cpu") -> np.ndarray:
    """Reference: one forward pass over the whole (reflect-padded) volume."""
    out = np.zeros(tuple(edges.shape), dtype=np.float32)
    run_hr(gen, prev, edges, out, core=max(edges.shape), device=device)
    return out


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
        from msgan.train import build_generator

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
        from msgan.train import build_generator

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
        """Tile core for ``scale`` from the config's memory budget (at most the volume's side)."""
        gen = self.generators[scale]
        assert isinstance(gen, HRGenerator)
        inf = self.config.inference
        return largest_tile(gen, self.config.dims, inf.memory_budget_mb * 2**20, inf.batch_size, max(shape))

    def translate_edges(
        self,
        edges: Sequence[Any],
        outputs: Sequence[Any] | None = None,
        tile: int | None = None,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Run the cascade on an edge pyramid (LR first). ``outputs`` receive each scale's image
        (window units); numpy arrays are made when not given. Returns (outputs, timings)."""
        cfg = self.config
        if len(edges) != cfg.num_scales:
            raise ValueError(f"{len(edges)} edge levels given; the cascade has {cfg.num_scales} scales")
        for s, e in enumerate(edges):
            if len(e.shape) != cfg.dims:
                raise ValueError(f"edge level {s} has shape {tuple(e.shape)}; the cascade is {cfg.dims}D")
        outs = list(outputs) if outputs is not None else [np.zeros(e.shape, np.float32) for e in edges]
        stats: dict[str, Any] = {"scales": []}
        t0 = time.perf_counter()
        outs[0][...] = run_lr(self.generators[0], edges[0], device, cfg.train.amp)
        stats["scales"].append({"scale": 0, "tiles": 1, "seconds": time.perf_counter() - t0})
        for s in range(1, cfg.num_scales):
            gen = self.generators[s]
            assert isinstance(gen, HRGenerator)
            core = tile if tile is not None else self.tile_size(s, edges[s].shape)
            t0 = time.perf_counter()

            def report(done: int, total: int, s: int = s) -> None:
                if progress is not None:
                    progress(s, done, total)

            n = run_hr(gen, outs[s - 1], edges[s], outs[s], core, cfg.inference.batch_size, device,
                       cfg.train.amp, report)  # fmt: skip
            stats["scales"].append({"scale": s, "tiles": n, "tile": core, "seconds": time.perf_counter() - t0})
        return outs, stats

    def translate(
        self,
        image: np.ndarray,
        tile: int | None = None,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Translate a raw image (HU for CT) held in memory; returns the finest scale in input units."""
        cfg = self.config
        if image.ndim != cfg.dims:
            raise ValueError(f"image has {image.ndim} dimensions {image.shape}; the cascade is {cfg.dims}D")
        pyr = build_pyramid(image, cfg.num_scales, cfg.intensity, cfg.edges)
        outs, _ = self.translate_edges(pyr.edges, tile=tile, device=device, progress=progress)
        return unwindow(outs[-1], cfg.intensity)
