import statistics

import pytest
import torch

from ptmdd_ray.config import ConfigError, EvalConfig, build_config
from ptmdd_ray.data import load_data
from ptmdd_ray.evaluate import evaluate_set, random_real_subset, summarize


def test_summarize_reports_mean_std_and_runs():
    s = summarize([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(statistics.pstdev([0.5, 0.7, 0.6]))
    assert s["runs"] == [0.5, 0.7, 0.6] and summarize([0.4])["std"] == 0.0


def test_random_real_subset_has_ipc_images_of_every_class_and_is_seeded():
    data = load_data(build_config({"dataset": {"name": "digits", "im_size": 8}}).dataset)
    x, y = random_real_subset(data, 3, seed=0)
    assert x.shape == (30, 1, 8, 8) and torch.bincount(y).tolist() == [3] * 10
    x2, _ = random_real_subset(data, 3, seed=0)
    x3, _ = random_real_subset(data, 3, seed=1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    # every image is a real training image of its label
    for img, label in zip(x, y):
        match = (data.x_train == img).flatten(1).all(1)
        assert match.any() and (data.y_train[match] == label).all()


def test_evaluate_set_trains_runs_per_arch_and_reports_fractions():
    data = load_data(build_config({"dataset": {"name": "digits", "test_per_class": 20}}).dataset)
    x, y = random_real_subset(data, 10, seed=0)
    cfg = EvalConfig(archs=["ConvNetW32", "MLP"], runs=2, epochs=100)
    out = evaluate_set(x, y, data, cfg, seed=0, progress=False)
    assert set(out) == {"test"}  # no validation split held out
    out = out["test"]
    assert set(out) == {"ConvNetW32", "MLP"}
    for res in out.values():
        assert len(res["runs"]) == 2 and all(0.0 <= a <= 1.0 for a in res["runs"])
    assert out["ConvNetW32"]["mean"] > 0.5  # 10 real digits per class already teach a lot
    again = evaluate_set(x, y, data, cfg, seed=0, progress=False)
    assert again["test"] == out  # fixed seeds reproduce the evaluation


def test_one_training_scores_both_the_validation_and_the_test_split():
    data = load_data(build_config({"dataset": {"name": "digits", "val_per_class": 20}}).dataset)
    x, y = random_real_subset(data, 5, seed=0)
    cfg = EvalConfig(archs=["ConvNetW32"], runs=2, epochs=60)
    both = evaluate_set(x, y, data, cfg, seed=0, progress=False)
    assert set(both) == {"test", "val"}
    val_only = evaluate_set(x, y, data, cfg, seed=0, progress=False, splits=("val",))
    assert val_only == {"val": both["val"]}  # the same models, scored on the held-out images
    assert both["val"]["ConvNetW32"]["mean"] > 0.5 and both["val"] != both["test"]


def test_a_validation_split_is_required_to_score_on_it():
    data = load_data(build_config({}).dataset)
    x, y = random_real_subset(data, 1, seed=0)
    with pytest.raises(ConfigError, match="val_per_class"):
        evaluate_set(x, y, data, EvalConfig(archs=["MLP"], runs=1, epochs=1), seed=0, progress=False, splits=("val",))


@pytest.mark.parametrize("method, augment", [("dc", False), ("dsa", True), ("dm", True)])
def test_evaluation_augments_as_the_reference_does_per_method(method, augment):
    assert build_config({"distill": {"method": method}}).eval.augment is augment
    assert build_config({"distill": {"method": method}, "eval": {"augment": not augment}}).eval.augment is not augment


def test_evaluation_compiles_from_500_epochs_unless_told():
    assert build_config({"eval": {"epochs": 500}}).eval.compile is True
    assert build_config({"eval": {"epochs": 499}}).eval.compile is False
    assert build_config({"distill": {"method": "dm"}}).eval.compile is True  # the reference 1000 epochs
    assert build_config({"distill": {"method": "dc"}}).eval.compile is False  # 300: not won back
    assert build_config({"eval": {"epochs": 1000, "compile": False}}).eval.compile is False
    assert build_config({}).eval.group is None  # resolved per device: grouped on CUDA only


@pytest.mark.slow
def test_compiled_evaluation_equals_eager_up_to_float_rounding():
    """The same seeds, shuffles and draws through inductor's graphs: the accuracies of every run
    match the eager ones (a prediction may flip where rounding moves a logit past another)."""
    data = load_data(build_config({"dataset": {"name": "digits", "im_size": 8, "val_per_class": 10}}).dataset)
    x, y = random_real_subset(data, 5, seed=0)
    cfg = EvalConfig(archs=["ConvNetW32"], runs=2, epochs=20, batch=16, augment=True, compile=False, group=False)
    eager = evaluate_set(x, y, data, cfg, seed=1, progress=False)
    compiled = evaluate_set(x, y, data, EvalConfig(**{**cfg.__dict__, "compile": True}), seed=1, progress=False)
    for split in ("test", "val"):
        assert compiled[split]["ConvNetW32"]["runs"] == pytest.approx(eager[split]["ConvNetW32"]["runs"], abs=0.02)
