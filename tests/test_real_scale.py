"""The real-scale GPU check's set-up code (benchmarks/real_scale.py), at a reduced size on the CPU.

The GPU run itself (the full 12 B transformer at 1024 px) needs a GPU; here: the analytic FLOP count against a
hand count and against torch's own FLOP counter, the built model against the analytic layer table, one training
step through the trainer's compute_loss changing the LoRA, and the table (NF4 skipped without CUDA).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import real_scale as rs  # noqa: E402
from kontext.training.config import Config  # noqa: E402
from kontext.runtime.flux import predict_velocity  # noqa: E402
from kontext.training.optim import make_optimizer  # noqa: E402
from losses import flow_matching as fm  # noqa: E402

# 1 double + 1 single block, 2 heads x 16 = width 32, T5 width 32, CLIP width 24.
TINY = rs.Arch(double_blocks=1, single_blocks=1, heads=2, head_dim=16, joint_attention_dim=32,
               pooled_projection_dim=24, axes_dims_rope=rs.rope_axes(16))


def hand_count(batch: int, img: int, txt: int, r: int) -> tuple[float, float]:
    """Model FLOPs and checkpointing recompute of one LoRA step of TINY, written out by hand.

    Default LoRA targets: all attention projections of both block kinds, both feed-forwards, proj_mlp, the
    single block's proj_out and (by suffix) the final proj_out. Frozen base: input gradients only.
    """
    D, M, n = 32, 128, img + txt
    mm = lambda rows, a, b: 2.0 * batch * rows * a * b  # noqa: E731
    # LoRA: forward 2*rows*r*(a+b); backward dA + dB + through B (+ through A when the input needs a gradient)
    lf = lambda rows, a, b: 2.0 * batch * rows * r * (a + b)  # noqa: E731
    lb = lambda rows, a, b, ig: 2.0 * batch * rows * r * (a + 2 * b + (a if ig else 0))  # noqa: E731

    fwd = (
        2 * (mm(1, 256, D) + mm(1, D, D)) + mm(1, 24, D) + mm(1, D, D)  # timestep, guidance, pooled text
        + mm(txt, 32, D) + mm(img, 64, D)  # context_embedder, x_embedder
        + 2 * mm(1, D, 6 * D) + mm(1, D, 3 * D) + mm(1, D, 2 * D)  # AdaLN modulations
        + mm(img, D, D) * 4 + mm(img, D, M) + mm(img, M, D)  # double, image stream
        + mm(txt, D, D) * 4 + mm(txt, D, M) + mm(txt, M, D)  # double, text stream
        + mm(n, D, D) * 3 + mm(n, D, M) + mm(n, D + M, D)  # single
        + mm(img, D, 64)  # final proj_out
    )
    attn = 2 * 4.0 * batch * n * n * D  # QK^T + AV, two blocks
    # Backward input gradients: not the embedders, modulations or the first block's q/k/v.
    bwd = (mm(img, D, D) + mm(img, D, M) + mm(img, M, D) + mm(txt, D, D) + mm(txt, D, M) + mm(txt, M, D)
           + mm(n, D, D) * 3 + mm(n, D, M) + mm(n, D + M, D) + mm(img, D, 64))
    lora_double = [(img, D, D, False)] * 3 + [(txt, D, D, False)] * 3 + [
        (img, D, D, True), (txt, D, D, True), (img, D, M, True), (img, M, D, True), (txt, D, M, True), (txt, M, D, True)]
    lora_single = [(n, D, D, True)] * 3 + [(n, D, M, True), (n, D + M, D, True)]
    lora_top = [(img, D, 64, True)]
    lora_fwd = sum(lf(rows, a, b) for rows, a, b, _ in lora_double + lora_single + lora_top)
    lora_bwd = sum(lb(rows, a, b, ig) for rows, a, b, ig in lora_double + lora_single + lora_top)
    model = fwd + attn + bwd + 2 * attn + lora_fwd + lora_bwd
    blocks_fwd = (
        2 * mm(1, D, 6 * D) + mm(1, D, 3 * D)
        + 4 * mm(img, D, D) + mm(img, D, M) + mm(img, M, D) + 4 * mm(txt, D, D) + mm(txt, D, M) + mm(txt, M, D)
        + 3 * mm(n, D, D) + mm(n, D, M) + mm(n, D + M, D)
        + attn + sum(lf(rows, a, b) for rows, a, b, _ in lora_double + lora_single)
    )
    return model, blocks_fwd


def test_flop_count_equals_hand_count():
    cfg = Config()
    img, txt = rs.tokens_for(64, 8)
    assert (img, txt) == (32, 8)
    for batch in (1, 2):
        for ckpt in (False, True):
            fc = rs.count_flops(TINY, img, txt, batch, 4, cfg.lora.target_modules, checkpointing=ckpt)
            model, recompute = hand_count(batch, img, txt, 4)
            assert fc.model == pytest.approx(model, rel=1e-12)
            assert fc.recompute == pytest.approx(recompute if ckpt else 0.0, rel=1e-12)
            assert fc.hardware == pytest.approx(model + (recompute if ckpt else 0.0), rel=1e-12)


def test_real_width_model_matches_layer_table():
    """The default Arch, built by diffusers on the meta device (no memory), has the analytic table's layers."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    arch = rs.Arch()
    with init_empty_weights():
        model = FluxTransformer2DModel(**arch.diffusers_config())
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {op.name: (op.d_in, op.d_out) for op in rs.linear_ops(arch)}
    assert sum(p.numel() for p in model.parameters()) == rs.param_count(arch)
    assert sum(arch.axes_dims_rope) == arch.head_dim and rs.rope_axes(arch.head_dim) == arch.axes_dims_rope
    # The more specific device name wins over its prefix; an unknown device has no peak.
    assert rs.peak_tflops_for("NVIDIA H100 PCIe") != rs.peak_tflops_for("NVIDIA H100 80GB HBM3")
    assert rs.peak_tflops_for("cpu") is None


def test_scheduler_config_is_fluxs():
    tiny = json.loads((REPO / "kontext/tiny/tiny_flux_kontext/scheduler/scheduler_config.json").read_text())
    sched = rs.make_scheduler()
    flux = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    assert {k: sched.config[k] for k in flux} == flux == {k: tiny[k] for k in flux}
    assert sched.config.shift == 3.0 and sched.config.use_dynamic_shifting


@pytest.fixture(scope="module")
def tiny_run():
    """TINY built on the CPU in float32 with the default LoRA."""
    cfg = Config()
    model = rs.build_transformer(TINY, "cpu", torch.float32, seed=0)
    params = rs.attach_default_lora(model, cfg)
    return cfg, model, params


def test_model_matches_layer_table(tiny_run):
    cfg, model, params = tiny_run
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ".lora_" not in n and not n.endswith("base_layer")}
    # PEFT wraps the targets: their nn.Linear is the `base_layer` child.
    linears.update({n[: -len(".base_layer")]: (m.in_features, m.out_features) for n, m in model.named_modules()
                    if n.endswith(".base_layer")})
    table = {op.name: (op.d_in, op.d_out) for op in rs.linear_ops(TINY)}
    assert linears == table
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base_params == rs.param_count(TINY)
    with_lora = {n[: -len(".lora_A")] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert with_lora == {op.name for op in rs.linear_ops(TINY) if rs.lora_matches(op.name, cfg.lora.target_modules)}
    fc = rs.count_flops(TINY, 32, 8, 1, cfg.lora.rank, cfg.lora.target_modules)
    assert sum(p.numel() for p in params) == fc.lora_params
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)


def test_count_equals_torch_flop_counter(tiny_run):
    """The analytic count is what autograd really runs: torch's FLOP counter, math attention (counted as bmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model, _ = tiny_run
    batch = rs.make_batch(TINY, cfg, 64, 2, 8, "cpu", torch.float32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        v = predict_velocity(model, batch.target_latents, batch.context_latents, torch.full((2,), 0.5),
                             batch.prompt_embeds, batch.pooled_prompt_embeds, 1.0)
        v.square().mean().backward()
    model.zero_grad(set_to_none=True)
    fc = rs.count_flops(TINY, 32, 8, 2, cfg.lora.rank, cfg.lora.target_modules)
    assert counter.get_total_flops() == fc.model


def test_step_changes_lora_weights(tiny_run):
    cfg, model, params = tiny_run
    model.train()
    before = [p.detach().clone() for p in params]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_B." in n for n in names)
    batch = rs.make_batch(TINY, cfg, 64, 1, 8, "cpu", torch.float32)
    assert tuple(batch.target_latents.shape) == (1, 16, 8, 8)
    assert tuple(batch.geometry.mask.shape) == (1, 1, 8, 8) and float(batch.geometry.mask.sum()) == 16.0
    opt = make_optimizer(cfg, params)
    sched = rs.make_scheduler()
    with torch.no_grad():  # the trainer's rectified-flow step (losses.flow_matching.flow_step) on this model
        step = fm.flow_step(batch.target_latents, torch.Generator().manual_seed(0), sched)
        v = predict_velocity(model, step.x_t, batch.context_latents, step.model_timesteps, batch.prompt_embeds,
                             batch.pooled_prompt_embeds, cfg.model.guidance_scale)
        want = step.loss(v, fm.masked_flow_weight(batch.geometry.mask, cfg.loss.masked.unmasked_weight))
    loss = rs.train_step(model, params, opt, batch, cfg, torch.Generator().manual_seed(0), sched)
    assert loss == loss and abs(loss) < float("inf")
    assert cfg.loss.masked.enabled and not cfg.loss.geometry.enabled
    assert loss == pytest.approx(float(want), rel=1e-6)
    changed = {n for n, p, b in zip(names, params, before) if not torch.equal(p.detach(), b)}
    # B starts at zero (gaussian init): every B moves in the first step.
    assert {n for n in names if ".lora_B." in n} <= changed
    assert all(torch.isfinite(p).all() for p in params)


def test_table_rows_columns_and_nf4_skipped(capsys, tmp_path):
    out = tmp_path / "rs.json"
    cells = rs.main(["--reduced", "--device", "cpu", "--dtype", "float32", "--resolution", "64", "--text-tokens", "8",
                     "--steps", "1", "--warmup", "0", "--variants", "dense-ckpt", "nf4", "--in-process",
                     "--json", str(out)])
    text = capsys.readouterr().out
    header = "| " + " | ".join(rs.COLUMNS) + " |"
    assert header in text
    table = text[text.index(header):].strip().splitlines()
    assert len(table) == 2 + 2
    assert [c["variant"] for c in cells] == ["dense-ckpt", "nf4"]
    assert all(set(c) == set(rs.COLUMNS) for c in cells)
    dense, nf4 = cells
    assert dense["status"] == "ok" and dense["grad ckpt"] == "on" and float(dense["s/step"]) > 0
    reduced = rs.arch_from_args(rs.parse_args(["--reduced"]))
    expected = rs.count_flops(reduced, 32, 8, 1, Config().lora.rank, Config().lora.target_modules).model
    assert float(dense["model FLOP/step"]) == pytest.approx(expected, rel=1e-3)
    assert dense["MFU"] == "n/a"  # no peak known for a CPU
    if not torch.cuda.is_available():
        assert nf4["status"] == "skipped" and "CUDA" in nf4["note"]
        assert nf4["s/step"] == ""
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved["rows"]] == ["dense-ckpt", "nf4"]
