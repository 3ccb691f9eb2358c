"""The ``README.md`` model card written into a finished run's output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kontext.runtime.sharing import shareable_model_name


def write_model_card(output_dir: str | Path, cfg: Any, metrics: dict[str, float], history: list[dict[str, float]]) -> Path:
    """Write ``output_dir/README.md``: base model, prompt, key settings, final metrics, last validation grid.

    Args:
        cfg: the resolved ``kontext.training.config.Config`` of the run.
        metrics: final validation metrics (name -> value); may be empty.
        history: per-step logged scalars (``[{"step": int, "loss/total": float, ...}, ...]``).
    """
    output_dir = Path(output_dir)
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
        f"- Prompt: `{cfg.data.default_prompt or '(per-sample prompts)'}`",
        f"- Mask hint drawn into the context: `{cfg.data.mask_hint}` (use the same at inference)",
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
        "```python",
        "import torch",
        "from diffusers import FluxKontextPipeline",
        f"pipe = FluxKontextPipeline.from_pretrained({base!r}, torch_dtype=torch.{dtype})",
        "pipe.load_lora_weights('path/to/this/folder')",
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
    path = output_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
