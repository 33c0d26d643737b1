"""The paper's Fig. 2: memory of one GAN training step vs image side length, for 3D DCGAN, Pix2Pix,
PGGAN (final stage) and our LR 64^3 / HR 32^3 networks.

    python benchmarks/paper_memory.py [--sizes 32 64 128 256 512] [--measure-limit-gb 6] [--out docs/results]

Analytic model for every size (msgan.memory.training_step_bytes: parameters, gradients, Adam moments,
activations kept for backward of one G pass and two D passes, images; batch 1, fp32). Measured where
this machine can: on CPU, the peak resident memory of one real training step in a fresh process, minus
the process before the networks existed (on a CUDA device: torch.cuda.max_memory_allocated). Sizes
whose analytic estimate exceeds --measure-limit-gb are extrapolated, drawn dashed as in the paper.
Writes <out>/memory.md (table) and <out>/memory.png (log-scale plot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gan3d


def measure(name: str, n: int, device: str) -> dict[str, float]:
    """One real training step in this process; prints JSON with the peak."""
    import time

    import torch
    import torch.nn.functional as F

    from msgan.memory import peak_host_bytes
    from msgan.nets import crop

    torch.set_num_threads(2)
    warm = torch.nn.Conv3d(1, 1, 3)(torch.zeros(1, 1, 4, 4, 4))  # load the conv kernels before the baseline
    del warm
    import psutil

    base = psutil.Process().memory_info().rss
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    g, d, gi, di, conditional = gan3d.build(name, n)
    g, d = g.to(dev), d.to(dev)
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    x = torch.randn(gi, device=dev)
    real = torch.randn((1, 1, *di[2:]), device=dev)
    t0 = time.perf_counter()
    fake = g(x)
    if conditional:
        c = crop(x, (x.shape[2] - di[2]) // 2) if x.shape[2] != di[2] else x
        pair = lambda img: torch.cat([c, img], 1)  # noqa: E731
    else:
        pair = lambda img: img  # noqa: E731
    d_real, d_fake = d(pair(real)), d(pair(fake.detach()))
    loss_d = 0.5 * (F.mse_loss(d_real, torch.ones_like(d_real)) + F.mse_loss(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    out = d(pair(fake))
    loss_g = F.mse_loss(out, torch.ones_like(out)) + (100 * F.l1_loss(fake, real) if conditional else 0)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    seconds = time.perf_counter() - t0
    peak = float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else float(peak_host_bytes() - base)
    return {"peak_bytes": peak, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--measure-limit-gb", type=float, default=6.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--measure", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.device)))
        return

    from msgan.memory import training_step_bytes

    rows: dict[str, dict[int, dict[str, float | None]]] = {}
    for name in gan3d.MODELS:
        rows[name] = {}
        for n in args.sizes:
            g, d, gi, di, _ = gan3d.build(name, n)
            analytic = training_step_bytes(g, d, gi, di)["total"]
            measured = None
            if analytic / 2**30 <= args.measure_limit_gb:
                r = subprocess.run(
                    [sys.executable, __file__, "--measure", name, str(n), "--device", args.device],
                    capture_output=True, text=True, timeout=3600,
                )  # fmt: skip
                if r.returncode == 0:
                    measured = json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]
                else:
                    print(f"{name} {n}^3: measurement failed: {r.stderr[-500:]}", file=sys.stderr)
            rows[name][n] = {"analytic": analytic, "measured": measured}
            m = f"{measured / 2**30:8.2f}" if measured else "       -"
            print(f"{name:<11} {n:>4}^3  analytic {analytic / 2**30:8.2f} GiB  measured {m} GiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({k: {str(n): v for n, v in r.items()} for k, r in rows.items()}))
    write_table(rows, args.sizes, args.device, out / "memory.md")
    plot(rows, args.sizes, out / "memory.png")
    print(f"wrote {out / 'memory.md'} and {out / 'memory.png'}")


def write_table(rows: dict, sizes: list[int], device: str, path: Path) -> None:
    kind = "CUDA max_memory_allocated" if device.startswith("cuda") else "CPU peak resident memory of the step"
    head = "| model | " + " | ".join(f"{n}^3" for n in sizes) + " |"
    lines = [
        f"GiB per training step, batch 1, fp32. Each cell: analytic (measured: {kind}; error of the analytic model).",
        "",
        head,
        "|" + " --- |" * (len(sizes) + 1),
    ]
    for name, r in rows.items():
        cells = []
        for n in sizes:
            a, m = r[n]["analytic"] / 2**30, r[n]["measured"]
            if m:
                cells.append(f"{a:.2f} (measured {m / 2**30:.2f}; {100 * (a - m / 2**30) / (m / 2**30):+.0f}%)")
            else:
                cells.append(f"{a:.2f} (extrapolated)" if not name.startswith("Ours") else f"{a:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in rows.items():
        xs = [n for n in sizes]
        analytic = [r[n]["analytic"] / 2**30 for n in xs]
        measured = [(n, r[n]["measured"] / 2**30) for n in xs if r[n]["measured"]]
        last = max((n for n, _ in measured), default=xs[0])
        solid = [(n, a) for n, a in zip(xs, analytic, strict=True) if n <= last]
        dashed = [(n, a) for n, a in zip(xs, analytic, strict=True) if n >= last]
        line = ax.plot(*zip(*solid, strict=False), "-", marker="o", label=name)[0]
        if len(dashed) > 1:
            ax.plot(*zip(*dashed, strict=False), "--", color=line.get_color())
        if measured:
            ax.plot(*zip(*measured, strict=False), "x", color=line.get_color(), markersize=9)
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("image side length (voxels)")
    ax.set_ylabel("memory of one training step (GiB)")
    ax.set_title("3D GANs: memory vs image size (x: measured, dashed: extrapolated)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
