"""MTT (``ptmdd_ray.methods.mtt``): the step equals an independent re-implementation of the
reference's (``bench/reference_mtt.py``, GeorgeCazenavette/mtt-distillation's distill.py) on the
same expert, images and random draws: loss and gradients."""
import sys
from pathlib import Path

import pytest
import torch

from ptmdd_ray.methods.mtt import Trajectory, batches, draw_segment, flatten, trajectory_loss, unflatten
from ptmdd_ray.train import new_model, train_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reference_mtt import reference_mtt_step  # noqa: E402

SHAPE = (1, 10, 8)  # digits at 8 px


def _expert(digits, epochs=2, seed=0):
    """A real expert: ConvNetW32 trained on digits, its parameters kept after each epoch."""
    net = new_model("ConvNetW32", SHAPE, seed=seed)
    params = [[p.detach().clone() for p in net.parameters()]]
    train_classifier(net, digits.x_train, digits.y_train, epochs=epochs, lr=0.01, momentum=0.0, weight_decay=0.0,
                     batch=256, dsa_strategy="color_crop_cutout_flip_scale_rotate",
                     gen=torch.Generator().manual_seed(seed), precision="fp32",
                     on_epoch=lambda e, m: params.append([p.detach().clone() for p in m.parameters()]))
    return params


def _syn(digits, ipc):
    x = torch.cat([digits.x_train[digits.y_train == c][:ipc] for c in range(10)]).clone()
    return x, torch.arange(10).repeat_interleave(ipc)


@pytest.mark.parametrize("strategy,batch_syn", [("color_crop_cutout_flip_scale_rotate", 7), ("none", 20)])
def test_mtt_step_equals_the_reference_loss_and_gradients(digits, strategy, batch_syn):
    expert = _expert(digits)
    x, y = _syn(digits, 2)
    grads = []
    for side in ("ours", "reference"):
        images = x.clone().requires_grad_(True)
        syn_lr = torch.tensor(0.01, requires_grad=True)
        student = new_model("ConvNetW32", SHAPE, seed=5)  # its own weights are never used
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
    assert 0 < l_a < 10 and l_a == pytest.approx(l_b, rel=1e-5)
    assert gi_a.abs().max() > 0 and torch.allclose(gi_a, gi_b, rtol=1e-4, atol=1e-6 * gi_a.abs().max().item())
    assert gl_a.abs() > 0 and torch.allclose(gl_a, gl_b, rtol=1e-4)


def test_the_loss_is_one_when_the_student_does_not_move(digits):
    """With step size 0 the student stays at the start: the normalised distance is exactly 1."""
    expert = _expert(digits, epochs=1)
    start, target = (torch.cat([p.reshape(-1) for p in expert[e]]) for e in (0, 1))
    x, y = _syn(digits, 1)
    loss = trajectory_loss(new_model("ConvNetW32", SHAPE, seed=0), start, target, x.requires_grad_(True), y,
                           torch.tensor(0.0, requires_grad=True), 3, 10, "none", torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_flat_parameters_round_trip():
    net = new_model("ConvNetW32", SHAPE, seed=1)
    flat = flatten(net)
    views = unflatten(net, flat)
    assert list(views) == [n for n, _ in net.named_parameters()]
    assert all(torch.equal(views[n], p) for n, p in net.named_parameters())
    with pytest.raises(ValueError, match="a flat vector of 3 parameters"):
        unflatten(net, torch.zeros(3))


def test_batches_follow_the_reference_draw_order():
    """Chunks of a fresh permutation, the last chunk first, a new permutation when they run out."""
    gen = torch.Generator().manual_seed(0)
    got = list(batches(10, 4, 4, gen))
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(10, generator=gen)
    assert [len(b) for b in got] == [2, 4, 4, 2]
    assert torch.equal(got[0], perm[8:]) and torch.equal(got[1], perm[4:8]) and torch.equal(got[2], perm[:4])


def test_a_segment_beyond_the_expert_is_refused():
    expert = Trajectory("ConvNetW32", [torch.zeros(3)] * 3, key="k")
    with pytest.raises(ValueError, match="expert k keeps 2 epochs"):
        for seed in range(20):
            draw_segment([expert], max_start_epoch=2, expert_epochs=2, gen=torch.Generator().manual_seed(seed))
    _, start = draw_segment([expert], max_start_epoch=1, expert_epochs=2, gen=torch.Generator().manual_seed(0))
    assert start == 0
