"""ptmdd_ray.compiled: one compilation serves every network of an architecture, equal to eager up
to float rounding; networks it cannot carry (BatchNorm in training mode) stay eager."""
import torch

from ptmdd_ray.compiled import CompiledCall, compilable
from ptmdd_ray.train import new_model


def test_one_compiled_call_serves_fresh_networks_and_matches_eager():
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    nets = [new_model("ConvNetW32", (1, 10, 8), seed=s) for s in (0, 1)]
    call = CompiledCall(nets[0], "embed")
    with torch.no_grad():
        for net in nets:  # the second network's weights are inputs to the same graph
            assert torch.allclose(call(net, x), net.embed(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(call(nets[0], x), call(nets[1], x))
    # gradients reach the images through the compiled pass
    xs = x.clone().requires_grad_(True)
    call(nets[1], xs).sum().backward()
    xe = x.clone().requires_grad_(True)
    nets[1].embed(xe).sum().backward()
    # equal up to float rounding (a different summation order): ~1e-7 of the gradient's scale; a
    # wrong graph would be off by its whole scale
    torch.testing.assert_close(xs.grad, xe.grad, rtol=1e-4, atol=1e-5 * float(xe.grad.abs().max()))


def test_batchnorm_in_training_mode_stays_eager():
    net = new_model("ConvNetBN", (1, 10, 8), seed=0)
    assert not compilable(net.train()) and compilable(net.eval())
    x = torch.randn(4, 1, 8, 8)
    before = [b.clone() for b in net.train().buffers()]
    CompiledCall(net, "forward")(net, x)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.buffers()))  # running stats updated: eager
