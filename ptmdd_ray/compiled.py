"""Forward passes through ``torch.compile`` (inductor) for the networks a distillation runs most.

DM's step is a few forward passes of a *fresh* random network (and, with a pool, of a PTM) whose
instance norm, ReLU and pooling are memory-bound elementwise passes; inductor fuses them around
the convolutions, which on the CPU halves the step (BENCHMARKS.md). The weights are *inputs* of
the compiled graph (``torch.func.functional_call`` on a template of the architecture), not
constants, so one compilation serves every network of the run: the per-iteration networks and
every PTM of an architecture. A graph is compiled per input shape (``dynamic=False``: the real
chunks, the synthetic set), once per process (inductor also caches across processes).

Numerics: the same operations in a different order, equal to the eager result up to float rounding
(~1e-7 relative per pass), so a compiled run is not bit-identical to an eager one; it is
deterministic in itself, which is what a resumed run relies on.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class _Call(nn.Module):
    """``template.<method>(x)`` as a module's forward (what ``functional_call`` calls)."""

    def __init__(self, template: nn.Module, method: str):
        super().__init__()
        self.net = template
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.method)(x)


def compilable(net: nn.Module) -> bool:
    """BatchNorm in training mode updates its running statistics in place, which a graph with the
    buffers as inputs would not carry back: such networks stay eager."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def _functional(call: _Call, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(call, state, (x,))


@functools.cache
def _compiled_functional() -> Callable:
    """``_functional`` through ``torch.compile``, set up on first use: importing dynamo and inductor
    takes a second, which a process that never compiles (the CLI answering a bad config, an eager
    run) does not pay."""
    # Graphs per call: architecture x method x grad mode x input shape and layout (the real chunks,
    # the synthetic set, a PTM's forward and embedding): past dynamo's default of 8 it would fall
    # back to eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Compile in this process: a pool of compile workers would outlive the compilation and compete
    # with the run for the CPU its trial was given (1 core by default).
    torch._inductor.config.compile_threads = 1
    return torch.compile(_functional, dynamic=False)


# One _Call per architecture and method, so that a later run in this process (a benchmark's
# blocks, a reused worker) finds its graphs compiled: the compiled graphs are guarded on it.
_CALLS: dict[tuple[str, str, bool], _Call] = {}


class CompiledCall:
    """``net.<method>(x)`` for any ``net`` of ``template``'s architecture, compiled once per process.
    Falls back to eager (with one warning) where inductor is unavailable, e.g. without a C++
    compiler."""

    def __init__(self, template: nn.Module, method: str = "embed"):
        self.method = method
        self.arch = repr(template)
        self._fn: Callable | None = _compiled_functional()

    def _call_for(self, net: nn.Module) -> _Call:
        """The template of ``net``'s architecture *and mode* (train/eval: dropout, norms differ)."""
        key = (self.arch, self.method, net.training)
        if key not in _CALLS:  # not setdefault: that would build a _Call on every pass
            _CALLS[key] = _Call(net, self.method)
        return _CALLS[key]

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._fn is None or not compilable(net):
            return getattr(net, self.method)(x)
        if x.dim() == 4:  # one layout, whatever produced x (each DSA op leaves its own): one graph, not six
            x = x.contiguous(memory_format=torch.channels_last)
        state = {f"net.{k}": v for k, v in net.named_parameters()}
        state.update({f"net.{k}": v for k, v in net.named_buffers()})
        try:
            return self._fn(self._call_for(net), state, x)
        except Exception as e:  # noqa: BLE001 - inductor's failures are many (no compiler, an op it lacks)
            log.warning("torch.compile unavailable (%s: %s); running eager", type(e).__name__, str(e)[:200])
            self._fn = None
            return getattr(net, self.method)(x)
