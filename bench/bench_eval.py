"""Seconds to evaluate one synthetic set: ours (training passes through torch.compile; on CUDA the
runs of an architecture as one grouped network, :mod:`ptmdd_ray.grouped`) against the reference's
``evaluate_synset`` loop (``reference_eval.py``: one eager model at a time), in alternating blocks
in one process.

    .venv/bin/python bench/bench_eval.py [--data parquet:../shared/data/cifar10-jpeg.parquet]
        [--archs ConvNetW32,ConvNet] [--ipc 10] [--runs 5] [--epochs 1000] [--blocks 2]
        [--no-compile] [--group auto|on|off] [--precision bf16|bf16-cpu|fp32] [--device auto|cpu|cuda]
        [--json] [--out FILE]

The set is ``--ipc`` random real images per class (what a set holds does not change the cost).
A block is one whole evaluation of the set by one side: ``--runs`` models of every ``--archs``
trained ``--epochs`` epochs with DSA (the DSA/DM protocol) and scored on the test split; ours and
the reference's blocks alternate (ours first in odd blocks, the reference first in even ones), each
block with its own seeds, so machine drift moves both alike. The reference protocol is 1000 epochs
x 5 models; on 2 CPU cores a block at that length takes hours for ConvNet-128, so CPU figures use a
shorter ``--epochs`` (say so when quoting them). torch.compile's one-time compilation is done in an
untimed warm-up and reported as ``compile_seconds``.

``--json`` prints one JSON object on stdout: ``seconds`` and ``reference_seconds`` (totals over the
blocks), ``speedup_vs_reference`` (their ratio), ``block_speedups`` (each block pair's ratio),
``accuracy`` and ``reference_accuracy`` ({arch: mean test accuracy over blocks and runs}), and the
settings; the table goes to stderr.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)


def ours(x, y, data, args, arch: str, seed: int, epochs: int) -> list[float]:
    from ptmdd_ray.config import EvalConfig
    from ptmdd_ray.evaluate import evaluate_set

    group = {"auto": None, "on": True, "off": False}[args.group]
    cfg = EvalConfig(archs=[arch], runs=args.runs, epochs=epochs, augment=True, compile=not args.no_compile, group=group)
    return evaluate_set(x, y, data, cfg, seed, progress=False, splits=("test",),
                        precision=args.precision)["test"][arch]["runs"]


def reference(x, y, data, args, arch: str, seed: int, epochs: int) -> list[float]:
    import torch

    from ptmdd_ray.config import DSA_STRATEGY
    from ptmdd_ray.train import new_model
    from reference_eval import reference_evaluate_synset

    shape = (data.channels, data.num_classes, data.im_size)
    accs = []
    for run in range(args.runs):
        torch.manual_seed(seed * 1000 + run)
        net = new_model(arch, shape, seed=seed * 1000 + run, device=x.device)
        accs.append(float(reference_evaluate_synset(net, x, y, data.x_test, data.y_test, epochs, DSA_STRATEGY)))
    return accs


def timed(fn, *a) -> tuple[float, list[float]]:
    import torch

    t = time.perf_counter()
    accs = fn(*a)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, accs


def measure(args) -> dict:
    import torch

    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data
    from ptmdd_ray.evaluate import random_real_subset
    from ptmdd_ray.pipeline import pick_device

    cfg = build_config({"dataset": {"name": args.data, **({"im_size": args.im_size} if args.im_size else {}),
                                    **({"test_per_class": args.test_per_class} if args.test_per_class else {})},
                        "device": args.device})
    device = pick_device(cfg.device)
    data = load_data(cfg.dataset, 0).to(device)
    x, y = random_real_subset(data, args.ipc, 0)
    archs = [a for part in args.archs for a in part.split(",") if a]
    t = time.perf_counter()
    for arch in archs:  # untimed warm-up: compilation, allocator, oneDNN's kernel choice
        ours(x, y, data, args, arch, 999, 1)
        reference(x, y, data, args, arch, 999, 1)
    warm = time.perf_counter() - t
    ours_s, ref_s, acc, ref_acc = [], [], {a: [] for a in archs}, {a: [] for a in archs}
    for block in range(args.blocks):
        pair = {}
        sides = (("ours", ours), ("reference", reference))
        for side, fn in (sides if block % 2 == 0 else sides[::-1]):
            seconds = 0.0
            for arch in archs:
                s, accs = timed(fn, x, y, data, args, arch, block, args.epochs)
                seconds += s
                (acc if side == "ours" else ref_acc)[arch] += accs
            pair[side] = seconds
        ours_s.append(pair["ours"])
        ref_s.append(pair["reference"])
        print(f"block {block}: ours {pair['ours']:.1f} s, reference {pair['reference']:.1f} s, "
              f"{pair['reference'] / pair['ours']:.2f}x", file=sys.stderr)
    return {"data": args.data, "archs": archs, "ipc": args.ipc, "runs": args.runs, "epochs": args.epochs,
            "blocks": args.blocks, "compile": not args.no_compile, "group": args.group, "precision": args.precision,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "seconds": sum(ours_s), "reference_seconds": sum(ref_s),
            "speedup_vs_reference": sum(ref_s) / sum(ours_s),
            "block_speedups": [r / o for o, r in zip(ours_s, ref_s)],
            "accuracy": {a: statistics.fmean(v) for a, v in acc.items()},
            "reference_accuracy": {a: statistics.fmean(v) for a, v in ref_acc.items()},
            "compile_seconds": warm}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--im-size", type=int, default=0, help="resize the images to this many pixels (default: the data's)")
    p.add_argument("--test-per-class", type=int, default=0, help="score on this many test images per class (0: all)")
    p.add_argument("--archs", nargs="+", default=["ConvNetW32,ConvNet"], help="evaluation architectures (comma separated)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--runs", type=int, default=5, help="models per architecture (the reference: 5)")
    p.add_argument("--epochs", type=int, default=1000, help="training epochs per model (the reference: 1000 for DSA/DM)")
    p.add_argument("--blocks", type=int, default=2, help="alternating blocks per side")
    p.add_argument("--no-compile", action="store_true", help="our training passes eager")
    p.add_argument("--group", choices=["auto", "on", "off"], default="auto",
                   help="train our runs as one grouped network (auto: on CUDA only, the package default)")
    p.add_argument("--precision", choices=["bf16", "bf16-cpu", "fp32"], default="bf16",
                   help="our precision (bf16, the default: bf16 autocast on CUDA, fp32 on the CPU; bf16-cpu: "
                        "bf16 on the CPU too); the reference computes fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    res = measure(args)
    print(f"{'arch':<12} {'ours acc':>9} {'ref acc':>9}", file=sys.stderr)
    for a in res["archs"]:
        print(f"{a:<12} {res['accuracy'][a]:>9.4f} {res['reference_accuracy'][a]:>9.4f}", file=sys.stderr)
    print(f"ours {res['seconds']:.1f} s, reference {res['reference_seconds']:.1f} s: "
          f"{res['speedup_vs_reference']:.2f}x ({args.epochs} epochs x {args.runs} runs, {res['device_name']})",
          file=sys.stderr)
    emit(res, args.json, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
