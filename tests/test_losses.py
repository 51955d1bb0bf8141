"""Each loss against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from ptmdd_ray import losses


def test_cclom_hand_computed():
    # syn: two unit vectors; real: three vectors. cos distances by hand.
    syn = torch.tensor([[1.0, 0.0], [0.0, 2.0]])           # normalised: e1, e2
    real = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # e1, e2, (e1+e2)/sqrt2
    syn_y = torch.tensor([0, 1])
    real_y = torch.tensor([0, 1, 1])
    c = 1 - 1 / math.sqrt(2)
    # D = [[0, 1, c], [1, 0, c]]; mask = [[1, 0, 0], [0, 1, 1]]
    expected = (0 + 0 + c) / (0 + 1 + c + 1 + 0 + c)
    assert losses.cclom(syn, real, syn_y, real_y).item() == pytest.approx(expected, rel=1e-6)


def test_cclom_is_zero_when_same_label_pairs_coincide_and_scale_free():
    syn = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[5.0, 0.0], [0.0, 0.5]])
    y = torch.tensor([0, 1])
    assert losses.cclom(syn, real, y, y).item() == pytest.approx(0.0, abs=1e-7)
    # swapping the labels of the real batch puts all distance on positive pairs
    assert losses.cclom(syn, real, y, y.flip(0)).item() == pytest.approx(1.0, abs=1e-6)
    # embeddings are normalised: scaling features does not change the loss
    a = losses.cclom(syn * 7, real, y, y.flip(0))
    assert a.item() == pytest.approx(1.0, abs=1e-6)


def test_clom_is_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert losses.clom(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_distribution_distance_hand_computed():
    syn = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    assert losses.distribution_distance(syn, real).item() == pytest.approx(1 + 4 + 9 + 1)


def test_gradient_distance_hand_computed():
    # conv-shaped (2 out channels): per-channel cosine; 1-D (bias) ignored.
    g_real = torch.zeros(2, 1, 1, 2)
    g_syn = torch.zeros(2, 1, 1, 2)
    g_real[0, 0, 0] = torch.tensor([1.0, 0.0])
    g_syn[0, 0, 0] = torch.tensor([2.0, 0.0])   # same direction -> 0
    g_real[1, 0, 0] = torch.tensor([1.0, 0.0])
    g_syn[1, 0, 0] = torch.tensor([0.0, 1.0])   # orthogonal -> 1
    lin_real = torch.tensor([[1.0, 1.0]])
    lin_syn = torch.tensor([[-1.0, -1.0]])      # opposite -> 2
    bias = torch.tensor([1.0, 2.0])
    d = losses.gradient_distance([g_syn, lin_syn, bias * 5], [g_real, lin_real, bias])
    assert d.item() == pytest.approx(0 + 1 + 2, abs=1e-5)


def test_losses_are_differentiable_in_the_synthetic_side():
    syn = torch.randn(4, 3, requires_grad=True)
    real = torch.randn(5, 3)
    loss = losses.cclom(syn, real, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0, 0]))
    loss = loss + losses.distribution_distance(syn[:2], real[:2])
    loss.backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
