"""The cascade on a staged volume: :class:`StagedVolume` is where the one per-scale loop
(:mod:`msgan.scale_loop`) reads a scale's inputs and writes its outputs, whoever runs the tiles (this process,
a Ray task, a tile actor)."""

from __future__ import annotations

import time

import numpy as np
import torch
import zarr

from msgan.cascade import Cascade
from msgan.config import Config
from msgan.engine import WriteFn
from msgan.io.volume import open_group
from msgan.pyramid import output_units
from msgan.scale_loop import ScaleTiles
from msgan.scale_loop import run_scale0 as run_lr_of
from msgan.tiling import Tile
from msgan.volumes.staging import VolumePlan, array, scale_arrays
from msgan.volumes.tasks import VolumeTask


class StagedVolume:
    """A staged volume as the cascade's target: scale ``s`` reads the staged ``image`` / ``edges`` at ``s`` and
    ``work/<s-1>``; its output goes to ``work/<s>`` (window units, read by the next scale) and to the output
    level ``n-1-s`` (input units: blended to the source outside the window when the config says so)."""

    def __init__(self, task: VolumeTask, config: Config, plan: VolumePlan | None = None) -> None:
        self.task, self.cfg, self._plan = task, config, plan
        self.n = config.num_scales
        self.inputs_group = open_group(task.inputs_uri, "r+")
        self.result = open_group(task.result_uri, "r+")

    @property
    def plan(self) -> VolumePlan:
        if self._plan is None:
            self._plan = VolumePlan.staged(self.task)
        return self._plan

    def inputs(self, scale: int) -> dict[str, zarr.Array]:
        return scale_arrays(self.inputs_group, scale)

    def tiles(self, scale: int) -> list[Tile]:
        return self.plan.tiles_of(scale)

    def core(self, scale: int) -> int:
        return self.plan.tiles[scale]

    def _source(self, scale: int) -> zarr.Array | None:
        return array(self.inputs_group, f"source/{scale}") if self.cfg.intensity.outside == "source" else None

    def write_lr(self, y: np.ndarray) -> None:
        if self.n > 1:
            array(self.inputs_group, "work/0")[...] = y
        src = self._source(0)
        source = None if src is None else np.asarray(src[...])
        array(self.result, str(self.n - 1))[...] = output_units(y, self.cfg.intensity, source)

    def writer(self, scale: int) -> WriteFn:
        work = array(self.inputs_group, f"work/{scale}") if scale < self.n - 1 else None
        out = array(self.result, str(self.n - 1 - scale))
        src = self._source(scale)
        intensity = self.cfg.intensity

        def write(tile: Tile, core: np.ndarray) -> None:
            if work is not None:
                work[tile.slices] = core
            source = None if src is None else np.asarray(src[tile.slices])
            out[tile.slices] = output_units(core, intensity, source)

        return write


def run_scale0(task: VolumeTask, cascade: Cascade, device: str | torch.device = "cpu") -> float:
    """Scale 0 of a staged volume on its whole LR grid; returns seconds."""
    t0 = time.perf_counter()
    run_lr_of(cascade, StagedVolume(task, cascade.config), device)
    return time.perf_counter() - t0


def scale_tiles(task: VolumeTask, cascade: Cascade, scale: int) -> ScaleTiles:
    """HR scale ``scale`` of a staged volume, ready to run any of its tiles (its arrays opened once)."""
    return ScaleTiles(cascade, StagedVolume(task, cascade.config), scale)
