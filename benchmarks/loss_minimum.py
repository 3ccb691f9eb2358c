"""Where is each geometry term minimal? Scores of painted-at-the-wrong-size predictions, per formulation.

For synthetic scenes the product is painted at 0.6x ... 1.4x its mask's size over the scene (the rest of the
mask shows the scene's own background, with a slight background drift everywhere outside the mask), encoded
with the tiny model's VAE, and every geometry term is computed with the prediction's latents as ``z_pred``:

- ``reference/hinted``: the specification's composition against the *hinted* context (the mask filled grey), the
  input the model is conditioned on;
- ``reference/scene``: the same composition against the un-hinted scene;
- ``calibrated``: the default formulation (against the scene, minimal at the target).

A term that measures size must be lowest at 1.0x. The script prints, per formulation and term, the mean over
samples at each scale, and the share of samples whose minimum over scales is at 1.0x. It also prints the
gradient norm at ``z_pred = z_tgt`` next to the one at 0.8x. Run::

    python benchmarks/loss_minimum.py                 # 24 samples, areas 1 %-30 %
    python benchmarks/loss_minimum.py --small         # masks of 1-3 % of the image
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.hint import apply_mask_hint  # noqa: E402
from data.synthetic import scaled_insertions  # noqa: E402
from kontext.runtime.flux import encode_images  # noqa: E402
from kontext.runtime.generation import pil_to_tensor  # noqa: E402
from losses import LOSS_TERMS, compute_mask_targets, geometry_loss  # noqa: E402

SCALES = (0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4)


def score_samples(vae, n: int, area_range: tuple[float, float], size: int = 128, seed: int = 0, drift: float = 3.0):
    """Per formulation: ``terms[formulation][term]`` = array ``[n, len(SCALES)]``, and the gradient norms."""
    rng = np.random.default_rng(seed)
    forms = {"reference/hinted": ("reference", True), "reference/scene": ("reference", False), "calibrated": ("calibrated", False)}
    terms = {f: {k: np.zeros((n, len(SCALES))) for k in LOSS_TERMS} for f in forms}
    grads = {f: np.zeros((n, 2)) for f in forms}
    areas = np.exp(rng.uniform(math.log(area_range[0]), math.log(area_range[1]), size=n))
    for i, child in enumerate(rng.spawn(n)):
        t, variants = scaled_insertions(child, size, size, float(areas[i]), SCALES, drift=drift)
        mask = torch.from_numpy(np.asarray(t.mask, dtype=np.float32) / 255.0)[None, None]
        scene = pil_to_tensor(t.context)
        with torch.no_grad():
            z_tgt = encode_images(vae, pil_to_tensor(t.target)).float()
            z_scene = encode_images(vae, scene).float()
            z_hint = encode_images(vae, apply_mask_hint(scene, mask, "fill")).float()
            preds = {s: encode_images(vae, pil_to_tensor(img)).float() for s, img in variants.items()}
        targets = compute_mask_targets(mask, tuple(z_tgt.shape[-2:]))
        for f, (formulation, hinted) in forms.items():
            z_ctx = z_hint if hinted else z_scene
            for j, s in enumerate(SCALES):
                _, parts = geometry_loss(preds[s], z_tgt, z_ctx, targets, formulation=formulation)
                for k in LOSS_TERMS:
                    terms[f][k][i, j] = float(parts[k])
            for j, z in enumerate((z_tgt, preds[0.8])):
                zp = z.clone().requires_grad_(True)
                total, _ = geometry_loss(zp, z_tgt, z_ctx, targets, formulation=formulation)
                total.backward()
                grads[f][i, j] = float(zp.grad.norm())
    return terms, grads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--small", action="store_true", help="masks of 1-3 %% of the image")
    parser.add_argument("--model", default="tiny", help="base model whose VAE encodes (default: the tiny model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from diffusers import AutoencoderKL

    from kontext.tiny.model import resolve_model_path

    vae = AutoencoderKL.from_pretrained(resolve_model_path(args.model, "--model"), subfolder="vae").eval()
    area_range = (0.01, 0.03) if args.small else (0.01, 0.3)
    terms, grads = score_samples(vae, args.samples, area_range)
    one = SCALES.index(1.0)
    print(f"{args.samples} samples, mask areas {area_range[0]:.0%}-{area_range[1]:.0%}, scales {SCALES}")
    for f, by_term in terms.items():
        print(f"\n{f}")
        print("  term      " + "".join(f"{s:>9.2f}x" for s in SCALES) + "   min at 1.0x")
        for k, arr in by_term.items():
            at_one = float((arr.argmin(1) == one).mean())
            print(f"  {k:<9} " + "".join(f"{v:10.4f}" for v in arr.mean(0)) + f"   {at_one:8.0%}")
        g = grads[f]
        print(f"  |grad| at the target {g[:, 0].mean():.2e}, at 0.8x {g[:, 1].mean():.2e} (ratio {g[:, 0].mean() / g[:, 1].mean():.3f})")


if __name__ == "__main__":
    main()
