"""How much each geometry term moves the LoRA, next to the flow loss: gradient norms on the LoRA weights.

On the scale-fidelity benchmark's training data and LoRA settings (``benchmarks/scale_fidelity.py``), for a few
training batches at the trainer's own noise levels, computes the gradient of the flow loss and of each geometry
term alone (its default weight times the noise-level weight, as the trainer composes it) with respect to the
LoRA weights, and prints ``|g_term| / |g_flow|`` and the cosine between the two, per batch and on average::

    python benchmarks/geometry_gradients.py                  # 6 batches, default weights
    python benchmarks/geometry_gradients.py --set area=2.0 --set boundary=10.0

A term whose ratio is a few percent barely steers training, whatever its value; one with a cosine near 1
mostly reweights the flow loss.

``--profile`` shows *where over the noise level* each geometry variant of the scale-fidelity benchmark pushes:
at fixed sigmas it measures the geometry total's gradient norm against the (masked) flow loss's, the flow loss
taken at that sigma too. For ``masked_on_policy`` the sigma is where the rollout stops (the on-policy prediction's
noise level; every micro-batch on-policy)::

    python benchmarks/geometry_gradients.py --profile --batches 3
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TERMS = ("mse", "bg", "dice", "area", "boundary")


def _norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))
    return dot / max(_norm(a) * _norm(b), 1e-30)


PROFILE_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.97)
PROFILE_VARIANTS = ("masked_geometry", "masked_geometry_inverse_sigma", "masked_on_policy")


@contextlib.contextmanager
def noise_level(tk: Any, sigma: float) -> Iterator[None]:
    """Every sample of the trainer's step at noise level ``sigma`` (its timestep sampling replaced for the duration)."""
    fm = tk.fm
    original = fm.timesteps_and_sigmas_from_density

    def fixed(u: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.full_like(u, sigma, dtype=torch.float32)
        return s * scheduler.config.num_train_timesteps, s

    fm.timesteps_and_sigmas_from_density = fixed
    try:
        yield
    finally:
        fm.timesteps_and_sigmas_from_density = original


def sigma_profile(tk: Any, sf: Any, work: Path, model: str, data: Path, batches: int) -> dict[str, dict[float, float]]:
    """``{variant: {sigma: mean |g_geometry| / |g_flow|}}`` over ``batches`` training batches (printed as a table)."""
    from kontext.training.config import config_from_dict

    out: dict[str, dict[float, float]] = {}
    for v in PROFILE_VARIANTS:
        cfg_dict = sf.run_config(work / f"profile-{v}", model, data, work / "cache", sf.QUICK, v, 0)
        cfg = config_from_dict(cfg_dict)
        cfg.train.resolution_shift = False  # the sigma asked for is the sigma used
        run = tk.setup(cfg)
        params = [p for p in run.transformer.parameters() if p.requires_grad]
        stream = run.batches()
        batch_list = [next(stream) for _ in range(batches)]
        geo, op = cfg.loss.geometry, cfg.loss.on_policy
        out[v] = {}
        for sigma in PROFILE_SIGMAS:
            if op.enabled:
                op.fraction, op.sigma_min, op.sigma_max = 1.0, sigma, sigma
            ratios = []
            with noise_level(tk, sigma):
                for i, batch in enumerate(batch_list):
                    geo.enabled = False
                    flow, _ = tk.compute_loss(run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale,
                                              torch.Generator().manual_seed(i), run.train_scheduler)
                    g_flow = torch.autograd.grad(flow, params)
                    geo.enabled = True
                    total, logs = tk.compute_loss(run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale,
                                                  torch.Generator().manual_seed(i), run.train_scheduler)
                    g_total = torch.autograd.grad(total, params)
                    if op.enabled:  # the flow part of the on-policy pass is the same loss at the same draws
                        assert torch.allclose(logs["loss/flow"], flow.detach())
                    ratios.append(_norm([a - b for a, b in zip(g_total, g_flow, strict=True)]) / max(_norm(g_flow), 1e-30))
            out[v][sigma] = sum(ratios) / len(ratios)
            print(f"{v} sigma {sigma}: |g_geometry| / |g_flow| {out[v][sigma]:.3f}", flush=True)
    print("\n| variant | " + " | ".join(f"sigma {s}" for s in PROFILE_SIGMAS) + " |\n|---|" + "---|" * len(PROFILE_SIGMAS))
    for v, row in out.items():
        print(f"| {v} | " + " | ".join(f"{row[s]:.3f}" for s in PROFILE_SIGMAS) + " |")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="TERM=WEIGHT", help="override a term weight")
    parser.add_argument("--profile", action="store_true", help="each geometry variant's gradient share over sigma")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import scale_fidelity as sf

    import train_kontext_lora as tk
    from data.synthetic import generate_dataset
    from kontext.tiny.model import resolve_model_path
    from kontext.training.config import config_from_dict

    work = Path(tempfile.mkdtemp(prefix="geometry_gradients_"))
    data = generate_dataset(work / "data", sf.QUICK.train_samples, sf.QUICK.size, seed=0, area_range=sf.TRAIN_AREAS,
                            aspect_range=sf.TRAIN_ASPECT, progress=False)
    if args.profile:
        return sigma_profile(tk, sf, work, resolve_model_path("tiny", "--model"), data, args.batches)
    cfg_dict = sf.run_config(work / "run", resolve_model_path("tiny", "--model"), data, work / "cache", sf.QUICK,
                             "geometry", 0)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in TERMS:
            parser.error(f"--set {item}: the term must be one of {', '.join(TERMS)}")
        cfg_dict["loss"]["geometry"][name] = float(value)
    cfg = config_from_dict(cfg_dict)
    run = tk.setup(cfg)
    geo = cfg.loss.geometry
    weights = {t: getattr(geo, t) for t in TERMS}
    params = [p for p in run.transformer.parameters() if p.requires_grad]
    batches = run.batches()
    ratios: dict[str, list[float]] = {t: [] for t in TERMS}
    cosines: dict[str, list[float]] = {t: [] for t in TERMS}
    print(f"weights {weights}, geometry weight {geo.weight}, noise weighting {geo.noise_weighting}")
    for i in range(args.batches):
        batch = next(batches)
        geo.enabled = False
        flow, _ = tk.compute_loss(run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale,
                                  torch.Generator().manual_seed(i), run.train_scheduler)
        g_flow = torch.autograd.grad(flow, params)
        geo.enabled = True
        row = []
        for t in TERMS:
            for u in TERMS:  # this term alone; same noise and timesteps as the flow-only pass
                setattr(geo, u, weights[u] if u == t else 0.0)
            total, _ = tk.compute_loss(run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale,
                                       torch.Generator().manual_seed(i), run.train_scheduler)
            g_term = [a - b for a, b in zip(torch.autograd.grad(total, params), g_flow, strict=True)]
            ratios[t].append(_norm(g_term) / max(_norm(g_flow), 1e-30))
            cosines[t].append(_cos(g_term, g_flow))
            row.append(f"{t} {ratios[t][-1]:.3f} (cos {cosines[t][-1]:+.2f})")
        for u in TERMS:
            setattr(geo, u, weights[u])
        print(f"batch {i}: " + " | ".join(row), flush=True)
    out = {t: {"ratio": sum(ratios[t]) / len(ratios[t]), "cosine": sum(cosines[t]) / len(cosines[t])} for t in TERMS}
    print("\n| term | " + " | ".join(TERMS) + " |\n|---|" + "---|" * len(TERMS))
    print("| gradient norm / flow loss gradient norm | " + " | ".join(f"{out[t]['ratio']:.2f}" for t in TERMS) + " |")
    print("| cosine with the flow loss gradient | " + " | ".join(f"{out[t]['cosine']:+.2f}" for t in TERMS) + " |")
    return out


if __name__ == "__main__":
    main()
