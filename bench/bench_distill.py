"""Seconds per distillation iteration of DC, DSA and DM, each plain / + CLoM / + CCLoM, plus peak
memory, on CIFAR-10 from the Parquet at CPU scale (ConvNetW32, IPC 10, batch_real 64 per class).

    .venv/bin/python bench/bench_distill.py [--data parquet:../shared/data/cifar10-jpeg.parquet]

Each case runs in its own process, after warm-up iterations; peak RSS is measured over the timed
iterations alone (the data set's ~600 MB of float tensors included), and "+MB" is that peak over
the resident size when they started. DM is
also timed against ``reference_dm.py`` (the per-class loop of the original code) in the same
process, in alternating blocks of 5 iterations, so the ratio is free of machine drift. The PTM pool (2 ConvNetW32, epoch 2) is taken from
the store, trained there first if missing.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CASES = [(m, v) for m in ("dc", "dsa", "dm") for v in ("plain", "clom", "cclom")]
ITERS = {"dc": 2, "dsa": 2, "dm": 30}
WARMUP = {"dc": 1, "dsa": 1, "dm": 3}


def config(args, method: str, variant: str):
    from ptmdd_ray.config import build_config

    return build_config({
        "dataset": {"name": args.data},
        "model": "ConvNetW32",
        "distill": {"method": method, "ipc": args.ipc, "iterations": ITERS[method], "batch_real": 64},
        "pool": {"archs": ["ConvNetW32"], "seeds": 2, "epoch": 2},
        "loss": {"clom": 1000.0 if variant == "clom" else 0.0, "cclom": 1.0 if variant == "cclom" else 0.0,
                 "cclom_batch": 256},
        "store": args.store,
        "device": args.device,
    })


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_case(args, method: str, variant: str) -> dict:
    import torch

    from ptmdd_ray.data import load_data
    from ptmdd_ray.methods import distill
    from ptmdd_ray.pipeline import pick_device, resolve_pool
    from ptmdd_ray.pool import PTMGuide

    cfg = config(args, method, variant)
    device = pick_device(cfg.device)
    data = load_data(cfg.dataset, 0).to(device)
    pool = resolve_pool(cfg, data, device, progress=False)
    guide = PTMGuide.from_config(cfg.loss, pool.ptms, data, 0) or None
    warm = cfg.distill.__class__(**{**cfg.distill.__dict__, "iterations": WARMUP[method]})
    distill(warm, cfg.model, data, 0, guide, progress=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb("VmRSS")
    reset_peak_rss()
    out = distill(cfg.distill, cfg.model, data, 0, guide, progress=False)
    row = {"method": method, "variant": variant, "seconds_per_iteration": out.seconds / out.iterations,
           "iterations": out.iterations, "peak_rss_mb": rss_mb(), "peak_over_start_mb": rss_mb() - base_rss,
           "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if variant in ("plain", "clom") and device.type == "cpu":
        blocks, per_block = (6, 5) if method == "dm" else (2, 1)
        ours, ref = interleaved_times(cfg, data, guide, pool.ptms if variant == "clom" else None, blocks, per_block)
        row["seconds_per_iteration"], row["reference_seconds_per_iteration"] = ours, ref
    return row


def interleaved_times(cfg, data, guide, ptms, blocks: int = 6, per_block: int = 5) -> tuple[float, float]:
    """Ours vs the reference in alternating blocks, so that drifts of the machine hit both alike."""
    from ptmdd_ray.methods import distill

    ref_iter = reference_iteration(cfg, data, ptms)
    block = cfg.distill.__class__(**{**cfg.distill.__dict__, "iterations": per_block})
    ours = ref = 0.0
    for b in range(blocks):
        ours += distill(block, cfg.model, data, b, guide, progress=False).seconds
        t0 = time.perf_counter()
        for k in range(per_block):
            ref_iter(b * per_block + k)
        ref += time.perf_counter() - t0
    n = blocks * per_block
    return ours / n, ref / n


def reference_iteration(cfg, data, ptms):
    import numpy as np
    import torch

    from ptmdd_ray.methods import init_synthetic
    from ptmdd_ray.train import new_model
    from reference_dc import reference_dc_iteration
    from reference_dm import reference_dm_iteration

    np.random.seed(0)
    d = cfg.distill
    syn, syn_y = init_synthetic(data, d.ipc, "real", torch.Generator().manual_seed(0))
    syn.requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=d.lr_img, momentum=0.5)
    indices = [i.numpy() for i in data.class_indices()]
    shape = (data.channels, data.num_classes, data.im_size)
    ptm = ptms[0].model if ptms else None
    alpha = cfg.loss.clom if ptm is not None else 0.0

    def it(k):
        net = new_model(cfg.model, shape, seed=k)  # the original's default (NCHW) layout
        if d.method == "dm":
            reference_dm_iteration(net, syn, syn_y, data.x_train, indices, opt, d.ipc, d.batch_real, d.dsa_strategy,
                                   ptm, alpha)
        else:
            reference_dc_iteration(net, syn, syn_y, data.x_train, indices, opt, d.ipc, d.batch_real, d.dsa_strategy,
                                   d.outer_loop, d.inner_loop, d.lr_net, d.batch_train, ptm, alpha)

    for k in range(WARMUP[d.method]):
        it(k)
    return it


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--store", default=str(ROOT / "ptm_store"))
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", default="dc,dsa,dm")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.case:
        method, variant = args.case.split(":")
        print(json.dumps(run_case(args, method, variant)))
        return
    rows = []
    wanted = args.methods.split(",")
    print(f"{'method':<8}{'variant':<9}{'s/iter':>10}{'reference':>11}{'speed-up':>10}{'peak RSS MB':>13}"
          f"{'distill +MB':>13}")
    for method, variant in CASES:
        if method not in wanted:
            continue
        cmd = [sys.executable, __file__, "--case", f"{method}:{variant}", "--data", args.data, "--ipc", str(args.ipc),
               "--store", args.store, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method:<8}{variant:<9} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        ref, ours = row.get("reference_seconds_per_iteration"), row["seconds_per_iteration"]
        ref_s = f"{ref:.4f}" if ref else "-"
        ratio = f"{ref / ours:.2f}x" if ref else "-"
        print(f"{method:<8}{variant:<9}{ours:>10.4f}{ref_s:>11}{ratio:>10}{row['peak_rss_mb']:>13.0f}"
              f"{row['peak_over_start_mb']:>13.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
