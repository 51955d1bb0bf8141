import pytest
import torch

from ptmdd_ray.train import accuracy, lr_at, new_model, train_classifier


def test_lr_milestones_fire():
    # 150-epoch pretraining run: x0.1 at 50 and 100 (the reference code's string milestones never fired)
    assert lr_at(0, 0.01, (50, 100)) == 0.01
    assert lr_at(49, 0.01, (50, 100)) == 0.01
    assert lr_at(50, 0.01, (50, 100)) == pytest.approx(0.001)
    assert lr_at(120, 0.01, (50, 100)) == pytest.approx(0.0001)
    assert lr_at(0, 0.01, (0, 1)) == 0.01  # a milestone at 0 is not a decay before training


def test_new_model_is_a_function_of_the_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = new_model("ConvNetW32", (1, 10, 8), seed=3)
    b = new_model("ConvNetW32", (1, 10, 8), seed=3)
    c = new_model("ConvNetW32", (1, 10, 8), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    cl = new_model("ConvNetW32", (1, 10, 8), seed=3, channels_last=True)
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(cl(x), a(x), atol=1e-5)  # layout changes speed, not results


def test_training_learns_a_separable_problem_and_calls_the_epoch_hook():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(16)
    x = torch.randn(64, 1, 8, 8, generator=gen) * 0.1
    for c in range(4):  # each class lights up its own quadrant
        x[y == c, 0, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 2.0
    model = new_model("ConvNetW32", (1, 4, 8), seed=0)
    assert accuracy(model, x, y) < 0.6
    epochs = []
    train_classifier(model, x, y, epochs=30, lr=0.05, momentum=0.9, weight_decay=0.0, batch=16, gen=gen,
                     on_epoch=lambda e, m: epochs.append(e))
    assert epochs == list(range(1, 31))
    assert accuracy(model, x, y) == 1.0 and not model.training
