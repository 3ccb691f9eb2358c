"""The config schema: shipped configs load, errors name the key and the fix, docs match the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kontext.config import Config, ConfigError, config_from_dict, load_config, reference_markdown

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
    # Every key the YAML sets is really applied (nothing silently dropped).
    raw = yaml.safe_load(path.read_text())

    def check(node, obj, where):
        for k, v in node.items():
            if isinstance(v, dict):
                check(v, getattr(obj, k), f"{where}{k}.")
            else:
                got = getattr(obj, k)
                assert got == v or (isinstance(got, float) and got == float(v)), f"{where}{k}"

    check(raw, cfg, "")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_valid_yaml_with_launch_command(path: Path):
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU"}
    assert int(raw["num_processes"]) >= 2
    assert "accelerate launch --config_file configs/accelerate/" + path.name in path.read_text()


def test_contract_keys_exist_with_defaults():
    cfg = Config()
    for dotted in [
        "output_dir",
        "model.pretrained_model_name_or_path",
        "data.root",
        "lora.rank",
        "lora.alpha",
        "train.max_steps",
        "train.seed",
        "train.batch_size",
        "checkpoint.every_steps",
        "checkpoint.total_limit",
        "checkpoint.resume_from",
        "loss.geometry.enabled",
        "export.comfyui",
    ]:
        obj = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
    g = cfg.loss.geometry
    assert (g.mse, g.bg, g.dice, g.area, g.boundary) == (1.0, 0.6, 0.9, 0.2, 0.4)
    assert (g.band_r, g.w_in, g.w_band, g.w_out, g.k_sigma) == (1, 1.0, 6.0, 0.2, 2.0)


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
        ({"train": {"max_steps": 0}}, "`train.max_steps` must be >= 1"),
        ({"train": {"learning_rate": 0}}, "`train.learning_rate` must be > 0"),
        ({"loss": {"geometry": {"dice": -0.5}}}, "`loss.geometry.dice` must be >= 0.0"),
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


def test_error_names_the_file(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batchsize: 2\n")
    with pytest.raises(ConfigError, match=r"train.batch_size.*bad.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_yaml_loader_is_safe(tmp_path: Path):
    p = tmp_path / "evil.yaml"
    p.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_docs_config_reference_matches_schema():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m kontext.config > docs/config.md`"
    )
