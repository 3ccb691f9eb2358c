"""The trainer against diffusers' Kontext LoRA example, side by side under ``accelerate launch --cpu`` (not a test).

Run (the example script is not part of this repository; docs/performance.md says how to get it and the
torchvision it imports)::

    python benchmarks/peer_step_time.py --example /path/to/train_dreambooth_lora_flux_kontext.py \
        --example-python /path/to/peer-venv/bin/python --threads 1 2 --repeats 2 --steps 30

Both sides train the committed tiny FLUX.1 Kontext (``kontext/tiny/tiny_flux_kontext``) on the same synthetic
triplets (``data.synthetic.generate_dataset``, square, ``--resolution`` px): the target is the image to learn,
the context with the ``fill`` hint drawn in (the project's own ``apply_mask_hint_pil``) is the conditioning
image, one prompt per sample. Batch 2, LoRA rank 16 / alpha 16 on the example's 13 module types, AdamW at
lr 1e-4 constant, no warm-up, float32 (``--mixed_precision no``), clipping at 1.0, guidance 1.0, T5 length 32,
centre crop, no flips, scalars logged to TensorBoard every step (the example cannot log to nothing), no
checkpoints and no validation during the loop. The project trains the plain flow-matching loss as the example
does: ``loss.masked`` and the geometry losses off, unless ``--masked`` / ``--geometry``.

- **project**: ``train_kontext_lora.py --config configs/example_tiny.yaml`` with overrides;
  ``data.cache_latents`` true / false.
- **example**: the script as published, with and without ``--cache_latents``; the data is a local parquet
  dataset (``--dataset_name``, ``--image_column target --cond_image_column context --caption_column prompt``).

Each run is its own ``accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process N`` of this file in
runner mode, which runs the script as ``__main__`` (``runpy``) after wrapping ``tqdm.auto.tqdm``: the training
progress bar of each side (``train`` / ``Steps``) timestamps its creation and every ``update``. Nothing of either
script's math is touched. The same clock on both sides:

- **s/step**: the time between consecutive progress updates (everything the loop does for one update: data,
  step, logging), the first ``--warmup`` steps of each run left out; the median over all repeats' steady steps;
- **loop**: from the progress bar's creation to its last update (first step start to last step end);
- **peak RSS**: the process's high-water mark (``getrusage`` ``ru_maxrss``) when the loop ends (model load,
  caching and training) and when the process exits (the example loads a second pipeline after training);
- **load**: the 1-minute load average before and after each run, and the cores other processes kept busy during
  it (all CPUs' busy time from ``/proc/stat`` less the run's own CPU time, over its wall time).

``--compile SIDE ...`` launches those sides with ``--dynamo_backend inductor --dynamo_use_regional_compilation``
(accelerate compiles each repeated transformer block with ``torch.compile``; nothing in either script changes).
Each compiled run gets its own empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so its first steps pay the
whole compilation, as a user's first run does, unless ``--warm-compile``, where every run of a side shares one
cache that an untimed run filled first (a user's later runs on the same machine). The first step's time is
reported with the loop.

Runs are interleaved: every (threads, path) setting runs project then example on even repeats and example then
project on odd ones (A B B A ...), the order of settings reversed on odd repeats. Reported: per path and thread
count, each side's figures and the ratios project / example; per side and path the thread scaling
s/step(1 thread) / s/step(N threads). The project's own ``step_time_s`` (``training_history.json``, the step
without the bookkeeping between steps) is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
EXAMPLE_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
]
SIDES = ("project", "example")
PATHS = ("cached", "uncached")
BATCH, RANK, LR, MSL, GUIDANCE = 2, 16, 1e-4, 32, 1.0


# ---------------------------------------------------------------------------------------------
# Runner mode: inside `accelerate launch`, run one script as __main__ with a clock on its progress bar
# ---------------------------------------------------------------------------------------------


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _usage() -> list[float]:
    """This process's user and system CPU seconds, minor page faults and involuntary context switches so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return [r.ru_utime, r.ru_stime, float(r.ru_minflt), float(r.ru_nivcsw)]


class _Profile:
    """torch.profiler over updates ``first`` .. ``first + count`` of the clocked bar; per-update op totals."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count, self.prof = first, count, None

    def at_update(self, done: int, record: dict[str, Any]) -> None:
        import torch

        if done == self.first and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
        elif done == self.first + self.count and self.prof is not None:
            self.prof.__exit__(None, None, None)
            rows = [
                {"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / self.count,
                 "total_ms": e.cpu_time_total / 1e3 / self.count, "calls": e.count / self.count}
                for e in self.prof.key_averages()
            ]
            record["profile"] = sorted(rows, key=lambda r: -r["self_ms"])
            self.prof = None


def _clocked_tqdm(desc: str, record: dict[str, Any], profile: _Profile | None = None) -> None:
    """Replace ``tqdm.auto.tqdm`` by a subclass whose bar named ``desc`` records its creation and each update
    (time, the process's peak RSS so far, :func:`_usage`); with ``profile``, profiles some of the updates."""
    import tqdm.auto

    base = tqdm.auto.tqdm

    class Clocked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._clocked = kwargs.get("desc") == desc and "start" not in record
            if self._clocked:
                import torch

                record.update(start=time.perf_counter(), threads=torch.get_num_threads(), ticks=[], rss_mib=[],
                              usage=[_usage()], rss_at_start_mib=_maxrss_mib())

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if getattr(self, "_clocked", False):
                record["ticks"].append(time.perf_counter())
                record["rss_mib"].append(_maxrss_mib())
                record["usage"].append(_usage())
                if profile is not None:
                    profile.at_update(len(record["ticks"]), record)
            return out

    tqdm.auto.tqdm = Clocked


def _torchvision_python_only() -> None:
    """Import torchvision; if its C extension (a CUDA build on PyPI) cannot load against this torch, define the two
    operator schemas its fake-tensor registrations need and import it again. The example uses only its PIL
    transforms, which are Python."""
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        return  # absent: the example's own import reports it
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_python_only.lib = lib  # type: ignore[attr-defined]  # the schemas live as long as the library
    import torchvision  # noqa: F401,F811


def run_side(argv: list[str]) -> int:
    """``--side NAME --script PATH --desc BAR --timing FILE -- SCRIPT_ARGS``: run the script, write the timing."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", required=True, choices=SIDES)
    ap.add_argument("--script", required=True)
    ap.add_argument("--desc", required=True)
    ap.add_argument("--timing", required=True)
    ap.add_argument("--profile", type=int, nargs=2, default=None, metavar=("FIRST", "COUNT"))
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = ap.parse_args(argv[:cut]), argv[cut + 1 :]
    import runpy

    record: dict[str, Any] = {"side": args.side, "pid": os.getpid()}
    _clocked_tqdm(args.desc, record, _Profile(*args.profile) if args.profile else None)
    if args.side == "example":
        _torchvision_python_only()
    script = Path(args.script).resolve()
    sys.path[0] = str(script.parent)  # as `python SCRIPT` would have it (not this file's folder)
    sys.argv = [str(script), *rest]
    code: Any = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        record["rss_at_exit_mib"] = _maxrss_mib()
        record["exit"] = code if isinstance(code, int) or code is None else str(code)
        Path(args.timing).write_text(json.dumps(record), encoding="utf-8")
    return code if isinstance(code, int) else (0 if code is None else 1)


# ---------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------


def _cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs; /proc/stat user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def make_data(work: Path, samples: int, resolution: int) -> tuple[Path, Path]:
    """The project's folder dataset and the same samples as a parquet dataset for the example (hint drawn)."""
    import io

    from PIL import Image

    from data.hint import apply_mask_hint_pil
    from data.synthetic import generate_dataset

    folder = work / "data"
    generate_dataset(folder, num_samples=samples, size=(resolution, resolution), seed=0, progress=False)
    peer = work / "peer_data"
    if not (peer / "train.parquet").is_file():
        import datasets

        names = sorted(p.stem for p in (folder / "target").glob("*.png"))
        rows: dict[str, list[Any]] = {"target": [], "context": [], "prompt": []}
        for name in names:
            ctx = Image.open(folder / "context" / f"{name}.png").convert("RGB")
            mask = Image.open(folder / "mask" / f"{name}.png").convert("L")
            buf = io.BytesIO()
            apply_mask_hint_pil(ctx, mask, "fill").save(buf, format="PNG")
            rows["context"].append({"bytes": buf.getvalue(), "path": None})
            rows["target"].append({"bytes": (folder / "target" / f"{name}.png").read_bytes(), "path": None})
            rows["prompt"].append((folder / "prompts" / f"{name}.txt").read_text(encoding="utf-8").strip())
        features = datasets.Features(
            {"target": datasets.Image(), "context": datasets.Image(), "prompt": datasets.Value("string")}
        )
        peer.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(peer / "train.parquet"))
    return folder, peer


def project_args(out: Path, model: Path, data: Path, resolution: int, steps: int, cached: bool, geometry: bool,
                 masked: bool = False) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "example_tiny.yaml"),
        f"output_dir={out}",
        f"model.pretrained_model_name_or_path={model}",
        f"model.max_sequence_length={MSL}",
        f"model.guidance_scale={GUIDANCE}",
        f"data.root={data}",
        "data.synthetic.enabled=false",
        f"data.cache_dir={out / 'latent_cache'}",
        f"data.resolution={resolution}",
        f"data.cache_latents={str(cached).lower()}",
        "data.random_flip=false",
        "data.random_crop=false",
        f"lora.rank={RANK}",
        f"lora.alpha={RANK}",
        f"lora.target_modules=[{', '.join(EXAMPLE_TARGETS)}]",
        f"train.batch_size={BATCH}",
        f"train.learning_rate={LR}",
        "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0",
        f"train.max_steps={steps}",
        "train.max_grad_norm=1.0",
        "train.weighting_scheme=none",
        "train.mixed_precision=no",
        "train.seed=0",
        f"loss.geometry.enabled={str(geometry).lower()}",
        f"loss.masked.enabled={str(masked).lower()}",
        "checkpoint.every_steps=0",
        "validation.every_steps=-1",
        "logging.report_to=tensorboard",
        "export.comfyui=false",
    ]


def example_args(out: Path, model: Path, peer: Path, resolution: int, steps: int, cached: bool) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={model}",
        f"--dataset_name={peer}",
        "--image_column=target",
        "--cond_image_column=context",
        "--caption_column=prompt",
        f"--output_dir={out}",
        f"--cache_dir={out / 'hf_datasets'}",
        f"--resolution={resolution}",
        "--center_crop",
        f"--train_batch_size={BATCH}",
        f"--rank={RANK}",
        f"--lora_alpha={RANK}",
        f"--learning_rate={LR}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--max_train_steps={steps}",
        "--max_grad_norm=1.0",
        "--weighting_scheme=none",
        "--mixed_precision=no",
        f"--max_sequence_length={MSL}",
        f"--guidance_scale={GUIDANCE}",
        "--seed=0",
        "--checkpointing_steps=1000000",
        "--dataloader_num_workers=0",
        "--report_to=tensorboard",
        *(["--cache_latents"] if cached else []),
    ]


def launch(python: str, threads: int, side: str, script: Path, desc: str, timing: Path, script_args: list[str],
           log: Path, timeout: float, updates: int, profile: list[int] | None = None,
           compile_cache: Path | None = None) -> dict[str, Any]:
    """One ``accelerate launch --cpu`` run of a side (``updates`` steps); its timing record plus load and wall figures.

    ``compile_cache``: compile the transformer's blocks (accelerate's regional compilation with inductor), with
    this folder as inductor's cache."""
    dynamo = ["--dynamo_backend", "inductor", "--dynamo_use_regional_compilation"] if compile_cache else ["--dynamo_backend", "no"]
    cmd = [
        python, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", *dynamo, "--num_cpu_threads_per_process", str(threads),
        str(THIS), "--side", side, "--script", str(script), "--desc", desc, "--timing", str(timing),
        *(["--profile", *map(str, profile)] if profile else []), "--", *script_args,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if compile_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    load0, busy0, t0 = os.getloadavg(), _cpu_busy_s(), time.perf_counter()
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), timeout=timeout)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    other = max(0.0, (_cpu_busy_s() - busy0 - own) / wall)
    rec = json.loads(timing.read_text(encoding="utf-8")) if timing.is_file() else {}
    # A script that fails after its loop finished (the example's final save and reload fail under regional
    # compilation) still timed every step: kept, and its failure reported.
    finished_loop = len(rec.get("ticks", [])) == updates
    if proc.returncode != 0 and not finished_loop:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}); log {log}:\n{tail}")
    if not rec.get("ticks"):
        raise RuntimeError(f"{side}: no update of a progress bar named {desc!r} was seen; log {log}")
    if proc.returncode != 0:
        # The script's own exception: the first "SomeError: ..." line (the launcher's CalledProcessError follows it).
        lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines()
                 if re.match(r"^[\w.]+(Error|Exception): ", x.strip()) and "CalledProcessError" not in x]
        rec["failed_after_loop"] = f"exit {proc.returncode}: {lines[0][:300] if lines else 'see ' + str(log)}"
    rec.update(load_before=load0[0], load_after=os.getloadavg()[0], other_cores=other, wall_s=wall,
               cpu_s=own, sys_s=r1.ru_stime - r0.ru_stime)
    return rec


def summarise(rec: dict[str, Any], warmup: int) -> dict[str, Any]:
    ticks = rec["ticks"]
    steps = [b - a for a, b in zip([rec["start"], *ticks[:-1]], ticks)]
    u = rec["usage"]
    per = [[b - a for a, b in zip(u[i], u[i + 1])] for i in range(len(u) - 1)][warmup:]  # steady steps only
    return {
        "steps": steps,
        "steady": steps[warmup:],
        # medians per steady step: CPU seconds in user and kernel mode, minor page faults, involuntary switches
        "user_s": statistics.median(x[0] for x in per), "sys_s_step": statistics.median(x[1] for x in per),
        "faults": statistics.median(x[2] for x in per), "preempted": statistics.median(x[3] for x in per),
        "profile": rec.get("profile"),
        "loop_s": ticks[-1] - rec["start"],
        "rss_loop_mib": rec["rss_mib"][-1],
        "rss_exit_mib": rec["rss_at_exit_mib"],
        "threads": rec["threads"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", required=True, type=Path, help="diffusers' train_dreambooth_lora_flux_kontext.py")
    ap.add_argument("--example-python", default=sys.executable,
                    help="the Python that runs the example (an environment with torchvision); default: this one")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs the project (default: this one)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the steady s/step at the start of each run")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--geometry", action="store_true", help="the project with its geometry losses on")
    ap.add_argument("--masked", action="store_true", help="the project with loss.masked on (the mask-weighted flow loss)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="write every run's figures here (JSON)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--profile", type=int, nargs=2, default=None, metavar=("FIRST", "COUNT"),
                    help="torch.profiler over updates FIRST+1 .. FIRST+COUNT of every run (slows those steps: "
                         "for the op breakdown, not for the timing table)")
    ap.add_argument("--compile", nargs="+", choices=SIDES, default=[],
                    help="launch these sides with accelerate's regional compilation (--dynamo_backend inductor)")
    ap.add_argument("--warm-compile", action="store_true",
                    help="compiled runs of a side share one inductor cache, filled by an untimed run first")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    sys.path.insert(0, str(REPO))
    import tempfile

    from kontext.tiny.model import tiny_model_path

    work = args.work or Path(tempfile.mkdtemp(prefix="peer_step_time_"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model_path(progress=False)
    data, peer = make_data(work, args.samples, args.resolution)
    print(f"work {work}; model {model}; {args.samples} samples at {args.resolution} px; {os.cpu_count()} CPUs")
    print(f"start: load average {'%.2f %.2f %.2f' % os.getloadavg()}")
    settings = [(n, p) for n in args.threads for p in args.paths]
    runs: list[dict[str, Any]] = []

    def compile_cache(side: str, tag: str) -> Path | None:
        if side not in args.compile:
            return None
        return work / f"inductor_{side}" if args.warm_compile else work / f"inductor_{tag}"

    if args.warm_compile:
        for side in args.compile:  # fill each side's cache, untimed, for every path the runs take
            for path in args.paths:
                tag = f"{side}_{path}_warmup"
                sargs = _side_args(side, args, work / tag, model, data, peer, path == "cached", steps=args.warmup + 1)
                py, script, desc = _side_program(side, args)
                launch(py, args.threads[-1], side, script, desc, work / f"{tag}.timing.json", sargs,
                       work / f"{tag}.log", args.timeout, args.warmup + 1, None, compile_cache(side, tag))
                print(f"  {tag}: inductor cache filled", flush=True)
    for rep in range(args.repeats):
        for threads, path in settings if rep % 2 == 0 else settings[::-1]:
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                tag = f"{side}_{path}_t{threads}_r{rep}"
                out = work / tag
                sargs = _side_args(side, args, out, model, data, peer, path == "cached", steps=args.steps)
                py, script, desc = _side_program(side, args)
                rec = launch(py, threads, side, script, desc, work / f"{tag}.timing.json", sargs, work / f"{tag}.log",
                             args.timeout, args.steps, args.profile, compile_cache(side, tag))
                s = summarise(rec, args.warmup)
                s["compiled"] = side in args.compile
                if "failed_after_loop" in rec:
                    s["failed_after_loop"] = rec["failed_after_loop"]
                    print(f"  {tag}: the loop finished, then the script failed ({rec['failed_after_loop']})", flush=True)
                if side == "project":
                    hist = json.loads((out / "training_history.json").read_text(encoding="utf-8"))
                    s["own_step_time"] = statistics.median(h["step_time_s"] for h in hist[args.warmup :])
                runs.append({"side": side, "path": path, "threads": threads, "repeat": rep, **s,
                             **{k: rec[k] for k in ("load_before", "load_after", "other_cores", "wall_s", "cpu_s", "sys_s")}})
                r = runs[-1]
                print(f"  {tag:<26} threads {r['threads']}  s/step {statistics.median(r['steady']):.3f}  loop "
                      f"{r['loop_s']:.1f} s (first step {r['steps'][0]:.1f} s)  RSS loop {r['rss_loop_mib']:.0f} / exit {r['rss_exit_mib']:.0f} MiB  "
                      f"load {r['load_before']:.2f}->{r['load_after']:.2f}  other cores {r['other_cores']:.2f}  "
                      f"per step: user {r['user_s']:.3f} s, sys {r['sys_s_step']:.3f} s, {r['faults']:.0f} faults",
                      flush=True)
                if r["profile"]:
                    print(f"    torch.profiler, ms per update (updates {args.profile[0] + 1}-{sum(args.profile)}):")
                    for row in r["profile"][:18]:
                        print(f"      {row['self_ms']:>8.2f} self {row['total_ms']:>8.2f} total {row['calls']:>6.0f} calls  "
                              f"{row['name']}")
    print(f"end: load average {'%.2f %.2f %.2f' % os.getloadavg()}")
    table = report(runs, args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "table": table}, indent=1), encoding="utf-8")
    return 0


def _side_args(side: str, args: argparse.Namespace, out: Path, model: Path, data: Path, peer: Path, cached: bool,
               steps: int) -> list[str]:
    """A side's command-line arguments for ``steps`` updates into ``out`` (latents cached or not)."""
    if side == "project":
        return project_args(out, model, data, args.resolution, steps, cached, args.geometry, args.masked)
    return example_args(out, model, peer, args.resolution, steps, cached)


def _side_program(side: str, args: argparse.Namespace) -> tuple[str, Path, str]:
    """The Python a side runs with, its script, and the description of its training progress bar."""
    if side == "project":
        return args.python, REPO / "train_kontext_lora.py", "train"
    return args.example_python, args.example.resolve(), "Steps"


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    def pick(side: str, path: str, n: int) -> list[dict[str, Any]]:
        return [r for r in runs if r["side"] == side and r["path"] == path and r["threads"] == n]

    def fig(rs: list[dict[str, Any]]) -> dict[str, float]:
        steady = [x for r in rs for x in r["steady"]]
        per_rep = [statistics.median(r["steady"]) for r in rs]
        return {
            "s_step": statistics.median(steady), "s_step_min": min(per_rep), "s_step_max": max(per_rep),
            "loop_s": statistics.median(r["loop_s"] for r in rs),
            "first_s": statistics.median(r["steps"][0] for r in rs),
            "rss_loop": max(r["rss_loop_mib"] for r in rs), "rss_exit": max(r["rss_exit_mib"] for r in rs),
            "load_lo": min(r["load_before"] for r in rs), "load_hi": max(max(r["load_before"], r["load_after"]) for r in rs),
            "other": max(r["other_cores"] for r in rs),
            "user_s": statistics.median(r["user_s"] for r in rs), "sys_s": statistics.median(r["sys_s_step"] for r in rs),
            "faults": statistics.median(r["faults"] for r in rs), "preempted": statistics.median(r["preempted"] for r in rs),
            **({"own": statistics.median(r["own_step_time"] for r in rs)} if "own_step_time" in rs[0] else {}),
        }

    table: list[dict[str, Any]] = []
    print(f"\n== {args.resolution} px, batch {BATCH}, rank {RANK}, {args.steps} steps, {args.repeats} repeats; "
          f"s/step: median of steady steps (first {args.warmup} left out) [per-repeat medians min-max] ==")
    if args.compile:
        print(f"compiled (accelerate's regional compilation, inductor, {'warm' if args.warm_compile else 'cold'} "
              f"cache): {', '.join(args.compile)}; first s: the first step, compilation included")
    head = (f"{'path':<9}{'thr':>4} {'side':<8}{'s/step':>8} {'[min-max]':<14}{'first s':>8}{'loop s':>8}{'RSS loop':>10}"
            f"{'RSS exit':>10}  {'load 1-min':<11}{'other':>6}{'own s/step':>11}")
    print(head)
    for path in args.paths:
        for n in args.threads:
            f = {side: fig(pick(side, path, n)) for side in SIDES}
            for side in SIDES:
                x = f[side]
                own = f"{x['own']:>11.3f}" if "own" in x else f"{'':>11}"
                print(f"{path:<9}{n:>4} {side:<8}{x['s_step']:>8.3f} [{x['s_step_min']:.3f}-{x['s_step_max']:.3f}] "
                      f"{x['first_s']:>7.1f}{x['loop_s']:>8.1f}{x['rss_loop']:>10.0f}{x['rss_exit']:>10.0f}  "
                      f"{x['load_lo']:.2f}-{x['load_hi']:.2f}  {x['other']:>5.2f}{own}")
            p, e = f["project"], f["example"]
            ratio = {k: p[k] / e[k] for k in ("s_step", "loop_s", "rss_loop", "rss_exit")}
            print(f"{'':<13} {'ratio':<8}{ratio['s_step']:>8.2f} {'':<14}{'':>8}{ratio['loop_s']:>8.2f}"
                  f"{ratio['rss_loop']:>10.2f}{ratio['rss_exit']:>10.2f}")
            table.append({"path": path, "threads": n, "project": p, "example": e, "ratio": ratio})
    print("\nper steady step (medians): CPU seconds in user / kernel mode, minor page faults, involuntary context switches")
    for t in table:
        for side in SIDES:
            x = t[side]
            print(f"  {t['path']:<9}{t['threads']:>2} thr {side:<8} user {x['user_s']:.3f}  sys {x['sys_s']:.3f}  "
                  f"faults {x['faults']:>7.0f}  preempted {x['preempted']:>5.0f}")
    if len(args.threads) > 1:
        lo, hi = min(args.threads), max(args.threads)
        print(f"\nthread scaling, s/step at {lo} thread(s) / at {hi} (higher is better; {hi / lo:.1f} is perfect):")
        for path in args.paths:
            row = []
            for side in SIDES:
                a, b = fig(pick(side, path, lo)), fig(pick(side, path, hi))
                row.append(f"{side} {a['s_step'] / b['s_step']:.2f} (loop {a['loop_s'] / b['loop_s']:.2f})")
            print(f"  {path:<9} " + ";  ".join(row))
    return table


if __name__ == "__main__":
    if "--side" in sys.argv[1:2]:
        sys.exit(run_side(sys.argv[1:]))
    sys.exit(main())
