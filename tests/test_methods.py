import pytest
import torch

from ptmdd_ray import augment, losses
from ptmdd_ray.config import build_config, loops_for_ipc
from ptmdd_ray.methods import DivergenceError, distill, dm_step, pass_precision
from ptmdd_ray.synthetic import RealSampler
from ptmdd_ray.train import cpu_has_bf16, new_model




def _cfg(method, **distill):
    return build_config({"dataset": {"name": "digits", "im_size": 8}, "model": "ConvNetW32",
                         "distill": {"method": method, "ipc": 2, "iterations": 2, "batch_real": 16,
                                     "outer_loop": 2, "inner_loop": 1, **distill}})


def test_published_loops_and_sensible_extension():
    assert loops_for_ipc(1) == (1, 1) and loops_for_ipc(10) == (10, 50) and loops_for_ipc(50) == (50, 10)
    for ipc in (2, 5, 15, 100, 200):
        outer, inner = loops_for_ipc(ipc)
        assert 1 <= outer <= 50 and 10 <= inner <= 50


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_each_method_updates_the_synthetic_set(digits, method):
    cfg = _cfg(method)
    out = distill(cfg.distill, cfg.model, digits, seed=0, progress=False)
    assert out.images.shape == (20, 1, 8, 8) and out.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.isfinite(out.images).all()
    assert out.loss_history and all(v >= 0 for _, v in out.loss_history)
    start = distill(_cfg(method, iterations=0).distill, cfg.model, digits, seed=0, progress=False).images
    assert not torch.allclose(start, out.images)


@pytest.mark.parametrize("method", ["dc", "dm"])
def test_a_fixed_seed_reproduces_a_cpu_run(digits, method):
    cfg = _cfg(method)
    a = distill(cfg.distill, cfg.model, digits, seed=5, progress=False).images
    b = distill(cfg.distill, cfg.model, digits, seed=5, progress=False).images
    c = distill(cfg.distill, cfg.model, digits, seed=6, progress=False).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ptm_guide_receives_the_augmented_images(digits):
    """The PTM loss sees exactly the images the matching term sees (augmented), not the raw set."""
    cfg = _cfg("dm", iterations=1)
    seen = []

    def guide(syn, raw, y):
        seen.append(syn.detach().clone())
        return syn.sum() * 0

    out = distill(cfg.distill, cfg.model, digits, seed=0, guide=guide, progress=False)
    start = distill(_cfg("dm", iterations=0).distill, cfg.model, digits, seed=0, progress=False).images
    assert len(seen) == 1 and seen[0].shape == out.images.shape
    assert not torch.allclose(seen[0], start)  # an augmentation was applied


def test_batched_dm_equals_the_per_class_definition(digits):
    cfg = _cfg("dm", dsa_strategy="none")
    net = new_model("ConvNetW32", (1, 10, 8), seed=0)
    syn = digits.x_train[torch.cat([i[:2] for i in digits.class_indices()])].clone().requires_grad_(True)
    syn_y = torch.arange(10).repeat_interleave(2)
    gen = torch.Generator().manual_seed(0)
    loss = dm_step(net, syn, syn_y, RealSampler(digits, gen), cfg.distill, 2, 10, gen, None)
    # replay the same real batch, per class, as the reference code does it
    gen = torch.Generator().manual_seed(0)
    sampler = RealSampler(digits, gen)
    augment.sample("none", 10, 8, gen)
    ref = 0.0
    for c in range(10):
        real = sampler.batch(c, 16)
        with torch.no_grad():
            r = net.embed(real).mean(0)
        s = net.embed(syn[c * 2:(c + 1) * 2]).mean(0)
        ref = ref + losses.distribution_distance(s[None], r[None])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_divergence_is_reported(digits):
    cfg = _cfg("dm", lr_img=1e30, iterations=5, log_every=1)
    with pytest.raises(DivergenceError, match="lr_img"):
        distill(cfg.distill, cfg.model, digits, seed=0, progress=False)


def _guide(digits):
    from ptmdd_ray.pool import PTM, PTMGuide

    ptms = [PTM("ConvNetW32", s, 1, f"k{s}", 0.1, new_model("ConvNetW32", (1, 10, 8), seed=s).eval()) for s in (0, 1)]
    return PTMGuide(ptms, clom=3.0, cclom=2.0, real=digits, cclom_batch=8, seed=0)


@pytest.mark.parametrize("method", ["dc", "dm"])
def test_a_run_resumed_from_its_saved_state_ends_as_the_uninterrupted_one(digits, method, tmp_path):
    """The state saved mid-run (synthetic set, momentum, the loop's and the guide's random states,
    history), written to disk and read back, continues to exactly the uninterrupted result."""
    from ptmdd_ray.artifacts import read_tensors, write_tensors
    from ptmdd_ray.methods import DistillState

    cfg = _cfg(method, iterations=4 if method == "dm" else 2, log_every=1, outer_loop=1)
    full = distill(cfg.distill, cfg.model, digits, seed=3, guide=_guide(digits), progress=False)
    states = []
    distill(cfg.distill, cfg.model, digits, seed=3, guide=_guide(digits), progress=False,
            state_every=1, on_state=states.append)
    assert [s.iteration for s in states] == list(range(1, cfg.distill.iterations))  # none after the last
    saved = states[-1 if method == "dc" else 1]
    write_tensors(tmp_path / "s.safetensors", saved.tensors(), saved.meta())
    state = DistillState.from_parts(*read_tensors(tmp_path / "s.safetensors"))
    assert state.iteration == saved.iteration and state.guide["rng"] == saved.guide["rng"]
    resumed = distill(cfg.distill, cfg.model, digits, seed=3, guide=_guide(digits), progress=False, resume=state)
    assert torch.equal(resumed.images, full.images)
    assert resumed.loss_history == full.loss_history
    fresh = distill(cfg.distill, cfg.model, digits, seed=3, guide=_guide(digits), progress=False,
                    resume=DistillState(**{**state.__dict__, "gen": torch.Generator().manual_seed(9).get_state()}))
    assert not torch.equal(fresh.images, full.images)  # the saved random state is what makes it exact


def test_compiled_dm_follows_the_eager_run(digits):
    """``distill.compile``: DM (+ CLoM and CCLoM) through torch.compile takes the eager run's path
    up to float rounding."""
    eager = _cfg("dm", iterations=3, log_every=1, compile=False)
    compiled = _cfg("dm", iterations=3, log_every=1, compile=True)
    a = distill(eager.distill, eager.model, digits, seed=1, guide=_guide(digits), progress=False)
    b = distill(compiled.distill, compiled.model, digits, seed=1, guide=_guide(digits), progress=False)
    assert [i for i, _ in a.loss_history] == [i for i, _ in b.loss_history]
    assert all(abs(x - y) <= 1e-4 * abs(x) for (_, x), (_, y) in zip(a.loss_history, b.loss_history))
    assert torch.allclose(a.images, b.images, atol=1e-3)


def test_bf16_cpu_reaches_a_distillation_only_where_its_passes_are_compiled():
    """``precision: bf16-cpu`` autocasts compiled passes (DM's, DC/DSA's inner loop); eager passes
    (no faster in bf16 on the CPU) and the default ``bf16`` stay fp32."""
    assert pass_precision(_cfg("dm", compile=True).distill, "bf16-cpu") == "bf16-cpu"
    assert pass_precision(_cfg("dsa", compile=True).distill, "bf16-cpu") == "bf16-cpu"
    assert pass_precision(_cfg("dm", compile=False).distill, "bf16-cpu") == "fp32"
    assert pass_precision(_cfg("dc", compile=False).distill, "bf16-cpu") == "fp32"
    assert pass_precision(_cfg("dm", compile=True).distill, "bf16") == "fp32"


needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU computes no bf16 natively")


@needs_bf16
def test_dm_step_runs_its_network_passes_in_bf16_and_its_distance_in_fp32(digits):
    cfg = _cfg("dm")
    net = new_model("ConvNetW32", (1, 10, 8), seed=0)
    seen = []
    net.features[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    syn = digits.x_train[torch.cat([i[:2] for i in digits.class_indices()])].clone().requires_grad_(True)
    args = (syn, torch.arange(10).repeat_interleave(2))
    losses_ = []
    for precision in ("fp32", "bf16-cpu"):
        losses_.append(dm_step(net, *args, RealSampler(digits, torch.Generator().manual_seed(0)), cfg.distill, 2,
                               10, torch.Generator().manual_seed(0), None, precision=precision))
        passes, seen[:] = list(seen), []
        assert len(passes) >= 2 and set(passes) == {torch.bfloat16 if precision == "bf16-cpu" else torch.float32}
    assert all(v.dtype == torch.float32 for v in losses_)
    assert losses_[1].item() == pytest.approx(losses_[0].item(), rel=2e-2)


@needs_bf16
def test_compiled_dm_in_bf16_cpu_follows_the_fp32_run(digits):
    """Compiled DM + CLoM + CCLoM under ``bf16-cpu``: bf16 rounding moves the path a little, not
    away (the accuracy this costs is paired in BENCHMARKS.md, "bf16 on the CPU")."""
    cfg = _cfg("dm", iterations=3, log_every=1, compile=True)
    a, b = (distill(cfg.distill, cfg.model, digits, seed=1, guide=_guide(digits), progress=False, precision=p)
            for p in ("fp32", "bf16-cpu"))
    assert all(abs(x - y) <= 3e-2 * abs(x) for (_, x), (_, y) in zip(a.loss_history, b.loss_history))
    assert not torch.equal(a.images, b.images)  # the bf16 passes ran
    assert torch.allclose(a.images, b.images, atol=2e-2)


@needs_bf16
def test_compiled_dsa_with_a_bf16_inner_loop_matches_in_fp32(digits):
    """Under ``bf16-cpu`` DSA's compiled inner loop trains in bf16; its first matching (before any
    inner training) is the fp32 run's exactly, and after it the matching loss stays within 2 % and
    the two sets closer to each other than to where they started (gradient matching amplifies any
    difference of the trained network, so no elementwise tolerance is meaningful)."""
    runs = []
    for precision in ("fp32", "bf16-cpu"):
        cfg = _cfg("dsa", iterations=1, log_every=1, inner_loop=3, outer_loop=1, compile=True)
        runs.append(distill(cfg.distill, cfg.model, digits, seed=1, progress=False, precision=precision))
        cfg = _cfg("dsa", iterations=1, log_every=1, inner_loop=3, compile=True)
        runs.append(distill(cfg.distill, cfg.model, digits, seed=1, progress=False, precision=precision))
    one_fp32, two_fp32, one_bf16, two_bf16 = runs
    assert torch.equal(one_fp32.images, one_bf16.images)  # no inner loop ran: the matching is fp32
    assert not torch.equal(two_fp32.images, two_bf16.images)  # the inner loop ran in bf16
    start = distill(_cfg("dsa", iterations=0).distill, "ConvNetW32", digits, seed=1, progress=False).images
    assert abs(two_bf16.loss_history[0][1] - two_fp32.loss_history[0][1]) <= 0.02 * two_fp32.loss_history[0][1]
    assert (two_bf16.images - two_fp32.images).norm() < 0.5 * (two_fp32.images - start).norm()


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_compiled_dc_inner_loop_follows_the_eager_run(digits, method):
    """``distill.compile`` for DC/DSA: the inner loop's training steps and the real images' gradients
    through torch.compile (forward and backward) take the eager run's path up to float rounding.
    One iteration (its second outer step matches gradients of the network the compiled inner loop
    trained): gradient matching at these tiny settings amplifies any difference ~1e4-fold per
    iteration (a 1e-6 nudge of the eager run's initial images moves them by 2e-2 after two), so the
    bound is on how far the two runs part relative to how far the images moved, and longer runs
    part as chaotically as any two float orders do."""
    runs = []
    for compile_ in (False, True):
        cfg = _cfg(method, iterations=1, log_every=1, inner_loop=3, compile=compile_)
        runs.append(distill(cfg.distill, cfg.model, digits, seed=1, guide=_guide(digits), progress=False))
    a, b = runs
    start = distill(_cfg(method, iterations=0).distill, "ConvNetW32", digits, seed=1, progress=False).images
    # measured with one thread / two (which split the compiled kernels' sums differently): the losses
    # 3e-7 / 5e-7 (DC) and 0 / 1.4e-4 (DSA) relative apart; the images 5e-5 (DC) and 1e-5 / 4e-3 (DSA)
    # of how far they moved, where unrelated runs part by about 100 %
    assert abs(a.loss_history[0][1] - b.loss_history[0][1]) <= 1e-3 * abs(a.loss_history[0][1])
    assert not torch.equal(a.images, b.images)  # the compiled path ran (its float order differs)
    assert (a.images - b.images).norm() < 2e-2 * (a.images - start).norm()
