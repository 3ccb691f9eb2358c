"""End-to-end runs of the trainer on the tiny FLUX.1 Kontext: outputs, LoRA file, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import kontext.runtime.lora_io as lora_io
from kontext.training.config import config_from_dict
from train_kontext_lora import run_training, setup, train, finish


def tiny_cfg(tmp_path: Path, model_dir: Path, data_dir: Path, **sections):
    from conftest import tiny_run_dict

    return config_from_dict(tiny_run_dict(tmp_path / "out", model_dir, data_dir, tmp_path / "cache", **sections))


def _transformer_out(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    tokens = torch.randn(1, 32, 64, generator=g)
    img_ids = torch.zeros(32, 3)
    img_ids[:, 2] = torch.arange(32)
    with torch.no_grad():
        return transformer(
            hidden_states=tokens,
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([1.0]),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
            encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
            txt_ids=torch.zeros(8, 3),
            img_ids=img_ids,
            return_dict=False,
        )[0]


def test_end_to_end_outputs_and_lora_loads(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys):
    import os
    import stat

    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_dataset_dir, export={"comfyui": True},
                   loss={"geometry": {"enabled": True}})  # every loss term in the history
    umask = os.umask(0o022)
    try:
        run = run_training(cfg)
    finally:
        os.umask(umask)
    out = Path(cfg.output_dir)
    assert run.stop_reason == "done"

    # The run ends with a summary: steps, losses, where the files are, how to go on.
    printed = capsys.readouterr().out
    summary = printed[printed.index("Training finished: 4 steps"):]
    assert "Final losses" in summary and "pytorch_lora_weights.safetensors" in summary
    assert "checkpoint.resume_from=latest" in summary and "python -m kontext.tools.evaluate" in summary
    # Both exports readable by others (safetensors alone leaves 0600).
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name

    # Resolved config with the absolute base-model path.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["pretrained_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert resolved["train"]["max_steps"] == 4

    # Checkpoints (step 2 and the final one), each complete and resumable.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ck in out.glob("checkpoint-*"):
        state = json.loads((ck / "trainer_state.json").read_text())
        assert state["lora"]["rank"] == 4
        assert (ck / "pytorch_lora_weights.safetensors").is_file()
        assert (ck / "optimizer.bin").is_file()
        assert not list(ck.glob("model*.safetensors")), "checkpoints must not hold the frozen base"

    # Losses were logged for every step and are finite.
    hist = json.loads((out / "training_history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["loss/total"])) for h in hist)
    assert all("loss/dice" in h for h in hist)

    # The LoRA file: whole LoRA config as metadata, and diffusers loads it.
    lora_file = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    # diffusers stores the config under the component prefix ("transformer.r", ...).
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    targets = meta["transformer.target_modules"]
    assert isinstance(targets, list) and "attn.to_q" in targets
    assert all(k.startswith("transformer.") for k in keys)
    assert any(".lora_B." in k for k in keys)

    pipe = FluxKontextPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = _transformer_out(pipe.transformer)
    pipe.load_lora_weights(out)
    after = _transformer_out(pipe.transformer)
    assert (after - before).abs().max() > 1e-5, "loading the trained LoRA must change the transformer's output"

    # Base weights untouched by training; LoRA B matrices moved away from their zero init.
    fresh = FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    trained = lora_io.unwrapped(run.accelerator, run.transformer)
    fresh_sd = fresh.state_dict()
    for name, p in trained.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(p.detach(), fresh_sd[key], rtol=0, atol=0)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)

    assert (out / "lora_comfyui.safetensors").is_file()
    card = (out / "README.md").read_text()
    # what was trained: the synthetic set's own prompt, not the config's default
    assert "base_model:" in card and "Prompt (every sample): `Insert the Kolo orange soda can" in card
    assert "insert the can" not in card
    assert str(Path(tiny_model_dir).resolve()) not in card and "dtype=torch.float32" in card
    assert meta["transformer.base_model_name_or_path"] == Path(tiny_model_dir).resolve().name


@pytest.mark.parametrize("on_policy", [False, True], ids=["teacher_forced", "on_policy"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_model_dir, tiny_dataset_dir, on_policy):
    """8 steps straight == 4 steps, pre-empted with a checkpoint, resumed to 8 (weights and per-step losses); also
    with the geometry terms judged on the model's own samples (their rollouts draw from the step's stream)."""
    common = dict(
        train={"max_steps": 8, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "gradient_accumulation_steps": 2},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1},
        data={"random_flip": True},
        checkpoint={"every_steps": 3, "total_limit": 5},
        loss={"geometry": {"enabled": True}, "on_policy": {"enabled": on_policy, "fraction": 0.5, "sampler_steps": 4}},
    )
    a = tiny_cfg(tmp_path / "a", tiny_model_dir, tiny_dataset_dir, **common)
    run_a = run_training(a)

    b = tiny_cfg(tmp_path / "b", tiny_model_dir, tiny_dataset_dir, **common)
    run_b1 = setup(b)
    assert train(run_b1, pause_at=5) == "paused"
    finish(run_b1, "paused")
    resumed = {**common, "checkpoint": {**common["checkpoint"], "resume_from": "latest"}}
    b2 = tiny_cfg(tmp_path / "b", tiny_model_dir, tiny_dataset_dir, **resumed)
    run_b2 = run_training(b2)
    assert run_b2.history[0]["step"] == 1 and len(run_b2.history) == 8

    loss_a = [h["loss/total"] for h in run_a.history]
    loss_b = [h["loss/total"] for h in run_b2.history]
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-7)
    lr_a = [h["lr"] for h in run_a.history]
    lr_b = [h["lr"] for h in run_b2.history]
    assert lr_a == pytest.approx(lr_b)

    from safetensors.torch import load_file

    wa = load_file(str(Path(a.output_dir) / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(Path(b2.output_dir) / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= 1e-6, diff


def test_cached_and_uncached_runs_agree_and_free_the_text_encoders(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """Both data paths build the same batches (same losses step by step); each encodes the prompts once, frees CLIP
    and T5 before training, and validation still generates from the stored prompt embeddings."""
    import kontext.runtime.flux
    import kontext.training.inputs

    calls: list[int] = []
    real = kontext.runtime.flux.encode_prompts

    def counting(pipe, prompts, *a, **k):
        calls.append(len(prompts))
        return real(pipe, prompts, *a, **k)

    monkeypatch.setattr(kontext.training.inputs, "encode_prompts", counting)
    histories = {}
    for cached in (True, False):
        calls.clear()
        # geometry on: the un-hinted scene's latents take both paths too
        cfg = tiny_cfg(tmp_path / str(cached), tiny_model_dir, tiny_dataset_dir, data={"cache_latents": cached},
                       train={"max_steps": 3}, checkpoint={"every_steps": 0}, loss={"geometry": {"enabled": True}},
                       validation={"every_steps": 0, "num_samples": 1, "num_inference_steps": 1})
        run = run_training(cfg)
        assert run.stop_reason == "done"
        assert run.pipe.text_encoder is None and run.pipe.text_encoder_2 is None
        assert list((Path(cfg.output_dir) / "validation").glob("step-*.png"))
        distinct = len({run.dataset.prompt_of(i) for i in range(len(run.dataset))})
        assert sum(calls) == distinct  # once per prompt, never per step
        histories[cached] = run.history
    for a, b in zip(histories[True], histories[False], strict=True):
        for k in ("loss/flow", "loss/geometry", "loss/total", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
