import pytest
import torch

from ptmdd_ray.train import accuracy, autocast, cpu_has_bf16, lr_at, new_model, train_classifier


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


needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU computes no bf16 natively")


@needs_bf16
def test_bf16_cpu_autocasts_the_convolutions_and_bf16_stays_fp32_on_the_cpu():
    model, x = new_model("ConvNetW32", (1, 4, 8), seed=0), torch.randn(4, 1, 8, 8)
    conv = model.features[0]
    for precision, dtype in (("bf16", torch.float32), ("fp32", torch.float32), ("bf16-cpu", torch.bfloat16)):
        with autocast(torch.device("cpu"), precision):
            assert conv(x).dtype == dtype, precision


def test_bf16_cpu_is_refused_on_a_cpu_without_native_bf16(monkeypatch):
    import ptmdd_ray.train as train
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)  # the hardware, which cannot be swapped here
    with pytest.raises(RuntimeError, match="bf16-cpu: this CPU computes no bf16 natively"):
        autocast(torch.device("cpu"), "bf16-cpu")
    with autocast(torch.device("cpu"), "bf16"):  # the default never asks
        pass


@needs_bf16
def test_bf16_cpu_training_keeps_fp32_weights_and_learns_as_fp32_does():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(16)
    x = torch.randn(64, 1, 8, 8, generator=gen) * 0.1
    for c in range(4):
        x[y == c, 0, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 2.0

    def trained(precision: str, epochs: int) -> torch.nn.Module:
        model = new_model("ConvNetW32", (1, 4, 8), seed=0)
        return train_classifier(model, x, y, epochs=epochs, lr=0.05, momentum=0.9, weight_decay=0.0, batch=16,
                                gen=torch.Generator().manual_seed(1), precision=precision)

    def drift(a: torch.nn.Module, b: torch.nn.Module) -> float:
        va, vb = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b))
        return float((va - vb).norm() / va.norm())

    one_step = trained("bf16-cpu", 1)
    assert all(p.dtype == torch.float32 for p in one_step.parameters())
    assert 0 < drift(trained("fp32", 1), one_step) < 0.01  # bf16 rounding, not another computation
    fp32, bf16 = trained("fp32", 30), trained("bf16-cpu", 30)
    assert accuracy(bf16, x, y, precision="bf16-cpu") == accuracy(fp32, x, y) == 1.0
