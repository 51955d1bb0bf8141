import pytest
import torch
from torch import nn

from ptmdd_ray import models
from ptmdd_ray.archs import ModelSpecError, available, is_known
from ptmdd_ray.models import build_model

CANONICAL = [
    "ConvNet", "ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4",
    "ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256",
    "ConvNetBN", "ConvNetIN", "ConvNetLN", "ConvNetGN", "ConvNetNN",
    "ConvNetAP", "ConvNetMP", "ConvNetNP", "ConvNetSigmoid",
    "MLP", "LeNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN",
    "ResNet18", "ResNet18BN", "ResNet18BN_AP",
]


def _check(name, channels, im_size, num_classes=10):
    torch.manual_seed(0)
    model = build_model(name, channels, num_classes, im_size).eval()
    x = torch.randn(2, channels, im_size, im_size)
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
        assert logits.shape == (2, num_classes)
        assert emb.shape == (2, model.feature_dim)
        assert isinstance(model.classifier, nn.Linear)
        assert torch.allclose(model.classifier(emb), logits, atol=1e-6)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("im_size", [8, 16, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", CANONICAL)
def test_shapes_and_embed_consistency(name, channels, im_size):
    _check(name, channels, im_size)


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetD4", "MLP", "LeNet", "AlexNet",
                                  "VGG11", "ResNet18BN_AP"])
def test_64px(name):
    _check(name, 3, 64)


@pytest.mark.parametrize("name", ["ConvNetD4W64", "ConvNetD2W32BNMPLeakyRelu", "ConvNetW6GN",
                                  "ConvNetD5", "ConvNetRelu", "ConvNetLeakyRelu"])
def test_combined_convnet_variants(name):
    assert is_known(name)
    _check(name, 3, 8)


def test_available_names_are_all_known():
    names = available()
    assert set(CANONICAL) <= set(names)
    assert all(is_known(n) for n in names)


@pytest.mark.parametrize("bad", ["Foo", "convnet", "ConvNetD0", "ConvNetW0", "ConvNetBNMPD3",
                                 "ResNet18_AP", "ConvNetXYZ", "", "ConvNet "])
def test_unknown_names(bad):
    assert not is_known(bad)
    with pytest.raises(ModelSpecError, match="unknown architecture") as exc:
        build_model(bad, 3, 10, 32)
    assert repr(bad) in str(exc.value)
    assert "ConvNet" in str(exc.value)  # lists the known names
    assert isinstance(exc.value, ValueError)


def test_is_known_agrees_with_build_model():
    for name in CANONICAL + ["ConvNetD4W64", "Foo", "ConvNetD0", "VGG16"]:
        try:
            build_model(name, 1, 10, 8)
            built = True
        except ModelSpecError:
            built = False
        assert is_known(name) == built, name
    assert not is_known(None)


def test_bad_shape_args():
    with pytest.raises(ModelSpecError):
        build_model("ConvNet", 0, 10, 32)
    with pytest.raises(ModelSpecError):
        build_model("ConvNet", 3, 10, 0)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_convnet_structure():
    assert _convs(build_model("ConvNetW32", 3, 10, 32))[0].out_channels == 32
    assert len(_convs(build_model("ConvNetD4", 3, 10, 32))) == 4
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model("ConvNetBN", 3, 10, 32).modules())

    default = build_model("ConvNet", 3, 10, 32)
    convs = _convs(default)
    assert len(convs) == 3 and all(c.out_channels == 128 for c in convs)
    gns = [m for m in default.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 3 and all(g.num_groups == g.num_channels for g in gns)
    assert sum(isinstance(m, nn.AvgPool2d) for m in default.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in default.modules())
    assert default.feature_dim == 128 * 4 * 4
    assert default.training

    assert sum(isinstance(m, nn.MaxPool2d) for m in build_model("ConvNetMP", 3, 10, 32).modules()) == 3
    ln = [m for m in build_model("ConvNetLN", 3, 10, 32).modules() if isinstance(m, nn.GroupNorm)]
    assert all(g.num_groups == 1 for g in ln)
    assert build_model("ConvNetNP", 3, 10, 8).feature_dim == 128 * 8 * 8


def test_convnet_depth4_at_8px_skips_last_pool():
    model = build_model("ConvNetD4", 3, 10, 8)
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3
    assert model.feature_dim == 128


def test_construction_does_not_touch_batchnorm_stats():
    model = build_model("ResNet18BN", 3, 10, 16)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(b.num_batches_tracked) == 0 for b in bns)
    assert model.training


def test_batchnorm_train_mode_forward_8px():
    for name in ("ResNet18BN", "ResNet18BN_AP", "ConvNetBN", "AlexNetBN", "VGG11BN"):
        model = build_model(name, 3, 10, 8)
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_gradient_flows_to_input():
    model = build_model("ConvNet", 3, 10, 32)
    x = torch.randn(2, 3, 32, 32).requires_grad_()
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_state_dict_keys_independent_of_im_size():
    # Identity stand-ins for skipped pools keep layer indices stable across input sizes.
    small = build_model("ConvNetD4", 3, 10, 8).state_dict()
    large = build_model("ConvNetD4", 3, 10, 32).state_dict()
    assert small.keys() == large.keys()
    assert models.Net is type(build_model("MLP", 1, 10, 28))
