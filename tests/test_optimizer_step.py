"""The optimiser step and what feeds it: mixed precision from the launcher, per-rank dropout, the fp16 scaler."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import train_kontext_lora as tk
from kontext.training.config import config_from_dict
from tests.conftest import tiny_run_dict


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test that sets another precision must not leak it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "yaml_value, launcher, expected", [(None, "bf16", "bf16"), ("no", "bf16", "no"), (None, None, "no")]
)
def test_mixed_precision_follows_the_launcher_unless_the_yaml_sets_it(
    tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, fresh_accelerate_state, yaml_value, launcher, expected
):
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:  # what `accelerate launch --mixed_precision bf16` (or its config file) sets for the script
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    train = {"max_steps": 1} if yaml_value is None else {"max_steps": 1, "mixed_precision": yaml_value}
    cfg = config_from_dict(tiny_run_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train=train))
    assert cfg.train.mixed_precision == (yaml_value or "auto")
    run = tk.setup(cfg)
    assert run.accelerator.mixed_precision == expected
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert recorded["train"]["mixed_precision"] == expected  # the resolved value, never `auto`


def test_lora_dropout_masks_differ_between_ranks(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """The LoRA dropout masks drawn in the same step differ between ranks; the same rank draws the same ones again."""
    cfg = config_from_dict(
        tiny_run_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                      train={"max_steps": 1, "seed": 3}, lora={"rank": 4, "alpha": 8, "dropout": 0.5})
    )
    run = tk.setup(cfg)
    dropouts = [m for n, m in run.transformer.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in dropouts)
    masks: list[torch.Tensor] = []

    def record(module, inputs, output):  # kept where the output is non-zero (or where the input already was zero)
        masks.append((output.detach() != 0) | (inputs[0].detach() == 0))

    for m in dropouts:
        m.register_forward_hook(record)

    def drawn(rank: int) -> torch.Tensor:
        masks.clear()
        monkeypatch.setattr(type(run.accelerator), "process_index", property(lambda self: rank))
        run.start_step = 0
        assert tk.train(run) == "done"
        return torch.cat([m.flatten() for m in masks])

    rank0, rank1, rank0_again = drawn(0), drawn(1), drawn(0)
    assert rank0.shape == rank1.shape and rank0.numel() > 1000
    assert 0.4 < rank0.float().mean() < 0.6  # real dropout at p = 0.5
    assert (rank0 != rank1).float().mean() > 0.3  # independent masks disagree on about half the positions
    assert torch.equal(rank0, rank0_again)


def _tiny_linear_run(max_grad_norm: float, scaler: torch.amp.GradScaler | None = None, monkeypatch=None):
    """A Run-shaped object around a real Accelerator and a 4 -> 1 linear layer (optionally with a CPU GradScaler)."""
    acc = Accelerator(cpu=True)
    if scaler is not None:
        # accelerate builds no GradScaler on the CPU; give it one, as it does on a GPU under fp16.
        monkeypatch.setattr(type(acc), "mixed_precision", property(lambda self: "fp16"))
        acc.native_amp, acc.scaler = True, scaler
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    opt, sched = acc.prepare(opt, sched)
    cfg = SimpleNamespace(train=SimpleNamespace(max_grad_norm=max_grad_norm))
    stale = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]  # as taken before prepare
    return SimpleNamespace(cfg=cfg, accelerator=acc, transformer=model, lora_params=stale, optimizer=opt, lr_scheduler=sched)


def _backward(run, scale: float = 1.0) -> torch.Tensor:
    x = torch.arange(8.0).view(2, 4)
    run.accelerator.backward(run.transformer(x).sum() * scale)
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in run.transformer.parameters()]))


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_optimizer_step_reads_the_prepared_models_gradients(max_grad_norm):
    run = _tiny_linear_run(max_grad_norm)
    true_norm = float(_backward(run))
    before = {n: p.detach().clone() for n, p in run.transformer.named_parameters()}
    stepped, norm = tk.optimizer_step(run, 0)
    assert stepped and norm == pytest.approx(true_norm, rel=1e-6) and true_norm > 1.0
    assert all(not torch.equal(before[n], p) for n, p in run.transformer.named_parameters())
    if max_grad_norm:  # clipped before the step
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in run.transformer.parameters()]))
        assert float(total) == pytest.approx(max_grad_norm, rel=1e-5)
    assert run.lr_scheduler.get_last_lr()[0] == pytest.approx(0.05)


def test_nonfinite_gradient_without_scaler_skips_the_update(caplog):
    run = _tiny_linear_run(1.0)
    _backward(run, scale=float("inf"))
    before = {n: p.detach().clone() for n, p in run.transformer.named_parameters()}
    assert tk.optimizer_step(run, 0) == (False, None)
    assert all(torch.equal(before[n], p) for n, p in run.transformer.named_parameters())
    assert run.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1)  # the schedule did not advance
    assert not run.accelerator.optimizer_step_was_skipped  # a trainer skip, counted as a failure by the loop


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_fp16_overflow_lets_the_scaler_skip_and_lower_its_scale(monkeypatch, max_grad_norm):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    run = _tiny_linear_run(max_grad_norm, scaler, monkeypatch)
    weight = run.transformer.weight
    hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # an injected fp16 overflow
    _backward(run)
    hook.remove()
    before = {n: p.detach().clone() for n, p in run.transformer.named_parameters()}
    assert tk.optimizer_step(run, 0) == (False, None)
    # The scaler saw the step, skipped it and halved its scale: the run can recover (the old check never let it).
    assert run.accelerator.optimizer_step_was_skipped
    assert scaler.get_scale() == 2.0**15
    assert all(torch.equal(before[n], p) for n, p in run.transformer.named_parameters())
    assert run.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1)

    # The next, finite update goes through, and the norm logged is that of the unscaled gradient.
    run.optimizer.zero_grad(set_to_none=True)
    scaled_norm = float(_backward(run))
    stepped, norm = tk.optimizer_step(run, 1)
    assert stepped and not run.accelerator.optimizer_step_was_skipped
    assert norm == pytest.approx(scaled_norm / 2.0**15, rel=1e-6)
    assert all(not torch.equal(before[n], p) for n, p in run.transformer.named_parameters())
    assert run.lr_scheduler.get_last_lr()[0] == pytest.approx(0.05)


def test_fp16_overflows_in_the_loop_are_not_nonfinite_failures(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """Three overflows in a row with max_nonfinite_steps=2: the scaler skips them, and the run goes on to the end."""
    cfg = config_from_dict(tiny_run_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                                         train={"max_steps": 4, "max_nonfinite_steps": 2}))
    run = tk.setup(cfg)
    acc = run.accelerator
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    # What accelerate sets up under fp16 on a GPU (it builds no scaler on the CPU).
    monkeypatch.setattr(type(acc), "mixed_precision", property(lambda self: "fp16"))
    acc.native_amp, acc.scaler = True, scaler
    run.optimizer.__setstate__({**run.optimizer.__dict__, "scaler": scaler})
    fired = {"n": 0}

    def overflow(grad):
        fired["n"] += 1
        return torch.full_like(grad, float("inf")) if fired["n"] <= 3 else grad

    param = next(p for p in run.transformer.parameters() if p.requires_grad)
    param.register_hook(overflow)
    assert tk.train(run) == "done"
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]
    assert scaler.get_scale() == 2.0**13  # halved once per skipped update
    assert [h["grad_norm"] > 0 for h in run.history] == [False, False, False, True]


FSDP2_STEP_WORKER = '''
import json, sys
import json
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import train_kontext_lora as tk

out = sys.argv[1]
acc = Accelerator(cpu=True)


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model[0].bias.requires_grad_(False)  # a frozen parameter, as the base weights are
    return model


def train(model, max_grad_norm, stale):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(max_grad_norm=max_grad_norm)), accelerator=acc,
                          transformer=model, optimizer=opt, lr_scheduler=sched, lora_params=stale)
    norms = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=g)  # the whole batch on every rank: the sharded and whole runs see the same
        model(x).pow(2).mean().mul(50).backward()
        stepped, norm = tk.optimizer_step(run, step)
        assert stepped
        norms.append(norm)
        opt.zero_grad(set_to_none=True)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist() for n, p in model.named_parameters()}
    return norms, full


report = {}
for clip in (0.0, 0.5):
    whole_model = build()
    whole_norms, whole = train(whole_model, clip, list(whole_model.parameters()))
    sharded_model = build()
    stale = [p for p in sharded_model.parameters() if p.requires_grad]  # taken before sharding, as the trainer once did
    mesh = init_device_mesh("cpu", (acc.num_processes,))
    fully_shard(sharded_model[0], mesh=mesh)
    fully_shard(sharded_model[2], mesh=mesh)
    fully_shard(sharded_model, mesh=mesh)
    assert any(type(p).__name__ == "DTensor" for p in sharded_model.parameters())
    sharded_norms, sharded = train(sharded_model, clip, stale)
    report[str(clip)] = {
        "norm_diff": max(abs(a - b) for a, b in zip(whole_norms, sharded_norms)),
        "norms": whole_norms,
        "param_diff": max(
            max(abs(a - b) for a, b in zip(torch.tensor(whole[n]).flatten().tolist(), torch.tensor(sharded[n]).flatten().tolist()))
            for n in whole
        ),
    }
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump(report, f)
acc.wait_for_everyone()
acc.end_training()
'''


@pytest.mark.slow
def test_fsdp2_sharded_step_equals_the_unsharded_one(tmp_path):
    """optimizer_step on fully_shard-ed parameters (2 gloo processes): same gradient norms and weights as unsharded."""
    import subprocess
    import sys

    from tests.test_distributed import _free_port
    from tests.test_launch import REPO, subprocess_env

    worker = tmp_path / "worker.py"
    worker.write_text(FSDP2_STEP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    proc = subprocess.run(cmd + [str(worker), str(tmp_path)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for clip, r in report.items():
            assert min(r["norms"]) > 0.5, (clip, r)  # real gradients (stale ones would read 0) that clipping acts on
            assert r["norm_diff"] < 1e-5 and r["param_diff"] < 1e-5, (clip, r)
