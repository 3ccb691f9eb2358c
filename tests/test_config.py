"""The config schema: shipped configs load, errors name the key and the fix, docs match the schema."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import typing
from pathlib import Path

import pytest
import yaml

from kontext.training.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    reference_markdown,
)
from losses import GeometryLossWeights, soft_change_mask_from_latents, weighted_masked_mse_latent

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"example_tiny.yaml", "flux_kontext_dev.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_launch_command(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    head = path.read_text().splitlines()[:12]
    assert any(f"--config configs/{path.name}" in line and line.startswith("#") for line in head)
    # Every key the YAML sets is really applied (nothing silently dropped); local paths come back absolute.
    raw = yaml.safe_load(path.read_text())
    local_paths = {"output_dir", "data.root", "data.cache_dir"}

    def check(node, obj, where):
        for k, v in node.items():
            if isinstance(v, dict):
                check(v, getattr(obj, k), f"{where}{k}.")
            elif f"{where}{k}" in local_paths:
                assert getattr(obj, k) == str((Path.cwd() / v).resolve()), f"{where}{k}"
            else:
                got = getattr(obj, k)
                assert got == v or (isinstance(got, float) and got == pytest.approx(float(v))), f"{where}{k}"

    check(raw, cfg, "")


def _leaves(node: dict, where: str = ""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{where}{k}.")
        else:
            yield f"{where}{k}", v


def _other_values(dotted: str, value):
    """Values other than ``value`` for the key, plausible for its type (the first valid one is used)."""
    _, tp = _schema_fields()[dotted]
    choices = [a for a in typing.get_args(tp) if isinstance(a, str)] if typing.get_origin(tp) is typing.Literal else []
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2 if value else 2, value - 1]
    if isinstance(value, float):
        return [value / 2, value * 2, value + 1] if value else [0.5, 1.0]
    if isinstance(value, str):
        return [c for c in choices if c != value] or [value + "-other"]
    if isinstance(value, list):
        return [value[:1] if len(value) > 1 else value + ["attn.to_q"]]
    raise AssertionError(f"{dotted}: no other value known for {value!r}")


def _set(node: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(node)
    *parents, last = dotted.split(".")
    d = out
    for part in parents:
        d = d[part]
    d[last] = value
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_a_shipped_config_sets_to_its_default_is_read(path: Path, tmp_path: Path):
    """The check above cannot see a key dropped while its value equals the default: give each such key another
    value in a copy of the file, and that value must arrive."""
    raw = yaml.safe_load(path.read_text())
    defaults = Config()
    at_default = [(k, v) for k, v in _leaves(raw) if _get(defaults, k) == v]
    assert at_default, "no key at its default: this test would check nothing"
    for dotted, value in at_default:
        errors = []
        for other in _other_values(dotted, value):
            copy_path = tmp_path / path.name
            copy_path.write_text(yaml.safe_dump(_set(raw, dotted, other)))
            try:
                cfg = load_config(copy_path)
            except ConfigError as e:  # not valid for this key; try the next value
                errors.append(str(e))
                continue
            got = _get(cfg, dotted)
            assert got == other or (isinstance(got, float) and got == pytest.approx(float(other))), (dotted, other, got)
            break
        else:
            raise AssertionError(f"{dotted}: no other valid value to try: {errors}")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_valid_yaml_with_launch_command(path: Path):
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU"}
    assert int(raw["num_processes"]) >= 2
    assert "accelerate launch --config_file configs/accelerate/" + path.name in path.read_text()


def _get(cfg, dotted):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# DESIGN.md's contract keys: (default, an override a user types, the value it must give).
CONTRACT_KEYS = {
    "output_dir": ("outputs/run", "output_dir=/tmp/kontext-run", str(Path("/tmp/kontext-run").resolve())),
    "model.pretrained_model_name_or_path": (
        "black-forest-labs/FLUX.1-Kontext-dev", "model.pretrained_model_name_or_path=tiny", "tiny"
    ),
    "data.root": ("datasets/my_object", "data.root=/tmp/kontext-data", str(Path("/tmp/kontext-data").resolve())),
    "lora.rank": (16, "lora.rank=4", 4),
    "lora.alpha": (16.0, "lora.alpha=2", 2.0),
    "train.max_steps": (1000, "train.max_steps=7", 7),
    "train.seed": (0, "train.seed=123", 123),
    "train.batch_size": (1, "train.batch_size=3", 3),
    "checkpoint.every_steps": (500, "checkpoint.every_steps=25", 25),
    "checkpoint.total_limit": (3, "checkpoint.total_limit=null", None),
    "checkpoint.resume_from": (None, "checkpoint.resume_from=latest", "latest"),
    "loss.geometry.enabled": (False, "loss.geometry.enabled=true", True),
    "export.comfyui": (False, "export.comfyui=true", True),
}


@pytest.mark.parametrize("dotted", sorted(CONTRACT_KEYS))
def test_contract_key_has_its_default_and_is_set_by_an_override(dotted):
    default, override, expected = CONTRACT_KEYS[dotted]
    assert dotted in _schema_fields()
    assert _get(Config(), dotted) == default
    got = _get(load_config(None, [override]), dotted)
    assert got == expected and type(got) is type(expected)


def test_geometry_defaults_are_the_loss_functions_defaults():
    """A default config computes what the spec's functions compute when called with their own defaults."""

    def defaults(fn, names):
        params = inspect.signature(fn).parameters
        return tuple(params[n].default for n in names)

    g = Config().loss.geometry
    assert g.loss_weights() == GeometryLossWeights()
    names = ("band_r", "w_in", "w_band", "w_out")
    assert tuple(getattr(g, n) for n in names) == defaults(weighted_masked_mse_latent, names)
    assert (g.band_r, g.k_sigma) == defaults(soft_change_mask_from_latents, ("band_r", "k_sigma"))


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(ROOT / "configs/example_tiny.yaml", ["train.max_steps=7", "loss.geometry.enabled=false",
                                                         "lora.target_modules=[attn.to_q, attn.to_k]"])
    assert cfg.train.max_steps == 7
    assert cfg.loss.geometry.enabled is False
    assert cfg.lora.target_modules == ["attn.to_q", "attn.to_k"]


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"trian": {"max_steps": 3}}, "Unknown config key `trian`. Did you mean `train`?"),
        ({"train": {"max_step": 3}}, "Did you mean `train.max_steps`?"),
        ({"train": {"max_steps": "ten"}}, "`train.max_steps` must be an integer; got str 'ten'"),
        ({"train": {"max_steps": 0}}, "`train.max_steps` must be >= 1; got 0."),
        ({"train": {"learning_rate": 0}}, "`train.learning_rate` must be > 0; got 0.0."),
        ({"loss": {"geometry": {"dice": -0.5}}}, "`loss.geometry.dice` must be >= 0; got -0.5."),
        ({"loss": {"geometry": {"enabled": "yes"}}}, "`loss.geometry.enabled` must be true or false"),
        ({"data": {"mask_hint": "fil"}}, "Did you mean 'fill'?"),
        ({"data": {"resolution": 100}}, "divisible by 16"),
        ({"lora": {"target_modules": "attn.to_q"}}, "`lora.target_modules` must be a list"),
        ({"model": "tiny"}, "`model` must be a mapping"),
    ],
)
def test_config_errors_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert fragment in str(e.value)


def test_renamed_formulation_value_names_the_key_and_the_new_name(tmp_path: Path):
    p = tmp_path / "old.yaml"
    p.write_text("loss:\n  geometry:\n    formulation: seed\n")
    fix = r"`loss\.geometry\.formulation`.*'seed' is now called 'reference': write `loss\.geometry\.formulation: reference`"
    with pytest.raises(ConfigError, match=fix + r".*old\.yaml, line 3"):
        load_config(p)
    with pytest.raises(ConfigError, match=fix):
        load_config(None, ["loss.geometry.formulation=seed"])
    assert load_config(None, ["loss.geometry.formulation=reference"]).loss.geometry.formulation == "reference"


def test_error_names_the_file(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batchsize: 2\n")
    with pytest.raises(ConfigError, match=r"train.batch_size.*\(in .*bad.yaml, line 2\)$"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_unquoted_no_is_the_string_choice_no(tmp_path: Path):
    """YAML 1.1 reads `no`/`off` as false: where a choice is spelt 'no', that is what was meant."""
    p = tmp_path / "cpu.yaml"
    p.write_text("train:\n  mixed_precision: no\n")
    cfg = load_config(p)
    assert cfg.train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=off"]).train.mixed_precision == "no"
    dump_config(cfg, tmp_path / "resolved.yaml")  # the resolved config reads back the same
    assert load_config(tmp_path / "resolved.yaml").train.mixed_precision == "no"
    # Generic over every choice list that has the words; elsewhere a boolean is still refused.
    from kontext.training.config import _coerce

    assert _coerce("k", True, typing.Literal["yes", "no", "ask"]) == "yes"
    with pytest.raises(ConfigError, match="`train.mixed_precision` must be one of"):
        load_config(None, ["train.mixed_precision=yes"])
    with pytest.raises(ConfigError, match="`data.mask_hint` must be one of"):
        load_config(None, ["data.mask_hint=no"])


def test_yaml_loader_is_safe(tmp_path: Path):
    p = tmp_path / "evil.yaml"
    p.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_docs_config_reference_matches_schema():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m kontext.training.config > docs/config.md`"
    )


# --------------------------------------------------------------------------------------------
# Numbers: any usual notation, finite, in range
# --------------------------------------------------------------------------------------------


def _schema_fields(cls=Config, prefix=""):
    """Every leaf key of the schema: dotted name -> (dataclasses.Field, annotation)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_schema_fields(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (f, tp)
    return out


def _number_kind(tp):
    """'int' / 'float' for (optional) number fields, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    return {int: "int", float: "float"}.get(args[0]) if len(args) == 1 else None


FLOAT_KEYS = sorted(k for k, (_, tp) in _schema_fields().items() if _number_kind(tp) == "float")
INT_KEYS = sorted(k for k, (_, tp) in _schema_fields().items() if _number_kind(tp) == "int")
BOUNDS = ("min", "max", "exclusive_min", "exclusive_max")


def test_schema_walk_sees_the_numbers():
    assert {"train.learning_rate", "lora.dropout", "train.adam_beta2", "loss.geometry.k_sigma"} <= set(FLOAT_KEYS)
    assert {"train.max_steps", "data.outline_width", "checkpoint.total_limit"} <= set(INT_KEYS)


def test_every_number_field_has_a_range():
    # Unbounded on purpose: any finite logit-normal mean is a valid density.
    unbounded = {"train.logit_mean"}
    missing = [k for k in FLOAT_KEYS + INT_KEYS if not any(b in _schema_fields()[k][0].metadata for b in BOUNDS)]
    assert sorted(missing) == sorted(unbounded)


def test_every_default_passes_its_own_checks():
    # config_from_dict validates only the keys it is given: give it every default.
    assert config_from_dict(config_to_dict(Config())) == Config()


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e999", "inf")])
def test_every_float_refuses_non_finite_values(key, text, shown):
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` must be a finite number; got {shown}.")):
        load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_refuses_non_finite_and_fractional_values(key):
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` must be an integer; got float nan.")):
        load_config(None, [f"{key}=.nan"])
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` must be an integer; got float 2.5.")):
        load_config(None, [f"{key}=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.adam_beta1=1.0", "`train.adam_beta1` must be >= 0 and < 1; got 1.0."),
        ("train.adam_beta2=1", "`train.adam_beta2` must be >= 0 and < 1; got 1.0."),
        ("train.adam_beta2=-0.1", "`train.adam_beta2` must be >= 0 and < 1; got -0.1."),
        ("lora.dropout=1.0", "`lora.dropout` must be >= 0 and < 1; got 1.0."),
        ("train.max_grad_norm=-1", "`train.max_grad_norm` must be >= 0; got -1.0."),
        ("train.learning_rate=0", "`train.learning_rate` must be > 0; got 0.0."),
        ("train.learning_rate=-1e-4", "`train.learning_rate` must be > 0; got -0.0001."),
        ("train.adam_epsilon=0", "`train.adam_epsilon` must be > 0; got 0.0."),
        ("lora.alpha=0", "`lora.alpha` must be > 0; got 0.0."),
        ("train.logit_std=0", "`train.logit_std` must be > 0; got 0.0."),
        ("train.mode_scale=1.8", "`train.mode_scale` must be >= -1 and <= 1.75194; got 1.8."),
        ("train.mode_scale=-1.5", "`train.mode_scale` must be >= -1 and <= 1.75194; got -1.5."),
        ("train.seed=-1", "`train.seed` must be >= 0 and <= 4294967295; got -1."),
        ("validation.seed=4294967296", "`validation.seed` must be >= 0 and <= 4294967295; got 4294967296."),
        ("model.max_sequence_length=513", "`model.max_sequence_length` must be >= 1 and <= 512; got 513."),
        ("model.guidance_scale=-1", "`model.guidance_scale` must be >= 0; got -1.0."),
        ("validation.every_steps=-2", "`validation.every_steps` must be >= -1; got -2."),
        ("data.outline_width=0", "`data.outline_width` must be >= 1; got 0."),
    ],
)
def test_out_of_range_numbers_say_the_allowed_range(override, message):
    with pytest.raises(ConfigError, match=re.escape(message) + r" \(from the command line: "):
        load_config(None, [override])


def test_range_bounds_themselves_are_accepted():
    cfg = load_config(None, [
        "train.adam_beta1=0", "train.adam_beta2=0.9999", "lora.dropout=0.999", "train.max_grad_norm=0",
        "train.seed=4294967295", "train.mode_scale=-1", "model.max_sequence_length=512", "validation.every_steps=-1",
    ])
    assert cfg.train.adam_beta1 == 0.0 and cfg.train.adam_beta2 == pytest.approx(0.9999)
    assert cfg.lora.dropout == pytest.approx(0.999) and cfg.train.max_grad_norm == 0.0
    assert cfg.train.seed == 2**32 - 1 and cfg.train.mode_scale == pytest.approx(-1.0)
    assert cfg.model.max_sequence_length == 512 and cfg.validation.every_steps == -1
    assert cfg.train.mode_scale == pytest.approx(-1.0)
    assert load_config(None, ["train.mode_scale=1.7519"]).train.mode_scale == pytest.approx(2 / (math.pi - 2), abs=1e-4)


def test_numbers_in_any_notation_from_yaml(tmp_path: Path):
    p = tmp_path / "n.yaml"
    p.write_text(
        "train:\n  learning_rate: 1e-4\n  adam_epsilon: 5E-9\n  weight_decay: .5e-2\n  max_steps: 1_000\n"
        "  lr_warmup_steps: 1e2\n  max_grad_norm: 2\n  logit_mean: -1.5E+0\nlora:\n  alpha: +3.2e1\n"
    )
    t = load_config(p).train
    assert t.learning_rate == pytest.approx(1e-4, rel=1e-12)
    assert t.adam_epsilon == pytest.approx(5e-9, rel=1e-12)
    assert t.weight_decay == pytest.approx(5e-3, rel=1e-12)
    assert t.max_steps == 1000 and type(t.max_steps) is int
    assert t.lr_warmup_steps == 100 and type(t.lr_warmup_steps) is int
    assert t.max_grad_norm == pytest.approx(2.0) and type(t.max_grad_norm) is float
    assert t.logit_mean == pytest.approx(-1.5)
    assert load_config(p).lora.alpha == pytest.approx(32.0)


def test_numbers_in_any_notation_from_the_command_line():
    cfg = load_config(None, ["train.learning_rate=1e-4", "train.adam_epsilon=5E-9", "train.max_steps=2e3",
                             "lora.alpha=1_6", "train.weight_decay=0.0001"])
    assert cfg.train.learning_rate == pytest.approx(1e-4, rel=1e-12)
    assert cfg.train.adam_epsilon == pytest.approx(5e-9, rel=1e-12)
    assert cfg.train.max_steps == 2000 and type(cfg.train.max_steps) is int
    assert cfg.lora.alpha == pytest.approx(16.0)
    assert cfg.train.weight_decay == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=1e-4x", "`train.learning_rate` must be a number; got str '1e-4x'."),
        ("train.learning_rate=e-4", "`train.learning_rate` must be a number; got str 'e-4'."),
        ("train.learning_rate=1e", "`train.learning_rate` must be a number; got str '1e'."),
        ("train.learning_rate='1e-4'", "`train.learning_rate` must be a number; got str '1e-4'."),
        ("train.learning_rate=true", "`train.learning_rate` must be a number; got bool True."),
        ("train.max_steps=yes", "`train.max_steps` must be an integer; got bool True."),
        ("train.max_steps=false", "`train.max_steps` must be an integer; got bool False."),
        ("model.revision=1234567", "`model.revision` must be a string; got int 1234567 (put it in quotes"),
    ],
)
def test_non_numbers_are_still_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_plain_yaml_safe_load_is_left_unchanged():
    # The number resolver lives on the config's own loader; other yaml.safe_load users see YAML 1.1 as before.
    assert yaml.safe_load("a: 1e-4") == {"a": "1e-4"}


# --------------------------------------------------------------------------------------------
# Duplicate keys, and errors that say where the key came from
# --------------------------------------------------------------------------------------------


def test_duplicate_top_level_key_is_refused_with_both_lines(tmp_path: Path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  max_steps: 5\nlora:\n  rank: 4\ntrain:\n  seed: 1\n")
    msg = f"Duplicate key `train` in {p}, lines 1 and 5: YAML would silently keep only the last one."
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(p)


def test_duplicate_nested_key_is_refused_with_its_dotted_name(tmp_path: Path):
    p = tmp_path / "dup.yaml"
    p.write_text("loss:\n  geometry:\n    dice: 0.5\n    area: 0.1\n    dice: 0.7\n")
    with pytest.raises(ConfigError, match=re.escape(f"Duplicate key `loss.geometry.dice` in {p}, lines 3 and 5")):
        load_config(p)
    p.write_text("train: {max_steps: 5, max_steps: 6}\n")
    with pytest.raises(ConfigError, match=re.escape(f"Duplicate key `train.max_steps` in {p}, lines 1 and 1")):
        load_config(p)


def test_duplicate_key_in_an_override_value_is_refused():
    msg = "Duplicate key `train.max_steps` in the command-line override 'train={max_steps: 1, max_steps: 2}'"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(None, ["train={max_steps: 1, max_steps: 2}"])


def test_override_typo_is_blamed_on_the_command_line_not_the_file(tmp_path: Path):
    p = tmp_path / "my.yaml"
    p.write_text("train:\n  max_steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.lerning_rate=1e-4"])
    msg = str(e.value)
    assert msg.startswith("Unknown config key `train.lerning_rate`. Did you mean `train.learning_rate`?")
    assert msg.endswith("(from the command line: train.lerning_rate=1e-4)")
    assert "my.yaml" not in msg


def test_yaml_error_names_the_file_and_line(tmp_path: Path):
    p = tmp_path / "my.yaml"
    p.write_text("output_dir: out\n\ntrain:\n  max_steps: 5\n  adam_beta2: 1.0\n")
    msg = f"`train.adam_beta2` must be >= 0 and < 1; got 1.0. (in {p}, line 5)"
    with pytest.raises(ConfigError, match=re.escape(msg) + "$"):
        load_config(p, ["train.seed=3"])  # an unrelated override does not take the blame


def test_override_that_replaces_a_yaml_value_takes_the_blame(tmp_path: Path):
    p = tmp_path / "my.yaml"
    p.write_text("train:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=re.escape("got 0. (from the command line: train.max_steps=0)")):
        load_config(p, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=re.escape("got 0. (from the command line: train={max_steps: 0})")):
        load_config(p, ["train={max_steps: 0}"])


def test_list_item_error_names_the_line_of_its_list(tmp_path: Path):
    p = tmp_path / "my.yaml"
    p.write_text("lora:\n  rank: 4\n  target_modules:\n    - attn.to_q\n    - 3\n")
    msg = ("`lora.target_modules[1]` must be a string; got int 3 (put it in quotes to make it a string). "
           f"(in {p}, line 3)")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(p)


def test_cross_field_error_names_where_each_key_was_set(tmp_path: Path):
    p = tmp_path / "my.yaml"
    p.write_text("data:\n  source: hf\n  root: org/set\n")
    msg = ("`data.synthetic.enabled` writes a folder dataset; it cannot be used with `data.source: hf`. "
           f"(from the command line: data.synthetic.enabled=true; in {p}, line 2)")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(p, ["data.synthetic.enabled=true"])
    # A key left at its default is not blamed on the file.
    with pytest.raises(ConfigError, match=re.escape("`data.cache_latents: false` or `data.random_crop: false`. "
                                                    "(from the command line: data.random_crop=true)")):
        load_config(p, ["data.random_crop=true"])
    assert load_config(p, ["data.random_crop=true", "data.cache_latents=false"]).data.random_crop is True


def test_empty_paths_are_refused():
    with pytest.raises(ConfigError, match=re.escape("`output_dir` must not be empty; name a path or id.")):
        load_config(None, ["output_dir="])
    with pytest.raises(ConfigError, match=re.escape("`data.root` must not be empty; name a path or id.")):
        config_from_dict({"data": {"root": "  "}})


# --------------------------------------------------------------------------------------------
# The resolved config records absolute paths
# --------------------------------------------------------------------------------------------


def test_local_paths_are_recorded_absolute_and_work_from_another_folder(tmp_path: Path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "ckpts" / "checkpoint-5").mkdir(parents=True)
    (work / "my.yaml").write_text(
        "output_dir: runs/a\nmodel:\n  pretrained_model_name_or_path: tiny\n"
        "data:\n  root: ../datasets/bottle\n  cache_dir: cache\n"
    )
    monkeypatch.chdir(work)
    cfg = load_config("my.yaml", ["checkpoint.resume_from=ckpts/checkpoint-5"])
    assert cfg.output_dir == str((work / "runs" / "a").resolve())
    assert cfg.data.root == str((tmp_path / "datasets" / "bottle").resolve())  # need not exist yet
    assert cfg.data.cache_dir == str((work / "cache").resolve())
    assert cfg.checkpoint.resume_from == str((work / "ckpts" / "checkpoint-5").resolve())
    assert cfg.model.pretrained_model_name_or_path == "tiny"
    dump_config(cfg, work / "config.yaml")
    monkeypatch.chdir(elsewhere)
    again = load_config(work / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_hub_ids_and_latest_are_left_alone(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.source=hf", "data.root=your-org/red-bottle", "checkpoint.resume_from=latest"])
    assert cfg.data.root == "your-org/red-bottle"
    assert cfg.checkpoint.resume_from == "latest"
    assert cfg.data.cache_dir is None
    (tmp_path / "local_set").mkdir()
    cfg = load_config(None, ["data.source=hf", "data.root=local_set"])
    assert cfg.data.root == str((tmp_path / "local_set").resolve())


def test_home_folder_paths_are_expanded(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_dir=~/runs/b", "data.cache_dir=~/cache"])
    assert cfg.output_dir == str((tmp_path / "runs" / "b").resolve())
    assert cfg.data.cache_dir == str((tmp_path / "cache").resolve())
