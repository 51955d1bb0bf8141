"""Yardstick only: the evaluation of a synthetic set written the way the original DC/DSA/DM code does it.

Zhao et al.'s ``evaluate_synset``: one network at a time, a ``TensorDataset``/``DataLoader`` with
``shuffle=True`` over the set, ``Epoch + 1`` passes of the original ``epoch()`` (DSA on every batch
with per-image parameters, ``loss.item()`` and a numpy accuracy per batch), the learning rate x0.1
by a *new* SGD optimiser after epoch ``Epoch // 2 + 1`` (momentum restarts), then one pass over
the test set through a ``DataLoader`` of 256 in eval mode, still recording the autograd graph as
the original does. It exists so ``bench_eval.py`` can report our evaluation as a ratio against it
in the same process; it is not part of the package.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from reference_dc import _epoch


def reference_evaluate_synset(net: nn.Module, images_train: torch.Tensor, labels_train: torch.Tensor,
                              x_test: torch.Tensor, y_test: torch.Tensor, epochs: int, strategy: str,
                              lr: float = 0.01, batch_train: int = 256) -> float:
    """Train ``net`` on the set (``epochs`` as the original's ``epoch_eval_train``); its test accuracy."""
    size = images_train.shape[-1]
    lr_schedule = [epochs // 2 + 1]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    criterion = nn.CrossEntropyLoss()
    trainloader = DataLoader(TensorDataset(images_train, labels_train), batch_size=batch_train, shuffle=True,
                             num_workers=0)
    for ep in range(epochs + 1):
        _epoch(trainloader, net, optimizer, criterion, strategy, size)
        if ep in lr_schedule:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    net.eval()
    correct = 0
    for img, lab in DataLoader(TensorDataset(x_test, y_test), batch_size=256, shuffle=False, num_workers=0):
        output = net(img.float())
        loss = criterion(output, lab.long())
        loss.item()
        correct += np.sum(np.equal(np.argmax(output.cpu().data.numpy(), axis=-1), lab.cpu().data.numpy()))
    return correct / len(y_test)


def reference_train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, momentum: float,
                    weight_decay: float, batch: int, milestones: tuple[int, ...]) -> nn.Module:
    """A PTM trained the way the reference trains networks: the original ``epoch()`` over a shuffled
    ``DataLoader``, no augmentation, the lr x0.1 by a new SGD optimiser at each milestone."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, num_workers=0)
    for ep in range(epochs):
        if ep in milestones and ep > 0:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        _epoch(loader, net, optimizer, criterion, "none", x.shape[-1])
    return net
