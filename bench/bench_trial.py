"""Seconds of one whole DM + CLoM trial, ours against the reference's loops, phase by phase.

    .venv/bin/python bench/bench_trial.py [--data parquet:../shared/data/cifar10-jpeg.parquet]
        [--train-per-class 500] [--model ConvNetW32] [--ipc 10] [--iterations 200] [--batch-real 64]
        [--ptm-epochs 2] [--runs 3] [--eval-epochs 300] [--eval-compile auto|on|off]
        [--distill-compile auto|on|off] [--precision bf16|bf16-cpu|fp32] [--json] [--out FILE]

A trial: train the 2-PTM pool (``--model``, ``--ptm-epochs`` epochs of a 150-epoch schedule on the
training images), distill IPC ``--ipc`` with DM + CLoM (α 2000 on the raw images, the reference's)
for ``--iterations`` iterations, evaluate the set and the random-real baseline (``--runs`` models ×
``--eval-epochs`` epochs with DSA each). Ours runs the package's pieces (``resolve_pool`` into a
fresh store, ``distill``, ``evaluate_set``); the reference runs ``reference_eval.reference_train``,
``reference_dm.reference_dm_iteration`` and ``reference_eval.reference_evaluate_synset``. The
phases alternate (ours, then the reference's, phase by phase) so machine drift hits both alike.
``--json`` prints one JSON object: per phase ``seconds`` and ``reference_seconds``, their totals
and ``speedup_vs_reference``, and each side's test accuracy of the set and of the baseline.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)

PHASES = ("pretrain", "distill", "eval_synthetic", "eval_baseline")
ON_OFF = {"auto": None, "on": True, "off": False}


def config(args, store: str):
    from ptmdd_ray.config import build_config

    return build_config({
        "dataset": {"name": args.data, "train_per_class": args.train_per_class,
                    **({"im_size": args.im_size} if args.im_size else {}),
                    **({"test_per_class": args.test_per_class} if args.test_per_class else {})},
        "model": args.model,
        "distill": {"method": "dm", "ipc": args.ipc, "iterations": args.iterations, "batch_real": args.batch_real,
                    "compile": ON_OFF[args.distill_compile]},
        "pool": {"archs": [args.model], "seeds": 2, "epoch": args.ptm_epochs},
        "loss": {"clom": 2000.0},
        "eval": {"runs": args.runs, "epochs": args.eval_epochs, "baseline": True,
                 "compile": ON_OFF[args.eval_compile]},
        "store": store, "device": "cpu", "precision": args.precision})


def clock(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def ours(cfg, data, phase: str, state: dict):
    from ptmdd_ray.evaluate import evaluate_set, random_real_subset
    from ptmdd_ray.methods import distill
    from ptmdd_ray.pool import PTMGuide, resolve_pool

    if phase == "pretrain":
        state["pool"] = resolve_pool(cfg, data, data.x_train.device, progress=False)
        return None
    if phase == "distill":
        guide = PTMGuide.from_config(cfg.loss, state["pool"].ptms, data, cfg.seed)
        state["set"] = distill(cfg.distill, cfg.model, data, cfg.seed, guide, progress=False, precision=cfg.precision)
        return None
    x, y = (state["set"].images, state["set"].labels) if phase == "eval_synthetic" else \
        random_real_subset(data, cfg.distill.ipc, cfg.seed)
    return evaluate_set(x, y, data, cfg.eval, cfg.seed, progress=False, splits=("test",),
                        precision=cfg.precision)["test"][cfg.model]["mean"]


def reference(cfg, data, phase: str, state: dict):
    import numpy as np
    import torch

    from ptmdd_ray.evaluate import random_real_subset
    from ptmdd_ray.synthetic import init_synthetic
    from ptmdd_ray.train import new_model
    from reference_dm import reference_dm_iteration
    from reference_eval import reference_evaluate_synset, reference_train

    shape = (data.channels, data.num_classes, data.im_size)
    t = cfg.pretrain
    if phase == "pretrain":
        state["ptms"] = [reference_train(new_model(cfg.model, shape, seed=s), data.x_train, data.y_train,
                                         cfg.pool.epoch, t.lr, t.momentum, t.weight_decay, t.batch,
                                         (t.epochs // 3, 2 * t.epochs // 3)).eval() for s in cfg.pool.seeds]
        return None
    d = cfg.distill
    if phase == "distill":
        np.random.seed(cfg.seed)
        syn, syn_y = init_synthetic(data, d.ipc, "real", torch.Generator().manual_seed(cfg.seed))
        syn = syn.clone().requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=d.lr_img, momentum=0.5)
        indices = [i.cpu().numpy() for i in data.class_indices()]
        for p in (p for m in state["ptms"] for p in m.parameters()):
            p.requires_grad_(False)
        for k in range(d.iterations):
            ptm = state["ptms"][k % len(state["ptms"])]
            reference_dm_iteration(new_model(cfg.model, shape, seed=k), syn, syn_y, data.x_train, indices, opt,
                                   d.ipc, d.batch_real, d.dsa_strategy, ptm, cfg.loss.clom)
        state["set"] = (syn.detach(), syn_y)
        return None
    x, y = state["set"] if phase == "eval_synthetic" else random_real_subset(data, d.ipc, cfg.seed)
    accs = []
    for run in range(cfg.eval.runs):
        torch.manual_seed(cfg.seed * 1000 + run)
        net = new_model(cfg.model, shape, seed=cfg.seed * 1000 + run)
        accs.append(float(reference_evaluate_synset(net, x, y, data.x_test, data.y_test, cfg.eval.epochs,
                                                    d.dsa_strategy if cfg.eval.augment else "none")))
    return sum(accs) / len(accs)


def measure(args) -> dict:
    import torch

    from ptmdd_ray.data import load_data

    with tempfile.TemporaryDirectory() as store:
        cfg = config(args, store)
        data = load_data(cfg.dataset, 0)
        mine, theirs, row = {}, {}, {}
        for phase in PHASES:
            s_ours, acc_ours = clock(lambda: ours(cfg, data, phase, mine))
            s_ref, acc_ref = clock(lambda: reference(cfg, data, phase, theirs))
            row[phase] = {"seconds": s_ours, "reference_seconds": s_ref, "speedup_vs_reference": s_ref / s_ours}
            if acc_ours is not None:
                row[phase].update(accuracy=acc_ours, reference_accuracy=acc_ref)
            print(f"{phase:<15} ours {s_ours:8.1f} s  reference {s_ref:8.1f} s  {s_ref / s_ours:5.2f}x", file=sys.stderr)
    total, ref_total = sum(r["seconds"] for r in row.values()), sum(r["reference_seconds"] for r in row.values())
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "phases": row,
            "seconds": total, "reference_seconds": ref_total, "speedup_vs_reference": ref_total / total,
            "eval_compile": bool(cfg.eval.compile), "distill_compile": bool(cfg.distill.compile)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--im-size", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=0)
    p.add_argument("--model", default="ConvNetW32")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--ptm-epochs", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--eval-compile", choices=["auto", "on", "off"], default="auto",
                   help="eval.compile (auto: the package default, on from 500 epochs)")
    p.add_argument("--distill-compile", choices=["auto", "on", "off"], default="auto",
                   help="distill.compile (auto: the package default, on from 1000 DM iterations)")
    p.add_argument("--precision", choices=["bf16", "bf16-cpu", "fp32"], default="bf16",
                   help="our precision (bf16-cpu: bf16 autocast on the CPU too, in pretraining, evaluation and "
                        "compiled DM passes; the reference computes fp32)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    res = measure(args)
    print(f"trial: ours {res['seconds']:.1f} s, reference {res['reference_seconds']:.1f} s: "
          f"{res['speedup_vs_reference']:.2f}x", file=sys.stderr)
    emit(res, args.json, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
