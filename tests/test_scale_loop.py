"""The one per-scale loop: scale 0, then each HR scale in order, wherever tiles run and outputs go."""

import numpy as np
import pytest
import zarr

from msgan.cascade import Cascade
from msgan.pyramid import build_pyramid, output_units
from msgan.scale_loop import ArrayTarget, InProcess, run_cascade
from tests.conftest import randomize_batchnorm, tiny_config


def _levels(cfg, shape, seed=1):
    img = np.random.default_rng(seed).uniform(-1000, 500, shape).astype(np.float32)
    pyr = build_pyramid(img, cfg.num_scales, cfg.intensity, cfg.edges)
    return img, [{"image": im, "edges": e} for im, e in zip(pyr.images, pyr.edges, strict=True)]


@pytest.mark.parametrize(
    "options,tile",
    [
        ({"hr_generator.norm": "batch", "inference.memory_budget_mb": 1.0}, None),
        ({"condition": "image+edges", "source_residual": True, "hr_generator.residual": False}, 8),
        ({"hr_generator.context": "wide", "inference.batch_size": 3}, 6),
    ],
)
def test_arrays_in_memory_through_the_loop_equal_the_cascade_byte_for_byte(options, tile):
    c = Cascade.untrained(tiny_config(**options), seed=4)
    for g in c.generators[1:]:
        randomize_batchnorm(g)
    img, levels = _levels(c.config, (23, 19, 21))
    target = ArrayTarget(levels, c.config, lambda s, shape: tile or c.tile_size(s, shape))
    records = run_cascade(c.config.num_scales, InProcess(c, target))
    want, stats = c.translate_arrays(levels, tile=tile)
    assert [o.tobytes() for o in target.outputs] == [w.tobytes() for w in want]
    assert output_units(target.outputs[-1], c.config.intensity, img).tobytes() == c.translate(img, tile=tile).tobytes()
    assert [(r["scale"], r["tiles"], r.get("tile")) for r in records] == [
        (r["scale"], r["tiles"], r.get("tile")) for r in stats["scales"]
    ]


def test_outputs_go_where_the_caller_puts_them():
    c = Cascade.untrained(tiny_config(), seed=2)
    _, levels = _levels(c.config, (20, 18, 22))
    outs = [zarr.zeros(tuple(lv["image"].shape), dtype="float32", chunks=(8, 8, 8)) for lv in levels]
    run_cascade(3, InProcess(c, ArrayTarget(levels, c.config, lambda s, shape: 8, outs)))
    want, _ = c.translate_arrays(levels, tile=8)
    assert [o[...].tobytes() for o in outs] == [w.tobytes() for w in want]


class _Steps:
    """A runner that records what the loop asks of it and has nothing left after scale ``last``."""

    def __init__(self, last: int) -> None:
        self.last, self.calls = last, []

    def scale0(self):
        self.calls.append(0)
        return {"tiles": 1}

    def hr_scale(self, scale, tick):
        self.calls.append(scale)
        if scale > self.last:
            return None
        tick(2, 2)
        return {"tiles": 2, "tile": 5}


def test_the_loop_runs_scale0_then_hr_scales_in_order_and_stops_when_nothing_is_left():
    steps, seen, lines = _Steps(last=2), [], []
    records = run_cascade(5, steps, lambda *a: seen.append(a), lines.append)
    assert steps.calls == [0, 1, 2, 3], "scale 4 never asked once scale 3 had nothing left"
    assert [r["scale"] for r in records] == [0, 1, 2] and all(r["seconds"] >= 0 for r in records)
    assert seen == [(0, 0, 1), (0, 1, 1), (1, 2, 2), (2, 2, 2)]
    assert [line.split(" in ")[0] for line in lines] == ["  scale 1: 2 tiles of 5", "  scale 2: 2 tiles of 5"]


def test_levels_that_do_not_fit_the_cascade_are_named():
    c = Cascade.untrained(tiny_config(), seed=0)
    _, levels = _levels(c.config, (20, 20, 20))
    with pytest.raises(ValueError, match="2 levels given; the cascade has 3 scales"):
        ArrayTarget(levels[:2], c.config, lambda s, shape: 8)
    with pytest.raises(ValueError, match="level 1 holds no image or edges array"):
        ArrayTarget([levels[0], {}, levels[2]], c.config, lambda s, shape: 8)


def test_a_normalised_source_through_the_loop_equals_the_cascade_byte_for_byte():
    from msgan.normalize import apply
    from tests.test_normalize import mr_like

    c = Cascade.untrained(tiny_config(**{"condition": "image", "intensity.normalize": "percentile",
                                         "intensity.low": -200.0, "intensity.high": 1400.0}), seed=4)  # fmt: skip
    img = (mr_like((23, 19, 21)) * 0.03 + 7.0).astype(np.float32)  # a scanner's arbitrary scale
    levels, normalised, scaling = c.levels(img)
    assert scaling == c.scaling_of(img) and normalised.tobytes() == apply(img, scaling, c.config.intensity).tobytes()
    raw = build_pyramid(img, c.config.num_scales, c.config.intensity, c.config.edges)
    assert not np.array_equal(levels[-1]["image"], raw.images[-1]), "the window sees normalised values"
    target = ArrayTarget(levels, c.config, lambda s, shape: 8)
    run_cascade(c.config.num_scales, InProcess(c, target))
    want = c.translate(img, tile=8)
    assert output_units(target.outputs[-1], c.config.intensity, normalised).tobytes() == want.tobytes()
