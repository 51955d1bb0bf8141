"""Seconds per distillation iteration of DC, DSA, DM and MTT, each plain / + CLoM / + CCLoM, plus peak
memory, on CIFAR-10 from the Parquet at CPU scale (ConvNetW32, IPC 10, batch_real 64 per class).

    .venv/bin/python bench/bench_distill.py [--data parquet:../shared/data/cifar10-jpeg.parquet]
        [--methods dc,dsa,dm,mtt] [--variants plain,clom,cclom] [--model ConvNetW32] [--pool-arch ConvNetW32]
        [--ipc 10] [--batch-real 64] [--iterations N] [--device auto|cpu|cuda] [--precision bf16|bf16-cpu|fp32]
        [--syn-steps N] [--json] [--out FILE]

Each case runs in its own process, after warm-up iterations; peak RSS is measured over the timed
iterations alone (the data set's ~600 MB of float tensors included), and "+MB" is that peak over
the resident size when they started; on CUDA also ``torch.cuda.max_memory_allocated`` over them. DM
(and DC/DSA) plain and + CLoM are also timed against ``reference_dm.py`` (``reference_dc.py``), the
per-class loops of the original code, in the same process, in alternating blocks (6 blocks of
iterations / 6 for DM), so the ratio is free of machine drift. The PTM pool (2 PTMs of
``--pool-arch`` at epoch 2) is taken from the store, trained there first if missing.

MTT (not in the default ``--methods``) is timed against ``reference_mtt.py``, distill.py's step,
the same way. Its 2 experts are the student's architecture trained with the reference's recipe
(buffer.py) on 500 images per class, for epochs 0..3 (``max_start_epoch`` 2, ``expert_epochs`` 2):
what a step costs depends on the student's steps (``syn_steps``, MTT's published 30 at IPC 10,
``--syn-steps`` to vary it for peak memory per step count), not on how far the experts trained.

``--json`` prints exactly one JSON object on stdout (the settings and, per method and variant,
``seconds_per_iteration``, ``real_images_per_second``, ``reference_seconds_per_iteration`` and
``speedup_vs_reference`` = reference s/it / ours where the reference ran, else null; there also
``block_speedups``, each block's ratio against its neighbour, and their ``median_block_speedup``,
which a burst of load elsewhere on the machine moves less than the ratio of totals); the table and
any progress go to stderr. ``--out FILE`` writes the same object to a file. Exit status 1 if a case
failed (it is listed under ``failed``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)

from ptmdd_ray.proc import reset_peak_memory, status_mb  # noqa: E402 - after the path (no torch)

METHODS = ("dc", "dsa", "dm", "mtt")
VARIANTS = ("plain", "clom", "cclom")
CASES = [(m, v) for m in METHODS for v in VARIANTS]
ITERS = {"dc": 2, "dsa": 2, "dm": 30, "mtt": 4}
WARMUP = {"dc": 1, "dsa": 1, "dm": 3, "mtt": 1}
BLOCKS = {"dc": 2, "dsa": 2, "dm": 6, "mtt": 2}  # alternating blocks of ours vs the reference
MTT_EXPERT_DATA = 500  # training images per class of the benchmark's experts


def iterations(args, method: str) -> int:
    return args.iterations or ITERS[method]


def config(args, method: str, variant: str):
    from ptmdd_ray.config import build_config

    if method == "mtt":
        return build_config(mtt_config(args, variant))
    return build_config({
        "dataset": {"name": args.data, **({"im_size": args.im_size} if args.im_size else {})},
        "model": args.model,
        "distill": {"method": method, "ipc": args.ipc, "iterations": iterations(args, method),
                    "batch_real": args.batch_real, "compile": not args.no_compile},
        "pool": {"archs": [args.pool_arch], "seeds": 2, "epoch": 2},
        "loss": {"clom": 1000.0 if variant == "clom" else 0.0, "cclom": 1.0 if variant == "cclom" else 0.0,
                 "cclom_batch": 256},
        "store": args.store,
        "device": args.device,
        "precision": args.precision,
    })


def mtt_config(args, variant: str) -> dict:
    """MTT's case: the published settings for the IPC except the start epochs (0..1, so the experts
    train 3 epochs), the learning rates (lr_img 1000, lr_lr 1e-7: the published IPC 10 ones were
    tuned on ZCA-whitened images, and on these raw ones the step size goes negative within an
    iteration; the rates do not change what a step costs) and, with ``--syn-steps``, the student's
    step count."""
    from ptmdd_ray.config import MTT_EXPERT_RECIPE

    return {
        "dataset": {"name": args.data, **({"im_size": args.im_size} if args.im_size else {})},
        "model": args.model,
        "distill": {"method": "mtt", "ipc": args.ipc, "iterations": iterations(args, "mtt"), "max_start_epoch": 2,
                    "expert_epochs": 2, "lr_img": 1000.0, "lr_lr": 1e-7, "mtt_gradient": args.mtt_gradient,
                    **({"syn_steps": args.syn_steps} if args.syn_steps else {})},
        "pool": {"archs": [args.model], "seeds": 2, "epoch": 2,
                 "source": {"name": args.data, "train_per_class": MTT_EXPERT_DATA,
                            **({"im_size": args.im_size} if args.im_size else {})}},
        "pretrain": MTT_EXPERT_RECIPE,
        "loss": {"clom": 1.0 if variant == "clom" else 0.0, "cclom": 1.0 if variant == "cclom" else 0.0,
                 "cclom_batch": 256},
        "store": args.store, "device": args.device, "precision": args.precision,
    }


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MB, read as the study's
    trials read it (:mod:`ptmdd_ray.proc`); off Linux, the peak that getrusage keeps."""
    mb = status_mb(field)
    return mb if mb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_per_iteration(data, cfg) -> int:
    """Real images one iteration embeds: DM all classes' batch (one size for all, the smallest
    class bounds it); DC/DSA every class's batch in each outer step."""
    counts = [int(i.numel()) for i in data.class_indices()]
    d = cfg.distill
    if d.method == "mtt":  # its real images are in the experts, not in its step
        return 0
    if d.method == "dm":
        return len(counts) * min(d.batch_real, min(counts))
    return d.outer_loop * sum(min(d.batch_real, c) for c in counts)


def run_case(args, method: str, variant: str) -> dict:
    import torch

    from ptmdd_ray.data import load_data
    from ptmdd_ray.experts import resolve_experts
    from ptmdd_ray.methods import distill
    from ptmdd_ray.pipeline import pick_device
    from ptmdd_ray.pool import PTMGuide, resolve_pool

    cfg = config(args, method, variant)
    device = pick_device(cfg.device)
    data = load_data(cfg.dataset, 0).to(device)
    pool = resolve_pool(cfg, data, device, progress=False)
    guide = PTMGuide.from_config(cfg.loss, pool.ptms, data, 0) or None
    experts = resolve_experts(cfg, data, device, progress=False).trajectories if method == "mtt" else None
    warm = cfg.distill.__class__(**{**cfg.distill.__dict__, "iterations": WARMUP[method]})
    t_warm = time.perf_counter()
    distill(warm, cfg.model, data, 0, guide, progress=False, precision=cfg.precision,  # incl. torch.compile's compilation
            experts=experts)
    warmup_seconds = time.perf_counter() - t_warm
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_start = torch.cuda.memory_allocated(device) / 2**20
    base_rss = rss_mb("VmRSS")
    reset_peak_memory()  # a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)
    out = distill(cfg.distill, cfg.model, data, 0, guide, progress=False, precision=cfg.precision, experts=experts)
    per_it = out.seconds / out.iterations
    row = {"method": method, "variant": variant, "seconds_per_iteration": per_it,
           "run_seconds_per_iteration": per_it, "iterations": out.iterations,
           "real_images_per_iteration": real_per_iteration(data, cfg),
           "peak_rss_mb": rss_mb(), "peak_over_start_mb": rss_mb() - base_rss,
           "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "im_size": data.im_size, "classes": data.num_classes,
           "reference_seconds_per_iteration": None, "reference_iterations": 0,
           "compile": bool(cfg.distill.compile), "warmup_seconds": warmup_seconds,
           **({"syn_steps": cfg.distill.syn_steps, "mtt_gradient": cfg.distill.mtt_gradient} if method == "mtt"
              else {})}
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["peak_cuda_over_start_mb"] = row["peak_cuda_mb"] - cuda_start
        row["device_name"] = torch.cuda.get_device_name(device)
        row["cuda"] = torch.version.cuda
    if variant in ("plain", "clom"):  # the reference code has no CCLoM
        n = iterations(args, method)
        blocks = BLOCKS[method]
        per_block = max(1, round(n / blocks))
        ours, ref = interleaved_times(cfg, data, guide, pool.ptms if variant == "clom" else None, blocks, per_block,
                                      experts)
        n = blocks * per_block
        row["seconds_per_iteration"], row["reference_seconds_per_iteration"] = sum(ours) / n, sum(ref) / n
        row["reference_iterations"] = n
        # each block's ratio against its neighbour: a burst of load elsewhere on the machine spoils a
        # block or two, not the median
        row["block_speedups"] = [r / o for o, r in zip(ours, ref)]
        row["median_block_speedup"] = statistics.median(row["block_speedups"])
    ours, ref = row["seconds_per_iteration"], row["reference_seconds_per_iteration"]
    row["real_images_per_second"] = row["real_images_per_iteration"] / ours
    row["speedup_vs_reference"] = ref / ours if ref else None
    return row


def interleaved_times(cfg, data, guide, ptms, blocks: int = 6, per_block: int = 5, experts=None
                      ) -> tuple[list[float], list[float]]:
    """Ours vs the reference in alternating blocks, so that drifts of the machine hit both alike:
    the seconds of each block, ours and the reference's."""
    from ptmdd_ray.methods import distill

    device = data.x_train.device
    ref_iter = reference_mtt_iteration(cfg, data, experts, ptms) if experts else reference_iteration(cfg, data, ptms)
    block = cfg.distill.__class__(**{**cfg.distill.__dict__, "iterations": per_block})
    ours, ref = [], []
    for b in range(blocks):
        ours.append(distill(block, cfg.model, data, b, guide, progress=False, precision=cfg.precision,
                            experts=experts).seconds)
        sync(device)
        t0 = time.perf_counter()
        for k in range(per_block):
            ref_iter(b * per_block + k)
        sync(device)
        ref.append(time.perf_counter() - t0)
    return ours, ref


def reference_iteration(cfg, data, ptms):
    import numpy as np
    import torch

    from ptmdd_ray.synthetic import init_synthetic
    from ptmdd_ray.train import new_model
    from reference_dc import reference_dc_iteration
    from reference_dm import reference_dm_iteration

    np.random.seed(0)
    d = cfg.distill
    device = data.x_train.device
    syn, syn_y = init_synthetic(data, d.ipc, "real", torch.Generator().manual_seed(0))
    syn, syn_y = syn.to(device).requires_grad_(True), syn_y.to(device)
    opt = torch.optim.SGD([syn], lr=d.lr_img, momentum=0.5)
    indices = [i.cpu().numpy() for i in data.class_indices()]
    shape = (data.channels, data.num_classes, data.im_size)
    ptm = ptms[0].model if ptms else None
    alpha = cfg.loss.clom if ptm is not None else 0.0

    def it(k):
        net = new_model(cfg.model, shape, seed=k, device=device)  # the original's default (NCHW) layout
        if d.method == "dm":
            reference_dm_iteration(net, syn, syn_y, data.x_train, indices, opt, d.ipc, d.batch_real, d.dsa_strategy,
                                   ptm, alpha)
        else:
            reference_dc_iteration(net, syn, syn_y, data.x_train, indices, opt, d.ipc, d.batch_real, d.dsa_strategy,
                                   d.outer_loop, d.inner_loop, d.lr_net, d.batch_train, ptm, alpha)

    for k in range(WARMUP[d.method]):
        it(k)
    return it


def reference_mtt_iteration(cfg, data, experts, ptms=None):
    """distill.py's iteration (``reference_mtt.py``): an expert and a start epoch drawn with numpy,
    the expert's parameters as lists of tensors (as buffer.py stores them), the images and the step
    size updated by their own SGD optimisers (momentum 0.5); with ``ptms``, CLoM added the way the
    paper's code adds it to DM (one PTM, the raw synthetic set)."""
    import numpy as np
    import torch

    from ptmdd_ray import losses
    from ptmdd_ray.synthetic import init_synthetic
    from ptmdd_ray.train import new_model
    from reference_mtt import reference_mtt_step

    np.random.seed(0)
    d = cfg.distill
    device = data.x_train.device
    shape = (data.channels, data.num_classes, data.im_size)
    names = [(p.shape, p.numel()) for p in new_model(cfg.model, shape, seed=0).parameters()]

    def as_list(flat):
        out, start = [], 0
        for size, n in names:
            out.append(flat[start:start + n].view(size))
            start += n
        return out

    buffer = [[as_list(p) for p in e.params] for e in experts]
    syn, syn_y = init_synthetic(data, d.ipc, "real", torch.Generator().manual_seed(0))
    syn, syn_y = syn.to(device).requires_grad_(True), syn_y.to(device)
    syn_lr = torch.tensor(d.lr_teacher, device=device).requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=d.lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=d.lr_lr, momentum=0.5)
    gen = torch.Generator().manual_seed(0)

    def it(k):
        net = new_model(cfg.model, shape, seed=k, device=device)
        trajectory = buffer[np.random.randint(0, len(buffer))]
        start = np.random.randint(0, d.max_start_epoch)
        loss = reference_mtt_step(net, trajectory[start], trajectory[start + d.expert_epochs], syn, syn_y, syn_lr,
                                  d.syn_steps, d.batch_syn or syn.shape[0], d.dsa_strategy, gen)
        if ptms:
            loss = loss + cfg.loss.clom * losses.clom(ptms[0].model(syn), syn_y)
        opt_img.zero_grad()
        opt_lr.zero_grad()
        loss.backward()
        opt_img.step()
        opt_lr.step()

    for k in range(WARMUP["mtt"]):
        it(k)
    return it


def subset(values: list[str], allowed: tuple[str, ...], flag: str) -> list[str]:
    """``--methods dm,dsa`` or ``--methods dm dsa`` (or ``"dm dsa"``): the named members of
    ``allowed``, in its order; an unknown name is an error."""
    names = [n for v in values for n in re.split(r"[,\s]+", v.strip().lower()) if n]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise SystemExit(f"bench_distill.py: error: {flag}: expected a subset of {','.join(allowed)}, got "
                         f"{' '.join(values)!r}")
    return [a for a in allowed if a in names]


def case_command(args, method: str, variant: str) -> list[str]:
    cmd = [sys.executable, __file__, "--case", f"{method}:{variant}", "--data", args.data, "--ipc", str(args.ipc),
           "--store", args.store, "--device", args.device, "--model", args.model, "--pool-arch", args.pool_arch,
           "--batch-real", str(args.batch_real), "--im-size", str(args.im_size), "--precision", args.precision,
           "--syn-steps", str(args.syn_steps), "--mtt-gradient", args.mtt_gradient]
    return cmd + (["--iterations", str(args.iterations)] if args.iterations else []) + (
        ["--no-compile"] if args.no_compile else [])


def settings(args, methods: list[str], variants: list[str], rows: list[dict]) -> dict:
    first = rows[0] if rows else {}
    if first:
        torch_version, device = first["torch"], first["device"]
    else:  # every case failed: say what this interpreter has
        import torch

        torch_version, device = torch.__version__, args.device
    return {"data": args.data, "im_size": first.get("im_size"), "model": args.model, "pool_arch": args.pool_arch, "ipc": args.ipc,
            "batch_real": args.batch_real, "iterations": {m: iterations(args, m) for m in methods},
            "warmup": {m: WARMUP[m] for m in methods}, "compile": not args.no_compile, "precision": args.precision,
            "methods": methods, "variants": variants,
            "device": device, "device_requested": args.device, "device_name": first.get("device_name"),
            "cuda": first.get("cuda"), "torch": torch_version, "threads": first.get("threads"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}",
                   help="a dataset name (digits, cifar10, ...) or parquet:PATH (default: the shared CIFAR-10)")
    p.add_argument("--im-size", type=int, default=0, help="resize the images to this many pixels (default: the data's)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--model", default="ConvNetW32", help="the matching network (ConvNet = width 128, the papers')")
    p.add_argument("--pool-arch", default="ConvNetW32", help="architecture of the 2 PTMs of the CLoM/CCLoM pool")
    p.add_argument("--batch-real", type=int, default=64, help="real images per class per matching step")
    p.add_argument("--iterations", type=int, default=0,
                   help=f"timed iterations per case (default per method: {ITERS}); the reference comparison "
                        "runs about as many of each, in alternating blocks")
    p.add_argument("--store", default=str(ROOT / "ptm_store"))
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true",
                   help="eager passes (default: through torch.compile: DM's embeddings, DC/DSA's inner-loop training)")
    p.add_argument("--precision", choices=["bf16", "bf16-cpu", "fp32"], default="bf16",
                   help="the run's precision (bf16-cpu: compiled DM passes in bf16 on the CPU too; the reference is fp32)")
    p.add_argument("--methods", nargs="+", default=["dc,dsa,dm"],
                   help="a subset of dc,dsa,dm,mtt (comma or space separated; default dc,dsa,dm)")
    p.add_argument("--syn-steps", type=int, default=0, help="MTT's student steps per iteration (default: published)")
    p.add_argument("--mtt-gradient", choices=["unrolled", "recomputed"], default="unrolled",
                   help="MTT's gradient through the student's steps (the reference's is unrolled)")
    p.add_argument("--variants", nargs="+", default=["plain,clom,cclom"],
                   help="a subset of plain,clom,cclom (comma or space separated)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its row as JSON
    args = p.parse_args(argv)
    if args.iterations < 0 or args.ipc < 1 or args.batch_real < 1 or args.syn_steps < 0:
        p.error("--iterations and --syn-steps must be >= 0, --ipc and --batch-real >= 1")
    if args.case:
        method, variant = args.case.split(":")
        print(json.dumps(run_case(args, method, variant)))
        return 0
    methods = subset(args.methods, METHODS, "--methods")
    variants = subset(args.variants, VARIANTS, "--variants")
    table = sys.stderr if args.json else sys.stdout
    rows, results, failed = [], {}, {}
    print(f"{'method':<8}{'variant':<9}{'s/iter':>10}{'reference':>11}{'speed-up':>10}{'median':>8}{'peak RSS MB':>13}"
          f"{'distill +MB':>13}", file=table, flush=True)
    for method, variant in CASES:
        if method not in methods or variant not in variants:
            continue
        proc = subprocess.run(case_command(args, method, variant), capture_output=True, text=True)
        row = None
        if proc.returncode == 0:
            try:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                pass
        if row is None:
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            failed[f"{method}:{variant}"] = reason
            print(f"{method:<8}{variant:<9} failed: {reason}", file=table, flush=True)
            if args.json:
                print(proc.stderr[-3000:], file=sys.stderr, flush=True)
            continue
        rows.append(row)
        results.setdefault(method, {})[variant] = {k: v for k, v in row.items() if k not in ("method", "variant")}
        ref, ours = row["reference_seconds_per_iteration"], row["seconds_per_iteration"]
        ref_s = f"{ref:.4f}" if ref else "-"
        ratio = f"{row['speedup_vs_reference']:.2f}x" if ref else "-"
        median = f"{row['median_block_speedup']:.2f}x" if ref else "-"
        cuda = f"  (CUDA peak {row['peak_cuda_mb']:.0f} MB)" if "peak_cuda_mb" in row else ""
        print(f"{method:<8}{variant:<9}{ours:>10.4f}{ref_s:>11}{ratio:>10}{median:>8}{row['peak_rss_mb']:>13.0f}"
              f"{row['peak_over_start_mb']:>13.0f}{cuda}", file=table, flush=True)
    report = {"benchmark": "bench_distill", "settings": settings(args, methods, variants, rows), "results": results,
              "failed": failed}
    emit(report, args.json, args.out, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
