"""Benchmark of the training step of the embedded default (prints figures and ratios; not a test).

Run:  python benchmarks/bench_train_step.py [--resolutions 128 256 512] [--repeats 3] [--steps 3]

Everything goes through the trainer's own code: ``setup`` builds a run of ``configs/example_tiny.yaml``
(tiny FLUX.1 Kontext, synthetic data) per resolution, and ``train`` performs the timed updates
(forward + backward + optimiser, data and batch transfer included), the same loop a user runs.

1. Geometry losses on vs off at each resolution: the two settings alternate on the same run (the
   cached geometry targets exist either way), repetition after repetition, so both see the same
   machine load. Reported: median step time, on/off ratio, and time per image token.
2. Caching on vs off at one resolution: latents and text embeddings precomputed once (encoders idle)
   against encoding the batch with VAE, CLIP and T5 inside every step.
3. Where one step's time goes: timers around the trainer's pieces (batch to device, forward and flow
   loss, geometry losses, backward, optimiser), and torch.profiler's top operators.
4. Gradient checkpointing on vs off (step time, step memory) at the profile resolution.

Peak memory on CUDA: the allocator's peak above what was allocated before the steps. On the CPU: the
process resident set size (RSS, from /proc/self/statm) is sampled every 0.5 ms by a thread during the
timed steps and reported as the peak above the RSS just before them (after ``malloc_trim`` returned
freed heap pages), i.e. what a step's activations, gradients and temporaries add on top of the
resident model. (tracemalloc does not see torch's allocations, and ``ru_maxrss`` only ever grows, so
it cannot separate settings measured in one process.) Torch runs on 2 threads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

# Progress bars would interleave with the tables.
import os  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_kontext_lora as T  # noqa: E402
from kontext.training.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name) if _libc_name and sys.platform.startswith("linux") else None


class PeakCUDA:
    """Context manager: ``.peak_mib`` = CUDA peak allocated above what was allocated at entry."""

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / MIB


def peak_memory() -> "PeakRSS | PeakCUDA":
    """The peak-memory probe for the device the trainer uses (CUDA allocator stats, else sampled RSS)."""
    return PeakCUDA() if torch.cuda.is_available() else PeakRSS()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; the benchmarks run on Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss_bytes() -> int:
    """The RSS after freed heap pages went back to the OS: what is live, so that what a step allocates next shows up
    as growth instead of reusing pages glibc kept from earlier steps."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return rss_bytes()


class PeakRSS:
    """Context manager sampling this process's RSS in a thread; ``.peak_mib`` above the RSS at entry (see
    :func:`trimmed_rss_bytes`)."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self._base = trimmed_rss_bytes()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_mib = (self._peak - self._base) / MIB


DTYPE = "float32"  # model.dtype of every run; --dtype bfloat16 for GPUs
# What every benchmark run of the trainer sets: one step at a time (``train_steps`` moves max_steps on), no
# warm-up, no checkpoints, no validation inside ``train``, no trackers.
TIMED_RUN_OVERRIDES = (
    "train.max_steps=1",
    "train.lr_warmup_steps=0",
    "checkpoint.every_steps=0",
    "validation.every_steps=-1",
    "logging.report_to=none",
)


def tiny_config(overrides: list[str]) -> Any:
    """``configs/example_tiny.yaml`` with :data:`TIMED_RUN_OVERRIDES`, then ``overrides``."""
    return load_config(str(REPO / "configs" / "example_tiny.yaml"), [*TIMED_RUN_OVERRIDES, *overrides])


def train_steps(run: T.Run, steps: int, geometry: bool) -> list[float]:
    """Run ``steps`` more updates through the trainer's ``train`` with the geometry losses on or off; returns the
    seconds of each (the trainer's own ``step_time_s``)."""
    run.cfg.loss.geometry.enabled = geometry
    run.cfg.train.max_steps = run.start_step + steps
    n0 = len(run.history)
    reason = T.train(run)
    if reason != "done":
        raise RuntimeError(f"training stopped: {reason}")
    return [h["step_time_s"] for h in run.history[n0:]]


def make_run(
    work: Path, resolution: int, cache_latents: bool = True, samples: int = 8, checkpointing: bool = False
) -> T.Run:
    """A trainer run of the embedded default at ``resolution`` px (batch 2, no checkpoints/validation)."""
    cfg = tiny_config(
        [
            f"output_dir={work / f'out_{resolution}_{int(cache_latents)}_{int(checkpointing)}'}",
            f"data.root={work / f'data_{resolution}'}",
            f"data.cache_dir={work / 'cache'}",
            f"data.resolution={resolution}",
            f"data.cache_latents={str(cache_latents).lower()}",
            f"data.synthetic.size={resolution}",
            f"data.synthetic.num_samples={samples}",
            "loss.geometry.enabled=true",
            f"model.dtype={DTYPE}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ]
    )
    return T.setup(cfg)


def timed_steps(run: T.Run, steps: int, geometry: bool) -> tuple[list[float], float]:
    """:func:`train_steps` under :func:`peak_memory`; returns per-step seconds and the peak memory growth (MiB)."""
    with peak_memory() as mem:
        times = train_steps(run, steps, geometry)
    return times, mem.peak_mib


def image_tokens(resolution: int) -> int:
    """Target plus context tokens at ``resolution`` px (VAE /8, 2x2 packing)."""
    return 2 * (resolution // 16) ** 2


def bench_geometry(work: Path, resolutions: list[int], repeats: int, steps: int) -> None:
    print("== 1. geometry losses on vs off (batch 2, median step time, interleaved) ==")
    runs = {r: make_run(work, r) for r in resolutions}
    for r, run in runs.items():
        timed_steps(run, 1, True)  # warm-up: first-call allocations and lazy imports
        timed_steps(run, 1, False)
    times: dict[tuple[int, bool], list[float]] = {(r, g): [] for r in resolutions for g in (True, False)}
    mems: dict[tuple[int, bool], list[float]] = {(r, g): [] for r in resolutions for g in (True, False)}
    for rep in range(repeats):
        for r in resolutions:
            order = (True, False) if rep % 2 == 0 else (False, True)
            for g in order:
                t, m = timed_steps(runs[r], steps, g)
                times[(r, g)] += t
                mems[(r, g)].append(m)
    print(f"{'px':>5} {'img tok':>7} {'on ms':>9} {'off ms':>9} {'on/off':>7} {'us/token(off)':>14} {'peak+ on MiB':>13} {'peak+ off MiB':>14}")
    base = None
    for r in resolutions:
        on, off = statistics.median(times[(r, True)]), statistics.median(times[(r, False)])
        tok = image_tokens(r)
        print(
            f"{r:>5} {tok:>7} {on * 1e3:>9.1f} {off * 1e3:>9.1f} {on / off:>7.3f} {off / tok * 1e6:>14.1f} "
            f"{max(mems[(r, True)]):>13.0f} {max(mems[(r, False)]):>14.0f}"
        )
        base = base or (r, off, tok)
    r0, off0, tok0 = base
    print("cost growth vs the smallest resolution (geometry off):")
    for r in resolutions:
        off = statistics.median(times[(r, False)])
        print(f"  {r:>4} px: tokens x{image_tokens(r) / tok0:5.1f}, step time x{off / off0:5.2f}")
    del runs


def interleaved(runs: dict[bool, T.Run], repeats: int, steps: int) -> tuple[dict[bool, list[float]], dict[bool, float]]:
    """Time two runs with the geometry losses on, after a warm-up step each, ``steps`` updates at a time in
    alternating order (the dict's order, then reversed); returns each run's step times and peak memory growth."""
    for run in runs.values():
        timed_steps(run, 1, True)
    times: dict[bool, list[float]] = {c: [] for c in runs}
    mems: dict[bool, list[float]] = {c: [] for c in runs}
    for rep in range(repeats):
        for c in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            t, m = timed_steps(runs[c], steps, True)
            times[c] += t
            mems[c].append(m)
    return times, {c: max(m) for c, m in mems.items()}


def bench_caching(work: Path, resolution: int, repeats: int, steps: int) -> None:
    print(f"\n== 2. caching on vs off at {resolution} px (geometry on, median step time, interleaved) ==")
    runs = {c: make_run(work, resolution, cache_latents=c) for c in (True, False)}
    times, mems = interleaved(runs, repeats, steps)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"cached   : {on * 1e3:8.1f} ms/step, peak +{mems[True]:.0f} MiB")
    print(f"encoding : {off * 1e3:8.1f} ms/step, peak +{mems[False]:.0f} MiB")
    print(f"caching saves {(1 - on / off) * 100:.0f}% of the step time (uncached/cached = {off / on:.2f}x)")
    enc = runs[True].pipe
    # The trainer deletes CLIP and T5 once every prompt is encoded; with caching the VAE waits on the CPU.
    n = {
        name: sum(p.numel() for p in getattr(enc, name).parameters())
        for name in ("vae", "text_encoder", "text_encoder_2")
        if getattr(enc, name, None) is not None
    }
    print(f"encoder parameters still held after caching (tiny model): {n}")


def bench_checkpointing(work: Path, resolution: int, repeats: int, steps: int) -> None:
    print(f"\n== 4. gradient checkpointing on vs off at {resolution} px (geometry on, interleaved) ==")
    runs = {c: make_run(work, resolution, checkpointing=c) for c in (False, True)}
    times, mems = interleaved(runs, repeats, steps)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"no checkpointing : {off * 1e3:8.1f} ms/step, peak +{mems[False]:.0f} MiB")
    print(f"checkpointing    : {on * 1e3:8.1f} ms/step, peak +{mems[True]:.0f} MiB")
    print(f"checkpointing costs {on / off:.2f}x the step time and keeps {mems[True] / max(mems[False], 1e-9):.2f}x the step memory")


@contextlib.contextmanager
def _timer(acc: dict[str, list[float]], name: str) -> Iterator[None]:
    # CUDA kernels run asynchronously: wait for them on both sides so each piece gets its own time.
    _sync()
    t0 = time.perf_counter()
    yield
    _sync()
    acc.setdefault(name, []).append(time.perf_counter() - t0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_profile(work: Path, resolution: int, repeats: int) -> None:
    """Time the pieces of one update as the trainer's loop performs them."""
    print(f"\n== 3. where one step goes at {resolution} px (batch 2, geometry on, median of {repeats}) ==")
    run = make_run(work, resolution)
    run.cfg.loss.geometry.enabled = True
    batches = run.batches()
    parts: dict[str, list[float]] = {}

    def one_step(step: int, acc: dict[str, list[float]]) -> None:
        with _timer(acc, "data + to device"):
            batch = next(batches)
        gen = T._step_generator(run, step, 0)
        # Forward + flow loss alone (geometry off), then the full loss with the same draws: the
        # difference is what the geometry losses add to the forward.
        run.cfg.loss.geometry.enabled = False
        with _timer(acc, "forward + flow loss"):
            loss_flow, _ = T.compute_loss(
                run.transformer, batch, run.cfg.loss, run.cfg.train, run.cfg.model.guidance_scale, gen, run.train_scheduler
            )
        del loss_flow
        run.cfg.loss.geometry.enabled = True
        _sync()
        t0 = time.perf_counter()
        loss, _ = T.compute_loss(
            run.transformer, batch, run.cfg.loss, run.cfg.train, run.cfg.model.guidance_scale,
            T._step_generator(run, step, 0), run.train_scheduler,
        )
        _sync()
        full = time.perf_counter() - t0
        acc.setdefault("geometry losses (forward)", []).append(max(full - acc["forward + flow loss"][-1], 0.0))
        with _timer(acc, "backward"):
            run.accelerator.backward(loss)
        with _timer(acc, "clip + optimiser"):
            run.accelerator.clip_grad_norm_(run.lora_params, 1.0)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)

    one_step(0, {})
    for i in range(repeats):
        one_step(i + 1, parts)
    # Geometry losses alone, forward + backward, on tensors of this step's shapes.
    batch = next(batches)
    geometry = run.cfg.loss.geometry
    from losses import GeometryLossWeights, geometry_loss

    x0 = batch.target_latents.float()
    geo_fb = []
    for _ in range(repeats + 1):
        z = (x0 + 0.1 * torch.randn_like(x0)).requires_grad_(True)
        _sync()
        t0 = time.perf_counter()
        tot, _ = geometry_loss(
            z, x0, batch.scene_latents.float(), batch.geometry,
            GeometryLossWeights(
                mse=geometry.mse, bg=geometry.bg, dice=geometry.dice, area=geometry.area, boundary=geometry.boundary
            ),
            w_in=geometry.w_in, w_band=geometry.w_band, w_out=geometry.w_out, k_sigma=geometry.k_sigma,
        )
        tot.backward()
        _sync()
        geo_fb.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    for k, v in med.items():
        print(f"  {k:<28} {v * 1e3:8.1f} ms  {v / total * 100:5.1f}%")
    print(f"  {'sum':<28} {total * 1e3:8.1f} ms")
    gfb = statistics.median(geo_fb[1:])
    print(f"  geometry losses alone, forward+backward: {gfb * 1e3:.2f} ms = {gfb / total * 100:.1f}% of the step")

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        one_step(repeats + 2, {})
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"  torch.profiler, top operators by {key} (one step):")
    table = prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=40)
    print("\n".join("    " + line for line in table.splitlines()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per setting")
    ap.add_argument("--steps", type=int, default=3, help="updates per repetition")
    ap.add_argument("--cache-resolution", type=int, default=256)
    ap.add_argument("--profile-resolution", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model.dtype")
    ap.add_argument("--skip", nargs="*", default=[], choices=["geometry", "caching", "profile", "checkpointing"])
    args = ap.parse_args(argv)
    global DTYPE
    DTYPE = args.dtype
    torch.set_num_threads(2)
    logging.disable(logging.WARNING)
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, model.dtype={DTYPE}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "geometry" not in args.skip:
            bench_geometry(work, args.resolutions, args.repeats, args.steps)
        if "caching" not in args.skip:
            bench_caching(work, args.cache_resolution, args.repeats, args.steps)
        if "profile" not in args.skip:
            bench_profile(work, args.profile_resolution, max(args.repeats, 3))
        if "checkpointing" not in args.skip:
            bench_checkpointing(work, args.profile_resolution, args.repeats, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
