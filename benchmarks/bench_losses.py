"""Benchmark of the geometry losses (prints figures; not a test).

Run:  python benchmarks/bench_losses.py [--repeats 30]

Measures, forward + backward, the geometry total with the default weights (B=4, C=16, 128x128 latents,
i.e. 1024 px images) on the CPU with 2 threads:

  (a) the public loss functions composed as in the usage example of docs/losses.md (SDM recomputed every call),
  (b) ``geometry_loss`` with ``compute_mask_targets`` done once beforehand,

each against a straightforward implementation of the same formulas written in this file (SciPy SDM every call,
every term on its own) and timed in the same process, alternating so both see the same machine load.
Targets: (a) no slower than the straightforward version, (b) at most half its time.
Then the signed distance map: the torch exact EDT against SciPy at 64x64 and 128x128, B=8, and, when
CUDA is available, the torch path on the GPU against SciPy including the host round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import (  # noqa: E402
    area_ratio_loss,
    background_preservation_mse_latent,
    boundary_loss,
    compute_mask_targets,
    dice_loss,
    downsample_mask_area,
    geometry_loss,
    signed_distance_map_from_mask,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)


# ------------------------------------------------------------------ straightforward reference


def straightforward_total(z_pred, z_tgt, z_ctx, m_px):
    """The default-weighted total written plainly: every term on its own, SciPy SDM every call."""
    h, w = z_pred.shape[-2:]
    m = F.interpolate(m_px, size=(h, w), mode="area")
    mb = (m > 0.5).float()
    dil = F.max_pool2d(mb, 3, 1, 1)
    ero = 1 - F.max_pool2d(1 - mb, 3, 1, 1)
    band = dil - ero
    weight = torch.where(band > 0, torch.full_like(m, 6.0), 1.0 * m + 0.2 * (1 - m))
    l_mse = (weight * ((z_pred - z_tgt) ** 2).mean(1, keepdim=True)).mean()

    outside = 1 - F.max_pool2d(mb, 3, 1, 1)
    err = ((z_pred - z_ctx) ** 2).mean(1, keepdim=True)
    l_bg = ((outside * err).sum((1, 2, 3)) / outside.sum((1, 2, 3)).clamp_min(1)).mean()

    d = torch.sqrt(((z_pred - z_ctx) ** 2).sum(1, keepdim=True) + 1e-12)
    bg = 1 - F.max_pool2d(mb, 3, 1, 1)
    taus, ss = [], []
    for i in range(d.shape[0]):
        vals = d[i][bg[i] > 0].detach()
        mean, std = vals.mean(), vals.std(unbiased=False).clamp_min(1e-3)
        taus.append(mean + 2.0 * std)
        ss.append(std)
    tau = torch.stack(taus).view(-1, 1, 1, 1)
    s = torch.stack(ss).view(-1, 1, 1, 1)
    m_hat = torch.sigmoid((d - tau) / s)

    inter = (m_hat * m).sum((1, 2, 3))
    l_dice = (1 - (2 * inter + 1) / (m_hat.sum((1, 2, 3)) + m.sum((1, 2, 3)) + 1)).mean()
    l_area = (torch.log((m_hat.sum((1, 2, 3)) + 1) / (m.sum((1, 2, 3)) + 1)) ** 2).mean()

    mask_np = mb[:, 0].cpu().numpy().astype(bool)
    phis = []
    for x in mask_np:
        phi = np.where(x, 0.5 - ndimage.distance_transform_edt(x), ndimage.distance_transform_edt(~x) - 0.5)
        phis.append(phi / np.abs(phi).max())
    phi_t = torch.from_numpy(np.stack(phis)[:, None]).float()
    l_bnd = (m_hat * phi_t).mean()
    return 1.0 * l_mse + 0.6 * l_bg + 0.9 * l_dice + 0.2 * l_area + 0.4 * l_bnd


# ------------------------------------------------------------------ the package


def composed_total(z_pred, z_tgt, z_ctx, m_px):
    """The usage example of docs/losses.md: the public loss functions composed with the default weights."""
    m_lat = downsample_mask_area(m_px, (z_pred.shape[-2], z_pred.shape[-1]))
    l_mse = weighted_masked_mse_latent(z_pred, z_tgt, m_lat, band_r=1, w_in=1.0, w_band=6.0, w_out=0.2)
    l_bg = background_preservation_mse_latent(z_pred, z_ctx, m_lat, band_r=1)
    m_hat, _, _ = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=m_lat, band_r=1, k_sigma=2.0)
    l_dice = dice_loss(m_hat, m_lat)
    l_area = area_ratio_loss(m_hat, m_lat)
    phi = signed_distance_map_from_mask(m_lat > 0.5, normalize=True)
    l_bnd = boundary_loss(m_hat, phi)
    return 1.00 * l_mse + 0.60 * l_bg + 0.90 * l_dice + 0.20 * l_area + 0.40 * l_bnd


def _time_pair(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, interleaved round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _inputs(b=4, c=16, h=128, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    m_px = torch.zeros(b, 1, 8 * h, 8 * w)
    for i in range(b):
        y0, x0 = 8 * (10 + 5 * i), 8 * (20 + 3 * i)
        m_px[i, 0, y0 : y0 + 8 * (40 + 4 * i), x0 : x0 + 8 * 50] = 1.0
    z_ctx = torch.randn(b, c, h, w, generator=g)
    z_tgt = z_ctx + F.interpolate(m_px, (h, w), mode="area") * torch.randn(b, c, h, w, generator=g)
    z_pred = (z_tgt + 0.3 * torch.randn(b, c, h, w, generator=g)).requires_grad_(True)
    return m_px, z_pred, z_tgt, z_ctx


def bench_total(repeats: int) -> None:
    m_px, z_pred, z_tgt, z_ctx = _inputs()
    targets = compute_mask_targets(m_px, (128, 128))
    ref = straightforward_total(z_pred, z_tgt, z_ctx, m_px)
    api = composed_total(z_pred, z_tgt, z_ctx, m_px)
    fused, _ = geometry_loss(z_pred, z_tgt, z_ctx, targets)
    print(f"values: straightforward {ref.item():.6f}  composed {api.item():.6f}  geometry_loss {fused.item():.6f}")

    def run(fn):
        def go():
            z_pred.grad = None
            fn().backward()

        return go

    t = _time_pair(
        {
            "straightforward": run(lambda: straightforward_total(z_pred, z_tgt, z_ctx, m_px)),
            "composed": run(lambda: composed_total(z_pred, z_tgt, z_ctx, m_px)),
            "geometry_loss": run(lambda: geometry_loss(z_pred, z_tgt, z_ctx, targets)[0]),
        },
        repeats,
    )
    t_prep = _time_pair({"targets": lambda: compute_mask_targets(m_px, (128, 128))}, max(3, repeats // 3))["targets"]
    print("\ndefault-weighted total, forward+backward, B=4 C=16 128x128, CPU, 2 threads (median ms)")
    print(f"  straightforward (SciPy SDM per call)       {1e3 * t['straightforward']:8.2f}")
    print(f"  (a) loss functions composed                {1e3 * t['composed']:8.2f}   "
          f"ratio {t['composed'] / t['straightforward']:.2f} (target <= 1.00)")
    print(f"  (b) geometry_loss + precomputed targets    {1e3 * t['geometry_loss']:8.2f}   "
          f"ratio {t['geometry_loss'] / t['straightforward']:.2f} (target <= 0.50)")
    print(f"      (compute_mask_targets, once per sample set: {1e3 * t_prep:.2f} ms for B=4 incl. 1024 px downsampling)")


def bench_sdm(repeats: int) -> None:
    print("\nsigned distance map, B=8, normalize=True (median ms)")
    for size in (64, 128):
        g = torch.Generator().manual_seed(size)
        m = torch.zeros(8, 1, size, size, dtype=torch.bool)
        for i in range(8):
            r = size // 8 + i * size // 32
            c = size // 2 + int(torch.randint(-size // 8, size // 8, (1,), generator=g))
            m[i, 0, c - r : c + r, c - r // 2 : c + r] = True
        t = _time_pair(
            {
                "scipy": lambda: signed_distance_map_from_mask(m, normalize=True, backend="scipy"),
                "torch_cpu": lambda: signed_distance_map_from_mask(m, normalize=True, backend="torch"),
            },
            repeats,
        )
        line = (f"  {size}x{size}: SciPy {1e3 * t['scipy']:7.2f}   torch CPU {1e3 * t['torch_cpu']:7.2f} "
                f"(ratio {t['torch_cpu'] / t['scipy']:.2f})")
        if torch.cuda.is_available():
            mg = m.cuda()

            def gpu_torch():
                signed_distance_map_from_mask(mg, normalize=True, backend="torch")
                torch.cuda.synchronize()

            def gpu_scipy():  # host round trip included
                signed_distance_map_from_mask(mg, normalize=True, backend="scipy")
                torch.cuda.synchronize()

            tg = _time_pair({"gpu_torch": gpu_torch, "gpu_scipy": gpu_scipy}, repeats)
            line += (f"   | CUDA tensor: SciPy+round trip {1e3 * tg['gpu_scipy']:7.2f}   torch GPU "
                     f"{1e3 * tg['gpu_torch']:7.2f} (ratio {tg['gpu_torch'] / tg['gpu_scipy']:.2f})")
        else:
            line += "   | no CUDA: GPU comparison skipped"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    bench_total(args.repeats)
    bench_sdm(args.repeats)


if __name__ == "__main__":
    main()
