"""The command that converts a diffusers/PEFT FLUX LoRA into the file ComfyUI (or, ``--layout fused``, kohya tools)
loads; the conversion itself is :mod:`kontext.export.comfyui`.

Run on a finished output folder or on any diffusers-format FLUX LoRA file::

    python -m kontext.tools.comfyui outputs/my-product            # writes outputs/my-product/lora_comfyui.safetensors
    python -m kontext.tools.comfyui some/pytorch_lora_weights.safetensors --out product_comfy.safetensors
    python -m kontext.tools.comfyui outputs/my-product --layout fused   # original FLUX names, for kohya tools
"""

from __future__ import annotations

import argparse

from safetensors import safe_open

from kontext.errors import UserError
from kontext.export.comfyui import COMFYUI_LORA_NAME, LAYOUTS, SPLIT, export_comfyui
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m kontext.tools.comfyui PATH [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="python -m kontext.tools.comfyui",
        description="Convert a diffusers FLUX (Kontext) LoRA to a file ComfyUI applies at the trained strength.",
    )
    parser.add_argument("path", help=f"a training output folder (with {LORA_WEIGHTS_NAME}) or a LoRA file")
    parser.add_argument("--out", default=None, help=f"output file (default: {COMFYUI_LORA_NAME} beside the input)")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=SPLIT,
        help="split (default): one LoRA per diffusers module, the smallest file, read by ComfyUI, Forge and diffusers; "
        "fused: one LoRA per original FLUX layer (kohya lora_unet_ names, for kohya tools), about 1.8x larger",
    )
    args = parser.parse_args(argv)
    try:
        out = export_comfyui(args.path, args.out, layout=args.layout)
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    with safe_open(str(out), framework="pt") as f:
        n_layers = sum(1 for k in f.keys() if k.endswith(".alpha"))
    what = "diffusers modules" if args.layout == SPLIT else "original FLUX layers"
    print(f"wrote {out} ({n_layers} {what}, {args.layout} layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
