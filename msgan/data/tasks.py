"""Translation tasks with ground truth, on the thorax phantom: pure functions of (task, seed, shape).

Each task gives, for one subject, the ``input`` a user would have, the ``target`` the translation
should produce (a real acquisition, with its own noise), the ``noiseless`` target (the same
reconstruction kernel, no noise: what the hallucination measure compares with) and the tissue
``labels`` of :func:`msgan.data.phantom.thorax_labels`. All in HU, float32, ``(z, y, x)``.

- ``sharp-to-soft``: one acquisition reconstructed with the sharp and the soft kernel (one noise
  realisation through two MTFs, as filtered back-projection does): linear apart from noise, so the
  bar is the fitted linear filter.
- ``soft-to-sharp``: the same pair the other way round: resolution recovery, ill-posed.
- ``low-dose``: soft kernel; input = target + extra quantum noise of the same noise power
  spectrum, dose fraction 1/k with k drawn per subject in [4, 10] (noise variance x k), as the
  Mayo low-dose challenge simulated quarter dose.
- ``contrast``: non-contrast to arterial-phase CT, soft kernel: aorta and heart chambers raised to a
  subject's value in [250, 350] HU, lung vessels to their own value in [250, 350] HU, myocardium
  by 30-60 HU, everything else unchanged. Input and target are separate acquisitions
  (independent noise).

Seeds are split once, before any tuning (:data:`SEEDS`): ``train`` for fitting every method,
``validation`` for tuning and sweeps, ``heldout`` (n = 8) for the tables only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msgan.data.phantom import (
    KERNELS,
    Label,
    PhantomOptions,
    apply_mtf,
    default_spacing,
    kernel_noise,
    reconstruct,
    thorax_labels,
)

TASKS = ("sharp-to-soft", "soft-to-sharp", "low-dose", "contrast")
SEEDS: dict[str, tuple[int, ...]] = {
    "train": (101, 102, 103, 104, 105, 106, 107, 108),
    "validation": (201, 202, 203, 204),
    "heldout": (301, 302, 303, 304, 305, 306, 307, 308),
}  # fixed before any run; never reuse a held-out seed for fitting or tuning
# Training without pairs (issue 22), fixed in a commit before any run or tuning: the training sources come
# from subjects 101-104 and the training targets from subjects 105-108, so no subject is on both sides (an
# unpaired method never sees an input with its own target); validation 201-204 may be used as pairs, for
# choosing hyperparameters only, the same for every method; held-out 301-308 are scored against their targets
# with the task tables' metrics. Methods: input, linear (radial filter from the ratio of the mean power spectra
# of the source and target training sets, no pairs), nlm_tuned (noise level from the source images alone),
# edges (the paper), cyclegan (3D patch CycleGAN, ResNet generators), ours (unpaired), paired (the task tables'
# ours rows: the upper bound).
UNPAIRED_SEEDS: dict[str, tuple[int, ...]] = {
    "train_sources": (101, 102, 103, 104),
    "train_targets": (105, 106, 107, 108),
    "validation": SEEDS["validation"],
    "heldout": SEEDS["heldout"],
}
UNPAIRED_METHODS = ("input", "linear", "nlm_tuned", "edges", "cyclegan", "ours", "paired")
METRIC_WINDOW = (-1024.0, 1024.0)  # HU onto [-1, 1] for SSIM / PSNR: part of the tasks, not of any model's window
TASK_PHANTOM = PhantomOptions(dense_bone=True, metal=False, emphysema=True, aorta=True)
DOSE_FACTOR = (4.0, 10.0)  # low-dose: noise variance of the input = k x the target's
ARTERIAL_HU = (250.0, 350.0)
MYOCARDIUM_GAIN = (30.0, 60.0)
_CODES = {name: i + 1 for i, name in enumerate(TASKS)}


@dataclass(frozen=True)
class TaskVolume:
    task: str
    seed: int
    input: np.ndarray
    target: np.ndarray
    noiseless: np.ndarray  # the target's reconstruction without noise
    labels: np.ndarray  # uint8 msgan.data.phantom.Label of the target's anatomy
    spacing: tuple[float, float, float]  # mm, numpy order (z, y, x)
    params: dict[str, Any] = field(default_factory=dict)  # what the seed drew (dose factor, enhancement)


def check_task(task: str) -> str:
    if task not in TASKS:
        import difflib

        hint = difflib.get_close_matches(task, TASKS, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"task {task!r}: must be one of {list(TASKS)}{extra}")
    return task


def split_of(seed: int) -> str:
    """Which split a seed belongs to (``train``, ``validation`` or ``heldout``)."""
    for name, seeds in SEEDS.items():
        if seed in seeds:
            return name
    raise ValueError(f"seed {seed} is in no split; valid seeds: {SEEDS}")


def _stream(seed: int, task: str, k: int) -> int:
    """A sub-seed for draw ``k`` of ``task`` on subject ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, _CODES[task], k]).generate_state(1)[0])


def make_task(
    task: str, seed: int, shape: Sequence[int], spacing: Sequence[float] | None = None, workers: int = -1
) -> TaskVolume:
    """One subject of ``task``: the same (task, seed, shape) always gives the same arrays."""
    check_task(task)
    shape = tuple(int(n) for n in shape)
    sp = tuple(float(v) for v in (spacing if spacing is not None else default_spacing(shape)))
    hu, labels = thorax_labels(shape, sp, seed, options=TASK_PHANTOM)
    rng = np.random.default_rng(_stream(seed, task, 0))
    params: dict[str, Any] = {}
    if task in ("sharp-to-soft", "soft-to-sharp"):
        acquisition = _stream(seed, "sharp-to-soft", 1)  # both directions share one acquisition
        recon = reconstruct(hu, ("soft", "sharp"), seed=acquisition, workers=workers)
        src, dst = ("sharp", "soft") if task == "sharp-to-soft" else ("soft", "sharp")
        return TaskVolume(task, seed, recon[src], recon[dst], apply_mtf(hu, dst, workers), labels, sp,  # type: ignore[arg-type]
                          {"input_kernel": src, "target_kernel": dst})  # fmt: skip
    if task == "low-dose":
        k = float(rng.uniform(*DOSE_FACTOR))
        target = reconstruct(hu, ("soft",), seed=_stream(seed, task, 1), workers=workers)["soft"]
        extra = kernel_noise(
            shape, "soft", _stream(seed, task, 2), KERNELS["soft"].noise_hu * np.sqrt(k - 1.0), workers
        )
        params = {"kernel": "soft", "dose_factor": k, "dose_fraction": 1.0 / k}
        return TaskVolume(task, seed, target + extra, target, apply_mtf(hu, "soft", workers), labels, sp, params)  # type: ignore[arg-type]
    # contrast
    arterial, pulmonary = float(rng.uniform(*ARTERIAL_HU)), float(rng.uniform(*ARTERIAL_HU))
    gain = float(rng.uniform(*MYOCARDIUM_GAIN))
    enhanced = hu.copy()
    enhanced[np.isin(labels, (Label.AORTA, Label.HEART_BLOOD))] = arterial
    enhanced[labels == Label.LUNG_VESSEL] = pulmonary
    enhanced[labels == Label.MYOCARDIUM] += gain
    before = reconstruct(hu, ("soft",), seed=_stream(seed, task, 1), workers=workers)["soft"]
    after = reconstruct(enhanced, ("soft",), seed=_stream(seed, task, 2), workers=workers)["soft"]
    params = {"kernel": "soft", "arterial_hu": arterial, "pulmonary_hu": pulmonary, "myocardium_gain_hu": gain}
    return TaskVolume(task, seed, before, after, apply_mtf(enhanced, "soft", workers), labels, sp, params)  # type: ignore[arg-type]
