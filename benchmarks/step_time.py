"""Step time and memory of the trainer against a straightforward encode-every-step loop (not a test).

Run:  python benchmarks/step_time.py [--resolutions 256 512] [--repeats 2] [--steps 3] [--threads 1 2] [--only NAME ...]
 or:  accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process 2 benchmarks/step_time.py --threads 1 2

Both sides train the committed tiny FLUX.1 Kontext (``kontext.tiny.model.tiny_model_path()``) on the same 8
synthetic triplets with the ``fill`` hint: batch 2, LoRA rank 16 on the default target modules, AdamW at
lr 1e-4 constant, float32, gradient-norm clipping at 1.0.

- **project**: the trainer's own ``setup`` and ``train`` (``train_kontext_lora.py``; ``loss.masked`` off), each with the
  geometry losses on and off: cached (``data.cache_latents: true``); uncached with a centre crop (each
  sample is VAE-encoded on its first use and its latents kept; timed after one epoch); and uncached with
  ``data.random_crop: true``, which VAE-encodes every batch in every step; all with the default
  ``data.prefetch: auto`` (off on a CPU), the random crop also with ``data.prefetch: true``.
- **baseline**: a loop written here the way a first LoRA script is written: every step opens the PNGs,
  resizes them, draws the hint, encodes context and target with the VAE and the prompts with CLIP and T5,
  and takes the flow-matching step (no geometry losses). It is the in-repo stand-in for diffusers' Kontext
  example (``benchmarks/peer_step_time.py`` runs the example itself).
- **bare transformer forward + backward**: the cached run's LoRA transformer on one fixed batch, the flow
  loss and its backward only (no data, no optimiser, no checks): what the trainer's step is built around.

Every setting is timed at every ``--threads`` count (``torch.set_num_threads`` before each block; under
``accelerate launch --cpu --num_cpu_threads_per_process N`` the launcher's N is only the starting value). All
(setting, threads) blocks live in one process and are timed interleaved, the order reversed every other repeat
(A B C, C B A, ...), so that they see the same machine load; each block records its thread count and the
1-minute load average at its start and end. Reported per resolution: the median s/step of each setting at each
thread count, its ratio to the baseline at the same thread count, the load during its blocks, and the thread
scaling s/step(fewest threads) / s/step(most) of each setting, the whole trainer step next to the bare
forward/backward; then each setting's peak RSS per phase (load, cache, train, validate), above the process's RSS
just before that setting was set up (the process holds every setting at once, so absolute RSS would count the
others). On a GPU also the peak allocated device memory per phase. On a shared machine other work slows every
setting alike, but read the ratios together with the load.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the tables

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_kontext_lora as T  # noqa: E402
from bench_train_step import MIB, rss_bytes, tiny_config, train_steps, trimmed_rss_bytes  # noqa: E402

SAMPLES, BATCH, RANK, LR, MSL = 8, 2, 16, 1e-4, 32


class PhaseMemory:
    """Peak RSS (and CUDA allocation) per named phase, sampled by a thread every 2 ms; a nested phase's samples
    count for it alone."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.cuda: dict[str, float] = {}
        self._label: str | None = None
        self._base = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            label = self._label
            if label is not None:
                self.peaks[label] = max(self.peaks.get(label, 0.0), (rss_bytes() - self._base) / MIB)
            time.sleep(0.002)

    def baseline(self) -> None:
        """The RSS the next setting's figures are counted from (after freed heap pages went back)."""
        self._base = trimmed_rss_bytes()

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        previous, self._label = self._label, label
        try:
            yield
        finally:
            self.peaks[label] = max(self.peaks.get(label, 0.0), (rss_bytes() - self._base) / MIB)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.cuda[label] = max(self.cuda.get(label, 0.0), torch.cuda.max_memory_allocated() / MIB)
            self._label = previous

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


MEM: PhaseMemory  # set in main


# ---------------------------------------------------------------------------------------------
# The project's trainer
# ---------------------------------------------------------------------------------------------


def project_run(work: Path, model: Path, data: Path, resolution: int, cached: bool, random_crop: bool = False) -> T.Run:
    """The trainer's ``setup`` of this benchmark's run; the load and cache phases are recorded."""
    name = f"project {'cached' if cached else 'uncached'}{' random-crop' if random_crop else ''} {resolution}"
    cfg = tiny_config(
        [
            f"output_dir={work / name.replace(' ', '_')}",
            f"model.pretrained_model_name_or_path={model}",
            f"model.max_sequence_length={MSL}",
            f"data.root={data}",
            f"data.cache_dir={work / ('cache_' + str(resolution))}",
            f"data.resolution={resolution}",
            f"data.cache_latents={str(cached).lower()}",
            f"data.random_crop={str(random_crop).lower()}",
            "loss.masked.enabled=false",  # the plain flow loss, as the baseline; each setting turns the geometry on or off
            "data.synthetic.enabled=false",
            f"lora.rank={RANK}",
            f"lora.alpha={RANK}",
            f"train.batch_size={BATCH}",
            f"train.learning_rate={LR}",
            "train.lr_scheduler=constant",
            "train.max_grad_norm=1.0",
            "validation.num_samples=1",
            "validation.num_inference_steps=2",
            "export.comfyui=false",
        ]
    )
    real_build = T.inputs.build_dataset

    def build_in_cache_phase(*a: Any, **k: Any) -> Any:
        with MEM.phase(f"{name}|cache"):
            return real_build(*a, **k)

    MEM.baseline()
    T.inputs.build_dataset = build_in_cache_phase
    try:
        with MEM.phase(f"{name}|load"):
            run = T.setup(cfg)
    finally:
        T.inputs.build_dataset = real_build
    run.bench_name = name  # type: ignore[attr-defined]
    return run


def project_steps(run: T.Run, steps: int, geometry: bool, prefetch: bool | str = "auto") -> list[float]:
    run.cfg.data.prefetch = prefetch
    with MEM.phase(f"{run.bench_name}|train"):  # type: ignore[attr-defined]
        return train_steps(run, steps, geometry)


class Bare:
    """The cached run's LoRA transformer on one fixed batch: forward, flow-matching loss, backward (timed); the
    gradients are dropped after each step, outside the timing."""

    def __init__(self, run: T.Run) -> None:
        from kontext.runtime.flux import predict_velocity

        self.run, self.predict = run, predict_velocity
        self.batch = next(run.batches())
        g = torch.Generator().manual_seed(0)
        x0 = self.batch.target_latents
        self.noise = torch.randn(x0.shape, generator=g).to(x0)
        self.sigma = torch.full((x0.shape[0],), 0.5, device=x0.device, dtype=x0.dtype)

    def step(self) -> float:
        b, run = self.batch, self.run
        s = self.sigma.view(-1, 1, 1, 1)
        t0 = time.perf_counter()
        x_t = (1 - s) * b.target_latents + s * self.noise
        v = self.predict(run.transformer, x_t, b.context_latents, self.sigma, b.prompt_embeds, b.pooled_prompt_embeds,
                         run.cfg.model.guidance_scale)
        loss = torch.nn.functional.mse_loss(v.float(), (self.noise - b.target_latents).float())
        loss.backward()
        float(loss.detach())
        dt = time.perf_counter() - t0
        run.optimizer.zero_grad(set_to_none=True)
        return dt

    def steps(self, n: int) -> list[float]:
        with MEM.phase(f"{self.run.bench_name}|bare"):  # type: ignore[attr-defined]
            return [self.step() for _ in range(n)]


def project_validate(run: T.Run) -> None:
    with MEM.phase(f"{run.bench_name}|validate"):  # type: ignore[attr-defined]
        T.validate(run, run.start_step)


# ---------------------------------------------------------------------------------------------
# The baseline: encode everything in every step
# ---------------------------------------------------------------------------------------------


class Baseline:
    """A plain Kontext LoRA loop: PNGs -> resize -> hint -> VAE + CLIP/T5 -> flow-matching step, every step."""

    def __init__(self, model: Path, data: Path, resolution: int) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
        from peft import LoraConfig

        from data import FolderSource
        from kontext.training.config import DEFAULT_LORA_TARGETS

        self.name = f"baseline {resolution}"
        self.res = resolution
        MEM.baseline()
        with MEM.phase(f"{self.name}|load"):
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.pipe = FluxKontextPipeline.from_pretrained(str(model), dtype=torch.float32).to(self.device)
            for m in (self.pipe.transformer, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
                m.requires_grad_(False)
            self.transformer = self.pipe.transformer
            torch.manual_seed(0)
            self.transformer.add_adapter(
                LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(DEFAULT_LORA_TARGETS))
            )
            self.transformer.train()
            self.params = [p for p in self.transformer.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=LR)
            self.sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
            src = FolderSource(data)
            self.samples = [
                ({r: src.image_refs(i)[r].path for r in ("context", "target", "mask")}, src.prompt(i))
                for i in range(len(src))
            ]
        self.k = 0

    def _load(self, files: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        size = (self.res, self.res)
        ctx = np.asarray(Image.open(files["context"]).convert("RGB").resize(size, Image.Resampling.LANCZOS), np.float32)
        tgt = np.asarray(Image.open(files["target"]).convert("RGB").resize(size, Image.Resampling.LANCZOS), np.float32)
        mask = np.asarray(Image.open(files["mask"]).convert("L").resize(size, Image.Resampling.BOX), np.float32) / 255.0
        ctx = np.where(mask[..., None] >= 0.5, 127.5, ctx)  # the fill hint: mid grey where the object goes
        to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0  # noqa: E731
        return to_t(ctx), to_t(tgt)

    def step(self) -> float:
        from diffusers import FluxKontextPipeline

        t0 = time.perf_counter()
        batch = [self.samples[(self.k + j) % len(self.samples)] for j in range(BATCH)]
        self.k += BATCH
        pairs = [self._load(files) for files, _ in batch]
        vae = self.pipe.vae
        with torch.no_grad():
            px = torch.stack([c for c, _ in pairs] + [t for _, t in pairs]).to(self.device)
            z = (vae.encode(px).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
            ctx, x0 = z[:BATCH], z[BATCH:]
            pe, pooled, text_ids = self.pipe.encode_prompt(
                prompt=[p for _, p in batch], prompt_2=None, max_sequence_length=MSL, device=self.device
            )
        b, c, h, w = x0.shape
        noise = torch.randn_like(x0)
        idx = torch.randint(0, self.sched.config.num_train_timesteps, (b,))
        sigmas = self.sched.sigmas[idx].view(-1, 1, 1, 1).to(self.device)
        timesteps = self.sched.timesteps[idx].to(self.device)
        x_t = (1.0 - sigmas) * x0 + sigmas * noise
        packed = FluxKontextPipeline._pack_latents(x_t, b, c, h, w)
        n = packed.shape[1]
        tokens = torch.cat([packed, FluxKontextPipeline._pack_latents(ctx, b, c, h, w)], dim=1)
        ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, torch.float32)
        cond_ids = ids.clone()
        cond_ids[..., 0] = 1
        pred = self.transformer(
            hidden_states=tokens,
            timestep=timesteps / 1000,
            guidance=torch.full((b,), 1.0, device=self.device),
            pooled_projections=pooled,
            encoder_hidden_states=pe,
            txt_ids=text_ids,
            img_ids=torch.cat([ids, cond_ids]),
            return_dict=False,
        )[0][:, :n]
        v = FluxKontextPipeline._unpack_latents(pred, h * 8, w * 8, 8)
        loss = torch.nn.functional.mse_loss(v.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss.detach())  # a script logs its loss every step
        return time.perf_counter() - t0

    def steps(self, n: int) -> list[float]:
        with MEM.phase(f"{self.name}|train"):
            return [self.step() for _ in range(n)]

    def validate(self) -> None:
        from PIL import Image

        files, prompt = self.samples[0]
        self.transformer.eval()
        with MEM.phase(f"{self.name}|validate"), torch.no_grad():
            size = (self.res, self.res)
            image = Image.open(files["context"]).convert("RGB").resize(size, Image.Resampling.LANCZOS)
            self.pipe.set_progress_bar_config(disable=True)
            self.pipe(image=image, prompt=prompt, height=self.res, width=self.res, max_area=self.res**2,
                      _auto_resize=False, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=MSL,
                      generator=torch.Generator().manual_seed(0))
        self.transformer.train()


# ---------------------------------------------------------------------------------------------


def load_text() -> str:
    try:
        return "load average %.2f %.2f %.2f (1/5/15 min) on %d CPUs" % (*os.getloadavg(), os.cpu_count() or 0)
    except OSError:
        return "load average unavailable"


def bench_resolution(work: Path, model: Path, resolution: int, repeats: int, steps: int, threads: list[int],
                     only: list[str] | None) -> dict[tuple[str, int], float]:
    from data.synthetic import generate_dataset

    data = work / f"data_{resolution}"
    generate_dataset(data, num_samples=SAMPLES, size=(resolution, resolution), seed=0)
    base = Baseline(model, data, resolution)
    made: dict[str, T.Run] = {}

    def run_of(kind: str) -> T.Run:
        """The project run of ``kind`` (cached / uncached / random crop), set up on first use."""
        if kind not in made:
            made[kind] = project_run(work, model, data, resolution, cached=kind == "cached", random_crop=kind == "random crop")
        return made[kind]

    settings: dict[str, Any] = {
        "baseline (encode every step)": lambda n: base.steps(n),
        "project cached, geometry off": lambda n: project_steps(run_of("cached"), n, False),
        "project cached, geometry on": lambda n: project_steps(run_of("cached"), n, True),
        "project uncached, geometry off": lambda n: project_steps(run_of("uncached"), n, False),
        "project uncached, geometry on": lambda n: project_steps(run_of("uncached"), n, True),
        "project random crop, geometry off": lambda n: project_steps(run_of("random crop"), n, False),
        "project random crop, geometry on": lambda n: project_steps(run_of("random crop"), n, True),
        "project random crop, geom. off, prefetch on": lambda n: project_steps(run_of("random crop"), n, False, prefetch=True),
        "bare transformer forward + backward": lambda n: bare.steps(n),
    }
    base_name = "baseline (encode every step)"
    if only:
        settings = {k: v for k, v in settings.items() if k == base_name or any(o in k for o in only)}
    for kind in ("cached", "uncached", "random crop"):  # set up before any timing, in this order
        if any(f"project {kind}," in k for k in settings) or (kind == "cached" and "bare transformer forward + backward" in settings):
            run_of(kind)
    bare = Bare(made["cached"]) if "cached" in made else None
    blocks = [(name, n) for name in settings for n in threads]
    for name, n in blocks:
        torch.set_num_threads(n)
        settings[name](1)  # warm-up: first-call allocations, lazy imports, the thread team
    if "uncached" in made:
        # Uncached with a centre crop encodes each sample on first use: time the steady state after one epoch.
        project_steps(made["uncached"], SAMPLES // BATCH, True)
    times: dict[tuple[str, int], list[float]] = {b: [] for b in blocks}
    loads: dict[tuple[str, int], list[float]] = {b: [] for b in blocks}
    for rep in range(repeats):
        for name, n in blocks if rep % 2 == 0 else blocks[::-1]:
            torch.set_num_threads(n)
            loads[(name, n)].append(os.getloadavg()[0])
            times[(name, n)] += settings[name](steps)
            loads[(name, n)].append(os.getloadavg()[0])
            if torch.get_num_threads() != n:
                raise RuntimeError(f"{name}: ran on {torch.get_num_threads()} threads, not {n}")
    torch.set_num_threads(max(threads))
    base.validate()
    for run in made.values():
        project_validate(run)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n== {resolution} px: s/step (median of {repeats} x {steps} interleaved steps), per thread count ==")
    print(f"{'setting':<44}{'thr':>4} {'s/step':>8} {'min':>7} {'max':>7} {'vs baseline':>12}  load 1-min")
    for name, n in blocks:
        b = med[(base_name, n)]
        print(f"{name:<44}{n:>4} {med[(name, n)]:>8.3f} {min(times[(name, n)]):>7.3f} {max(times[(name, n)]):>7.3f} "
              f"{med[(name, n)] / b:>12.2f}  {min(loads[(name, n)]):.2f}-{max(loads[(name, n)]):.2f}")
    if len(threads) > 1:
        lo, hi = min(threads), max(threads)
        print(f"\n-- {resolution} px: thread scaling, s/step at {lo} thread(s) / at {hi} ({hi / lo:.1f} would be perfect) --")
        for name in settings:
            print(f"{name:<44} {med[(name, lo)] / med[(name, hi)]:>6.2f}")
    print(f"\n-- {resolution} px: peak RSS per phase, MiB above the RSS before the setting was set up --")
    whose = {"baseline": base.name, **{f"project {k}": r.bench_name for k, r in made.items()}}  # type: ignore[attr-defined]
    phases = ("load", "cache", "train", "validate")
    print(f"{'run':<20}" + "".join(f"{p:>10}" for p in phases) + (" | CUDA peak MiB per phase" if MEM.cuda else ""))
    for label, key in whose.items():
        row = "".join(f"{MEM.peaks[f'{key}|{p}']:>10.0f}" if f"{key}|{p}" in MEM.peaks else f"{'-':>10}" for p in phases)
        cuda = "".join(f"{MEM.cuda.get(f'{key}|{p}', float('nan')):>8.0f}" for p in phases) if MEM.cuda else ""
        print(f"{label:<20}{row}{(' | ' + cuda) if cuda else ''}")
    print(load_text())
    return med


def main(argv: list[str] | None = None) -> int:
    global MEM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions per setting")
    ap.add_argument("--steps", type=int, default=3, help="steps per repetition")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch intra-op thread counts; every setting is timed at each (default: 1 2)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="time only the settings whose name contains one of these (the baseline always runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(args.threads))
    logging.disable(logging.WARNING)
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    from kontext.tiny.model import tiny_model_path

    model = tiny_model_path(progress=False)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    launcher = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"torch {torch.__version__}, threads {args.threads} (OMP_NUM_THREADS {launcher}), {where}; model {model.name}")
    print(f"start: {load_text()}")
    MEM = PhaseMemory()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in args.resolutions:
                bench_resolution(Path(tmp), model, r, args.repeats, args.steps, args.threads, args.only)
                gc.collect()
    finally:
        MEM.close()
    print(f"end: {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
