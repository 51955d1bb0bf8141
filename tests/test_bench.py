"""The yardsticks in bench/ compute what the package computes, so the speed ratios in
BENCHMARKS.md compare like with like (same loss, different loop structure)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptmdd_ray import losses
from ptmdd_ray.config import build_config
from ptmdd_ray.data import load_data
from ptmdd_ray.train import new_model, train_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reference_dc import _match_loss, reference_dc_iteration  # noqa: E402
from reference_diffaug import apply as reference_diffaugment  # noqa: E402
from reference_dm import reference_dm_iteration  # noqa: E402
from reference_eval import reference_evaluate_synset  # noqa: E402
from reference_mtt import reference_mtt_step  # noqa: E402
from emit import emit  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_data(build_config({"dataset": {"name": "digits", "im_size": 8, "train_per_class": 12}}).dataset)


def _syn(data, ipc):
    syn = torch.cat([data.x_train[data.y_train == c][:ipc] for c in range(data.num_classes)]).clone()
    return syn.requires_grad_(True), torch.arange(data.num_classes).repeat_interleave(ipc)


def test_reference_match_loss_is_the_package_gradient_distance(digits):
    net = new_model("ConvNetW32", (1, 10, 8), seed=0)
    params = list(net.parameters())
    x, y = digits.x_train, digits.y_train
    g_a = torch.autograd.grad(F.cross_entropy(net(x[:20]), y[:20]), params)
    g_b = torch.autograd.grad(F.cross_entropy(net(x[20:50]), y[20:50]), params)
    assert {g.dim() for g in g_a} == {1, 2, 4}  # conv, linear and bias gradients all compared
    assert float(_match_loss(g_a, g_b)) == pytest.approx(float(losses.gradient_distance(g_a, g_b)), rel=1e-5)
    assert float(_match_loss(g_a, g_b)) > 0


def test_reference_dm_loss_is_the_package_distribution_distance(digits):
    ipc, classes = 2, digits.num_classes
    syn, syn_y = _syn(digits, ipc)
    indices = [i.numpy() for i in digits.class_indices()]
    net = new_model("ConvNetW32", (1, classes, 8), seed=3)
    with torch.no_grad():  # every real image of its class (batch_real >= class size): no sampling noise
        real_mean = torch.stack([net.embed(digits.x_train[i]).mean(0) for i in digits.class_indices()])
        syn_mean = net.embed(syn).view(classes, ipc, -1).mean(1)
    expected = float(losses.distribution_distance(syn_mean, real_mean))
    opt = torch.optim.SGD([syn], lr=0.0)
    got = reference_dm_iteration(net, syn, syn_y, digits.x_train, indices, opt, ipc, 100, "none")
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_reference_dc_iteration_matches_per_class_gradients_and_updates_the_set(digits):
    ipc, classes = 2, digits.num_classes
    syn, syn_y = _syn(digits, ipc)
    indices = [i.numpy() for i in digits.class_indices()]
    net = new_model("ConvNetW32", (1, classes, 8), seed=5)
    params = list(net.parameters())
    expected = 0.0
    for c, idx in enumerate(digits.class_indices()):
        g_real = torch.autograd.grad(F.cross_entropy(net(digits.x_train[idx]), digits.y_train[idx]), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn[c * ipc:(c + 1) * ipc]), syn_y[c * ipc:(c + 1) * ipc]),
                                    params)
        expected += float(losses.gradient_distance(g_syn, g_real))
    before = syn.detach().clone()
    opt = torch.optim.SGD([syn], lr=0.1)
    got = reference_dc_iteration(net, syn, syn_y, digits.x_train, indices, opt, ipc, 100, "none",
                                 outer_loop=1, inner_loop=1, lr_net=0.01, batch_train=256)
    assert got * classes == pytest.approx(expected, rel=1e-4)  # it returns the per-class mean
    assert not torch.allclose(before, syn.detach())


ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    # one thread per process: the bench's cases run beside whatever else the machine runs, and
    # oversubscribed cores would make a tiny case take minutes
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_reference_evaluation_trains_as_the_package_evaluation_does():
    """The yardstick of bench_eval.py learns what our evaluation learns from the same set (its loop
    differs in RNG use, one extra epoch and the momentum restart, so the accuracies are close, not
    equal). Full-batch training of 100 digits at 8 px: 150 steps per model."""
    from ptmdd_ray.config import EvalConfig
    from ptmdd_ray.evaluate import evaluate_set, random_real_subset

    data = load_data(build_config({"dataset": {"name": "digits", "im_size": 8, "test_per_class": 30}}).dataset)
    x, y = random_real_subset(data, 10, seed=0)
    torch.manual_seed(0)
    ref = [reference_evaluate_synset(new_model("ConvNetW32", (1, 10, 8), seed=s), x, y, data.x_test, data.y_test,
                                     epochs=150, strategy="none", lr=0.05, batch_train=100) for s in range(2)]
    ours = evaluate_set(x, y, data, EvalConfig(archs=["ConvNetW32"], runs=2, epochs=150, batch=100, lr=0.05,
                                               augment=False), seed=0, progress=False)["test"]["ConvNetW32"]["runs"]
    assert min(ref) > 0.7 and min(ours) > 0.7
    assert abs(sum(ref) / 2 - sum(ours) / 2) < 0.08


def test_bench_distill_json_prints_one_object_with_dm_against_its_reference(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_distill.py"), "--methods", "dm", "--json",
                           "--data", "digits", "--im-size", "8", "--ipc", "1", "--batch-real", "16",
                           "--iterations", "2", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "b.json"),
                           "--no-compile", "--precision", "fp32"],  # compiling costs a minute here; tests/test_methods.py checks it
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON object; the table went to stderr
    assert "s/iter" in proc.stderr and report == json.loads((tmp_path / "b.json").read_text())
    s = report["settings"]
    assert (s["model"], s["ipc"], s["batch_real"], s["data"], s["device"]) == ("ConvNetW32", 1, 16, "digits", "cpu")
    assert s["iterations"] == {"dm": 2} and s["torch"] == torch.__version__ and s["date"] and s["compile"] is False
    assert s["precision"] == "fp32"
    assert report["failed"] == {} and list(report["results"]) == ["dm"]
    dm = report["results"]["dm"]
    assert list(dm) == ["plain", "clom", "cclom"]
    for variant, r in dm.items():
        assert r["seconds_per_iteration"] > 0 and r["real_images_per_second"] > 0 and r["iterations"] == 2
        if variant == "cclom":  # the reference code has no CCLoM
            assert r["reference_seconds_per_iteration"] is None and r["speedup_vs_reference"] is None
            continue
        ref = r["reference_seconds_per_iteration"]
        assert ref > 0 and r["reference_iterations"] == 6
        assert r["speedup_vs_reference"] == pytest.approx(ref / r["seconds_per_iteration"])
        assert len(r["block_speedups"]) == 6 and min(r["block_speedups"]) <= r["median_block_speedup"] <= max(
            r["block_speedups"])


def test_bench_distill_refuses_an_unknown_method():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_distill.py"), "--methods", "dm,dx", "--json"],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode != 0 and "--methods: expected a subset of dc,dsa,dm" in proc.stderr and not proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script measures for minutes: run it by hand")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu_check: no CUDA device here (torch.cuda.is_available() is False" in proc.stdout
    assert re.search(r"gpu_check: \d+ tests? collected", proc.stdout), proc.stdout  # its tests import here


def test_a_benchmarks_figures_go_to_stdout_as_one_json_object_and_to_its_out_file(tmp_path, capsys):
    res = {"seconds": 1.5, "speedup_vs_reference": 2.0}
    emit(res, True, str(tmp_path / "sub" / "out.json"))
    assert json.loads(capsys.readouterr().out) == res == json.loads((tmp_path / "sub" / "out.json").read_text())
    emit(res, False, None)
    assert capsys.readouterr().out == ""


def _expert(data, epochs=2, seed=0):
    """A real expert: ConvNetW32 trained on digits (DSA, no momentum, as buffer.py trains), its
    parameters kept as buffer.py keeps them: a list per epoch, epoch 0 the initialisation."""
    net = new_model("ConvNetW32", (1, 10, 8), seed=seed)
    params = [[p.detach().clone() for p in net.parameters()]]
    train_classifier(net, data.x_train, data.y_train, epochs=epochs, lr=0.01, momentum=0.0, weight_decay=0.0,
                     batch=256, dsa_strategy="color_crop_cutout_flip_scale_rotate",
                     gen=torch.Generator().manual_seed(seed), precision="fp32",
                     on_epoch=lambda e, m: params.append([p.detach().clone() for p in m.parameters()]))
    return params


@pytest.mark.parametrize("strategy,batch_syn", [("color_crop_cutout_flip_scale_rotate", 7), ("none", 20)])
def test_mtt_step_equals_the_reference_loss_and_gradients(digits, strategy, batch_syn):
    """Issue 26: ours (flat student through functional_call, lazily drawn batches) against
    distill.py's step (ReparamModule-style student, ``student_params`` list, mse_loss / num_params)
    on the same expert, images and random draws: the loss and the gradients of the pixels and of
    the learnable step size."""
    from ptmdd_ray.methods.mtt import trajectory_loss

    expert = _expert(digits)
    x, y = _syn(digits, 2)
    x = x.detach()
    grads = []
    for side in ("ours", "reference"):
        images = x.clone().requires_grad_(True)
        syn_lr = torch.tensor(0.01, requires_grad=True)
        student = new_model("ConvNetW32", (1, 10, 8), seed=5)  # its own weights are never used
        gen = torch.Generator().manual_seed(3)
        if side == "ours":
            start = torch.cat([p.reshape(-1) for p in expert[0]])
            target = torch.cat([p.reshape(-1) for p in expert[2]])
            loss = trajectory_loss(student, start, target, images, y, syn_lr, 5, batch_syn, strategy, gen)
        else:
            loss = reference_mtt_step(student, expert[0], expert[2], images, y, syn_lr, 5, batch_syn, strategy, gen)
        loss.backward()
        grads.append((loss.item(), images.grad.clone(), syn_lr.grad.clone()))
    (l_a, gi_a, gl_a), (l_b, gi_b, gl_b) = grads
    assert 0 < l_a < 100 and l_a == pytest.approx(l_b, rel=1e-5)
    assert gi_a.abs().max() > 0 and torch.allclose(gi_a, gi_b, rtol=1e-4, atol=1e-6 * gi_a.abs().max().item())
    assert gl_a.abs() > 0 and torch.allclose(gl_a, gl_b, rtol=1e-4)


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
@pytest.mark.parametrize("size", [32, 28, 15])
@pytest.mark.parametrize("siamese", [False, True])
def test_dsa_ops_equal_the_reference_diffaugment_on_the_same_draws(op, size, siamese):
    """Each DSA op of ``ptmdd_ray.augment`` against the reference's ``rand_*`` (bench/reference_diffaug.py,
    written from mtt-distillation's utils.py) given the values ours drew: per image (the reference's
    default) and Siamese (one draw for the batch, its ``batchmode``), at even and odd sizes (crop's
    and cutout's integer ranges depend on them). Equal to float rounding, in the images and in the
    gradient reaching them."""
    from ptmdd_ray import augment

    gen = torch.Generator().manual_seed(size)
    x = torch.randn(6, 3, size, size, generator=gen)
    for seed in range(8):  # several draws of the op's values
        params = augment.sample(op, 1 if siamese else 6, size, torch.Generator().manual_seed(seed))
        ours_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        group = torch.zeros(6, dtype=torch.long) if siamese else None
        ours, ref = augment.apply(ours_x, params, group), reference_diffaugment(ref_x, params, siamese)
        assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
        weights = torch.randn(ours.shape, generator=gen)
        (ours * weights).sum().backward()
        (ref * weights).sum().backward()
        assert torch.allclose(ours_x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)

