"""Real-scale GPU check: one LoRA training step of the full-size FLUX.1 Kontext transformer, random weights.

Run (one CUDA GPU; about 3-4 minutes on an H200, never more than ``--time-budget``):

    python benchmarks/real_scale.py --resolution 1024 --steps 3 --warmup 2

and on a CPU, at a reduced size (what tests/test_real_scale.py runs):

    python benchmarks/real_scale.py --reduced --device cpu --dtype float32 --resolution 64 --steps 1 --warmup 0 --in-process

What it does, per variant (``dense``, ``dense-ckpt``, ``nf4``, ``nf4-ckpt``; ``--variants``):

1. Builds diffusers' ``FluxTransformer2DModel`` with FLUX.1 Kontext [dev]'s configuration (19 double + 38 single
   blocks, 24 heads x 128, joint_attention_dim 4096, pooled_projection_dim 768, in_channels 64, guidance
   embedding, rope axes (16, 56, 56); 11.9 B parameters) on the ``meta`` device, then materialises every
   parameter directly on the device in the base dtype with a cheap random init (no download, no second copy:
   compute and memory do not depend on the values). ``nf4`` first swaps every ``nn.Linear`` for a
   bitsandbytes ``Linear4bit`` exactly as ``diffusers``' ``BitsAndBytesConfig`` loading does (the settings come
   from ``kontext.runtime.quantization.bnb_kwargs``), then quantises each random bf16 weight as it is made, so
   the bf16 model never exists in full.
2. Attaches the project's default LoRA (``kontext.runtime.lora.attach_lora`` with ``lora.rank/alpha/dropout/
   init/target_modules`` of the config: ``Config()`` defaults, or ``--config``/``--set``), turns gradient
   checkpointing on for the ``-ckpt`` variants (``transformer.enable_gradient_checkpointing()``, as the trainer).
3. Builds a ``data.dataset.TrainBatch`` at ``--resolution`` (target, context and scene latents ``[B, 16, R/8,
   R/8]``, T5 embeddings ``[B, 512, 4096]``, pooled ``[B, 768]``, mask targets from ``losses.compute_mask_targets``
   on a centred rectangle mask, as ``data/dataset.py`` builds them) and trains with the trainer's own
   ``train_kontext_lora.compute_loss`` (its rectified-flow step ``losses.flow_matching.flow_step`` on FLUX's
   ``FlowMatchEulerDiscreteScheduler``), under bf16 autocast as the real-model template
   (``train.mixed_precision: bf16``), then ``backward``, gradient clipping at ``train.max_grad_norm`` and the
   trainer's optimiser on the LoRA parameters (``kontext.training.optim.make_optimizer``: ``train.optimizer``).
4. Reports the median seconds per step after ``--warmup`` steps, model FLOP utilisation (MFU) against the
   device's dense bf16 peak (``PEAK_TFLOPS``, or ``--peak-tflops``), the memory the weights take and the peak
   CUDA memory of the steps (``torch.cuda.max_memory_allocated``). An OOM, an error or a time-out in one variant
   becomes a row of the table; each variant runs in its own process (``--in-process`` to run them in this one)
   so that its memory is freed and a hung variant can be killed at its time limit.

How the FLOPs are counted (:func:`count_flops`; analytic, from the config; one multiply-add = 2 FLOP):

* Forward: every ``nn.Linear`` of the transformer, 2 * rows * d_in * d_out, over the rows it really sees:
  the double blocks' image-stream projections over the image tokens (target + context), their text-stream
  projections over the text tokens, the single blocks over all tokens, ``x_embedder`` and the final ``proj_out``
  over the image tokens, ``context_embedder`` over the text tokens, and the timestep/guidance/pooled-text
  embedders and every AdaLN modulation linear once per sample. Attention: QK^T and AV, 2 * 2 * N^2 * heads *
  head_dim per block over the joint sequence N = text + image tokens. Norms, rope, activations, the loss and the
  optimizer are elementwise and not counted.
* Backward of the frozen base: no weight gradients, only input gradients, i.e. 1x the forward of each linear
  whose input depends on a trainable parameter (every linear from the first double block's attention output on;
  not the embedders, not the modulation linears of the per-sample time embedding, not the first block's q/k/v
  projections), and 2x the forward of attention (dQ, dK, dV, dP: four N^2 matmuls) in every block it reaches.
* LoRA (rank r on a d_in -> d_out linear): forward 2 * rows * r * (d_in + d_out); backward its two weight
  gradients plus the gradient through B, and through A where the input needs one: about 2x its forward.
  About 1% of the total at rank 16.
* Model FLOPs = forward + backward; MFU = model FLOPs / (s/step * peak). Gradient checkpointing recomputes every
  block's forward in backward: counted apart (``recompute``) and only in the hardware utilisation (HFU), as is
  usual. Fused attention kernels also recompute QK^T in backward; not counted either.
* Checked: at a reduced size the count equals, to the FLOP, what ``torch.utils.flop_counter`` measures for the
  forward and backward, with and without checkpointing (tests/test_real_scale.py). FLUX.1 Kontext, 1024 px,
  batch 1, rank 16: 3.86e14 model FLOP per step (+1.66e14 recomputed with checkpointing).

The usual "6 * parameters * tokens" (6.3e14 for 12 B parameters and 4096 + 4096 + 512 tokens) overcounts this
step: it assumes weight gradients (here frozen), every parameter applied to every token (the double blocks'
image and text weights each see only their own stream's tokens, and the 3.2 B AdaLN modulation parameters act
once per sample, not per token), and it leaves attention out. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GIB = 2**30

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first. --peak-tflops overrides.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
]

VARIANTS: dict[str, tuple[str, bool]] = {  # name -> (base, gradient checkpointing)
    "dense": ("dense", False),
    "dense-ckpt": ("dense", True),
    "nf4": ("nf4", False),
    "nf4-ckpt": ("nf4", True),
}

COLUMNS = [
    "variant",
    "base",
    "grad ckpt",
    "status",
    "s/step",
    "model FLOP/step",
    "TFLOP/s",
    "MFU",
    "HFU",
    "weights GiB",
    "peak GiB",
    "note",
]


# ---------------------------------------------------------------------------------------------
# Architecture and the analytic FLOP count
# ---------------------------------------------------------------------------------------------


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rope axes summing to ``head_dim``, each even: (16, 56, 56) for 128, as FLUX.1."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and at least 6; got {head_dim}")
    first = 2 * max(1, round(head_dim / 16))
    rest = head_dim - first
    second = 2 * ((rest // 2) // 2)
    return first, second, rest - second


@dataclass(frozen=True)
class Arch:
    """The ``FluxTransformer2DModel`` configuration (defaults: FLUX.1 Kontext [dev])."""

    double_blocks: int = 19
    single_blocks: int = 38
    heads: int = 24
    head_dim: int = 128
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    in_channels: int = 64
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    MLP_RATIO = 4  # diffusers' FeedForward (mult 4) and FluxSingleTransformerBlock (mlp_ratio 4.0)
    TIME_PROJ_DIM = 256  # diffusers' Timesteps(num_channels=256) before the timestep / guidance embedders

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def diffusers_config(self) -> dict[str, Any]:
        return {
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": None,
            "num_layers": self.double_blocks,
            "num_single_layers": self.single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": tuple(self.axes_dims_rope),
        }


REDUCED = dict(double_blocks=1, single_blocks=1, heads=2, head_dim=16, joint_attention_dim=32, pooled_projection_dim=32)


@dataclass(frozen=True)
class LinearOp:
    """One ``nn.Linear`` of the transformer: its module name, shape and how many rows it sees per sample."""

    name: str
    d_in: int
    d_out: int
    rows: int


def transformer_groups(arch: Arch, image_tokens: int, text_tokens: int) -> list[tuple[str, Any, bool]]:
    """The transformer's matmul work in execution order: ``(kind, payload, in_block)``.

    kind ``temb`` / ``input`` / ``mod`` / ``proj``: payload = list of :class:`LinearOp` run side by side;
    kind ``attention``: payload = (module prefix, joint sequence length). ``in_block``: inside a transformer
    block (recomputed under gradient checkpointing).
    """
    d, i_tok, t_tok = arch.width, image_tokens, text_tokens
    n = i_tok + t_tok
    mlp = arch.MLP_RATIO * d
    groups: list[tuple[str, Any, bool]] = []
    temb = [LinearOp("time_text_embed.timestep_embedder.linear_1", arch.TIME_PROJ_DIM, d, 1),
            LinearOp("time_text_embed.timestep_embedder.linear_2", d, d, 1)]
    if arch.guidance_embeds:
        temb += [LinearOp("time_text_embed.guidance_embedder.linear_1", arch.TIME_PROJ_DIM, d, 1),
                 LinearOp("time_text_embed.guidance_embedder.linear_2", d, d, 1)]
    temb += [LinearOp("time_text_embed.text_embedder.linear_1", arch.pooled_projection_dim, d, 1),
             LinearOp("time_text_embed.text_embedder.linear_2", d, d, 1)]
    groups.append(("temb", temb, False))
    groups.append(("input", [LinearOp("context_embedder", arch.joint_attention_dim, d, t_tok),
                             LinearOp("x_embedder", arch.in_channels, d, i_tok)], False))
    for b in range(arch.double_blocks):
        p = f"transformer_blocks.{b}."
        groups.append(("mod", [LinearOp(p + "norm1.linear", d, 6 * d, 1),
                               LinearOp(p + "norm1_context.linear", d, 6 * d, 1)], True))
        groups.append(("proj", [LinearOp(p + f"attn.to_{x}", d, d, i_tok) for x in "qkv"]
                       + [LinearOp(p + f"attn.add_{x}_proj", d, d, t_tok) for x in "qkv"], True))
        groups.append(("attention", (p + "attn", n), True))
        groups.append(("proj", [LinearOp(p + "attn.to_out.0", d, d, i_tok),
                                LinearOp(p + "attn.to_add_out", d, d, t_tok)], True))
        groups.append(("proj", [LinearOp(p + "ff.net.0.proj", d, mlp, i_tok),
                                LinearOp(p + "ff_context.net.0.proj", d, mlp, t_tok)], True))
        groups.append(("proj", [LinearOp(p + "ff.net.2", mlp, d, i_tok),
                                LinearOp(p + "ff_context.net.2", mlp, d, t_tok)], True))
    for b in range(arch.single_blocks):
        p = f"single_transformer_blocks.{b}."
        groups.append(("mod", [LinearOp(p + "norm.linear", d, 3 * d, 1)], True))
        groups.append(("proj", [LinearOp(p + "proj_mlp", d, mlp, n)]
                       + [LinearOp(p + f"attn.to_{x}", d, d, n) for x in "qkv"], True))
        groups.append(("attention", (p + "attn", n), True))
        groups.append(("proj", [LinearOp(p + "proj_out", d + mlp, d, n)], True))
    groups.append(("mod", [LinearOp("norm_out.linear", d, 2 * d, 1)], False))
    groups.append(("proj", [LinearOp("proj_out", d, arch.in_channels, i_tok)], False))
    return groups


def linear_ops(arch: Arch, image_tokens: int = 1, text_tokens: int = 1) -> list[LinearOp]:
    """Every ``nn.Linear`` of the transformer (name, shape, rows per sample)."""
    return [op for kind, ops, _ in transformer_groups(arch, image_tokens, text_tokens) if kind != "attention" for op in ops]


def param_count(arch: Arch) -> int:
    """Parameters of the transformer: every linear's weight and bias plus the q/k RMSNorm weights."""
    linears = sum(op.d_in * op.d_out + op.d_out for op in linear_ops(arch))
    norms = arch.double_blocks * 4 * arch.head_dim + arch.single_blocks * 2 * arch.head_dim
    return linears + norms


def lora_matches(name: str, target_modules: list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule for a list of ``target_modules``: the module name equals one or ends with ``"." + it``."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


@dataclass
class FlopCount:
    """FLOPs of one training step (see the module docstring for the rules)."""

    forward_linear: float = 0.0
    forward_attention: float = 0.0
    backward_linear: float = 0.0
    backward_attention: float = 0.0
    lora_forward: float = 0.0
    lora_backward: float = 0.0
    recompute: float = 0.0  # gradient checkpointing: the blocks' forward again (not in model FLOPs)
    lora_params: int = 0
    tokens: int = 0  # per sample, text + image

    @property
    def forward(self) -> float:
        return self.forward_linear + self.forward_attention + self.lora_forward

    @property
    def backward(self) -> float:
        return self.backward_linear + self.backward_attention + self.lora_backward

    @property
    def model(self) -> float:
        """Model FLOPs per step (what MFU divides by the peak)."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        """Model FLOPs plus the recomputation of gradient checkpointing (for HFU)."""
        return self.model + self.recompute


def count_flops(
    arch: Arch,
    image_tokens: int,
    text_tokens: int,
    batch: int = 1,
    lora_rank: int = 16,
    lora_targets: list[str] | tuple[str, ...] = (),
    checkpointing: bool = False,
) -> FlopCount:
    """Analytic FLOPs of one LoRA training step (forward, backward of a frozen base, LoRA, recompute).

    Gradient flow: a linear's input needs a gradient when it depends on a trainable (LoRA) parameter upstream;
    the per-sample time embedding depends on one only if its own linears carry a LoRA.
    """
    fc = FlopCount(tokens=image_tokens + text_tokens)
    b, r, hd = batch, lora_rank, arch.heads * arch.head_dim
    temb_grad = False  # the time embedding (and so every modulation) depends on a trainable parameter
    stream_grad = False  # the token streams depend on a trainable parameter
    for kind, payload, in_block in transformer_groups(arch, image_tokens, text_tokens):
        if kind == "attention":
            _, n = payload
            fwd = 4.0 * b * n * n * hd  # QK^T and AV
            fc.forward_attention += fwd
            if stream_grad:
                fc.backward_attention += 2.0 * fwd
            if in_block and checkpointing:
                fc.recompute += fwd
            continue
        in_grad = {"temb": False, "input": False, "mod": temb_grad, "proj": stream_grad}[kind]
        trainable = False
        for op in payload:
            base = 2.0 * b * op.rows * op.d_in * op.d_out
            fc.forward_linear += base
            if in_grad:
                fc.backward_linear += base  # input gradient only: the base is frozen
            fwd = 0.0
            if lora_matches(op.name, lora_targets):
                trainable = True
                fc.lora_params += r * (op.d_in + op.d_out)
                fwd = 2.0 * b * op.rows * r * (op.d_in + op.d_out)
                fc.lora_forward += fwd
                # dB, dA and the gradient through B; the gradient through A only if the input needs one.
                fc.lora_backward += 2.0 * b * op.rows * r * (op.d_in + 2 * op.d_out + (op.d_in if in_grad else 0))
            if in_block and checkpointing:
                fc.recompute += base + fwd
        if kind == "temb":
            temb_grad = trainable
        elif kind == "mod":
            stream_grad = stream_grad or temb_grad or trainable
        else:
            stream_grad = stream_grad or trainable
    return fc


def tokens_for(resolution: int, text_tokens: int) -> tuple[int, int]:
    """(image tokens, text tokens) per sample: target + same-size context after the VAE's /8 and 2x2 packing."""
    if resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16; got {resolution}")
    return 2 * (resolution // 16) ** 2, text_tokens


def peak_tflops_for(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Set-up: model, LoRA, batch, step
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _init_(t: torch.Tensor, name: str) -> torch.Tensor:
    """Cheap random init in place: weights N(0, 1/fan_in) (variance preserving), biases 0, norm scales 1."""
    with torch.no_grad():
        if t.ndim >= 2:
            t.normal_(0.0, t.shape[1] ** -0.5)
        elif name == "bias":
            t.zero_()
        else:
            t.fill_(1.0)
    return t


def build_transformer(
    arch: Arch, device: torch.device | str, dtype: torch.dtype, quantization: str = "none", seed: int = 0
) -> torch.nn.Module:
    """``FluxTransformer2DModel`` of ``arch`` with random weights, built on ``meta`` and materialised on ``device``.

    ``quantization="nf4"``: every ``nn.Linear`` becomes a bitsandbytes ``Linear4bit`` as diffusers'
    ``BitsAndBytesConfig`` loading makes it (no module skipped, as for FLUX), each weight quantised from a random
    ``dtype`` tensor on ``device`` as it is made (needs CUDA and bitsandbytes: ``check_available`` says so first).
    """
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    bnb = None
    with default_dtype(dtype):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**arch.diffusers_config())
        if quantization != "none":
            from kontext.runtime.quantization import bnb_kwargs, check_available

            check_available(quantization)
            if quantization != "nf4":
                raise ValueError(f"only nf4 is benchmarked here; got {quantization!r}")
            import bitsandbytes as bnb
            from diffusers import BitsAndBytesConfig
            from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

            model = replace_with_bnb_linear(
                model, modules_to_not_convert=[], quantization_config=BitsAndBytesConfig(**bnb_kwargs(quantization, dtype))
            )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    cuda_state = None
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device)
        torch.cuda.manual_seed(seed)
    try:
        for module in model.modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                if bnb is not None and isinstance(p, bnb.nn.Params4bit):
                    w = _init_(torch.empty(tuple(p.shape), device=device, dtype=dtype), "weight")
                    # As diffusers' bnb quantizer (create_quantized_param): .to(device) quantises.
                    module._parameters[pname] = bnb.nn.Params4bit(w, requires_grad=False, **p.__dict__).to(device)
                    del w
                else:
                    pdtype = dtype if p.dtype.is_floating_point else p.dtype
                    t = _init_(torch.empty(tuple(p.shape), device=device, dtype=pdtype), pname)
                    module._parameters[pname] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            for bname, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    raise RuntimeError(f"buffer {bname} of {type(module).__name__} cannot be materialised randomly")
    finally:
        torch.random.set_rng_state(gen_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    return model


def attach_default_lora(transformer: torch.nn.Module, cfg: Any) -> list[torch.nn.Parameter]:
    """The project's LoRA with the config's ``lora.*`` (seeded by ``train.seed``, as the trainer)."""
    from kontext.runtime.lora import attach_lora, make_lora_config

    lora_cfg = cfg.lora
    torch.manual_seed(cfg.train.seed)
    return attach_lora(
        transformer,
        make_lora_config(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.init, lora_cfg.target_modules),
    )


def make_scheduler() -> Any:
    """FLUX.1's ``FlowMatchEulerDiscreteScheduler`` (shift 3, dynamic shift 0.5-1.15 over 256-4096 tokens), read
    from the committed tiny model's ``scheduler_config.json``, which is FLUX.1 Kontext [dev]'s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from kontext.tiny.model import COMMITTED_DIR

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(COMMITTED_DIR), subfolder="scheduler")


def make_batch(
    arch: Arch,
    cfg: Any,
    resolution: int,
    batch_size: int,
    text_tokens: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
) -> Any:
    """A random ``TrainBatch`` at ``resolution`` px with a centred rectangle mask (geometry as data/dataset.py)."""
    from data.dataset import TrainBatch
    from losses import compute_mask_targets

    g = torch.Generator().manual_seed(seed)
    h = w = resolution // 8

    def lat() -> torch.Tensor:
        return torch.randn(batch_size, 16, h, w, generator=g)

    mask_px = torch.zeros(batch_size, 1, resolution, resolution)
    q = resolution // 4
    mask_px[..., q : resolution - q, q : resolution - q] = 1.0
    geometry = cfg.loss.geometry
    targets = compute_mask_targets(mask_px, (h, w), geometry.band_r, geometry.sdm_normalize)
    batch = TrainBatch(
        target_latents=lat(),
        context_latents=lat(),
        scene_latents=lat(),
        prompt_embeds=torch.randn(batch_size, text_tokens, arch.joint_attention_dim, generator=g),
        pooled_prompt_embeds=torch.randn(batch_size, arch.pooled_projection_dim, generator=g),
        geometry=targets,
        names=[f"random-{i}" for i in range(batch_size)],
        prompts=["random"] * batch_size,
    )
    return batch.to(device, dtype)


def train_step(
    transformer: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batch: Any,
    cfg: Any,
    generator: torch.Generator,
    train_scheduler: Any,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One update through the trainer's ``compute_loss`` (and so :func:`losses.flow_matching.flow_step`); returns the
    loss (a host sync)."""
    from train_kontext_lora import compute_loss

    device_type = batch.target_latents.device.type
    optimizer.zero_grad(set_to_none=True)
    ctx = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx:
        loss, _ = compute_loss(transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale, generator, train_scheduler)
    loss.backward()
    if cfg.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# One variant
# ---------------------------------------------------------------------------------------------


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(spec: dict[str, Any], variant: str, time_limit: float) -> dict[str, Any]:
    """Build, attach, train ``warmup + steps`` updates; a result row (never raises for OOM or a missing feature)."""
    from kontext.runtime.quantization import QuantizationUnavailable, check_available
    from kontext.training.optim import make_optimizer

    t_start = time.perf_counter()
    base, ckpt = VARIANTS[variant]
    cfg = load_cfg(spec)
    arch = Arch(**spec["arch"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    row: dict[str, Any] = {"variant": variant, "base": spec["dtype"] if base == "dense" else f"nf4 ({spec['dtype']} compute)",
                           "grad ckpt": "on" if ckpt else "off", "step_times": [], "note": ""}
    quant = "none" if base == "dense" else base
    try:
        check_available(quant)
    except QuantizationUnavailable as e:
        row["status"] = "skipped"
        row["note"] = str(e)
        return row
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    stage = "build"
    transformer = params = optimizer = batch = None
    try:
        transformer = build_transformer(arch, device, dtype, quant, seed=cfg.train.seed)
        params = attach_default_lora(transformer, cfg)
        if ckpt:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        batch = make_batch(arch, cfg, spec["resolution"], spec["batch_size"], spec["text_tokens"], device, dtype, cfg.train.seed)
        optimizer = make_optimizer(cfg, params)
        scheduler = make_scheduler()
        _sync(device)
        row["build_s"] = time.perf_counter() - t_start
        row["lora_params"] = sum(p.numel() for p in params)
        if cuda:
            row["weights GiB"] = torch.cuda.memory_allocated(device) / GIB
            torch.cuda.reset_peak_memory_stats(device)
        print(f"[{variant}] built in {row['build_s']:.1f} s ({row['lora_params'] / 1e6:.1f} M LoRA parameters)", flush=True)
        autocast = torch.bfloat16 if (cuda and spec["mixed_precision"] == "bf16") else None
        total = spec["warmup"] + spec["steps"]
        losses = []
        for step in range(total):
            stage = f"step {step + 1}"
            if time.perf_counter() - t_start > time_limit:
                row["note"] = f"time limit {time_limit:.0f} s reached after {step} of {total} steps"
                break
            gen = torch.Generator().manual_seed(cfg.train.seed + step)
            _sync(device)
            t0 = time.perf_counter()
            losses.append(train_step(transformer, params, optimizer, batch, cfg, gen, scheduler, autocast))
            _sync(device)
            dt = time.perf_counter() - t0
            print(f"[{variant}] step {step + 1}/{total}: {dt:.3f} s, loss {losses[-1]:.4g}", flush=True)
            if step >= spec["warmup"]:
                row["step_times"].append(dt)
        row["status"] = "ok" if row["step_times"] else "time limit"
        if losses and not all(math.isfinite(x) for x in losses):
            row["note"] = (row["note"] + "; " if row["note"] else "") + "non-finite loss (random weights)"
        row["loss"] = losses[-1] if losses else None
    except Exception as e:  # noqa: BLE001 - every failure becomes a row of the table
        if _is_oom(e):
            row["status"] = f"OOM ({stage})"
        else:
            row["status"] = f"error ({stage})"
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        if cuda:
            row["peak GiB"] = torch.cuda.max_memory_allocated(device) / GIB
        del transformer, params, optimizer, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def load_cfg(spec: dict[str, Any]) -> Any:
    from kontext.training.config import load_config

    return load_config(spec.get("config"), list(spec.get("overrides") or []))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def finish_row(row: dict[str, Any], flops: dict[str, FlopCount], peak_tflops: float | None) -> dict[str, str]:
    """The table's cells of one result row."""
    base, ckpt = VARIANTS[row["variant"]]
    fc = flops["ckpt" if ckpt else "plain"]
    cells = {c: "" for c in COLUMNS}
    cells.update(variant=row["variant"], base=row["base"], status=row["status"], note=row.get("note", ""))
    cells["grad ckpt"] = row["grad ckpt"]
    if row["status"] not in ("skipped", "not run"):
        cells["model FLOP/step"] = f"{fc.model:.3e}"
    times = row.get("step_times") or []
    if times:
        s = statistics.median(times)
        cells["s/step"] = f"{s:.3f}"
        cells["TFLOP/s"] = f"{fc.model / s / 1e12:.4g}"
        if peak_tflops:
            cells["MFU"] = f"{100 * fc.model / s / (peak_tflops * 1e12):.1f}%"
            cells["HFU"] = f"{100 * fc.hardware / s / (peak_tflops * 1e12):.1f}%"
        else:
            cells["MFU"] = cells["HFU"] = "n/a"
    for key in ("weights GiB", "peak GiB"):
        cells[key] = f"{row[key]:.1f}" if row.get(key) is not None else "n/a"
    return cells


def format_table(rows: list[dict[str, str]]) -> str:
    """A Markdown table with the columns :data:`COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)


def _run_isolated(spec: dict[str, Any], variant: str, limit: float) -> dict[str, Any]:
    """``run_variant`` in a child process, killed ``grace`` seconds after its limit; a row whatever happens."""
    base, ckpt = VARIANTS[variant]
    fallback = {"variant": variant, "base": spec["dtype"] if base == "dense" else "nf4", "grad ckpt": "on" if ckpt else "off"}
    with tempfile.TemporaryDirectory(prefix="real_scale_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--worker-spec", str(spec_path),
               "--worker-result", str(out_path), "--worker-limit", str(limit)]
        grace = 30.0
        proc = subprocess.Popen(cmd, cwd=str(REPO))
        try:
            proc.wait(timeout=limit + grace)
        except subprocess.TimeoutExpired:
            return {**fallback, "status": "timeout", "note": f"killed after {limit + grace:.0f} s"}
        finally:
            if proc.poll() is None:  # timed out, or this process is being stopped: never leave the worker behind
                proc.kill()
                proc.wait()
        if out_path.is_file():
            return json.loads(out_path.read_text())
        return {**fallback, "status": "crashed", "note": f"worker exited with code {proc.returncode}; see the log above"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=1024, help="square target and context size in pixels")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="frozen base dtype")
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"],
                    help="autocast around compute_loss on CUDA (the real-model template uses bf16)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of the config")
    ap.add_argument("--text-tokens", type=int, default=None, help="default: model.max_sequence_length (512)")
    ap.add_argument("--config", default=None, help="YAML config for the lora/train/loss settings (default: Config())")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--reduced", action="store_true", help=f"a tiny architecture for CPUs: {REDUCED}")
    ap.add_argument("--double-blocks", type=int, default=None)
    ap.add_argument("--single-blocks", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--joint-dim", type=int, default=None, help="joint_attention_dim (T5 width)")
    ap.add_argument("--pooled-dim", type=int, default=None, help="pooled_projection_dim (CLIP width)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: table)")
    ap.add_argument("--variant-time-limit", type=float, default=150.0, help="seconds per variant, build included")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds for all variants together")
    ap.add_argument("--in-process", action="store_true", help="run the variants in this process (no isolation)")
    ap.add_argument("--json", default=None, help="also write the rows and the FLOP count to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-limit", type=float, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def arch_from_args(args: argparse.Namespace) -> Arch:
    kw: dict[str, Any] = dict(REDUCED) if args.reduced else {}
    for key, attr in (("double_blocks", "double_blocks"), ("single_blocks", "single_blocks"), ("heads", "heads"),
                      ("head_dim", "head_dim"), ("joint_attention_dim", "joint_dim"),
                      ("pooled_projection_dim", "pooled_dim")):
        if getattr(args, attr) is not None:
            kw[key] = getattr(args, attr)
    head_dim = kw.get("head_dim", Arch.head_dim)
    kw["axes_dims_rope"] = rope_axes(head_dim)
    return Arch(**kw)


def _on_sigterm_exit() -> Any:
    """SIGTERM raises SystemExit (so the worker is killed and the table printed); returns the previous handler."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread
        return None


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker_spec).read_text())
        row = run_variant(spec, args.worker, args.worker_limit)
        Path(args.worker_result).write_text(json.dumps(row))
        return []

    from kontext.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    arch = arch_from_args(args)
    batch_size = args.batch_size or cfg.train.batch_size
    text_tokens = args.text_tokens or cfg.model.max_sequence_length
    image_tokens, text_tokens = tokens_for(args.resolution, text_tokens)
    spec = {
        "arch": dataclasses.asdict(arch),
        "device": args.device,
        "dtype": args.dtype,
        "mixed_precision": args.mixed_precision,
        "resolution": args.resolution,
        "batch_size": batch_size,
        "text_tokens": text_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "config": args.config,
        "overrides": list(args.overrides),
    }
    lora_cfg = cfg.lora
    flops = {
        key: count_flops(arch, image_tokens, text_tokens, batch_size, lora_cfg.rank, lora_cfg.target_modules,
                         checkpointing=ck)
        for key, ck in (("plain", False), ("ckpt", True))
    }
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops if args.peak_tflops is not None else (peak_tflops_for(device_name) if device.type == "cuda" else None)
    fc, n_params = flops["plain"], param_count(arch)
    tokens = image_tokens + text_tokens
    print(f"real-scale check on {device_name}: peak {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s dense bf16")
    print(f"transformer {arch.double_blocks}+{arch.single_blocks} blocks, width {arch.width}: {n_params / 1e9:.3f} B parameters; "
          f"LoRA rank {lora_cfg.rank} on {len(lora_cfg.target_modules)} target suffixes: {fc.lora_params / 1e6:.1f} M parameters")
    print(f"{args.resolution} px, batch {batch_size}: {image_tokens // 2} target + {image_tokens // 2} context + "
          f"{text_tokens} text = {tokens} tokens per sample")
    print(f"FLOP per step: forward linears {fc.forward_linear:.3e}, attention {fc.forward_attention:.3e}; "
          f"backward linears {fc.backward_linear:.3e}, attention {fc.backward_attention:.3e}; "
          f"LoRA {fc.lora_forward + fc.lora_backward:.3e}; model total {fc.model:.3e}; "
          f"checkpointing recompute {flops['ckpt'].recompute:.3e}")
    print(f"(6 x parameters x tokens x batch = {6 * n_params * tokens * batch_size:.3e}: assumes weight gradients, "
          "every parameter on every token, no attention)", flush=True)

    # Stopped from outside (`timeout` sends SIGTERM): kill the worker, print what was measured, exit.
    prev_handler = _on_sigterm_exit()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    interrupted: BaseException | None = None
    for k, variant in enumerate(args.variants):
        left = args.time_budget - (time.perf_counter() - t0)
        limit = min(args.variant_time_limit, left / (len(args.variants) - k))
        base, ckpt = VARIANTS[variant]
        stub = {"variant": variant, "base": args.dtype if base == "dense" else "nf4", "grad ckpt": "on" if ckpt else "off"}
        print(f"\n--- {variant} (limit {limit:.0f} s)", flush=True)
        if interrupted is not None or limit < 15:
            rows.append({**stub, "status": "not run", "note": "interrupted" if interrupted else "time budget spent"})
            continue
        try:
            rows.append(run_variant(spec, variant, limit) if args.in_process else _run_isolated(spec, variant, limit))
        except (KeyboardInterrupt, SystemExit) as e:
            interrupted = e
            rows.append({**stub, "status": "interrupted", "note": "stopped from outside"})
            continue
        if rows[-1]["status"] == "skipped":
            print(f"[{variant}] skipped: {rows[-1]['note']}", flush=True)
    if prev_handler is not None:
        signal.signal(signal.SIGTERM, prev_handler)
    cells = [finish_row(r, flops, peak) for r in rows]
    print(f"\nReal-scale LoRA step, {args.resolution} px, batch {batch_size}, {tokens} tokens/sample, "
          f"model FLOP/step {fc.model:.3e} (checkpointing adds {flops['ckpt'].recompute:.3e} recompute, in HFU only); "
          f"median of {args.steps} steps after {args.warmup} warm-up; peak {peak or 'n/a'} TFLOP/s")
    print(format_table(cells), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device_name, "peak_tflops": peak, "spec": spec, "rows": rows, "cells": cells,
            "flops": {k: {**dataclasses.asdict(v), "model": v.model, "hardware": v.hardware} for k, v in flops.items()},
        }, indent=2))
    if interrupted is not None:
        raise interrupted
    return cells


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
