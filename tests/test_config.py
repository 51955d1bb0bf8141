"""Config: embedded defaults, method-default resolution, ``--set`` parsing, flattening and
one-line errors that start with the offending dotted key. Pure and fast: nothing is trained."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ptmdd_ray.config import (
    DSA_STRATEGY,
    METHOD_DEFAULTS,
    Config,
    ConfigError,
    build_config,
    flatten,
    json_schema,
    load_config,
    load_yaml,
    parse_override,
    to_dict,
)


def cfg_from(text: str) -> Config:
    """Build a resolved config from a YAML snippet (what a config file would hold)."""
    return build_config(yaml.safe_load(text) or {})


# --------------------------------------------------------------------------- defaults

def test_embedded_defaults():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.dataset.name == "digits"
    assert cfg.model == "ConvNet"
    d = cfg.distill
    assert d.method == "dm"
    assert d.iterations == 20000
    assert d.lr_img == 1.0
    assert d.init == "real"
    assert d.dsa_strategy == DSA_STRATEGY == "color_crop_cutout_flip_scale_rotate"
    # every None of a method default is filled in
    assert None not in (d.iterations, d.lr_img, d.init, d.dsa_strategy, d.outer_loop, d.inner_loop)
    assert cfg.pool.archs == [] and cfg.pool.seeds == [0] and cfg.pool.source is None
    assert cfg.pretrain.epochs == 150  # the paper's run length; only trained up to pool.epoch
    assert cfg.loss.clom == 0.0  # empty pool: no PTM loss
    assert cfg.eval.archs == ["ConvNet"]


def test_dc_defaults():
    d = load_config(None, ["distill.method=dc"]).distill
    assert d.method == "dc"
    assert d.lr_img == 0.1
    assert d.init == "noise"
    assert d.dsa_strategy == "none"
    assert d.iterations == METHOD_DEFAULTS["dc"]["iterations"]


def test_dsa_defaults():
    d = load_config(None, ["distill.method=dsa"]).distill
    assert d.init == "real"
    assert d.dsa_strategy == DSA_STRATEGY
    assert d.lr_img == 0.1


@pytest.mark.parametrize("method, iterations, compiled", [
    ("dm", 20000, True), ("dc", 1000, True), ("dsa", 1000, True),  # the published run lengths
    ("dm", 999, False), ("dc", 200, False), ("dsa", 999, False),    # short runs: not worth compiling
    ("mtt", 5000, False)])                                           # no compiled path
def test_distill_compile_null_compiles_long_runs_of_dc_dsa_and_dm(method, iterations, compiled):
    """``distill.compile: null`` turns compilation on for runs of the published length, for DC and
    DSA as for DM (each paired against eager by seed, BENCHMARKS.md); an explicit value wins."""
    sets = [f"distill.method={method}", f"distill.iterations={iterations}"]
    sets += ["pool.archs=[ConvNet]"] if method == "mtt" else []  # MTT's experts
    assert load_config(None, sets).distill.compile is compiled
    assert load_config(None, [*sets, "distill.compile=false"]).distill.compile is False


def test_explicit_values_win_over_method_defaults():
    d = load_config(None, ["distill.method=dc", "distill.lr_img=0.5", "distill.init=real",
                           "distill.iterations=0", "distill.outer_loop=3", "distill.inner_loop=7"]).distill
    assert (d.lr_img, d.init, d.iterations, d.outer_loop, d.inner_loop) == (0.5, "real", 0, 3, 7)


@pytest.mark.parametrize("ipc, loops", [(1, (1, 1)), (10, (10, 50)), (50, (50, 10))])
def test_published_loops(ipc, loops):
    d = load_config(None, [f"distill.ipc={ipc}", "distill.method=dc"]).distill
    assert (d.outer_loop, d.inner_loop) == loops


def test_off_table_ipc_loops_are_sensible():
    d = load_config(None, ["distill.ipc=5"]).distill
    assert d.outer_loop == 5
    assert 10 <= d.inner_loop <= 50
    big = load_config(None, ["distill.ipc=200"]).distill
    assert 1 <= big.outer_loop <= 50 and 10 <= big.inner_loop <= 50


# --------------------------------------------------------------------------- loss weights

@pytest.mark.parametrize("method, weight", [("dc", 1000.0), ("dsa", 5000.0), ("dm", 2000.0)])
def test_clom_default_per_method_with_pool(method, weight):
    """The authors' weights, on the raw synthetic images as in the reference code."""
    cfg = load_config(None, [f"distill.method={method}", "pool.archs=[ConvNet]"])
    assert cfg.loss.clom == weight and cfg.loss.augmented is False


@pytest.mark.parametrize("method, epochs", [("dc", 300), ("dsa", 1000), ("dm", 1000)])
def test_evaluation_defaults_to_the_reference_protocol(method, epochs):
    """evaluate_synset's: 5 models, DC 300 epochs, DSA and DM 1000; a set value wins."""
    e = load_config(None, [f"distill.method={method}"]).eval
    assert (e.runs, e.epochs) == (5, epochs)
    assert load_config(None, [f"distill.method={method}", "eval.epochs=7"]).eval.epochs == 7


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_clom_default_zero_without_pool(method):
    assert load_config(None, [f"distill.method={method}"]).loss.clom == 0.0


def test_clom_map_accepted_for_pool_arch():
    cfg = cfg_from("pool: {archs: [ConvNet, MLP]}\nloss: {clom: {ConvNet: 10.0}}")
    assert cfg.loss.clom == {"ConvNet": 10.0}


def test_clom_map_rejects_arch_outside_pool():
    with pytest.raises(ConfigError) as ei:
        cfg_from("pool: {archs: [ConvNet]}\nloss: {clom: {MLP: 10.0}}")
    msg = str(ei.value)
    assert msg.startswith("loss.clom.MLP:") and "\n" not in msg


def test_clom_zero_with_empty_pool_is_fine():
    assert cfg_from("loss: {clom: 0}").loss.clom == 0.0


# --------------------------------------------------------------------------- pool / pretrain

def test_pool_seeds_int_becomes_range():
    assert cfg_from("pool: {seeds: 3}").pool.seeds == [0, 1, 2]


def test_pool_seeds_list_kept():
    assert cfg_from("pool: {seeds: [4, 7]}").pool.seeds == [4, 7]


def test_pretrain_run_length_is_the_papers_150_epochs():
    cfg = cfg_from("pool: {epoch: 7}")
    assert cfg.pretrain.epochs == 150
    cfg = cfg_from("pool: {epoch: 3}\npretrain: {epochs: 9}")
    assert (cfg.pool.epoch, cfg.pretrain.epochs) == (3, 9)


# --------------------------------------------------------------------------- --set

def test_parse_override_types():
    assert parse_override("distill.ipc=1") == ("distill.ipc", 1)
    assert parse_override("pool.archs=[ConvNet,MLP]") == ("pool.archs", ["ConvNet", "MLP"])
    assert parse_override("loss.clom={ConvNet: 5}") == ("loss.clom", {"ConvNet": 5})
    assert parse_override("dataset.name=digits") == ("dataset.name", "digits")
    assert parse_override(" distill.ipc = 2") == ("distill.ipc", 2)


def test_overrides_through_load_config():
    cfg = load_config(None, ["distill.ipc=1", "pool.archs=[ConvNet,MLP]", "loss.clom={ConvNet: 5}"])
    assert cfg.distill.ipc == 1 and isinstance(cfg.distill.ipc, int)
    assert cfg.pool.archs == ["ConvNet", "MLP"]
    assert cfg.loss.clom == {"ConvNet": 5.0}


def test_overrides_apply_on_top_of_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill: {ipc: 10, method: dc}\nseed: 3\n")
    cfg = load_config(path, ["distill.ipc=1"])
    assert (cfg.distill.ipc, cfg.distill.method, cfg.seed) == (1, "dc", 3)


def test_override_unbalanced_brackets():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["pool.archs=[ConvNet"])
    msg = str(ei.value)
    assert "pool.archs" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="pool.archs"):
        parse_override("pool.archs=[ConvNet")


def test_override_without_equals():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["noequals"])
    msg = str(ei.value)
    assert "noequals" in msg and "\n" not in msg


# --------------------------------------------------------------------------- flatten

def test_flatten():
    cfg = load_config(None, ["pool.archs=[ConvNet]", "loss.clom={ConvNet: 5}"])
    flat = flatten(cfg)
    for key in ("distill.ipc", "dataset.name", "pool.archs", "loss.clom", "seed", "model", "eval.runs"):
        assert key in flat, key
    assert flat["distill.ipc"] == 10
    assert flat["dataset.name"] == "digits"
    assert flat["pool.archs"] == ["ConvNet"]
    assert flat["loss.clom"] == {"ConvNet": 5.0}  # a weight map stays one value
    assert not [k for k, v in flat.items() if isinstance(v, dict) and k not in ("loss.clom", "loss.cclom")]
    assert not [k for k in flat if k.startswith("loss.clom.")]


def test_flatten_scalar_clom_and_defaults():
    flat = flatten(load_config(None))
    assert flat["loss.clom"] == 0.0
    assert not any(isinstance(v, dict) for v in flat.values())


# --------------------------------------------------------------------------- bad inputs

BAD = [
    ("foo: 1", "foo"),
    ("distill: {ipcc: 1}", "distill.ipcc"),
    ('distill: {ipc: "ten"}', "distill.ipc"),
    ("eval: {runs: 1.5}", "eval.runs"),
    ("seed: true", "seed"),
    ("distill: {method: xx}", "distill.method"),
    ("model: Foo", "model"),
    ("pool: {archs: [Foo]}", "pool.archs[0]"),
    ("eval: {archs: [Bar]}", "eval.archs[0]"),
    ("dataset: {name: imagenet42}", "dataset.name"),
    ('dataset: {name: "parquet:/nonexistent.parquet"}', "dataset.name"),
    ("dataset: {domain: sepia}", "dataset.domain"),
    ("distill: {ipc: 0}", "distill.ipc"),
    ("loss: {clom: -1}", "loss.clom"),
    ("loss: {clom: .nan}", "loss.clom"),
    ("loss: {clom: .inf}", "loss.clom"),
    ("loss: {clom: 5}", "loss"),
    ("pool: {epoch: 10}\npretrain: {epochs: 5}", "pool.epoch"),
    ("distill: {iterations: -1}", "distill.iterations"),
    ("distill: {dsa_strategy: color_blur}", "distill.dsa_strategy"),
    ("distill: {init: zeros}", "distill.init"),
    ("device: tpu", "device"),
]


@pytest.mark.parametrize("text, key", BAD, ids=[t.replace("\n", " ") for t, _ in BAD])
def test_bad_input_names_key(text, key):
    with pytest.raises(ConfigError) as ei:
        cfg_from(text)
    msg = str(ei.value)
    assert msg.startswith(key + ":"), msg
    assert "\n" not in msg


@pytest.mark.parametrize("text, key", BAD[:3], ids=["file-unknown", "file-nested", "file-type"])
def test_bad_input_through_file(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value).startswith(key + ":")


def test_nan_never_resolves():
    with pytest.raises(ConfigError):
        load_config(None, ["distill.lr_net=.nan"])
    with pytest.raises(ConfigError):
        load_config(None, ["distill.lr_img=.inf"])
    assert math.isfinite(load_config(None).distill.lr_net)


# --------------------------------------------------------------------------- load_yaml

def test_load_yaml_malformed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  ipc: [1,\n")
    with pytest.raises(ConfigError) as ei:
        load_yaml(path)
    msg = str(ei.value)
    assert msg.startswith("config:") and "\n" not in msg


def test_load_yaml_missing(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_yaml(tmp_path / "nope.yaml")
    assert str(ei.value).startswith("config:")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.yaml")


def test_load_yaml_top_level_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as ei:
        load_yaml(path)
    assert str(ei.value).startswith("config:")


def test_load_yaml_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError) as ei:
        load_yaml(path)
    msg = str(ei.value)
    assert msg.startswith("config:") and "\n" not in msg


def test_load_yaml_empty_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}
    assert load_config(path) == load_config(None)


def test_pool_source_mapping_inherits_the_target_but_not_its_domain():
    from ptmdd_ray.config import build_config, source_dataset

    cfg = build_config({"dataset": {"name": "digits", "im_size": 8, "train_per_class": 7, "domain": "invert"},
                        "pool": {"archs": ["MLP"], "source": {"domain": "grayscale", "classes": [1, 2]}},
                        "loss": {"clom": 0, "cclom": 1}})
    src = source_dataset(cfg)
    assert (src.name, src.im_size, src.train_per_class, src.domain, src.classes) == ("digits", 8, 7, "grayscale", [1, 2])
    by_name = build_config({"dataset": {"name": "digits", "im_size": 8, "classes": [0, 1]},
                            "pool": {"archs": ["MLP"], "source": "digits"}, "loss": {"clom": 0, "cclom": 1}})
    s2 = source_dataset(by_name)
    assert (s2.im_size, s2.classes, s2.domain) == (8, None, "none")


def test_a_pool_from_another_data_set_takes_the_targets_input_and_only_cclom(tmp_path):
    from ptmdd_ray.config import build_config, source_dataset

    cclom = {"archs": ["ConvNetW32"]}, {"clom": 0, "cclom": 1}
    fashion = build_config({"dataset": {"name": "digits"}, "pool": {**cclom[0], "source": "fashionmnist"}, "loss": cclom[1]})
    assert source_dataset(fashion).im_size == 16  # 28px Fashion-MNIST resized to the digits' 16
    digits = build_config({"dataset": {"name": "fashionmnist"}, "pool": {**cclom[0], "source": "digits"}, "loss": cclom[1]})
    assert source_dataset(digits).im_size == 28
    inverted = build_config({"dataset": {"name": "digits"}, "pool": {**cclom[0], "source": {"domain": "invert"}}})
    assert source_dataset(inverted).im_size is None and inverted.loss.clom > 0  # same labels: CLoM as usual
    with pytest.raises(ConfigError, match=r"^loss.clom: the pool's label space \(fashionmnist, classes all\) differs "
                                          r"from the target's \(digits, classes all\): use loss.cclom"):
        build_config({"dataset": {"name": "digits"}, "pool": {**cclom[0], "source": "fashionmnist"}})
    with pytest.raises(ConfigError, match=r"^loss.clom: the pool's label space \(digits, classes \[0, 1\]\)"):
        build_config({"dataset": {"name": "digits"}, "pool": {**cclom[0], "source": {"classes": [0, 1]}}})
    with pytest.raises(ConfigError, match=r"^pool.source.im_size: 20px does not match the target's 16px"):
        build_config({"dataset": {"name": "digits"}, "pool": {**cclom[0], "source": {"name": "fashionmnist", "im_size": 20}},
                      "loss": cclom[1]})
    rgb = _rgb_parquet(tmp_path / "rgb.parquet")
    with pytest.raises(ConfigError, match=r"^pool.source: fashionmnist images have 1 channel\(s\), the target's 3"):
        build_config({"dataset": {"name": f"parquet:{rgb}"}, "pool": {**cclom[0], "source": "fashionmnist"}, "loss": cclom[1]})


def _rgb_parquet(path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * c, 0, 0)).save(buf, "PNG")
        return buf.getvalue()
    rows = [(s, c) for c in range(2) for s in ("train", "train", "test")]
    pq.write_table(pa.table({"split": [s for s, _ in rows], "png": [png(c) for _, c in rows],
                             "label": pa.array([c for _, c in rows], pa.int8())}), path)
    return path


def test_anchor_paths_makes_relative_paths_absolute_and_leaves_the_rest():
    from ptmdd_ray.config import anchor_paths

    data = {"dataset": {"name": "parquet:d/x.parquet", "cache_dir": "c"}, "store": "s3://bucket/store",
            "pool": {"source": {"name": "imagefolder:/abs/imgs"}}}
    anchor_paths(data, "/base")
    assert data["dataset"] == {"name": "parquet:/base/d/x.parquet", "cache_dir": "/base/c", "root": "/base/data"}
    assert data["store"] == "s3://bucket/store" and data["pool"]["source"] == {"name": "imagefolder:/abs/imgs"}
    other = anchor_paths({"dataset": {"name": "cifar10"}, "pool": {"source": "parquet:p.parquet"}, "store": "st"}, "/b")
    assert other == {"dataset": {"name": "cifar10", "root": "/b/data"}, "pool": {"source": "parquet:/b/p.parquet"},
                     "store": "/b/st"}


# --------------------------------------------------------------------------- JSON Schema

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))


def schema_of(schema: dict, key: str) -> dict:
    """The schema of dotted ``key``, following ``$ref`` and the mapping branch of an ``anyOf``."""
    node = schema
    for part in key.split("."):
        options = node.get("anyOf", [node])
        node = next(o for o in options if "$ref" in o or "properties" in o)
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        assert part in node["properties"], f"{key}: {part!r} is not in the schema"
        node = node["properties"][part]
    return node


def keys_of(data: dict, prefix: str = "") -> list[str]:
    """Every dotted key a config mapping uses (weight maps are values, not sections)."""
    out = []
    for k, v in data.items():
        out.append(prefix + k)
        if isinstance(v, dict) and k not in ("clom", "cclom"):
            out += keys_of(v, f"{prefix}{k}.")
    return out


def test_json_schema_covers_every_dotted_key_with_its_default_and_meaning():
    schema = json.loads(json.dumps(json_schema()))  # plain JSON
    flat = flatten(to_dict(Config()))
    for key, default in flat.items():
        node = schema_of(schema, key)
        assert node.get("description"), key
        assert node["default"] == default, key
    assert schema_of(schema, "distill.method")["enum"] == ["dc", "dsa", "dm", "mtt"]
    assert None in schema_of(schema, "distill.init")["enum"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_configs_fit_the_json_schema(path):
    data = yaml.safe_load(path.read_text())
    base = data.get("base", data)
    if isinstance(base, str):
        base = yaml.safe_load((path.parent / base).read_text())
    schema = json_schema()
    for key in keys_of(base):
        schema_of(schema, key)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(base, schema, cls=jsonschema.Draft202012Validator)


def test_json_schema_rejects_unknown_keys_and_wrong_types():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    for text, _ in BAD[:5]:  # what from_dict rejects by shape alone
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(text), schema, cls=jsonschema.Draft202012Validator)


def test_checkpoint_interval_is_resolved_with_the_config():
    """``distill.checkpoint_every: 0`` means a tenth of the run, resolved when the config is built, so
    the interval a trial used is the one MLflow records."""
    assert build_config({"distill": {"iterations": 200}}).distill.checkpoint_every == 20
    assert build_config({"distill": {"iterations": 5}}).distill.checkpoint_every == 1
    assert build_config({"distill": {"iterations": 200, "checkpoint_every": 7}}).distill.checkpoint_every == 7


def test_precision_names_its_three_choices():
    assert build_config({"precision": "bf16-cpu"}).precision == "bf16-cpu"
    with pytest.raises(ConfigError, match=r"precision: expected one of bf16, bf16-cpu, fp32, got 'fp16'"):
        build_config({"precision": "fp16"})
