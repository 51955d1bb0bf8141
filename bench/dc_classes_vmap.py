"""Would DC/DSA's per-class gradient matching be faster as one batched pass over the classes?

    .venv/bin/python bench/dc_classes_vmap.py [--arch ConvNetW32] [--classes 10] [--batch-real 64]
        [--ipc 10] [--im-size 32] [--channels 3] [--reps 3] [--json]

One matching step of the package's DC loss (per class: the real batch's parameter gradient, the
synthetic class's create-graph gradient, the layer-wise distance; then the gradient w.r.t. the
synthetic images) computed two ways on the same random tensors: the per-class loop the package and
the reference use, and all classes at once with ``torch.func`` (``vmap`` over the classes of
``grad`` of a ``functional_call``). Prints the loss and image-gradient agreement and the seconds of
each (alternating, ``--reps`` times); ``--json`` prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ConvNetW32")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--im-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from ptmdd_ray import losses
    from ptmdd_ray.train import new_model

    C, B, ipc, ch, s = args.classes, args.batch_real, args.ipc, args.channels, args.im_size
    gen = torch.Generator().manual_seed(0)
    net = new_model(args.arch, (ch, C, s), seed=0)
    real = torch.randn(C, B, ch, s, s, generator=gen)
    y_real = torch.arange(C)[:, None].expand(C, B)
    syn = torch.randn(C * ipc, ch, s, s, generator=gen, requires_grad=True)
    y_syn = torch.arange(C).repeat_interleave(ipc)
    params = list(net.parameters())
    state = {k: v.detach() for k, v in net.named_parameters()}

    def per_class_loop():
        loss = syn.new_zeros(())
        for c in range(C):
            gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real[c]), y_real[c]), params)]
            syn_c = syn[c * ipc:(c + 1) * ipc]
            gw_syn = torch.autograd.grad(F.cross_entropy(net(syn_c), y_syn[c * ipc:(c + 1) * ipc]), params,
                                         create_graph=True)
            loss = loss + losses.gradient_distance(gw_syn, gw_real)
        return loss.detach(), torch.autograd.grad(loss, syn)[0]

    def ce(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    per_class_grad = vmap(grad(ce), in_dims=(None, 0, 0))
    distance = vmap(lambda a, b: losses.gradient_distance(list(a.values()), list(b.values())))

    def batched():
        gw_real = per_class_grad(state, real, y_real)
        gw_syn = per_class_grad(state, syn.view(C, ipc, ch, s, s), y_syn.view(C, ipc))
        loss = distance(gw_syn, gw_real).sum()
        return loss.detach(), torch.autograd.grad(loss, syn)[0]

    (l_loop, g_loop), (l_vmap, g_vmap) = per_class_loop(), batched()
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    for _ in range(args.reps):
        for name, fn in (("loop", per_class_loop), ("vmap", batched)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    res = {"arch": args.arch, "classes": C, "batch_real": B, "ipc": ipc, "im_size": s, "threads": torch.get_num_threads(),
           "loss_loop": float(l_loop), "loss_vmap": float(l_vmap),
           "grad_max_abs_diff": float((g_loop - g_vmap).abs().max()), "grad_max_abs": float(g_loop.abs().max()),
           "loop_seconds": statistics.median(times["loop"]), "vmap_seconds": statistics.median(times["vmap"])}
    res["speedup_vmap_vs_loop"] = res["loop_seconds"] / res["vmap_seconds"]
    print(f"loss {res['loss_loop']:.6g} (loop) vs {res['loss_vmap']:.6g} (vmap); image gradients differ by at most "
          f"{res['grad_max_abs_diff']:.2g} (max {res['grad_max_abs']:.2g}); loop {res['loop_seconds'] * 1e3:.0f} ms, "
          f"vmap {res['vmap_seconds'] * 1e3:.0f} ms: {res['speedup_vmap_vs_loop']:.2f}x", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
