"""MTT (``ptmdd_ray.methods.mtt``, the loop, the experts from the store, its config). Its step
against the reference's is in tests/test_bench.py, beside the other yardsticks."""
import pytest
import torch

from ptmdd_ray.methods.mtt import (Trajectory, batches, draw_segment, flatten, trajectory_loss,
                                  trajectory_loss_recomputed, unflatten)
from ptmdd_ray.train import new_model

SHAPE = (1, 10, 8)  # digits at 8 px


def _syn(digits, ipc):
    x = torch.cat([digits.x_train[digits.y_train == c][:ipc] for c in range(10)]).clone()
    return x, torch.arange(10).repeat_interleave(ipc)


def test_the_loss_is_one_when_the_student_does_not_move(digits):
    """With step size 0 the student stays at the start: the normalised distance is exactly 1."""
    start, target = (flatten(new_model("ConvNetW32", SHAPE, seed=s)) for s in (0, 1))
    x, y = _syn(digits, 1)
    loss = trajectory_loss(new_model("ConvNetW32", SHAPE, seed=0), start, target, x.requires_grad_(True), y,
                           torch.tensor(0.0, requires_grad=True), 3, 10, "none", torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("strategy,batch", [("none", 10), ("color_crop_cutout_flip_scale_rotate", 7)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
def test_the_recomputed_gradient_is_the_unrolled_one(digits, strategy, batch, dtype, tol):
    """``mtt_gradient: recomputed`` (constant memory in syn_steps) against the unrolled graph on the
    same segment and random draws: the same loss, and the same gradients of the pixels and of the
    step size (images revisited across steps, DSA replayed, a partial last batch): to 1e-10 in
    float64, where the float order no longer shows (seen: 4e-14), and to float order in float32
    (seen: 1.2e-4 of the largest pixel gradient)."""
    net = new_model("ConvNetW32", SHAPE, seed=0).to(dtype)
    start = flatten(net)
    target = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    x, y = _syn(digits, 2)
    grads = []
    for loss_fn in (trajectory_loss, trajectory_loss_recomputed):
        images, lr = x.to(dtype).requires_grad_(True), torch.tensor(0.05, dtype=dtype, requires_grad=True)
        loss = loss_fn(net, start, target, images, y, lr, 6, batch, strategy, torch.Generator().manual_seed(3))
        (2.0 * loss).backward()  # a scaled loss scales both gradients alike
        grads.append((loss.detach(), images.grad, lr.grad))
    (l1, gx1, glr1), (l2, gx2, glr2) = grads
    # the forward steps are the same operations: equal in float64; in float32 a forward without a
    # graph may take another oneDNN kernel (seen on an AVX2-only CPU: one ulp of the loss)
    assert (l1 - l2).abs() <= (0 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps * l1.abs())
    assert gx1.abs().max() > 0 and (gx1 - gx2).abs().max() <= tol * gx1.abs().max()
    assert glr1.abs() > 0 and (glr1 - glr2).abs() <= tol * glr1.abs()


def test_flat_parameters_round_trip():
    net = new_model("ConvNetW32", SHAPE, seed=1)
    flat = flatten(net)
    views = unflatten(net, flat)
    assert list(views) == [n for n, _ in net.named_parameters()]
    assert all(torch.equal(views[n], p) for n, p in net.named_parameters())
    with pytest.raises(ValueError, match="a flat vector of 3 parameters"):
        unflatten(net, torch.zeros(3))


def test_batches_follow_the_reference_draw_order():
    """Chunks of a fresh permutation, the last chunk first, a new permutation when they run out."""
    gen = torch.Generator().manual_seed(0)
    got = list(batches(10, 4, 4, gen))
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(10, generator=gen)
    assert [len(b) for b in got] == [2, 4, 4, 2]
    assert torch.equal(got[0], perm[8:]) and torch.equal(got[1], perm[4:8]) and torch.equal(got[2], perm[:4])


def test_a_segment_beyond_the_expert_is_refused():
    expert = Trajectory("ConvNetW32", [torch.zeros(3)] * 3, key="k")
    with pytest.raises(ValueError, match="expert k keeps 2 epochs"):
        for seed in range(20):
            draw_segment([expert], max_start_epoch=2, expert_epochs=2, gen=torch.Generator().manual_seed(seed))
    _, start = draw_segment([expert], max_start_epoch=1, expert_epochs=2, gen=torch.Generator().manual_seed(0))
    assert start == 0


# -- the loop: experts from the store, a learned step size, an exact resume ------------------------

def _mtt_cfg(tmp_path, **distill):
    from ptmdd_ray.config import build_config

    return build_config({
        "dataset": {"name": "digits", "im_size": 8, "train_per_class": 30}, "model": "ConvNetW32",
        "distill": {"method": "mtt", "ipc": 1, "iterations": 4, "syn_steps": 4, "max_start_epoch": 2,
                    "expert_epochs": 1, "lr_img": 1.0, "lr_lr": 1e-7, "log_every": 1, **distill},
        "pool": {"archs": ["ConvNetW32"], "seeds": 2, "epoch": 1},
        "pretrain": {"epochs": 3, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
                     "dsa_strategy": "color_crop_cutout_flip_scale_rotate"},
        "eval": {"runs": 1, "epochs": 3}, "store": str(tmp_path / "store")})


def _resolved(ipc, dataset="digits", **distill):
    from ptmdd_ray.config import DatasetConfig, DistillConfig, check_distill

    return check_distill(DistillConfig(method="mtt", ipc=ipc, **distill), DatasetConfig(name=dataset))


def _settings(d):
    return d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr, d.lr_teacher, d.batch_syn


def test_mtt_defaults_come_from_the_published_table_per_data_set_and_ipc():
    """Unset settings take MTT's published row of the data set (CIFAR-10's for data sets MTT never
    published, digits here); the figures are DC-Bench's transcription of the authors' table, written
    out here so that an edit of the table shows."""
    from ptmdd_ray.config import MTT_TABLE

    for table, dataset in (("cifar10", "digits"), ("cifar10", "cifar10"), ("cifar100", "cifar100")):
        for ipc, row in MTT_TABLE[table].items():
            d = _resolved(ipc, dataset)
            assert _settings(d) == tuple(row[k] for k in ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img",
                                                          "lr_lr", "lr_teacher", "batch_syn"))
            assert d.iterations == 5000 and d.init == "real"
    assert _settings(_resolved(1)) == (50, 2, 2, 100.0, 1e-7, 0.01, None)
    assert _settings(_resolved(10)) == (30, 2, 20, 100.0, 1e-5, 0.001, None)
    assert _settings(_resolved(50)) == (30, 2, 40, 1000.0, 1e-5, 0.001, None)
    assert _settings(_resolved(1, "cifar100")) == (20, 3, 20, 1000.0, 1e-5, 0.01, None)  # the reference README's
    assert _settings(_resolved(50, "cifar100")) == (80, 2, 40, 1000.0, 1e-5, 0.01, 125)
    assert _resolved(20).max_start_epoch == 20 and _resolved(3).syn_steps == 50  # off the table: the nearest IPC's
    assert _settings(_resolved(10, lr_teacher=0.01, batch_syn=50))[5:] == (0.01, 50)  # a set value stands


def test_an_unwhitened_run_at_the_published_rates_says_it_is_off_the_papers_setting(caplog):
    from ptmdd_ray.config import build_config
    from ptmdd_ray.pipeline import note_unwhitened_mtt

    def cfg(**over):
        return build_config({"model": "ConvNet", "distill": {"method": "mtt", "ipc": 10}, "pool": {"archs": ["ConvNet"]},
                             "pretrain": {"epochs": 50}, **over})

    with caplog.at_level("WARNING", logger="ptmdd_ray.pipeline"):
        note_unwhitened_mtt(cfg())
        assert "tuned on ZCA-whitened images; dataset.zca is off" in caplog.text
        caplog.clear()
        note_unwhitened_mtt(cfg(dataset={"name": "digits", "zca": True}))
        note_unwhitened_mtt(cfg(distill={"method": "mtt", "ipc": 10, "lr_img": 1000.0}))
        note_unwhitened_mtt(cfg(distill={"method": "mtt", "ipc": 50}))  # IPC 50's row ran without whitening
        assert caplog.text == ""


def test_mtt_guidance_from_other_architectures_and_what_the_experts_must_share():
    """Experts are the pool's PTMs of the student's architecture; the pool's others guide (CLoM), as
    for DC/DSA/DM. Experts trained on another label space, domain or whitening are refused in one line."""
    from ptmdd_ray.config import ConfigError, build_config

    base = {"model": "ConvNetW32", "distill": {"method": "mtt", "ipc": 1}, "pretrain": {"epochs": 50},
            "pool": {"archs": ["ConvNetW32", "MLP"]}, "loss": {"clom": 1.0}}
    assert build_config(base).pool.archs == ["ConvNetW32", "MLP"]
    for pool, needle in (({"source": {"name": "fashionmnist"}}, "pool.source: MTT's experts must train on the "
                                                                 "target's images and labels"),
                         ({"source": {"name": "digits", "domain": "invert"}}, "pool.source: MTT's experts"),
                         ({"source": {"name": "digits", "zca": True}}, "pool.source.zca: True but dataset.zca is "
                                                                       "False")):
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            build_config({**base, "pool": {**base["pool"], **pool}})


def test_experts_are_the_stored_per_epoch_checkpoints_trained_once(digits, tmp_path):
    """A trajectory is its PTM run's checkpoints from epoch 0 (the initialisation) on, content
    addressed by the recipe: a second resolution trains nothing; another recipe is another run."""
    from dataclasses import replace

    from ptmdd_ray.experts import resolve_experts, trajectory_epochs
    from ptmdd_ray.pool import PTMRepository, PTMSpec, pool_specs
    from ptmdd_ray.store import CheckpointStore

    cfg = _mtt_cfg(tmp_path)
    assert trajectory_epochs(cfg) == [0, 1, 2]
    repo = PTMRepository(CheckpointStore(cfg.store), progress=False)
    experts = resolve_experts(cfg, digits, torch.device("cpu"), progress=False, repo=repo).trajectories
    assert repo.trainings == 2 and len(experts) == 2 and all(e.epochs == 2 for e in experts)
    init = new_model("ConvNetW32", SHAPE, seed=0)
    assert torch.equal(experts[0].params[0], flatten(init))  # epoch 0: seed 0's initialisation
    assert not torch.equal(experts[0].params[1], experts[0].params[0])
    again = PTMRepository(CheckpointStore(cfg.store), progress=False)
    experts2 = resolve_experts(cfg, digits, torch.device("cpu"), progress=False, repo=again).trajectories
    assert again.trainings == 0 and all(torch.equal(a, b) for a, b in zip(experts[1].params, experts2[1].params))
    paper = PTMSpec("ConvNetW32", 0, cfg.dataset, replace(cfg.pretrain, dsa_strategy="none", schedule="thirds"))
    assert paper.run_id != pool_specs(cfg)[0].run_id  # the recipe is part of the key
    assert "dsa_strategy" not in paper.identity()["pretrain"]  # at its default: keys stored before it stand


def test_a_trajectory_extended_later_is_the_run_trained_once_to_its_end(digits, tmp_path):
    """A trial that reaches further than the stored epochs trains the run again from its seed and
    saves only the missing epochs: the same draws, so the extended trajectory is, to the bit, the one
    a single training to its end gives (same machine)."""
    from dataclasses import replace

    from ptmdd_ray.experts import resolve_experts

    def experts(cfg, max_start):
        cfg = replace(cfg, distill=replace(cfg.distill, max_start_epoch=max_start))
        return resolve_experts(cfg, digits, torch.device("cpu"), progress=False).trajectories

    short = _mtt_cfg(tmp_path / "a")
    assert [e.epochs for e in experts(short, 1)] == [1, 1]
    extended = experts(short, 2)
    direct = experts(_mtt_cfg(tmp_path / "b"), 2)
    assert [e.epochs for e in extended] == [2, 2]
    assert all(torch.equal(a, b) for x, y in zip(extended, direct) for a, b in zip(x.params, y.params))


def test_only_the_students_architecture_gives_experts_the_others_guide(digits, tmp_path):
    from dataclasses import replace

    from ptmdd_ray.experts import resolve_experts

    cfg = _mtt_cfg(tmp_path)
    cfg = replace(cfg, pool=replace(cfg.pool, archs=["MLP", "ConvNetW32"]))
    experts = resolve_experts(cfg, digits, torch.device("cpu"), progress=False)
    assert [e.arch for e in experts.trajectories] == ["ConvNetW32", "ConvNetW32"]
    assert experts.pool.trainings == 2  # the MLPs are the guiding pool's, trained (or not) there


class _Constant:
    """A guide that adds a fixed amount and records what it was given."""

    def __init__(self, augmented):
        self.augmented, self.seen = augmented, []

    def __call__(self, syn_aug, syn_raw, labels):
        self.seen.append((syn_aug.detach().clone(), syn_raw.detach().clone()))
        return torch.tensor(0.25)


@pytest.mark.parametrize("augmented", [False, True])
def test_the_guide_adds_to_the_mtt_loss_on_the_raw_or_one_augmented_set(digits, augmented):
    """CLoM/CCLoM add to MTT's matching loss as to DM's: the iteration's loss is the matching term
    plus the guide's, and the guide sees the raw set, or (``loss.augmented``) one DSA draw of it."""
    from ptmdd_ray.config import DistillConfig
    from ptmdd_ray.methods.loop import _outer_step

    start = flatten(new_model("ConvNetW32", SHAPE, seed=0))
    expert = Trajectory("ConvNetW32", [start, start + 0.01, start + 0.02], key="k")
    cfg = DistillConfig(method="mtt", ipc=1, syn_steps=2, expert_epochs=1, max_start_epoch=2, lr_img=1.0, lr_lr=0.0,
                        lr_teacher=0.01, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    x, y = _syn(digits, 1)
    losses, guide = [], _Constant(augmented)
    for g in (None, guide):
        syn = x.clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        opt = torch.optim.SGD([syn, lr], lr=0.0)
        step = _outer_step(cfg, syn, y, None, torch.Generator().manual_seed(0), g, opt, 10, experts=[expert],
                           syn_lr=lr)
        losses.append(step(new_model("ConvNetW32", SHAPE, seed=0))[0])
    assert losses[1].item() == pytest.approx(losses[0].item() + 0.25, abs=1e-6)
    (aug, raw), = guide.seen
    assert torch.equal(raw, x) and aug.shape == x.shape and torch.equal(aug, x) is not augmented


def test_mtt_learns_its_step_size_and_resumes_exactly(digits, tmp_path):
    from ptmdd_ray.artifacts import read_tensors, write_tensors
    from ptmdd_ray.experts import resolve_experts
    from ptmdd_ray.methods import DistillState, distill

    cfg = _mtt_cfg(tmp_path)
    experts = resolve_experts(cfg, digits, torch.device("cpu"), progress=False).trajectories
    full = distill(cfg.distill, cfg.model, digits, seed=3, progress=False, experts=experts)
    assert full.lr is not None and full.lr != cfg.distill.lr_teacher  # learned
    assert len(full.loss_history) == 4 and all(v > 0 for _, v in full.loss_history)
    states = []
    distill(cfg.distill, cfg.model, digits, seed=3, progress=False, experts=experts, state_every=1,
            on_state=states.append)
    write_tensors(tmp_path / "s.safetensors", states[1].tensors(), states[1].meta())
    state = DistillState.from_parts(*read_tensors(tmp_path / "s.safetensors"))
    assert state.syn_lr is not None and state.syn_lr_momentum is not None
    resumed = distill(cfg.distill, cfg.model, digits, seed=3, progress=False, experts=experts, resume=state)
    assert torch.equal(resumed.images, full.images) and resumed.lr == full.lr
    assert resumed.loss_history == full.loss_history
    seen = []  # the intermediate evaluations hear the step size learned so far
    distill(cfg.distill, cfg.model, digits, seed=3, progress=False, experts=experts, every=2,
            on_every=lambda it, images, labels, lr=None: seen.append((it, lr)))
    assert [it for it, _ in seen] == [2] and seen[0][1] == pytest.approx(float(states[1].syn_lr))


def test_a_recomputed_mtt_run_follows_the_unrolled_one(digits, tmp_path):
    """The loop with ``distill.mtt_gradient: recomputed``: the same losses and (float order aside)
    the same set and learned step size as the unrolled run; the memory bound of one step."""
    from dataclasses import replace

    from ptmdd_ray.experts import resolve_experts
    from ptmdd_ray.methods import distill
    from ptmdd_ray.methods.mtt import student_bytes

    cfg = _mtt_cfg(tmp_path, iterations=2, lr_img=0.1)  # two iterations: float order compounds over more
    experts = resolve_experts(cfg, digits, torch.device("cpu"), progress=False).trajectories
    runs = [distill(replace(cfg.distill, mtt_gradient=g), cfg.model, digits, seed=3, progress=False, experts=experts)
            for g in ("unrolled", "recomputed")]
    (_, l1), (_, l2) = runs[0].loss_history[0], runs[1].loss_history[0]
    assert l1 == pytest.approx(l2, rel=1e-5)  # the same segment and steps (the backward kernels may differ)
    init = distill(replace(cfg.distill, iterations=0), cfg.model, digits, seed=3, progress=False, experts=experts)
    moved = (runs[0].images - init.images).abs().max()
    assert (runs[0].images - runs[1].images).abs().max() <= 1e-3 * moved and runs[1].lr == pytest.approx(runs[0].lr)
    net = new_model("ConvNetW32", SHAPE, seed=0)
    one = student_bytes(net, (1, 8, 8), 10, 1)
    params = sum(p.numel() for p in net.parameters())
    assert student_bytes(net, (1, 8, 8), 10, 30) == 30 * one  # a step's activations kept per step
    assert student_bytes(net, (1, 8, 8), 10, 30, "recomputed") == one + 4 * 30 * params  # one, and the thetas


def test_an_mtt_run_end_to_end_evaluates_at_its_learned_step_size(tmp_path):
    """``run_distill`` with ``distill.method: mtt``: experts trained into the store, the set
    distilled, evaluated, written; the baseline is evaluated at ``eval.lr``."""
    import json

    from ptmdd_ray.pipeline import run_distill

    cfg = _mtt_cfg(tmp_path)
    result = run_distill(cfg, tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["timing"]["iterations"] == 4 and 0 <= result["accuracy"]["ConvNetW32"]["mean"] <= 1
    assert written["learned_lr"] == pytest.approx(result["learned_lr"]) and result["learned_lr"] > 0
    assert (tmp_path / "out" / "synthetic.parquet").exists()
    # the experts' training is the pool's cost, not the distillation's: their run up to epoch 2
    cost = written["cost"]
    assert result["pool_stats"]["trainings"] == 2 and [p["epoch"] for p in result["pool"]] == [2, 2]
    assert cost["ptm_train"]["wall_s"] > 0 and cost["pool"]["wall_s"] == pytest.approx(
        sum(p["train_cost"]["wall_s"] for p in result["pool"]))
    assert written["pool_stats"]["seconds"] >= cost["ptm_train"]["wall_s"]  # trained in the pool's phase
    again = run_distill(cfg, tmp_path / "again", progress=False)  # the store has them: nothing trained
    assert again["pool_stats"]["trainings"] == 0 and again["cost"]["ptm_train"]["wall_s"] == 0
    assert again["cost"]["pool"]["wall_s"] == pytest.approx(cost["pool"]["wall_s"])


def test_a_step_size_learned_below_zero_is_a_divergence(digits, tmp_path):
    from ptmdd_ray.experts import resolve_experts
    from ptmdd_ray.methods import DivergenceError, distill

    cfg = _mtt_cfg(tmp_path, lr_lr=1e-3)
    experts = resolve_experts(cfg, digits, torch.device("cpu"), progress=False).trajectories
    with pytest.raises(DivergenceError, match="MTT's learned step size went to -.*; lower distill.lr_lr"):
        distill(cfg.distill, cfg.model, digits, seed=3, progress=False, experts=experts)


def test_the_memory_estimate_bounds_what_the_unrolled_steps_keep():
    """``student_bytes`` (what the refusal of a run that cannot fit reads) against the bytes of
    the tensors autograd really saves for the backward pass, per step (distinct storages, counted
    by a saved-tensors hook: what the allocator does with them aside), on CIFAR-sized images with
    MTT's DSA: an upper bound, within 2x."""
    from ptmdd_ray.methods.mtt import student_bytes

    net = new_model("ConvNetW32", (3, 10, 32), seed=0)
    start = flatten(net)
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
    x = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.arange(10).repeat_interleave(10)
    saved = {}
    for steps in (4, 12):
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trajectory_loss(net, start, target, x, y, torch.tensor(0.01, requires_grad=True), steps, 100,
                            "color_crop_cutout_flip_scale_rotate", torch.Generator().manual_seed(0))
        saved[steps] = sum(storages.values())
    measured = (saved[12] - saved[4]) / 8
    estimate = student_bytes(net, (3, 32, 32), 100, 1)
    assert estimate / 2 <= measured <= estimate, (measured / 2**20, estimate / 2**20)
