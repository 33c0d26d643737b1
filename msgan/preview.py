"""Pictures to look at: centre slices of volumes side by side, at their true aspect ratio.

A 3D volume shows three rows (axial, coronal, sagittal centre slices), a 2D image one row; each
column is one volume (source, result, truth, ...). Pixels are drawn at the physical aspect
ratio of their spacing, so a 0.7 x 0.7 x 3 mm CT does not look squashed. Only the centre slices
are read from a zarr store (its chunks through them), never the whole volume.

    msgan preview OUT.zarr [OUT.png]     # a translated volume: its source and the result side by side
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msgan import storage

View = tuple[str, np.ndarray, float]  # (name, 2D image, row spacing / column spacing)
PREVIEW = "preview.png"


def centre_views(volume: Any, spacing: Sequence[float]) -> list[View]:
    """Centre slices of a 3D ``(z, y, x)`` array (numpy or zarr; only these slices are read) or the whole of
    a 2D ``(y, x)`` image, each with its pixel aspect (row spacing / column spacing). ``spacing`` is in
    numpy axis order. Coronal and sagittal views show z upwards."""
    shape = tuple(int(n) for n in volume.shape)
    if len(shape) == 2:
        return [("image", np.asarray(volume[...], dtype=np.float32), spacing[0] / spacing[1])]
    if len(shape) != 3:
        raise ValueError(f"a preview needs a 2D or 3D image, got shape {shape}")
    cz, cy, cx = (n // 2 for n in shape)
    sz, sy, sx = spacing
    return [
        ("axial", np.asarray(volume[cz], dtype=np.float32), sy / sx),
        ("coronal", np.asarray(volume[:, cy, :], dtype=np.float32)[::-1], sz / sx),
        ("sagittal", np.asarray(volume[:, :, cx], dtype=np.float32)[::-1], sz / sy),
    ]


def auto_window(views: Sequence[View]) -> tuple[float, float]:
    """A display window from the 1st and 99th percentiles of the finite pixels shown."""
    vals = np.concatenate([v[1][np.isfinite(v[1])].ravel() for v in views] or [np.zeros(1)])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [1, 99])
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 1.0, float(lo) + 1.0)


def render(columns: Mapping[str, Sequence[View]], window: tuple[float, float] | None = None, dpi: int = 80) -> bytes:
    """PNG bytes of a grid: one column per entry of ``columns`` (same views in the same order), one row per view.
    ``window`` (low, high) defaults to :func:`auto_window` of the first column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    if not names:
        raise ValueError("nothing to draw: no columns")
    rows = len(columns[names[0]])
    lo, hi = window if window is not None else auto_window(columns[names[0]])
    # each row as tall as its tallest physical slice, relative to the width of its slices
    heights = []
    for i in range(rows):
        _, img, aspect = columns[names[0]][i]
        heights.append(img.shape[0] * aspect / img.shape[1])
    width = 3.2
    fig, axes = plt.subplots(
        rows,
        len(names),
        figsize=(width * len(names), sum(width * h for h in heights) + 0.4),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for j, name in enumerate(names):
        for i, (view, img, aspect) in enumerate(columns[name]):
            ax = axes[i][j]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(view)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save(path_or_uri: str | Path, png: bytes) -> str:
    """Write PNG bytes to a local path or a ``file://``/``s3://`` URI (whole, atomically); returns where."""
    s = str(path_or_uri)
    uri = s if s.startswith(("s3://", "file://")) else storage.normalize_uri(s)
    storage.write_bytes(uri, png)
    return s


def save_columns(
    path: str | Path,
    volumes: Mapping[str, Any],
    spacing: Sequence[float],
    window: tuple[float, float] | None = None,
) -> Path:
    """A preview PNG of in-memory volumes (same shape and spacing) side by side; returns the path."""
    columns = {name: centre_views(v, spacing) for name, v in volumes.items()}
    save(path, render(columns, window))
    return Path(path)


# ----------------------------------------------------------------------------- zarr volumes


def _level0(uri: str) -> tuple[Any, tuple[float, ...], dict[str, Any]]:
    """Level 0 of an OME-Zarr volume (lazy), its spacing in numpy order, and its msgan attributes."""
    from msgan.io.volume import read_level

    arr, geom, meta = read_level(uri, 0)  # the one reader: a VolumeError (a FileNotFoundError when missing)
    return arr, tuple(float(s) for s in geom.numpy_spacing()), meta


def _uri(path: str | Path) -> str:
    s = str(path).rstrip("/")
    return s if s.startswith(("s3://", "file://")) else storage.normalize_uri(s)


def default_output(volume: str | Path) -> str:
    """``DIR/NAME.png`` beside ``DIR/NAME.zarr``."""
    s = str(volume).rstrip("/")
    return (s[: -len(".zarr")] if s.endswith(".zarr") else s) + ".png"


def _manifest_input(volume: str | Path, uri: str, manifest_uri: str) -> str:
    """The input a translated volume's manifest names, checked: an absolute path or URI (a relative one would
    resolve against wherever this runs), and on S3 only when the volume itself is (its credentials are never
    spent on a store the user did not name)."""
    try:
        named = json.loads(storage.read_text(manifest_uri)).get("input")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{volume}: its manifest.json cannot be read ({type(err).__name__})") from None
    if not isinstance(named, str) or not named:
        raise ValueError(f"{volume}: its manifest.json names no input (pass --source)")
    if named.startswith("s3://") and not uri.startswith("s3://"):
        raise ValueError(f"{volume}: its manifest names the input {named} on S3, this volume is local; pass --source")
    if not named.startswith(("s3://", "file://", "/")):
        raise ValueError(f"{volume}: its manifest names the input {named!r}, not an absolute path; pass --source")
    return named


def preview_volume(volume: str | Path, out: str | Path | None = None, source: str | Path | None = None) -> str:
    """A preview PNG of an OME-Zarr volume. A translated volume (its ``manifest.json`` names the input) shows
    the source beside the result, both in the source's display window; ``source`` overrides the manifest.
    Returns where the PNG went (default: :func:`default_output`)."""
    uri = _uri(volume)
    result, spacing, meta = _level0(uri)
    named = None  # the manifest's input: a file inside the volume, so untrusted
    if source is None:
        manifest_uri = storage.join(uri, "manifest.json")
        if storage.exists(manifest_uri):
            source = named = _manifest_input(volume, uri, manifest_uri)
    columns: dict[str, list[View]] = {}
    if source is not None:
        src, src_spacing, src_meta = _level0(_uri(source))
        if tuple(src.shape) != tuple(result.shape):
            raise ValueError(f"{volume}: shape {tuple(result.shape)} differs from its source's {tuple(src.shape)}")
        # a translation keeps its input's attributes as its "source" and its grid: a volume the manifest names
        # that differs in either is not this one's input, and is never drawn into its preview
        kept = {k: v for k, v in src_meta.items() if k != "geometry"}
        same_grid = src_meta.get("geometry") == meta.get("geometry")
        if named is not None and (kept != meta.get("source") or not same_grid):
            raise ValueError(f"{volume}: its manifest names the input {named}, whose attributes are not this "
                             "volume's source's; it is not its input (pass its source with --source)")  # fmt: skip
        columns["source"] = centre_views(src, src_spacing)
    columns["result" if source is not None else Path(str(volume).rstrip("/")).name] = centre_views(result, spacing)
    window = auto_window(next(iter(columns.values())))
    target = str(out) if out is not None else default_output(volume)
    return save(target, render(columns, window))
