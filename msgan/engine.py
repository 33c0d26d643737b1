"""The one tile engine: what a generator sees for a box, and the loop that runs it over tiles.

:func:`feed_box` builds a generator's inputs for an output box from NAMED arrays, the same
way for training (with corruptions) and inference (without):

- ``"prev"``: scale ``i - 1`` (the real image in training, the previous output at
  inference), window units, at its own (coarse) resolution;
- ``"image"``: the source image at scale ``i``, window units;
- ``"edges"``: the edge image at scale ``i``.

A generator reads only what its :attr:`channels` (and wide context) name; arrays may be
numpy, zarr or anything with basic slicing, read box by box with the reflect border rule
of :mod:`msgan.tiling`.

:func:`run_tiles` runs a generator over tiles: a plan's batches (:func:`msgan.tiling.batches_of`),
each forward pass the same shape (``batch_size`` tiles of the plan's run core; a short last
batch is padded with copies of its last tile), one autocast rule, and a ``write`` callback
that receives each tile's core. Same input, model, tile and batch size give the same bytes,
whichever process runs which batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from msgan.augment import Corruption, corrupt
from msgan.tiling import Tile, batches_of, input_box, read_region, upsample_region

Arrays = Mapping[str, Any]
FeedFn = Callable[[Tile], "Feed"]
WriteFn = Callable[[Tile, np.ndarray], None]
ProgressFn = Callable[[int, int], None]  # (tiles done, tiles total)


class Feed(NamedTuple):
    x: np.ndarray  # (C, *box + 2*halo): the fine channels, in the generator's `channels` order
    coarse: np.ndarray | None  # (1, *context box): the previous scale for a wide context, else None


def autocast(device: str | torch.device, amp: bool) -> Any:
    """The one mixed-precision rule: bf16 autocast on CUDA when ``amp``, full precision elsewhere."""
    d = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and d.type == "cuda" else nullcontext()


def needed_arrays(gen: Any) -> tuple[str, ...]:
    """Names of the arrays :func:`feed_box` reads for ``gen``."""
    names = list(getattr(gen, "channels", ("edges",)))
    if getattr(gen, "context", "none") == "wide":
        names.append("prev")
    return tuple(dict.fromkeys(names))


def _fine_shape(gen: Any, arrays: Arrays) -> tuple[int, ...]:
    """The grid of the generator's own scale: its first fine array's, else ``arrays["grid"]``'s (an array
    on that grid, given when every fine channel is made by the caller: ``feed_box``'s ``regions``)."""
    for name in needed_arrays(gen):
        if name != "prev" and name in arrays:
            return tuple(arrays[name].shape)
    if "grid" in arrays:
        return tuple(arrays["grid"].shape)
    raise ValueError(f"generator channels {needed_arrays(gen)} name no array at its own scale")


def _corrupted(a: np.ndarray, params: Corruption | None) -> np.ndarray:
    if params is None or not params.fired:
        return a
    return corrupt(torch.from_numpy(np.ascontiguousarray(a))[None, None], params)[0, 0].numpy()


def feed_box(
    gen: Any,
    arrays: Arrays,
    start: Sequence[int] | None = None,
    stop: Sequence[int] | None = None,
    corruptions: Mapping[str, Corruption] | None = None,
    regions: Mapping[str, np.ndarray] | None = None,
) -> Feed:
    """The inputs of ``gen`` for the output box ``[start, stop)`` (default: the whole grid).

    ``gen`` is a generator, or anything with its ``channels``, ``halo`` and ``context`` attributes.

    Fine channels cover the box grown by the generator's halo; ``prev`` is upsampled x2 onto it
    (``upscaled`` context) or read at its own resolution over the wide context box. Training passes
    ``corruptions`` per array name (applied to the whole region read); inference passes none. ``regions``
    gives fine channels already made for this box's input box (the box grown by the halo), by name, instead
    of reading them from ``arrays``: training without pairs synthesizes the source this way.
    """
    made = dict(regions or {})
    missing = [n for n in needed_arrays(gen) if n not in arrays and n not in made]
    if missing:
        raise ValueError(
            f"the generator reads arrays {list(needed_arrays(gen))}; missing {missing} (given: {sorted(arrays)})"
        )
    shape = _fine_shape(gen, arrays)
    for name in needed_arrays(gen):
        if name != "prev" and name in arrays and tuple(arrays[name].shape) != shape:
            raise ValueError(f"array {name!r} has shape {tuple(arrays[name].shape)}; the scale's grid is {shape}")
    start = [0] * len(shape) if start is None else list(start)
    stop = list(shape) if stop is None else list(stop)
    halo = int(getattr(gen, "halo", 0))
    in0, in1 = input_box(start, stop, halo)
    cor = corruptions or {}
    channels = []
    for name in getattr(gen, "channels", ("edges",)):
        if name == "prev":
            region = upsample_region(arrays["prev"], shape, in0, in1)
        elif name in made:
            region = np.asarray(made[name], dtype=np.float32)
            if region.shape != tuple(b - a for a, b in zip(in0, in1, strict=True)):
                raise ValueError(f"region {name!r} has shape {region.shape}; the input box {in0}..{in1} needs its size")
        else:
            region = np.asarray(read_region(arrays[name], in0, in1), dtype=np.float32)
        channels.append(_corrupted(region, cor.get(name)))
    coarse = None
    if getattr(gen, "context", "none") == "wide":
        c0, c1 = gen.context_box(start, stop)  # type: ignore[operator]
        region = np.asarray(read_region(arrays["prev"], c0, c1), dtype=np.float32)
        coarse = _corrupted(region, cor.get("prev"))[None]
    return Feed(np.stack(channels).astype(np.float32, copy=False), coarse)


def tile_feed(gen: nn.Module, arrays: Arrays) -> FeedFn:
    """The inference feed of ``gen`` over ``arrays``: a tile's inputs over its run box, uncorrupted."""

    def feed(tile: Tile) -> Feed:
        return feed_box(gen, arrays, tile.start, tile.run_stop)

    return feed


def cpu_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the layout the CPU runs a generator fastest in: channels-last for 2D and 3D batches.
    oneDNN then convolves in place of reordering every layer's input and output to its blocked
    layout and back: 1.7-1.9x faster per layer and no copy of a feature map (``python
    benchmarks/memory_model.py --layers``). Other devices: unchanged."""
    if t.device.type != "cpu" or t.ndim not in (4, 5):
        return t
    return t.contiguous(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)


@torch.no_grad()
def run_tiles(
    gen: nn.Module,
    tiles: Sequence[Tile],
    feed: FeedFn,
    write: WriteFn,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: ProgressFn | None = None,
) -> int:
    """Run ``gen`` over ``tiles`` (in plan order) in the plan's batches, calling ``write(tile, core)``
    with each tile's output core (``core.shape == tile.shape``). Returns the number of tiles."""
    if getattr(gen, "padding", "valid") != "valid":
        raise ValueError("tiled inference needs a valid-convolution generator (padding='valid')")
    d = torch.device(device)
    gen.eval()
    done = 0
    for group in batches_of(tiles, batch_size):
        feeds = [feed(t) for t in group]
        feeds += [feeds[-1]] * (batch_size - len(feeds))  # every forward pass has the same shape
        x = cpu_layout(torch.from_numpy(np.stack([f.x for f in feeds])).to(d))  # (B, C, run + 2h, ...)
        c = None
        if feeds[0].coarse is not None:
            c = cpu_layout(torch.from_numpy(np.stack([f.coarse for f in feeds])).to(d))  # type: ignore[misc]
        del feeds  # the batch holds the inputs now: no second copy alive through the forward pass
        with autocast(d, amp):
            y = gen(x, c) if c is not None else gen(x)  # (B, 1, run, ...)
        y_np = y.float().cpu().numpy()
        for t, yi in zip(group, y_np, strict=False):
            write(t, yi[0][t.crop])
        done += len(group)
        if progress is not None:
            progress(done, len(tiles))
    return done


@torch.no_grad()
def run_whole(gen: nn.Module, arrays: Arrays, device: str | torch.device = "cpu", amp: bool = False) -> np.ndarray:
    """One forward pass of ``gen`` over the whole grid (scale 0's U-Net; a reference for HR)."""
    d = torch.device(device)
    gen.eval()
    f = feed_box(gen, arrays)
    x = torch.from_numpy(f.x)[None].to(d)  # (1, C, D, H, W)
    c = torch.from_numpy(f.coarse)[None].to(d) if f.coarse is not None else None
    with autocast(d, amp):
        y = gen(x, c) if c is not None else gen(x)
    return y.float().cpu().numpy()[0, 0]


def array_writer(out: Any) -> WriteFn:
    """A ``write`` callback that stores each core into ``out`` (numpy, zarr: anything with slice assignment)."""

    def write(tile: Tile, core: np.ndarray) -> None:
        out[tile.slices] = core

    return write
