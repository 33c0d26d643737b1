"""What an input may declare, checked before anything is allocated: one place for every size rule.

A file from a PACS, an archive or object storage declares its size (DICOM rows x columns x frames,
a zarr array's shape and chunks, a NIfTI/MHA header) before it is read. Each rule here compares a
declared size with a cap or with what is actually stored, and raises :class:`LimitError` naming the
input and the rule, so a 12 KB file that claims 65535 x 65535 pixels is refused in microseconds
instead of exhausting memory.

The caps are generous for real images: no radiograph or mammogram is above 8192^2 pixels per frame
(a 43 x 43 cm detector at 100 um is 4300^2); no CT/MR volume a hospital keeps is above 2048^3
voxels (the per-volume cap is a setting, ``MSGAN_MAX_VOXELS``); real lossless and lossy codecs stay
far below 1000:1 (RLE cannot exceed 64:1, deflate 1032:1), where a decompression bomb is ~10^9:1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

MAX_FRAME_SIDE = 16384  # rows or columns of one 2D frame
MAX_FRAME_PIXELS = 8192 * 8192  # rows x columns of one 2D frame
DEFAULT_MAX_VOXELS = 2048**3  # one volume; MSGAN_MAX_VOXELS overrides
MAX_CHUNK_BYTES = 512 * 2**20  # one zarr (inner) chunk, decoded: read at once, so it must fit in memory
MAX_COMPRESSION_RATIO = 1000  # declared (decoded) bytes over stored bytes
RATIO_FLOOR_BYTES = 64 * 2**20  # below this many declared bytes the ratio is not checked (small frames are cheap)


class LimitError(ValueError):
    """An input declares a size beyond a rule; the message names the input, the size and the rule."""


def max_voxels() -> int:
    """The per-volume cap: ``MSGAN_MAX_VOXELS`` (an integer, or an expression like ``2048**3``), default 2048^3."""
    raw = os.environ.get("MSGAN_MAX_VOXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        if "**" in raw:
            base, _, exp = raw.partition("**")
            value = int(base) ** int(exp)
        else:
            value = int(raw)
    except ValueError as err:
        raise LimitError(f"MSGAN_MAX_VOXELS={raw!r}: not an integer (e.g. 8589934592 or 2048**3)") from err
    if value < 1:
        raise LimitError(f"MSGAN_MAX_VOXELS={raw!r}: must be positive")
    return value


def check_frame(rows: int, columns: int, what: str) -> None:
    """One 2D frame of ``rows`` x ``columns`` pixels."""
    if rows < 1 or columns < 1:
        raise LimitError(f"{what}: declares a frame of {rows} x {columns} pixels; both must be positive")
    if rows > MAX_FRAME_SIDE or columns > MAX_FRAME_SIDE or rows * columns > MAX_FRAME_PIXELS:
        raise LimitError(
            f"{what}: declares a frame of {rows} x {columns} pixels, above the cap of {MAX_FRAME_SIDE} per side "
            f"and {MAX_FRAME_PIXELS} pixels per frame (no real image is that large); refused before reading it"
        )


def check_shape(shape: Sequence[int], what: str, cap: int | None = None) -> int:
    """A volume's declared shape: every side positive and the voxel count under the cap; returns the count."""
    if not shape or any(int(s) < 1 for s in shape):
        raise LimitError(f"{what}: declares shape {tuple(shape)}; every side must be positive")
    voxels = math.prod(int(s) for s in shape)
    limit = max_voxels() if cap is None else cap
    if voxels > limit:
        raise LimitError(
            f"{what}: declares shape {tuple(int(s) for s in shape)} ({voxels:.3g} voxels), above the cap of "
            f"{limit:.3g} voxels per volume (MSGAN_MAX_VOXELS, default 2048^3); refused before reading it"
        )
    return voxels


def check_chunks(shape: Sequence[int], chunks: Sequence[int], what: str, itemsize: int = 4) -> int:
    """A chunked array's (inner) chunk shape: positive, one per axis, a decoded chunk under the cap; returns the
    declared number of chunks (computed, never enumerated)."""
    if len(chunks) != len(shape) or any(int(c) < 1 for c in chunks):
        raise LimitError(
            f"{what}: chunk shape {tuple(chunks)} for array shape {tuple(shape)}; need one positive size per axis"
        )
    per_chunk = math.prod(min(int(c), int(s)) for c, s in zip(chunks, shape, strict=True)) * itemsize
    if per_chunk > MAX_CHUNK_BYTES:
        raise LimitError(
            f"{what}: chunk shape {tuple(int(c) for c in chunks)} decodes to {per_chunk:.3g} bytes, above the cap of "
            f"{MAX_CHUNK_BYTES} bytes per chunk (512 MiB); rechunk the array (e.g. 64^3 or 128^3 chunks)"
        )
    return math.prod(math.ceil(int(s) / int(c)) for s, c in zip(shape, chunks, strict=True))


def check_ratio(declared_bytes: int, stored_bytes: int, what: str) -> None:
    """Declared (decoded) bytes against the bytes actually stored (a compressed frame, a gzip file)."""
    if declared_bytes <= RATIO_FLOOR_BYTES:
        return
    if stored_bytes <= 0 or declared_bytes > MAX_COMPRESSION_RATIO * stored_bytes:
        ratio = declared_bytes / max(stored_bytes, 1)
        raise LimitError(
            f"{what}: declares {declared_bytes:.3g} bytes of pixels stored in {stored_bytes} bytes (ratio "
            f"{ratio:.3g}:1, above the cap of {MAX_COMPRESSION_RATIO}:1 that real codecs stay under); "
            "refused as a decompression bomb before decoding it"
        )
