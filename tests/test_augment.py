import pytest
import torch

from ptmdd_ray import augment
from ptmdd_ray.config import DSA_OPS

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def test_check_strategy():
    assert augment.check_strategy("none") == []
    assert augment.check_strategy(STRATEGY) == ["color", "crop", "cutout", "flip", "scale", "rotate"]
    with pytest.raises(ValueError, match="blur"):
        augment.check_strategy("color_blur")


@pytest.mark.parametrize("op", DSA_OPS)
def test_each_op_keeps_shape_and_is_differentiable(op):
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    params = augment.sample(op, 6, 16, torch.Generator().manual_seed(0))
    y = augment.apply(x, params)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", DSA_OPS)
def test_siamese_groups_share_one_transformation(op):
    """Images of the same group get identical parameters: the same image twice in one group is
    transformed identically (the Siamese property real/synthetic matching relies on)."""
    img = torch.randn(1, 3, 16, 16)
    x = img.repeat(4, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    params = augment.sample(op, 2, 16, gen)
    y = augment.apply(x, params, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(y[0], y[1]) and torch.allclose(y[2], y[3])


def test_flip_and_crop_are_exact_pixel_operations():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    flip = augment.AugParams("flip", {"flip": torch.tensor([0.1])})
    assert torch.equal(augment.apply(x, flip), x.flip(3))
    no_flip = augment.AugParams("flip", {"flip": torch.tensor([0.9])})
    assert torch.equal(augment.apply(x, no_flip), x)
    shift = augment.AugParams("crop", {"tx": torch.tensor([1]), "ty": torch.tensor([0])})
    y = augment.apply(x, shift)
    assert torch.equal(y[0, 0, :3], x[0, 0, 1:]) and torch.equal(y[0, 0, 3], torch.zeros(4))


def test_cutout_zeroes_a_square():
    x = torch.ones(1, 1, 8, 8)
    p = augment.AugParams("cutout", {"ox": torch.tensor([4]), "oy": torch.tensor([4])})
    y = augment.apply(x, p)
    assert (y == 0).sum().item() == 16  # a 4x4 hole (half of 8 px)


def test_sampling_is_reproducible_with_a_seed():
    a = augment.sample(STRATEGY, 5, 32, torch.Generator().manual_seed(1))
    b = augment.sample(STRATEGY, 5, 32, torch.Generator().manual_seed(1))
    assert a.op == b.op and all(torch.equal(a.values[k], b.values[k]) for k in a.values)
    assert augment.sample("none", 5, 32) is None
