import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from msgan.memory import (
    activation_elements,
    forward_peak_bytes,
    hr_inference_bytes,
    largest_tile,
    peak_host_bytes,
    per_voxel_flops,
    training_step_bytes,
)
from msgan.nets import HRGenerator, PatchDiscriminator


def test_activation_count_of_a_small_chain():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3))
    # outputs: 4 x 6^3, 4 x 6^3, 2 x 4^3 for an 8^3 input
    assert activation_elements(net, torch.zeros(1, 1, 8, 8, 8)) == 4 * 216 + 4 * 216 + 2 * 64


def test_forward_peak_follows_what_is_alive():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3))
    # 8^3 input (512 values) stays alive; at the ReLU its input 4 x 6^3 and output 4 x 6^3 coexist;
    # the first output is freed before the last convolution (2 x 4^3)
    assert forward_peak_bytes(net, (1, 1, 8, 8, 8), channels_last=True) == 4 * (512 + 864 + 864)
    # plain layout: oneDNN computes the first output in 16-channel blocks and copies it back, beside
    # the input (1 channel: no copy of it)
    assert forward_peak_bytes(net, (1, 1, 8, 8, 8)) == 4 * (512 + 16 * 216 + 864)
    assert next(net.parameters()).device.type == "cpu"


HR_PASS = """
import json, sys
import numpy as np, torch
from msgan.volumes.heap import bound_heap, release_memory
from msgan.memory import current_rss, reset_peak_rss
from msgan.engine import array_writer, run_tiles, tile_feed
from msgan.memory import hr_inference_bytes, peak_host_bytes
from msgan.nets import HRGenerator, count_parameters
from msgan.tiling import tile_grid
torch.set_num_threads(1)
bound_heap()
gen = HRGenerator(3, width=16, num_blocks=2, norm_kind="none", residual=False, condition="image+edges")
core, bs = 40, 2
rng = np.random.default_rng(0)
grid = (2 * core,) * 3
arrays = {k: rng.uniform(-1, 1, grid).astype(np.float32) for k in ("image", "edges")}
arrays["prev"] = rng.uniform(-1, 1, (core,) * 3).astype(np.float32)
tiles, out = tile_grid(grid, core), np.zeros(grid, np.float32)
feed, write = tile_feed(gen, arrays), array_writer(out)
run_tiles(gen, tiles[:bs], feed, write, bs)
release_memory(); base = current_rss(); reset_peak_rss()
run_tiles(gen, tiles, feed, write, bs)
print(json.dumps([peak_host_bytes() - base, hr_inference_bytes(gen, core, 3, bs) - 4 * count_parameters(gen)]))
"""


def test_hr_memory_model_matches_the_measured_peak_of_the_tile_runner():
    """The model the tile budget is chosen with, against the runner's real peak (own process)."""
    import json

    out = subprocess.run([sys.executable, "-c", HR_PASS], capture_output=True, text=True, check=True)
    measured, model = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.95 <= measured / model <= 1.15, (measured / 2**20, model / 2**20)


def test_training_step_model_parts():
    g, d = HRGenerator(3, 4, 1), PatchDiscriminator(3, 3, 4, 1)
    est = training_step_bytes(g, d, (1, 2, 16, 16, 16), (1, 3, 12, 12, 12))
    params = sum(p.numel() for p in g.parameters()) + sum(p.numel() for p in d.parameters())
    assert est["parameters_and_optimizer"] == 4 * 4 * params
    assert est["total"] == sum(v for k, v in est.items() if k != "total")
    assert next(g.parameters()).device.type == "cpu", "estimating must not move the caller's networks"


def test_tile_budget_is_monotone_and_bounded():
    g = HRGenerator(3, 8, 2)
    assert largest_tile(g, 3, 64 * 2**20) <= largest_tile(g, 3, 256 * 2**20)
    t = largest_tile(g, 3, 64 * 2**20)
    assert hr_inference_bytes(g, t, 3) <= 64 * 2**20 < hr_inference_bytes(g, t + 2, 3)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        largest_tile(g, 3, 1000)


def test_peak_host_bytes_is_this_process_not_its_parent():
    ballast = np.ones(300 * 2**20 // 8)  # the parent holds 300 MiB
    code = "from msgan.memory import peak_host_bytes; print(peak_host_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < peak_host_bytes() - 200 * 2**20
    del ballast


def test_reset_peak_rss_forgets_what_ran_before():
    code = """
import json, numpy as np
from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
a = np.ones(300 * 2**20 // 8); del a
before = peak_host_bytes()
assert reset_peak_rss()
base = current_rss()
b = np.ones(60 * 2**20 // 8)
print(json.dumps([before, base, peak_host_bytes()]))
"""
    before, base, after = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert after < before - 200 * 2**20  # the 300 MiB that ran before the reset is forgotten
    assert after - base >= 55 * 2**20  # what ran after it is counted


def test_conv_flops_counts_multiply_adds_of_valid_convolutions():
    import torch

    from msgan.memory import conv_flops
    from msgan.nets import HRGenerator

    g = HRGenerator(3, width=4, num_blocks=0, norm_kind="none", residual=False)  # head conv 2->4, tail 4->1
    x = torch.zeros(2, 2, 10, 10, 10)
    head = 2 * (2 * 8**3) * 4 * 2 * 27  # batch 2, 8^3 outputs, 4 channels, 2 inputs x 27 taps
    tail = 2 * (2 * 6**3) * 1 * 4 * 27
    assert conv_flops(g, x) == head + tail


@pytest.mark.parametrize("dims", [2, 3])
def test_per_voxel_flops_is_what_a_whole_grid_pass_counts(dims):
    from torch.utils.flop_counter import FlopCounterMode

    gen = HRGenerator(dims, width=4, num_blocks=2, norm_kind="none", residual=False, padding="same")
    n = 12
    with FlopCounterMode(display=False) as count:  # with grad: PyTorch's own convolution, which it counts
        gen(torch.zeros(1, len(gen.channels), *(n,) * dims))
    assert per_voxel_flops(gen) * n**dims == count.get_total_flops()


def test_the_wide_branch_counts_on_the_coarse_grid():
    from torch.utils.flop_counter import FlopCounterMode

    gen = HRGenerator(3, width=4, num_blocks=1, norm_kind="none", context="wide", context_layers=2, residual=False)
    assert gen.ctx is not None
    ctx_per_voxel = 0
    for m in gen.ctx.modules():
        if isinstance(m, torch.nn.Conv3d):  # one output voxel: a 3^3 input
            with FlopCounterMode(display=False) as count:
                m(torch.zeros(1, m.in_channels, 3, 3, 3))
            ctx_per_voxel += count.get_total_flops()
    fine = per_voxel_flops(gen) - ctx_per_voxel / 8
    gen.ctx = None
    assert per_voxel_flops(gen) == fine > 0


REUSED_HEAP = """
import json
from msgan.memory import current_rss, peak_host_bytes, reset_peak_rss
from msgan.volumes.heap import release_memory
blocks, fences = [], []
for _ in range(1600):  # 100 MiB of heap blocks (below glibc's mmap threshold), each fenced by a small one:
    blocks.append(bytearray(64 * 1024))  # free() alone cannot hand their space back (not at the heap's top)
    fences.append(bytearray(1024))
del blocks
if RELEASE:
    release_memory()
reset_peak_rss(); base = current_rss()
blocks = [bytearray(64 * 1024) for _ in range(1600)]
print(json.dumps(peak_host_bytes() - base))
"""


def test_a_peak_measured_after_release_memory_sees_allocations_that_reuse_freed_heap():
    """What the training-step probes of the task tables rely on: without the release a loop reusing what the
    data loading freed reads as (almost) no memory at all."""
    import json

    def measured(release: bool) -> int:
        code = f"RELEASE = {release}\n" + REUSED_HEAP
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(json.loads(out.stdout.strip().splitlines()[-1]))

    assert measured(True) > 80 * 2**20
    assert measured(False) < 20 * 2**20  # the trap the release avoids
