"""Paper-scale points on one GPU: CIFAR-10 IPC 10 with DM at the published settings, plain and with
CLoM, beside the published DM figure (48.9 ± 0.6 %, Zhao & Bilen 2023, Table 1).

    .venv/bin/python bench/paper_scale.py [--data parquet:PATH] [--iterations 20000] [--batch-real 256]
        [--ptm-epoch 10] [--eval-runs 5] [--eval-epochs 1000] [--budget-s 540] [--device auto|cuda|cpu]
        [--out FILE]

The steps, in this order: train 2 ConvNet PTMs (width 128, seeds 0 and 1) with the reference's
recipe (SGD lr 0.01, momentum 0.9, weight decay 5e-3 as the paper's code sets it, batch 256, a 150-epoch schedule with x0.1 at
50 and 100) up to ``--ptm-epoch`` (10: the best of the sub-optimal epochs, REPRODUCTION.md); distill
the set with plain DM and with DM + CLoM (the authors' α 2000, raw synthetic images), each
``--iterations`` iterations with ``--batch-real`` real images per class; evaluate both sets and the
random-real baseline with ``--eval-runs`` ConvNet models x ``--eval-epochs`` epochs with DSA (the
reference's 5 x 1000). The whole must fit ``--budget-s`` (9 minutes on one H100): after the PTMs,
probes time an evaluation model-epoch (on the random-real subset, a set's shape) and an iteration
of each distillation, each after a warm-up that compiles what the full runs compile; if the plan
overruns the budget, the number of evaluation models is cut first (to at least 1 per set), and the
distillation's iterations only if that is not enough; the JSON and the table say so. The JSON
also carries the resolved precision, compilation and PTM recipe, since they differ from the
paper's code (bf16 autocast and compiled, grouped evaluation on CUDA), and its ± is over the
evaluation models of one distilled set, not over seeds.

Writes one JSON object (``--out``, and stdout): the card, settings, per set accuracy mean ± std over
the evaluation models, seconds per iteration, distillation and evaluation seconds, the wall time,
and the published figure; the table goes to stderr. Without CUDA (``--device auto``) it says so and
exits 0; ``--device cpu`` runs it on the CPU (for tests, at tiny settings).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED = {"dm": {"mean": 48.9, "std": 0.6, "source": "Zhao & Bilen 2023 (DM), Table 1, CIFAR-10 IPC 10"}}
PROBE_EPOCHS = 20  # the evaluation probe's epochs (after a 1-epoch warm-up)
PROBE_ITERATIONS = 20  # the distillation probe's iterations per set (after a warm-up of as many)


def config(args, store: str):
    from ptmdd_ray.config import build_config

    return build_config({
        "dataset": {"name": args.data, **({"train_per_class": args.train_per_class} if args.train_per_class else {}),
                    **({"test_per_class": args.test_per_class} if args.test_per_class else {}),
                    **({"im_size": args.im_size} if args.im_size else {})},
        "model": args.model,
        "distill": {"method": "dm", "ipc": args.ipc, "iterations": args.iterations, "batch_real": args.batch_real},
        "pool": {"archs": [args.model], "seeds": 2, "epoch": args.ptm_epoch},
        "pretrain": {"epochs": 150},
        "loss": {"clom": None},  # DM's default: the authors' α 2000
        "eval": {"runs": args.eval_runs, "epochs": args.eval_epochs, "baseline": True},
        "store": store, "device": args.device})


def plan(eval_s: float, distill_s: float, args, sets: int, left_s: float) -> tuple[int, int]:
    """(evaluation models, distillation iterations) that fit ``left_s``, from the probes' steady
    rates: ``eval_s`` seconds per evaluation model per epoch, ``distill_s`` seconds per iteration of
    both distillations together. The evaluation count is cut first (to at least 1 model per set),
    the iterations only if even that does not fit (to at least 1)."""
    evaluation = lambda runs: eval_s * args.eval_epochs * runs * sets  # noqa: E731
    runs = args.eval_runs
    if distill_s * args.iterations + evaluation(runs) > left_s:
        spare = left_s - distill_s * args.iterations
        runs = max(1, min(runs, math.floor(spare / evaluation(1)) if spare > 0 else 1))
    iterations = args.iterations
    if distill_s * iterations + evaluation(runs) > left_s:
        iterations = max(1, math.floor((left_s - evaluation(runs)) / distill_s))
    return runs, iterations


def probes(cfg, data, guides: dict) -> tuple[float, float, float]:
    """Steady seconds per evaluation model-epoch and per iteration of both distillations, each timed
    after a warm-up that compiles what the full runs compile (once per process), so that the
    one-off compilation is not scaled up; and the seconds the probes took."""
    from ptmdd_ray.evaluate import evaluate_set, random_real_subset
    from ptmdd_ray.methods import distill

    t0 = time.perf_counter()
    images, labels = random_real_subset(data, cfg.distill.ipc, cfg.seed)  # a set's shape: a set's cost
    one = replace(cfg.eval, runs=1)
    evaluate_set(images, labels, data, replace(one, epochs=1), cfg.seed, progress=False, splits=("test",),
                 precision=cfg.precision)
    t = time.perf_counter()
    evaluate_set(images, labels, data, replace(one, epochs=PROBE_EPOCHS), cfg.seed, progress=False,
                 splits=("test",), precision=cfg.precision)
    eval_s = (time.perf_counter() - t) / PROBE_EPOCHS
    distill_s = 0.0
    for guide in guides.values():
        short = replace(cfg.distill, iterations=PROBE_ITERATIONS)
        distill(short, cfg.model, data, cfg.seed, guide, progress=False)  # warm-up (compiles if the run does)
        distill_s += distill(short, cfg.model, data, cfg.seed, guide, progress=False).seconds / PROBE_ITERATIONS
    return eval_s, distill_s, time.perf_counter() - t0


def run(args) -> dict:
    import tempfile

    import torch

    from ptmdd_ray.data import load_data
    from ptmdd_ray.evaluate import evaluate_set, random_real_subset
    from ptmdd_ray.methods import distill
    from ptmdd_ray.pipeline import pick_device
    from ptmdd_ray.pool import PTMGuide, resolve_pool

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        cfg = config(args, store)
        device = pick_device(cfg.device)
        data = load_data(cfg.dataset, 0).to(device)
        t = time.perf_counter()
        pool = resolve_pool(cfg, data, device, progress=True)
        ptm_s = time.perf_counter() - t
        losses = {"dm": replace(cfg.loss, clom=0.0), "dm+clom": cfg.loss}
        guides = {name: PTMGuide.from_config(loss, pool.ptms, data, cfg.seed) if loss.clom else None
                  for name, loss in losses.items()}  # built once: the probes and the runs share them
        eval_s, distill_s, probe_s = probes(cfg, data, guides)
        runs, iterations = plan(eval_s, distill_s, args, 3, args.budget_s - (time.perf_counter() - t0))
        sets, rows = {}, {}  # {name: (images, labels)}, {name: its figures}
        for name, loss in losses.items():
            made = distill(replace(cfg.distill, iterations=iterations), cfg.model, data, cfg.seed, guides[name],
                           progress=True)
            sets[name] = (made.images, made.labels)
            rows[name] = {"clom": loss.clom, "distill_seconds": made.seconds,
                          "seconds_per_iteration": made.seconds / max(1, iterations)}
            print(f"paper_scale: {name}: {made.seconds:.0f} s", file=sys.stderr)
        sets["random real"] = random_real_subset(data, cfg.distill.ipc, cfg.seed)
        evaluation = replace(cfg.eval, runs=runs)
        for name, s in sets.items():
            t = time.perf_counter()
            acc = evaluate_set(*s, data, evaluation, cfg.seed, progress=False, splits=("test",),
                               precision=cfg.precision)["test"][cfg.model]
            rows.setdefault(name, {}).update(accuracy_mean=100 * acc["mean"], accuracy_std=100 * acc["std"],
                                             accuracy_runs=[100 * a for a in acc["runs"]],
                                             eval_seconds=time.perf_counter() - t)
    wall = time.perf_counter() - t0
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    notes = [f"evaluation cut from {args.eval_runs} to {runs} models per set" if runs < args.eval_runs else "",
             f"distillation cut from {args.iterations} to {iterations} iterations" if iterations < args.iterations
             else ""]
    return {"card": card, "device": str(device), "torch": torch.__version__,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "resolved": {"precision": cfg.precision, "eval.compile": cfg.eval.compile,
                         "distill.compile": cfg.distill.compile, "pretrain": vars(cfg.pretrain)},
            "eval_runs": runs, "eval_shortened": runs < args.eval_runs, "iterations": iterations,
            "distill_shortened": iterations < args.iterations,
            "eval_note": "; ".join(n for n in notes if n) + f" to fit {args.budget_s:.0f} s" if any(notes) else None,
            "ptm_seconds": ptm_s, "probe_seconds": probe_s, "eval_seconds_per_model_epoch": eval_s,
            "distill_seconds_per_iteration_probe": distill_s, "sets": rows, "wall_seconds": wall,
            "within_budget": wall <= args.budget_s, "published": PUBLISHED,
            "accuracy_std_over": "the evaluation models of one distilled set (one seed), not seeds"}


def table(res: dict) -> str:
    pub = res["published"]["dm"]
    data = Path(res["settings"]["data"].split(":", 1)[-1]).name
    lines = [f"paper_scale on {res['card']}: {data} IPC {res['settings']['ipc']}, {res['settings']['model']}, "
             f"DM {res['iterations']} iterations, evaluation {res['eval_runs']} x "
             f"{res['settings']['eval_epochs']} epochs" + (f" ({res['eval_note']})" if res["eval_note"] else ""),
             f"{'set':<12} {'test acc %':>14} {'s/it':>8} {'distill s':>10} {'eval s':>8}"]
    for name, r in res["sets"].items():
        sit = f"{r['seconds_per_iteration']:.4f}" if "seconds_per_iteration" in r else "-"
        dist = f"{r['distill_seconds']:.0f}" if "distill_seconds" in r else "-"
        lines.append(f"{name:<12} {r['accuracy_mean']:>7.2f} ± {r['accuracy_std']:<4.2f} {sit:>8} {dist:>10} "
                     f"{r['eval_seconds']:>8.0f}")
    lines.append(f"{'published DM':<12} {pub['mean']:>7.2f} ± {pub['std']:<4.2f}   ({pub['source']})")
    lines.append(f"wall {res['wall_seconds']:.0f} s (budget {res['settings']['budget_s']:.0f} s), PTMs {res['ptm_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--train-per-class", type=int, default=0, help="0: all (the paper)")
    p.add_argument("--test-per-class", type=int, default=0, help="0: all (the paper)")
    p.add_argument("--im-size", type=int, default=0)
    p.add_argument("--model", default="ConvNet", help="matching, PTM and evaluation network (the paper: ConvNet)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--ptm-epoch", type=int, default=10)
    p.add_argument("--eval-runs", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, default=1000)
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole run's time budget (9 minutes)")
    p.add_argument("--device", default="auto", help="auto: CUDA if there, else say so and exit 0")
    p.add_argument("--out", help="write the JSON object here too")
    args = p.parse_args(argv)

    import torch

    if args.device == "auto" and not torch.cuda.is_available():
        print("paper_scale: no CUDA device here (torch.cuda.is_available() is False): nothing to run; "
              "run it on a machine with a CUDA GPU (or --device cpu at tiny settings)")
        return 0
    res = run(args)
    print(table(res), file=sys.stderr)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
