"""Two training processes on the CPU (gloo): replicas agree, data is sharded, one process writes."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_launch import REPO, accelerate_cmd, subprocess_env, tiny_overrides

STEPS, BATCH, ACCUM, PROCS, SAMPLES = 3, 2, 2, 2, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    cmd = accelerate_cmd() + [
        "launch",
        "--config_file",
        "configs/accelerate/cpu_2proc.yaml",
        "--main_process_port",
        str(_free_port()),
        "train_kontext_lora.py",
        "--config",
        "configs/example_tiny.yaml",
        *tiny_overrides(
            tiny_model_dir,
            tiny_dataset_dir,
            tmp,
            **{
                "train.max_steps": STEPS,
                "train.batch_size": BATCH,
                "train.gradient_accumulation_steps": ACCUM,
                "logging.report_to": "tensorboard",
            },
        ),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp / "out", proc.stdout + proc.stderr


@pytest.mark.slow
def test_both_ranks_end_with_the_exported_lora(two_process_run):
    out, log = two_process_run
    m = re.findall(r"LoRA digest per process: (\[.*?\])", log)
    assert len(m) == 1, "the digest line must be printed once, by the main process"
    digests = json.loads(m[0])
    assert len(digests) == PROCS and len(set(digests)) == 1
    exported = load_file(str(out / "pytorch_lora_weights.safetensors"))
    peft_named = {k.removeprefix("transformer."): v for k, v in exported.items()}
    assert _sha256(peft_named) == digests[0]
    # Training moved the LoRA: B starts at zero with the default init.
    assert any(v.abs().sum() > 0 for k, v in peft_named.items() if "lora_B" in k)


@pytest.mark.slow
def test_step_count_and_effective_batch(two_process_run):
    out, _ = two_process_run
    history = json.loads((out / "training_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["num_processes"] == PROCS
    data = state["data"]
    # Each rank sees SAMPLES / (BATCH * PROCS) batches per epoch: the sampler shards the data.
    assert data["num_replicas"] == PROCS and data["num_batches"] == SAMPLES // (BATCH * PROCS)
    micro_batches_per_rank = data["epoch"] * data["num_batches"] + data["position"]
    assert micro_batches_per_rank == STEPS * ACCUM
    samples_seen = micro_batches_per_rank * BATCH * PROCS
    assert samples_seen == STEPS * BATCH * PROCS * ACCUM


def test_ranks_draw_disjoint_batches():
    """What each rank of the run above trains on: the trainer's sampler with rank = process index."""
    from data import BucketBatchSampler

    per_rank = []
    for rank in range(PROCS):
        s = BucketBatchSampler(
            [0] * SAMPLES, batch_size=BATCH, seed=0, shuffle=True, drop_last=True, num_replicas=PROCS, rank=rank
        )
        s.set_epoch(0)
        per_rank.append([i for b in s for i in b])
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(SAMPLES))


@pytest.mark.slow
def test_only_the_main_process_wrote(two_process_run):
    out, log = two_process_run
    assert len(list(out.rglob("config.yaml"))) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["gradient_accumulation_steps"] == ACCUM
    assert len(list(out.rglob("pytorch_lora_weights.safetensors"))) == 1 + len(list(out.glob("checkpoint-*")))
    assert len(list(out.rglob("README.md"))) == 1
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    # TensorBoard names event files events.out.tfevents.<time>.<host>.<pid>.<n>; the hparams record
    # adds a second file from the same writer, so count writing processes, not files.
    writers = {e.name.split(".")[-2] for e in events}
    assert events and len(writers) == 1, events
    assert log.count("Done: ") == 1
    ckpts = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-2", f"checkpoint-{STEPS}"]
    for ck in ckpts:
        names = {p.name for p in ck.iterdir()}
        assert {"trainer_state.json", "pytorch_lora_weights.safetensors", "optimizer.bin"} <= names
        # accelerate saves one RNG state per process.
        assert {f"random_states_{r}.pkl" for r in range(PROCS)} <= names
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".checkpoint-*"))


FSDP2_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator
    from diffusers import FluxTransformer2DModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from peft.utils import get_peft_model_state_dict

    from kontext.runtime.lora import attach_lora, make_lora_config
    from kontext.runtime.lora_io import full_lora_state_dict, save_lora

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    tr = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    attach_lora(tr, make_lora_config(4, 4, 0.0, "gaussian", ["attn.to_q", "attn.to_v", "proj_mlp", "ff.net.2"]))
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; give it values so a wrong gather shows
    whole = full_lora_state_dict(tr)
    mesh = init_device_mesh("cpu", (acc.num_processes,))
    for block in list(tr.transformer_blocks) + list(tr.single_transformer_blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(tr, mesh=mesh)
    sharded = sum(type(p).__name__ == "DTensor" for p in tr.parameters())
    local = get_peft_model_state_dict(tr, adapter_name="default")  # what reading it without gathering gives
    gathered = full_lora_state_dict(tr)
    save_lora(tr, out, write=acc.is_main_process)
    report = {
        "world": acc.num_processes,
        "sharded_params": sharded,
        "keys_equal": sorted(gathered) == sorted(whole),
        "values_equal": all(torch.equal(gathered[k], whole[k]) for k in whole),
        "local_shapes_differ": any(
            tuple(getattr(local[k], "to_local", lambda: local[k])().shape) != tuple(whole[k].shape) for k in whole
        ),
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    torch.save(whole, out / f"whole{acc.process_index}.pt")
    acc.wait_for_everyone()
    acc.end_training()
    """
)


@pytest.mark.slow
def test_fsdp2_export_gathers_the_sharded_lora(tmp_path, tiny_model_dir):
    """Under FSDP2 the LoRA matrices are DTensor shards; the export must write the whole LoRA."""
    worker = tmp_path / "fsdp2_worker.py"
    worker.write_text(FSDP2_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCS), "--master_port", str(_free_port())]
    cmd += [str(worker), str(tiny_model_dir), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in range(PROCS):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["world"] == PROCS and report["sharded_params"] > 0
        assert report["local_shapes_differ"], "the parameters were not sharded; the test would prove nothing"
        assert report["keys_equal"] and report["values_equal"]
    whole = torch.load(out / "whole0.pt", weights_only=True)
    exported = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sorted(k.removeprefix("transformer.") for k in exported) == sorted(whole)
    for k, v in exported.items():
        torch.testing.assert_close(v, whole[k.removeprefix("transformer.")], rtol=0, atol=0)


@pytest.mark.slow
def test_an_error_on_the_main_process_stops_every_rank(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """data.synthetic over a folder of real data fails on the main process (the generator's check), inside the
    main-process-first section: the other rank must stop with the same message, not wait at the barrier."""
    import shutil

    from data.synthetic import MANIFEST_NAME

    real = tmp_path / "real"  # the same files, without the generator's manifest: a user's data
    shutil.copytree(tiny_dataset_dir, real, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    cmd = accelerate_cmd() + [
        "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml", "--main_process_port", str(_free_port()),
        "train_kontext_lora.py", "--config", "configs/example_tiny.yaml",
        *tiny_overrides(tiny_model_dir, real, tmp_path, **{"data.synthetic.enabled": "true"}),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "data.synthetic.enabled is true, but data.root" in out, out[-3000:]
    assert "the main process failed: data.synthetic.enabled is true" in out, out[-3000:]  # rank 1's own message
    assert not (tmp_path / "out").exists()


SAVE_FAILURE_WORKER = textwrap.dedent(
    """
    import errno, json, sys
    from pathlib import Path

    from accelerate import Accelerator

    from kontext.training.checkpoint import stop_if_any_failed
    from kontext.errors import UserError

    out = Path(sys.argv[1])
    acc = Accelerator(cpu=True)
    tmp = out / "checkpoint-4.tmp"
    if acc.is_main_process:
        tmp.mkdir(exist_ok=True)
        (tmp / "random_states_0.pkl").write_bytes(b"partial")
    acc.wait_for_everyone()
    # Only rank 1's disk is full.
    failure = OSError(errno.ENOSPC, "No space left on device") if acc.process_index == 1 else None
    try:
        stop_if_any_failed(acc, failure, out, tmp, "checkpoint-4")
        outcome = "went on"
    except UserError as e:
        outcome = str(e)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(outcome))
    """
)


@pytest.mark.slow
def test_a_checkpoint_write_failing_on_one_rank_stops_every_rank(tmp_path):
    """A full disk on rank 1 only: both ranks stop with a message (rank 0 was fine and would otherwise wait
    at the next barrier for ever), and the partial folder is removed."""
    worker = tmp_path / "save_failure_worker.py"
    worker.write_text(SAVE_FAILURE_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCS), "--master_port", str(_free_port())]
    cmd += [str(worker), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rank0 = json.loads((out / "rank0.json").read_text())
    rank1 = json.loads((out / "rank1.json").read_text())
    assert rank1.startswith("no space left on device while writing checkpoint-4"), rank1
    assert "checkpoint-4" in rank0 and "another process could not write its part" in rank0, rank0
    assert not (out / "checkpoint-4.tmp").exists()


class _OneOfTwoRanks:
    """The accelerator of one process of two, without a process group: ``reduce`` adds the other rank's value."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, rank: int, other: float = 0.0) -> None:
        self.process_index, self.is_main_process, self.other = rank, rank == 0, other

    def reduce(self, t: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return t + self.other


def test_each_rank_learns_of_the_main_process_failing(monkeypatch):
    """What each rank of the two-process run above decides (the broadcast of the outcome given)."""
    import kontext.training.distributed as dist
    from kontext.errors import UserError

    shared: list[str | None] = []
    monkeypatch.setattr(dist, "_share_outcome", lambda failure: shared.append(failure) or failure)

    def fails():
        raise UserError("data.synthetic.enabled is true, but data.root holds a user's data")

    with pytest.raises(UserError, match="^data.synthetic.enabled is true"):  # the main process: its own error
        dist.main_process_first(_OneOfTwoRanks(0), fails)
    assert shared == ["data.synthetic.enabled is true, but data.root holds a user's data"]
    # The other rank never runs the work and stops with the main process's message instead of waiting.
    monkeypatch.setattr(dist, "_share_outcome", lambda failure: shared[0])
    with pytest.raises(UserError, match="^the main process failed: data.synthetic.enabled is true"):
        dist.main_process_first(_OneOfTwoRanks(1), lambda: pytest.fail("rank 1 ran the work after a failure"))
    monkeypatch.setattr(dist, "_share_outcome", lambda failure: None)  # it went well: then rank 1 runs it too
    assert dist.main_process_first(_OneOfTwoRanks(1), lambda: "done") == "done"
    assert dist.main_process_first(_OneOfTwoRanks(1), lambda: "done", everyone=False) is None


def test_each_rank_stops_when_one_rank_cannot_write_its_checkpoint_part(tmp_path):
    """What each rank of the two-process run above decides (the other rank's vote given): a full disk on rank 1
    stops both with a message, and the partial folder is removed."""
    import errno

    from kontext.errors import UserError
    from kontext.training.checkpoint import stop_if_any_failed

    full = OSError(errno.ENOSPC, "No space left on device")
    for rank, failure, other, needle in [(1, full, 0.0, "no space left on device while writing checkpoint-4"),
                                         (0, None, 1.0, "another process could not write its part")]:
        tmp = tmp_path / "checkpoint-4.tmp"
        tmp.mkdir()
        (tmp / "random_states_0.pkl").write_bytes(b"partial")
        with pytest.raises(UserError) as info:
            stop_if_any_failed(_OneOfTwoRanks(rank, other), failure, tmp_path, tmp, "checkpoint-4")
        assert needle in str(info.value) and "checkpoint-4" in str(info.value), (rank, str(info.value))
        assert not tmp.exists()
    stop_if_any_failed(_OneOfTwoRanks(0, 0.0), None, tmp_path, tmp_path / "checkpoint-4.tmp", "checkpoint-4")  # all fine


STOP_IN_FINAL_VALIDATION = textwrap.dedent(
    """
    import signal, sys
    sys.path.insert(0, {repo!r})
    import kontext.evaluation.score as score
    import train_kontext_lora as tk

    real_generate = score.generate

    def generate_after_sigterm(*a, **k):  # the final validation runs on the main process only
        signal.raise_signal(signal.SIGTERM)
        return real_generate(*a, **k)

    score.generate = generate_after_sigterm
    sys.exit(tk.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_stop_during_the_final_validation_saves_on_every_rank(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """SIGTERM reaches only the main process, during the final validation (checkpoint.every_steps=0): every rank
    learns it, all save checkpoint-2 together and exit 0 with the resume command; nothing is exported."""
    script = tmp_path / "stop_in_final_validation.py"
    script.write_text(STOP_IN_FINAL_VALIDATION.format(repo=str(REPO)))
    cmd = accelerate_cmd() + [
        "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml", "--main_process_port", str(_free_port()),
        str(script), "--config", "configs/example_tiny.yaml",
        *tiny_overrides(tiny_model_dir, tiny_dataset_dir, tmp_path, **{
            "train.max_steps": 2, "checkpoint.every_steps": 0, "validation.every_steps": 0,
            "validation.num_samples": 1, "validation.num_inference_steps": 2}),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received: ending the final validation early" in out, out[-3000:]
    assert "Stopped by signal at step 2 before the final export; checkpoint saved. Resume with:" in out, out[-3000:]
    folder = tmp_path / "out"
    assert (folder / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
