"""Memory options: quantized base and 8-bit optimiser (configuration code on the CPU, loading on CUDA only), gradient checkpointing."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from kontext.runtime.quantization import QUANTIZATION_MODES, QuantizationUnavailable, bnb_kwargs, check_available

HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _bnb_config(mode: str, monkeypatch: pytest.MonkeyPatch):
    """What diffusers makes of ``bnb_kwargs(mode, bf16)``; without bitsandbytes installed, its 4-bit version check
    is told a supported version (the config object itself needs no kernels)."""
    import importlib.metadata

    from diffusers import BitsAndBytesConfig

    if not HAS_BNB:
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.0" if name == "bitsandbytes" else real(name))
    return BitsAndBytesConfig(**bnb_kwargs(mode, torch.bfloat16))


def test_nf4_config_is_double_quantized_nf4_computing_in_the_weight_dtype(monkeypatch):
    cfg = _bnb_config("nf4", monkeypatch)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.quantization_method() == "nf4"
    # Computing in the base's dtype (not bnb's float32 default), and the quantization constants quantized too.
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.to_dict()["bnb_4bit_use_double_quant"] is True
    assert bnb_kwargs("nf4", torch.float16)["bnb_4bit_compute_dtype"] == torch.float16


def test_int8_config_builds_without_a_gpu(monkeypatch):
    # diffusers checks the bitsandbytes version only for 4-bit, so the 8-bit config builds anywhere.
    cfg = _bnb_config("int8", monkeypatch)
    assert cfg.load_in_8bit and not cfg.load_in_4bit
    assert cfg.quantization_method() == "llm_int8"


def test_kwargs_are_bitsandbytes_config_parameters():
    # BitsAndBytesConfig takes **kwargs: a misspelt key would be kept as an attribute and silently ignored.
    from diffusers import BitsAndBytesConfig

    accepted = set(inspect.signature(BitsAndBytesConfig.__init__).parameters)
    for mode in ("nf4", "int8"):
        assert set(bnb_kwargs(mode, torch.bfloat16)) <= accepted


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match=r"model\.quantization.*'fp4'"):
        bnb_kwargs("fp4", torch.bfloat16)
    assert QUANTIZATION_MODES == ("none", "nf4", "int8")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised on a machine without CUDA")
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_without_cuda_the_error_names_the_fix(mode):
    with pytest.raises(QuantizationUnavailable, match=r"needs a CUDA GPU.*model\.quantization=none"):
        check_available(mode)


@pytest.mark.skipif(HAS_CUDA, reason="checks the errors raised on a machine without CUDA")
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model": {"quantization": "nf4"}}, r"model\.quantization=none"),
        ({"train": {"optimizer": "adamw8bit"}}, r"adamw8bit.*CUDA.*adamw"),
    ],
)
def test_trainer_refuses_gpu_only_options_before_loading(tmp_path, override, message):
    from kontext.training.config import config_from_dict
    from train_kontext_lora import UserError, setup

    base = {
        "output_dir": str(tmp_path / "out"),
        "model": {"pretrained_model_name_or_path": str(tmp_path / "no_model_here")},
        "data": {"root": str(tmp_path / "no_data_here")},
        "logging": {"report_to": "none"},
    }
    for section, values in override.items():
        base.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=message):
        setup(config_from_dict(base))
    # Nothing was written: the check runs before the output folder is created.
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes: pip install -e '.[quantization]'")
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bitsandbytes kernels); none on this machine")
def test_nf4_transformer_loads_and_trains_lora_on_cuda(tiny_model_dir):
    """The NF4 base runs forward and backward: the LoRA gets finite gradients, an update lowers the loss on the
    batch it was computed on, and the 4-bit base weights stay frozen and unchanged."""
    from kontext.runtime.flux import predict_velocity
    from kontext.runtime.lora import attach_lora, make_lora_config
    from kontext.runtime.quantization import quantized_transformer

    tr = quantized_transformer(str(tiny_model_dir), "nf4", torch.bfloat16, {})
    quantized = [m for m in tr.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized
    params = attach_lora(tr, make_lora_config(4, 4, 0.0, "gaussian", ["to_q", "to_k", "to_v"]))
    assert params and all(p.dtype == torch.float32 for p in params)
    # Loaded onto the GPU by the quantizer (the trainer does not move a quantized base); the LoRA follows it.
    device = params[0].device
    assert device.type == "cuda" and all(p.device == device for p in params)
    base_before = [m.weight.detach().clone() for m in quantized]

    g = torch.Generator().manual_seed(0)
    c = tr.config
    x_t = torch.randn(2, 16, 8, 8, generator=g).to(device, torch.bfloat16)
    ctx = torch.randn(2, 16, 8, 8, generator=g).to(device, torch.bfloat16)
    target = torch.randn(2, 16, 8, 8, generator=g).to(device)
    prompt = torch.randn(2, 8, c.joint_attention_dim, generator=g).to(device, torch.bfloat16)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g).to(device, torch.bfloat16)
    t = torch.full((2,), 0.5, device=device)

    def loss() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = predict_velocity(tr, x_t, ctx, t, prompt, pooled, 1.0)
        return (v.float() - target).square().mean()

    opt = torch.optim.AdamW(params, lr=1e-2)
    first = loss()
    first.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
    assert all(not m.weight.requires_grad for m in quantized)
    opt.step()
    with torch.no_grad():
        assert float(loss()) < float(first)
    assert all(torch.equal(b, m.weight) for b, m in zip(base_before, quantized))


# ---------------------------------------------------------------- other memory options of the trainer


def _loss_and_lora_grads(tmp_path, model_dir, data_dir, checkpointing: bool):
    from tests.test_train_e2e import tiny_cfg
    from train_kontext_lora import _step_generator, compute_loss, setup

    cfg = tiny_cfg(tmp_path / f"gc{int(checkpointing)}", model_dir, data_dir, model={"gradient_checkpointing": checkpointing})
    run = setup(cfg)
    assert run.transformer.is_gradient_checkpointing == checkpointing
    batch = next(run.batches())
    torch.manual_seed(0)
    loss, _ = compute_loss(
        run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale, _step_generator(run, 0, 0),
        run.train_scheduler,
    )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in run.transformer.named_parameters() if p.requires_grad}
    # The trainable parameters are exactly the run's LoRA parameters (by identity, not by order).
    assert {id(p) for n, p in run.transformer.named_parameters() if p.requires_grad} == {id(p) for p in run.lora_params}
    assert grads and all("lora_" in n for n in grads)
    return float(loss.detach()), grads


def test_gradient_checkpointing_gives_the_same_lora_gradients(tmp_path, tiny_model_dir, tiny_dataset_dir):
    # Recomputing activations in backward must not change the loss or any LoRA gradient (the frozen
    # base means block inputs need no grad; a re-entrant checkpoint would silently drop them).
    loss_a, grads_a = _loss_and_lora_grads(tmp_path, tiny_model_dir, tiny_dataset_dir, checkpointing=False)
    loss_b, grads_b = _loss_and_lora_grads(tmp_path, tiny_model_dir, tiny_dataset_dir, checkpointing=True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert any(g.abs().sum() > 0 for g in grads_b.values())
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, msg=k)
