"""Prepared training volumes at rest: one OME-Zarr store per volume holding the image and the
edge pyramid (each an OME multiscales group, level 0 finest), on ``file://`` or ``s3://``.

Layout of ``<uri>`` (``.zarr``)::

    zarr.json        attributes: msgan = {geometry, source, fingerprint, num_scales, complete}
    image/0..n-1     windowed image, level 0 = finest = scale n-1
    edges/0..n-1     edge image per level
    source/0..n-1    a training pair's windowed source image per level
    valid/0..n-1     a pair's valid voxels per level (uint8: inside the overlap and both fields of view);
                     absent when every voxel is valid

``complete`` is set last: a store without it was interrupted and is prepared again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr

from msgan.io.volume import Geometry, dimension_names, ome_attrs, open_group
from msgan.pyramid import Pyramid

CACHE_BYTES = 256 * 2**20  # levels smaller than this are read into memory when opened


def _group(uri: str, mode: str) -> zarr.Group:
    return open_group(uri, mode)


def write_pyramid(uri: str, pyramid: Pyramid, geometry: Geometry, meta: dict[str, Any], chunks: int = 64) -> None:
    """Write every level of ``pyramid`` to ``uri``, then mark the store complete."""
    root = _group(uri, "w")
    n = pyramid.num_scales
    groups = [("image", pyramid.images), ("edges", pyramid.edges)]
    if pyramid.sources is not None:  # a training pair: the source image per scale too
        groups.append(("source", pyramid.sources))
    if pyramid.masks is not None:  # voxels that must not train
        groups.append(("valid", pyramid.masks))
    for name, levels in groups:
        g = root.create_group(name)
        finest_first = list(reversed(levels))
        dtype = "uint8" if name == "valid" else "float32"
        for k, lv in enumerate(finest_first):
            ch = tuple(min(chunks, s) for s in lv.shape)
            arr = g.create_array(
                str(k), shape=lv.shape, dtype=dtype, chunks=ch, dimension_names=dimension_names(lv.ndim)
            )
            arr[...] = np.asarray(lv, dtype=dtype)
        g.attrs["ome"] = ome_attrs([lv.shape for lv in finest_first], geometry, name)
    root.attrs["msgan"] = {**meta, "geometry": geometry.as_dict(), "num_scales": n, "complete": True}


def pyramid_meta(uri: str) -> dict[str, Any] | None:
    """The store's msgan attributes, or None when it does not exist or was never completed."""
    try:
        root = _group(uri, "r")
    except Exception:  # zarr raises several kinds for a missing store
        return None
    meta = root.attrs.get("msgan")
    if not isinstance(meta, dict) or not meta.get("complete"):
        return None
    return dict(meta)


def open_pyramid(uri: str, scales: Iterable[int] | None = None, cache_bytes: int = CACHE_BYTES) -> Pyramid:
    """A :class:`Pyramid` (LR first) backed by the store. Only ``scales`` (plus the LR image, which
    gives the foreground mask) are opened; others are None. Small levels are read into memory."""
    meta = pyramid_meta(uri)
    if meta is None:
        raise FileNotFoundError(f"{uri}: no complete prepared pyramid (prepare the volume first)")
    root = _group(uri, "r")
    n = int(meta["num_scales"])
    wanted = set(range(n)) if scales is None else {*scales, 0}
    for s in wanted:
        if not 0 <= s < n:
            raise ValueError(f"{uri}: scale {s} does not exist (num_scales={n})")

    def level(kind: str, scale: int) -> Any:
        arr = root[f"{kind}/{n - 1 - scale}"]
        assert isinstance(arr, zarr.Array)
        if arr.nbytes <= cache_bytes:
            return np.asarray(arr[...])
        return arr

    images = [level("image", s) if s in wanted else None for s in range(n)]
    edges = [level("edges", s) if s in wanted else None for s in range(n)]
    sources = [level("source", s) if s in wanted else None for s in range(n)] if "source" in root else None
    masks = [level("valid", s) if s in wanted else None for s in range(n)] if "valid" in root else None
    return Pyramid(images=images, edges=edges, sources=sources, masks=masks)  # type: ignore[arg-type]
