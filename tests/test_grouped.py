"""Grouped training: R networks trained as one equal each trained alone, up to float rounding."""
import pytest
import torch

from ptmdd_ray.config import EvalConfig, build_config
from ptmdd_ray.data import load_data
from ptmdd_ray.evaluate import evaluate_set, random_real_subset
from ptmdd_ray.grouped import GroupedNet, group_accuracy, groupable, grouped_forward, train_group
from ptmdd_ray.train import accuracy, new_model, train_classifier

SHAPE = (3, 10, 16)


@pytest.mark.parametrize("arch, ok", [("ConvNet", True), ("ConvNetW32", True), ("ConvNetD2LN", True),
                                      ("ConvNetGNMP", True), ("ConvNetNNNP", True), ("ConvNetBN", False),
                                      ("MLP", False), ("ResNet18", False)])
def test_groupable_is_the_convnet_family_without_batchnorm(arch, ok):
    assert groupable(arch) is ok


@pytest.mark.parametrize("arch", ["ConvNetW32", "ConvNetD2LN", "ConvNetGNMP", "ConvNetNNNP", "ConvNetD2LeakyRelu"])
def test_grouped_forward_gives_every_model_its_own_logits(arch):
    models = [new_model(arch, SHAPE, seed=s) for s in range(3)]
    net = GroupedNet(models, compile=False)
    x = torch.rand(3, 7, 3, 16, 16)
    out = grouped_forward(models[0], net.params, x)
    assert out.shape == (3, 7, 10)
    for r, m in enumerate(models):
        torch.testing.assert_close(out[r], m(x[r]), rtol=1e-5, atol=1e-5)


def _alone(arch, x, y, seeds, strategy, epochs):
    models = []
    for s in seeds:
        m = new_model(arch, SHAPE, seed=s)
        train_classifier(m, x, y, epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, batch=16,
                         milestones=(epochs // 2,), dsa_strategy=strategy, gen=torch.Generator().manual_seed(s))
        models.append(m)
    return models


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_model_trained_in_the_group_equals_it_trained_alone(compile):
    """Same seeds, shuffles and DSA draws: final weights and accuracies match the sequential runs."""
    data = load_data(build_config({"dataset": {"name": "digits", "test_per_class": 30}}).dataset)
    x, y = random_real_subset(data, 4, seed=0)
    x = torch.nn.functional.interpolate(x.repeat(1, 3, 1, 1), size=16)
    xt = torch.nn.functional.interpolate(data.x_test.repeat(1, 3, 1, 1), size=16)
    seeds, strategy, epochs = [11, 12, 13], "color_crop_cutout_flip_scale_rotate", 6  # 40 images: 3 batches, the last short
    alone = _alone("ConvNetW32", x, y, seeds, strategy, epochs)
    net = GroupedNet([new_model("ConvNetW32", SHAPE, seed=s) for s in seeds], compile=compile)
    train_group(net, x, y, gens=[torch.Generator().manual_seed(s) for s in seeds], epochs=epochs, lr=0.01,
                momentum=0.9, weight_decay=5e-4, batch=16, milestones=(epochs // 2,), dsa_strategy=strategy)
    grouped = net.sync()
    for a, g in zip(alone, grouped):
        for (name, pa), (_, pg) in zip(a.named_parameters(), g.named_parameters()):
            torch.testing.assert_close(pg, pa, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(grouped[0].features[0].weight, grouped[1].features[0].weight)  # own seeds
    accs = group_accuracy(net, xt, data.y_test, batch=128)
    assert accs == [accuracy(m, xt, data.y_test) for m in alone]


def test_evaluate_set_grouped_equals_one_at_a_time():
    data = load_data(build_config({"dataset": {"name": "digits", "val_per_class": 10, "test_per_class": 30}}).dataset)
    x, y = random_real_subset(data, 3, seed=0)
    cfg = EvalConfig(archs=["ConvNetW32"], runs=3, epochs=8, augment=True, compile=False, group=True)
    grouped = evaluate_set(x, y, data, cfg, seed=2, progress=False)
    alone = evaluate_set(x, y, data, EvalConfig(**{**cfg.__dict__, "group": False}), seed=2, progress=False)
    assert set(grouped) == {"test", "val"}
    for split in grouped:
        assert grouped[split]["ConvNetW32"]["runs"] == pytest.approx(alone[split]["ConvNetW32"]["runs"], abs=2 / 100)


def test_train_group_needs_a_generator_per_model():
    net = GroupedNet([new_model("ConvNetW32", SHAPE, seed=s) for s in range(2)], compile=False)
    with pytest.raises(ValueError, match="1 generators for 2 models"):
        train_group(net, torch.rand(4, 3, 16, 16), torch.arange(4), gens=[torch.Generator()], epochs=1, lr=0.01,
                    momentum=0.9, weight_decay=0.0, batch=4)
