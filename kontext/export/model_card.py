"""The ``README.md`` model card written into a finished run's output folder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.errors import write_text_atomic
from kontext.runtime.sharing import shareable_model_name
from kontext.tiny.model import COMMITTED_DIR

# How many of the per-sample prompts the card quotes.
PROMPTS_SHOWN = 3


def prompt_lines(prompts: Sequence[str]) -> list[str]:
    """The card's lines on what the LoRA was trained with: the one prompt, or the most frequent few and counts."""
    counts = Counter(prompts)
    if not counts:
        return ["- Prompt: none (the run had no training samples)"]
    if len(counts) == 1:
        return [f"- Prompt (every sample): `{prompts[0]}`"]
    shown = counts.most_common(PROMPTS_SHOWN)
    lines = [f"- Prompts: {len(counts)} different per-sample prompts over {len(prompts)} samples; the most frequent:"]
    lines += [f"  - `{text}` ({n} sample{'s' if n > 1 else ''})" for text, n in shown]
    return lines


def _load_base_lines(base_path: str, base: str, dtype: str) -> list[str]:
    """The snippet's lines that load the base model, in a form that runs as written where one exists."""

    if Path(base_path).expanduser().resolve() == COMMITTED_DIR.resolve():
        return [
            "from kontext.tiny.model import tiny_model_path  # the tiny base committed with kontext-lora",
            f"pipe = FluxKontextPipeline.from_pretrained(tiny_model_path(), dtype=torch.{dtype})",
        ]
    # A hub id (owner/name) loads anywhere; of a local base folder the card records only the name.
    comment = "" if "/" in base else "  # the local base folder it was trained on: give its path"
    return [f"pipe = FluxKontextPipeline.from_pretrained({base!r}, dtype=torch.{dtype}){comment}"]


def write_model_card(
    output_dir: str | Path,
    cfg: Any,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    prompts: Sequence[str] | None = None,
) -> Path:
    """Write ``output_dir/README.md``: base model, prompts, key settings, final metrics, last validation grid.

    Args:
        cfg: the resolved ``kontext.training.config.Config`` of the run.
        metrics: final validation metrics (name -> value); may be empty.
        history: per-step logged scalars (``[{"step": int, "loss/total": float, ...}, ...]``).
        prompts: the prompt of every training sample (what the LoRA learned); None: ``data.default_prompt``.
    """
    output_dir = Path(output_dir)
    if prompts is None:
        prompts = [cfg.data.default_prompt] if cfg.data.default_prompt else []
    prompts = list(prompts)
    grids = sorted((output_dir / "validation").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    last = history[-1] if history else {}
    geo = cfg.loss.geometry
    # A card is for sharing: the base model as a hub id or a folder name, never a path under a home folder.
    base = shareable_model_name(cfg.model.pretrained_model_name_or_path)
    data_name = Path(str(cfg.data.root)).name or str(cfg.data.root)
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(cfg.model.dtype), "bfloat16")
    alpha_is_rank = float(cfg.lora.alpha) == float(cfg.lora.rank)
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [flux, flux-kontext, lora, diffusers, kontext-lora]",
        "---",
        "",
        "# FLUX.1 Kontext product-insertion LoRA",
        "",
        f"Trained with kontext-lora for {last.get('step', 0)} steps on `{data_name}`.",
        "",
        f"- Base model: `{base}`",
        *prompt_lines(prompts),
        f"- Mask hint drawn into the context: `{cfg.data.mask_hint}` (use the same at inference)",
        f"- Prompt length: {cfg.model.max_sequence_length} T5 tokens",
        f"- LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {', '.join(cfg.lora.target_modules)}",
        f"- Resolution {cfg.data.resolution}, batch {cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} "
        f"accumulation, learning rate {cfg.train.learning_rate} ({cfg.train.lr_scheduler})",
        f"- Geometry losses: {'on' if geo.enabled else 'off'}"
        + (
            f" (mse {geo.mse}, bg {geo.bg}, dice {geo.dice}, area {geo.area}, boundary {geo.boundary}, "
            f"noise weighting {geo.noise_weighting})"
            if geo.enabled
            else ""
        ),
        "",
        "## Final metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No validation was run (validation.every_steps = -1).")
    if last:
        lines += ["", f"Last logged loss: {last.get('loss/total', float('nan')):.5f}."]
    if grids:
        rel = grids[-1].relative_to(output_dir).as_posix()
        lines += ["", "## Last validation grid", "", "context | generated | target | mask outline", "", f"![validation]({rel})"]
    lines += [
        "",
        "## Use with diffusers",
        "",
        "Run from this folder (or give its path to `load_lora_weights`):",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxKontextPipeline",
        *_load_base_lines(str(cfg.model.pretrained_model_name_or_path), base, dtype),
        "pipe.load_lora_weights('.')  # reads pytorch_lora_weights.safetensors",
        "# Generate with the mask hint it was trained with drawn into the scene (kontext-lora does that):",
        "# from kontext.runtime.generation import generate",
        f"# generate(pipe, scene, {(Counter(prompts).most_common(1)[0][0] if prompts else 'prompt')!r}, mask, "
        f"mask_hint={cfg.data.mask_hint!r}, max_sequence_length={cfg.model.max_sequence_length}).images[0]",
        "```",
        "",
        "## Which file where",
        "",
        "- diffusers: `pytorch_lora_weights.safetensors` (this folder, as above).",
        "- ComfyUI, Forge: `lora_comfyui.safetensors` (original FLUX module names, one LoRA per projection; write "
        "it with `python -m kontext.tools.comfyui <this folder>` if it is missing; kohya tools need the fused layout, "
        "`--layout fused`). ComfyUI ignores the diffusers file's "
        "`lora_adapter_metadata`, so the diffusers file loaded there is scaled "
        + (
            f"wrong: this LoRA has alpha {cfg.lora.alpha} != rank {cfg.lora.rank}, and ComfyUI would apply it "
            f"at {cfg.lora.rank / float(cfg.lora.alpha):.4g} x the trained strength."
            if not alpha_is_rank
            else "wrong whenever alpha differs from rank (here they are equal, but use the ComfyUI file anyway)."
        ),
        "",
    ]
    return write_text_atomic(output_dir / "README.md", "\n".join(lines), "the model card")
