"""On a CUDA device (`pytest -m gpu`, run by `bash bench/gpu_check.sh`): device selection, bf16
autocast on and off, a study whose trials share one GPU (half a GPU each) with the PTM training
they need, and a checkpoint trained on the GPU loaded on the CPU. Tiny digits data throughout.
Without CUDA every test here skips (the development and CI machines have none)."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_BASE
from ptmdd_ray.config import build_config
from ptmdd_ray.data import load_data
from ptmdd_ray.evaluate import random_real_subset
from ptmdd_ray.pipeline import pick_device, run_distill, run_evaluate, run_pretrain
from ptmdd_ray.store import CheckpointStore
from ptmdd_ray.train import accuracy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (torch.cuda.is_available() is False)")]

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {"name": "digits", "im_size": 8}


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls without TF32 on CUDA (cuDNN convolutions use TF32 by default),
    so that GPU and CPU results compare at fp32 tolerances."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_auto_picks_cuda_and_a_cuda_config_distills_on_the_gpu(tmp_path):
    assert pick_device("auto").type == "cuda"
    assert pick_device("cuda").type == "cuda"
    cfg = build_config({**TINY_BASE, "store": str(tmp_path / "store"), "device": "cuda",
                        "eval": {"runs": 1, "epochs": 5}})
    result = run_distill(cfg, tmp_path / "out", progress=False)
    assert result["device"] == "cuda" and result["config"]["device"] == "cuda"
    assert result["pool_stats"]["trainings"] == 1  # the PTM was pretrained here, on the GPU
    assert result["timing"]["iterations"] == 10 and result["timing"]["seconds_per_iteration"] > 0
    assert all(math.isfinite(loss) for _, loss in result["loss_history"])
    for split in ("accuracy", "baseline_random", "val_accuracy"):
        assert 0.0 <= result[split]["ConvNetW32"]["mean"] <= 1.0
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["device"] == "cuda"
    cost = result["cost"]  # on CUDA the phases also count GPU seconds (synchronised), and GPU memory
    for phase in ("distill", "eval", "ptm_train"):
        assert cost[phase]["gpu_s"] == cost[phase]["wall_s"] > 0
    assert cost["peak_gpu_mb"] > 0 and cost["pool"]["gpu_s"] > 0


def _conv_output_dtypes(monkeypatch) -> set:
    """Record the output dtype of every convolution (``nn.Conv2d`` and the grouped evaluation's
    functional ones both call ``torch.nn.functional.conv2d``)."""
    seen: set = set()
    conv2d = torch.nn.functional.conv2d

    def recording(*args, **kwargs):
        out = conv2d(*args, **kwargs)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    return seen


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_evaluation_runs_under_bf16_autocast_only_when_asked(monkeypatch, precision, dtype, group):
    cfg = build_config({"dataset": DIGITS, "model": "ConvNetW32", "device": "cuda", "precision": precision,
                        "eval": {"runs": 2, "epochs": 10, "baseline": False, "group": group}})
    images, labels = random_real_subset(load_data(cfg.dataset, 0), 2, 0)
    seen = _conv_output_dtypes(monkeypatch)
    out = run_evaluate(cfg, images, labels, progress=False)
    assert seen == {dtype}  # training and scoring: every convolution ran in bf16, or none did
    acc = out["accuracy"]["ConvNetW32"]
    assert math.isfinite(acc["mean"]) and 0.0 <= acc["mean"] <= 1.0 and len(acc["runs"]) == 2


def test_grouped_evaluation_on_the_gpu_equals_one_model_at_a_time():
    """The default on CUDA: the runs as one grouped network give each run's accuracy (fp32, no TF32)."""
    from ptmdd_ray.config import EvalConfig
    from ptmdd_ray.evaluate import evaluate_set

    data = load_data(build_config({"dataset": {**DIGITS, "val_per_class": 10}}).dataset, 0).to("cuda")
    x, y = random_real_subset(data, 3, 0)
    cfg = EvalConfig(archs=["ConvNetW32"], runs=3, epochs=20, augment=True, compile=False, group=True)
    with ieee_fp32():
        grouped = evaluate_set(x, y, data, cfg, seed=0, progress=False, precision="fp32")
        alone = evaluate_set(x, y, data, EvalConfig(**{**cfg.__dict__, "group": False}), seed=0, progress=False,
                             precision="fp32")
    for split in ("test", "val"):
        assert grouped[split]["ConvNetW32"]["runs"] == pytest.approx(alone[split]["ConvNetW32"]["runs"], abs=0.02)


def test_a_ptm_trained_on_the_gpu_loads_on_the_cpu_with_the_same_weights_and_predictions(tmp_path):
    base = {"dataset": DIGITS, "model": "ConvNetW32", "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 2},
            "pretrain": {"batch": 128}, "store": str(tmp_path / "store")}
    gpu = run_pretrain(build_config({**base, "device": "cuda"}), progress=False)
    assert gpu.trainings == 1 and len(gpu.ptms) == 1
    on_gpu = gpu.ptms[0]
    assert {p.device.type for p in on_gpu.model.parameters()} == {"cuda"}

    cpu = run_pretrain(build_config({**base, "device": "cpu"}), progress=False)
    assert cpu.trainings == 0 and cpu.hits == 1  # the GPU's checkpoint, not a new training
    on_cpu = cpu.ptms[0]
    assert on_cpu.key == on_gpu.key and {p.device.type for p in on_cpu.model.parameters()} == {"cpu"}
    stored = CheckpointStore(tmp_path / "store").load(on_gpu.key).tensors
    gpu_state, cpu_state = on_gpu.model.state_dict(), on_cpu.model.state_dict()
    assert set(gpu_state) == set(cpu_state) == set(stored)
    for name, value in cpu_state.items():
        assert torch.equal(value, stored[name]) and torch.equal(gpu_state[name].cpu(), value), name

    data = load_data(build_config({**base, "device": "cpu"}).dataset, 0)
    with torch.no_grad(), ieee_fp32():
        logits_cpu = on_cpu.model(data.x_test)
        logits_gpu = on_gpu.model(data.x_test.cuda()).float().cpu()
    assert torch.allclose(logits_gpu, logits_cpu, rtol=1e-3, atol=1e-3), (logits_gpu - logits_cpu).abs().max()
    assert (logits_gpu.argmax(1) == logits_cpu.argmax(1)).float().mean() >= 0.99
    # the test accuracy recorded at training (on the GPU, bf16 autocast) holds on the CPU in fp32
    assert abs(accuracy(on_cpu.model, data.x_test, data.y_test) - on_gpu.test_accuracy) <= 0.05


# A study on a local Ray that has one GPU: each trial asks for half of it, so both run at once,
# and the PTM both need is trained once, inside the first trial, on that GPU.
DRIVER = """
import json, sys
from ptmdd_ray.service import init_local_ray
from ptmdd_ray.study import run_study
from ptmdd_ray.study_spec import load_study
import ray
init_local_ray(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
try:
    summary = run_study(load_study(sys.argv[1]), store=sys.argv[2], results=sys.argv[3], quiet=True)
finally:
    ray.shutdown()
print(json.dumps({k: summary[k] for k in ("errors", "tracking_uri", "parent_run_id")}))
"""

STUDY = {
    "name": "gpu",
    "metric": "val.acc.mean",
    "base": {**TINY_BASE, "device": "auto", "eval": {"runs": 1, "epochs": 10}},
    "sweep": {"loss.clom": {"grid": [10.0, 30.0]}},  # both use the PTM: one trains it, the other waits, then loads
    "samples": 1,
    "resources": {"cpu": 1, "gpu": 0.5},
    "max_concurrent": 2,
}


@pytest.mark.slow
def test_a_study_runs_two_trials_on_half_a_gpu_each_with_the_ptm_trained_on_it(tmp_path):
    pytest.importorskip("ray", reason="the study needs ray[tune] (pip install -e .)")
    pytest.importorskip("mlflow", reason="the study needs mlflow (pip install -e .)")
    import mlflow

    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "study.yaml"), str(tmp_path / "store"),
                           str(tmp_path / "results")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0

    client = mlflow.MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("gpu").experiment_id])
    trials = [r for r in runs if r.data.tags.get("ptmdd.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        assert r.data.tags["ptmdd.device"] == "cuda"  # torch saw the GPU Ray gave the trial
        assert 0.0 <= r.data.metrics["acc.mean"] <= 1.0
    gpu_ids = {r.data.tags["ray.gpu_ids"] for r in trials}
    assert len(gpu_ids) == 1 and len(gpu_ids.pop().split(",")) == 1  # both on the one GPU
    starts, ends = [r.info.start_time for r in trials], [r.info.end_time for r in trials]
    assert max(starts) < min(ends), "the two half-GPU trials did not run at the same time"
    result = json.loads(Path(client.download_artifacts(trials[0].info.run_id, "result.json", str(tmp_path))).read_text())
    assert result["device"] == "cuda"
    stats = CheckpointStore(tmp_path / "store").stats()
    assert stats["trainings"] == 1  # one PTM, trained once, inside a trial on the shared GPU
