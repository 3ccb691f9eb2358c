"""GPU memory estimate for LoRA training of FLUX.1-Kontext-dev (prints Markdown tables; not a measurement).

Run:  python benchmarks/memory_estimate.py [--rank 32] [--batch 1]

Everything is computed from the architecture (19 double-stream + 38 single-stream blocks, hidden 3072,
24 heads, MLP 12288) and the parameter counts of the components; nothing here has been measured on a
GPU. Assumptions, stated so they can be checked against a measurement:

* Tokens per sample: (H/16)*(W/16) target + the same for the context image + 512 T5 tokens.
* Activations kept for backward, bf16, with fused (flash / SDPA) attention so no seq x seq matrix is
  stored: about ``ACT_BYTES_PER_TOKEN_HIDDEN`` bytes per token per hidden unit per block (the usual
  34 for a pre-norm block with a 4x MLP, plus the adaLN modulation and the rotary q/k copies).
* Gradient checkpointing (diffusers, per block) keeps each block's input (2 bytes per token per hidden
  unit) plus one block's full activations while it is recomputed.
* LoRA on the trainer's default targets; LoRA weights, gradients and AdamW's two moments in float32
  (16 bytes per LoRA parameter); 8-bit AdamW keeps its moments in 1 byte each (10 bytes per parameter).
* A fixed ``OVERHEAD_GB`` for the CUDA context, cuBLAS workspaces and allocator fragmentation.
"""

from __future__ import annotations

import argparse

GB = 1e9

TRANSFORMER_PARAMS = 11.9e9
T5_PARAMS = 4.7e9
CLIP_PARAMS = 123e6
VAE_PARAMS = 84e6
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
HIDDEN, MLP = 3072, 12288
TEXT_TOKENS = 512
ACT_BYTES_PER_TOKEN_HIDDEN = 36
OVERHEAD_GB = 1.5
# Bytes per base parameter: bf16; bitsandbytes int8 (+ per-row scales); NF4 with double-quantised scales.
BASE_BYTES = {"bf16": 2.0, "int8": 1.02, "nf4": 4.13 / 8}


def image_tokens(px: int) -> int:
    """Target + context image tokens at ``px`` x ``px`` (VAE /8, 2x2 packing)."""
    return 2 * (px // 16) ** 2


def lora_params(rank: int) -> int:
    """LoRA parameters on the default targets (attention q/k/v/out, added projections, feed-forwards, proj_mlp, proj_out)."""
    sq = rank * (HIDDEN + HIDDEN)
    ff = rank * (HIDDEN + MLP)
    double = 8 * sq + 4 * ff  # to_q/k/v/out + add_q/k/v + to_add_out; ff and ff_context (2 linears each)
    single = 3 * sq + ff + rank * (HIDDEN + MLP + HIDDEN)  # to_q/k/v, proj_mlp, proj_out (15360 -> 3072)
    top = rank * (HIDDEN + 64)  # the transformer's final proj_out also matches the suffix
    return DOUBLE_BLOCKS * double + SINGLE_BLOCKS * single + top


def activations_gb(px: int, batch: int, checkpointing: bool) -> float:
    """Activation memory kept for backward (bf16), in GB."""
    s = image_tokens(px) + TEXT_TOKENS
    per_block = ACT_BYTES_PER_TOKEN_HIDDEN * s * HIDDEN * batch
    blocks = DOUBLE_BLOCKS + SINGLE_BLOCKS
    if not checkpointing:
        return blocks * per_block / GB
    return (blocks * 2 * s * HIDDEN * batch + per_block) / GB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    n_lora = lora_params(args.rank)
    print(f"LoRA rank {args.rank}: {n_lora / 1e6:.1f} M parameters")
    print("\n| component | GB |\n|---|---:|")
    for name, gb in [
        ("transformer, bf16", TRANSFORMER_PARAMS * BASE_BYTES["bf16"] / GB),
        ("transformer, int8 (bitsandbytes)", TRANSFORMER_PARAMS * BASE_BYTES["int8"] / GB),
        ("transformer, NF4 (bitsandbytes, double quant)", TRANSFORMER_PARAMS * BASE_BYTES["nf4"] / GB),
        ("T5-XXL encoder, bf16", T5_PARAMS * 2 / GB),
        ("CLIP-L + VAE, bf16", (CLIP_PARAMS + VAE_PARAMS) * 2 / GB),
        (f"LoRA r{args.rank} fp32 weights + grads + AdamW", n_lora * 16 / GB),
        (f"LoRA r{args.rank} fp32 weights + grads + 8-bit AdamW", n_lora * 10 / GB),
    ]:
        print(f"| {name} | {gb:.1f} |")
    print(f"\n| px | tokens | activations, no checkpointing | activations, checkpointing |\n|---|---:|---:|---:|")
    for px in (512, 1024):
        print(
            f"| {px} | {image_tokens(px) + TEXT_TOKENS} | {activations_gb(px, args.batch, False):.1f} GB "
            f"| {activations_gb(px, args.batch, True):.1f} GB |"
        )
    print(f"\nTotals on the training GPU (batch {args.batch}, + {OVERHEAD_GB} GB overhead):\n")
    print("| base | encoders on GPU | checkpointing | optimizer | 512 px | 1024 px | fits |\n|---|---|---|---|---:|---:|---|")
    setups = [
        ("bf16", True, False, "adamw"),
        ("bf16", False, False, "adamw"),
        ("bf16", False, True, "adamw"),
        ("int8", False, True, "adamw"),
        ("nf4", False, True, "adamw8bit"),
        ("nf4", False, False, "adamw8bit"),
    ]
    for base, enc, ckpt, opt in setups:
        row = []
        for px in (512, 1024):
            total = TRANSFORMER_PARAMS * BASE_BYTES[base] / GB
            total += (T5_PARAMS + CLIP_PARAMS + VAE_PARAMS) * 2 / GB if enc else 0.0
            total += n_lora * (16 if opt == "adamw" else 10) / GB
            total += activations_gb(px, args.batch, ckpt) + OVERHEAD_GB
            row.append(total)
        fits = ", ".join(f"{cap} GB: {'512+1024' if row[1] <= cap else ('512' if row[0] <= cap else 'no')}" for cap in (24, 48, 80))
        print(
            f"| {base} | {'yes (no caching)' if enc else 'no (cached, freed)'} | {'yes' if ckpt else 'no'} | {opt} "
            f"| {row[0]:.1f} | {row[1]:.1f} | {fits} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
