"""How well :func:`msgan.align.align_pair` recovers known rigid motions of a CT phantom pair.

For each seed: the ``contrast`` task's input (non-contrast phase) is the source; its target
(arterial phase, another acquisition) is moved by a known rigid motion of a few mm and degrees
(drawn from the seed) and padded outside a round field of view with -3024 HU, as a scanner writes
it. The target is then registered back onto the source, and we print the RMS and maximum
displacement error over the body (the phantom's labels) in voxels and mm, the residual, and the
time (wall and CPU) on the given number of threads.

    .venv/bin/python benchmarks/align_check.py --size 128 --seeds 201 202 --threads 1

Writes nothing; prints one line per case.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import SimpleITK as sitk

from msgan.align import align_pair
from msgan.data.phantom import phantom_geometry
from msgan.data.tasks import make_task
from msgan.io.volume import Geometry, from_sitk, to_sitk

PADDING = -3024.0


def round_fov(image: np.ndarray, padding: float = PADDING) -> np.ndarray:
    """``image`` with ``padding`` outside the largest circle of each axial slice (a scanner's round field of view)."""
    ny, nx = image.shape[-2:]
    y, x = np.ogrid[:ny, :nx]
    r = min(ny, nx) / 2.0
    outside = (y - (ny - 1) / 2.0) ** 2 + (x - (nx - 1) / 2.0) ** 2 > r * r
    out = image.copy()
    out[..., outside] = padding
    return out


def motion(seed: int, dims: int, degrees: float, mm: float, centre: tuple[float, ...]) -> sitk.Transform:
    """A rigid motion of up to ``degrees`` about each axis and ``mm`` along each, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    if dims == 3:
        t = sitk.Euler3DTransform()
        t.SetRotation(*(math.radians(float(a)) for a in rng.uniform(-degrees, degrees, 3)))
    else:
        t = sitk.Euler2DTransform()
        t.SetAngle(math.radians(float(rng.uniform(-degrees, degrees))))
    t.SetCenter(centre)
    t.SetTranslation(tuple(float(v) for v in rng.uniform(-mm, mm, dims)))
    return t


def move(image: np.ndarray, geometry: Geometry, t: sitk.Transform, fill: float) -> np.ndarray:
    """``image`` resampled through ``t`` on its own grid: moved(x) = image(t(x))."""
    img = to_sitk(image.astype(np.float32), geometry)
    return from_sitk(sitk.Resample(img, img, t, sitk.sitkLinear, fill, sitk.sitkFloat32))[0]


def displacement_error(
    found: tuple[float, ...], truth: sitk.Transform, mask: np.ndarray, geometry: Geometry, method: str
) -> np.ndarray:
    """|truth(found(x)) - x| in mm for the voxels of ``mask``: zero when ``found`` undoes ``truth``."""
    dims = geometry.dims
    if method == "rigid":
        t = sitk.Euler3DTransform() if dims == 3 else sitk.Euler2DTransform()
    else:
        t = sitk.AffineTransform(dims)
    n = len(found) - dims
    t.SetParameters(found[:n])
    t.SetFixedParameters(tuple(found[n:]) + ((0.0,) if method == "rigid" and dims == 3 else ()))
    ref = to_sitk(mask.astype(np.uint8), geometry)
    idx = np.argwhere(mask)[:, ::-1]  # ITK order
    pts = np.array([ref.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx])
    back = np.array([truth.TransformPoint(t.TransformPoint(tuple(p))) for p in pts])
    return np.linalg.norm(back - pts, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203])
    ap.add_argument("--degrees", type=float, default=4.0)
    ap.add_argument("--mm", type=float, default=6.0)
    ap.add_argument("--method", choices=("rigid", "affine"), default="rigid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stride", type=int, default=3, help="evaluate the error on every n-th body voxel")
    args = ap.parse_args()
    shape = (args.size,) * 3
    geom = phantom_geometry(shape)
    sp = geom.spacing[0]
    centre = tuple((n - 1) / 2.0 * s for n, s in zip(reversed(shape), geom.spacing, strict=True))
    print(f"{args.size}^3, {sp:.3f} mm voxels, motion up to {args.degrees} deg and {args.mm} mm per axis, "
          f"{args.method}, {args.threads} thread(s)")  # fmt: skip
    for seed in args.seeds:
        task = make_task("contrast", seed, shape, workers=1)
        truth = motion(seed, 3, args.degrees, args.mm, centre)
        moved = round_fov(move(task.target, geom, truth, -1000.0))
        source = round_fov(task.input)
        cpu = time.process_time()
        out = align_pair(source, geom, moved, geom, args.method, modality="CT", label=f"seed {seed}",
                         threads=args.threads)  # fmt: skip
        cpu = time.process_time() - cpu
        unaligned = align_pair(source, geom, moved, geom, "none", modality="CT").residual
        body = task.labels > 0
        sub = np.zeros_like(body)
        sub[:: args.stride, :: args.stride, :: args.stride] = True
        err = displacement_error(out.transform, truth, body & sub, geom, args.method)
        rms = float(np.sqrt(np.mean(err**2)))
        ref = to_sitk(np.zeros(shape, np.uint8), geom)
        pts = [ref.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in np.argwhere(body & sub)]
        before = float(np.sqrt(np.mean([np.sum((np.array(truth.TransformPoint(p)) - p) ** 2) for p in pts])))
        print(
            f"seed {seed}: motion {before / sp:.2f} voxel RMS; error {rms / sp:.3f} voxel RMS ({rms:.2f} mm), "
            f"max {err.max() / sp:.3f} voxel, "
            f"residual {unaligned:.4f} -> {out.residual:.4f}, overlap {out.overlap:.3f}, "
            f"{out.seconds:.1f} s wall, {cpu:.1f} s CPU"
        )


if __name__ == "__main__":
    main()
