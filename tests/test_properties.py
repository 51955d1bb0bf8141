"""Property-based bad input (hypothesis): generated configs either run or are rejected with one
``ConfigError`` line (exit 2, nothing written), never a traceback. Configs are a valid tiny one
with one to three keys replaced (known keys at any depth, or unknown ones) by values of any type."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ptmdd_ray import cli
from ptmdd_ray.config import ConfigError, build_config, flatten, load_config, parse_override, set_dotted

BASE = {"dataset": {"name": "digits", "im_size": 8}, "model": "ConvNetW32",
        "distill": {"method": "dm", "ipc": 1, "iterations": 2, "batch_real": 8},
        "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1}, "pretrain": {"batch": 128, "epochs": 2},
        "loss": {"clom": 1.0}, "eval": {"runs": 1, "epochs": 1, "baseline": False}}
KEYS = sorted(flatten(build_config(BASE)))
UNKNOWN = st.builds(lambda section, name: f"{section}.{name}" if section else name,
                    st.sampled_from(["", "dataset", "distill", "pool", "loss", "eval", "pretrain"]),
                    st.text("abcxyz_", min_size=1, max_size=6))

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(-2, 5), st.text(max_size=6)), max_size=3),
    st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(-1, 3), max_size=2))
# for configs that may run: small numbers (nothing that trains for long) and names from the field
SMALL_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 4), st.sampled_from([-1.0, 0.0, 0.5, 2.0, 1e3, float("nan"), float("inf")]),
    st.sampled_from(["dm", "dc", "dsa", "real", "noise", "ConvNetW32", "MLP", "LeNet", "nope", "invert", "lowres",
                     "grayscale", "digits", "cpu", "cuda", "", "none"]),
    st.lists(st.sampled_from(["ConvNetW32", "MLP", "bogus", 0, 1, 2]), max_size=3))
RUN_KEYS = [k for k in KEYS if not k.endswith(("download", "root", "cache_dir")) and k != "store"]
# null restores a key's default, and these defaults are the papers' budgets (20000 iterations, 300
# evaluation epochs, 150 pretraining epochs, width-128 ConvNets): minutes per example, not a bad input
PAPER_BUDGETS = {"distill.iterations", "distill.batch_real", "distill.inner_loop", "distill.outer_loop",
                 "eval.epochs", "eval.runs", "eval.archs", "eval.baseline", "pretrain.epochs", "pool.epoch",
                 "model", "dataset.im_size"}
RUN_EDIT = st.sampled_from(RUN_KEYS).flatmap(
    lambda key: st.tuples(st.just(key), SMALL_VALUE.filter(lambda v: v is not None) if key in PAPER_BUDGETS
                          else SMALL_VALUE))


def _mutated(base: dict, edits: list[tuple[str, object]]) -> dict:
    import copy

    data = copy.deepcopy(base)
    for key, value in edits:
        try:
            set_dotted(data, key, value)
        except (ConfigError, TypeError, AttributeError):
            parts = key.split(".")  # a key under a scalar: replace the scalar by a mapping
            data[parts[0]] = {} if len(parts) > 1 else value
            if len(parts) > 1:
                set_dotted(data, key, value)
    return data


def _one_line(e: ConfigError) -> None:
    text = str(e)
    assert text and "\n" not in text, repr(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), UNKNOWN), ANY_VALUE), min_size=1, max_size=3))
def test_any_config_is_valid_or_rejected_with_one_line(edits):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(_mutated(BASE, edits)))
        try:
            cfg = load_config(path)
        except ConfigError as e:
            event("rejected")
            _one_line(e)
        else:
            event("valid")
            assert cfg.distill.ipc >= 1 and cfg.eval.runs >= 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_override_text_parses_or_is_rejected_with_one_line(text):
    try:
        key, _ = parse_override(text)
    except ConfigError as e:
        _one_line(e)
    else:
        assert key and "=" not in key


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_yaml_bytes_load_or_are_rejected_with_one_line(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(raw)
        try:
            load_config(path)
        except ConfigError as e:
            _one_line(e)


@pytest.fixture(scope="module")
def ptm_store(tmp_path_factory):
    """One PTM store for every generated run: a PTM is trained once, not once per example (the
    store is a cache; what is asserted is each run's own output directory)."""
    return tmp_path_factory.mktemp("store")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(RUN_EDIT, min_size=1, max_size=2))
def test_generated_configs_run_or_exit_2_with_one_line_and_write_nothing(ptm_store, edits):
    """Through the real CLI in-process: exit 0 with result.json, or exit 2 (bad input) / 1 (a run
    that diverges) with exactly one ``ptmdd: error:`` line and no output directory."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            Path("c.yaml").write_text(yaml.safe_dump({**_mutated(BASE, edits), "store": str(ptm_store)}))
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = cli.main(["distill", "c.yaml", "--out", "out", "--set", "device=cpu"])
            errors = [ln for ln in err.getvalue().splitlines() if ln.startswith("ptmdd: error:")]
            event(f"exit {rc}")
            if rc == 0:
                assert Path("out/result.json").exists() and not errors
            else:
                assert rc in (1, 2) and len(errors) == 1, (rc, err.getvalue())
                assert not Path("out").exists()
                if rc == 1:
                    assert "diverged" in errors[0]
        finally:
            os.chdir(cwd)
