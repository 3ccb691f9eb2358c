"""Every file the project writes goes through one write guard, and every bad path or file a command is given is
refused with one message naming it (docs/reliability.md, section 10).

A full disk reaches Python in three forms: ``OSError`` (ENOSPC), torch's writer's ``RuntimeError`` and safetensors'
``SafetensorError``, which is not an ``OSError``. Each must end in the documented one-line message and exit status 2,
never a traceback, and never at the cost of what was already written.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

import data.errors as write_guard
import train_kontext_lora as tk
from data import LatentCache
from data.errors import WriteError, write_text_atomic, writing
from kontext.training.checkpoint import save_failure_message, try_write
from kontext.training.config import ConfigError, config_from_dict, dump_config, load_config

FULL_DISK = {
    "OSError": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "SafetensorError": lambda: SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28) at path "/x/.tmpAbC123"'
    ),
    "torch RuntimeError": lambda: RuntimeError(
        "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed"
    ),
}


def _main(args: list[str], capsys) -> str:
    """Run the trainer's ``main``: exit status 2 and one message, no traceback; returns the message."""
    capsys.readouterr()
    rc = tk.main(args)
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    lines = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in cap.err + cap.out and len(lines) == 1, cap.err
    return cap.err[cap.err.index(lines[0]):]


# ---------------------------------------------------------------------------------------------
# The guard itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FULL_DISK))
def test_the_guard_turns_every_librarys_full_disk_into_one_message(kind, tmp_path):
    partial = tmp_path / "half.safetensors"
    partial.write_bytes(b"half a file")
    with pytest.raises(WriteError) as info:
        with writing(tmp_path / "lora.safetensors", "the LoRA", partial=[partial]):
            raise FULL_DISK[kind]()
    msg = str(info.value)
    assert msg.startswith(f"cannot write the LoRA {tmp_path / 'lora.safetensors'}: "), msg
    assert "Free some space" in msg and "\n" not in msg, msg
    assert info.value.errno == errno.ENOSPC
    assert not partial.exists(), "a half-written file must not look finished"
    # Checkpoint saves: try_write hands the error on, and the save's message names what to do.
    error = try_write(lambda: (_ for _ in ()).throw(FULL_DISK[kind]()))
    assert error is not None
    message = save_failure_message(error, tmp_path, [], "checkpoint-4")
    assert message is not None and message.startswith(f"no space left on device while writing checkpoint-4 in {tmp_path}")


def test_the_guard_names_other_write_errors_and_leaves_other_errors_alone(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(WriteError, match="A folder on that path is missing or is a file"):
        write_text_atomic(tmp_path / "a_file" / "config.yaml", "x: 1\n")
    with pytest.raises(WriteError, match="Make that folder writable"):
        with writing(tmp_path / "x"):
            raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)") from OSError(
                errno.EROFS, "Read-only file system")
    message = save_failure_message(OSError(errno.EIO, "Input/output error"), tmp_path, [], "checkpoint-4")
    assert message is not None and "could not write checkpoint-4" in message and "Input/output error" in message
    # A programming error is not a write error: it is neither swallowed nor dressed up as one.
    for error in (ValueError("bad"), RuntimeError("mat1 and mat2 shapes cannot be multiplied")):
        with pytest.raises(type(error)):
            with writing(tmp_path / "x"):
                raise error
        with pytest.raises(type(error)):
            try_write(lambda e=error: (_ for _ in ()).throw(e))


def test_an_atomic_text_write_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("output_dir: before\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write_guard.os, "replace", full)
    with pytest.raises(WriteError, match="Free some space"):
        dump_config(config_from_dict({"output_dir": str(tmp_path)}), config)
    assert config.read_text() == "output_dir: before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"], "no temporary file is left behind"


def test_the_latent_cache_writer_names_its_entry_and_the_setting(tmp_path, monkeypatch):
    import data.cache as cache_module

    def full(*a, **k):
        raise FULL_DISK["SafetensorError"]()

    monkeypatch.setattr(cache_module, "save_file", full)
    cache = LatentCache(tmp_path / "cache", model_id="m")
    with pytest.raises(WriteError) as info:
        cache.save_prompt(cache.prompt_key("p"), "p", torch.zeros(2, 4), torch.zeros(4))
    msg = str(info.value)
    assert str(cache.prompt_path(cache.prompt_key("p"))) in msg and "data.cache_dir" in msg, msg
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "a failed entry leaves no file"


# ---------------------------------------------------------------------------------------------
# The trainer: a write that fails at the end of a run
# ---------------------------------------------------------------------------------------------


def _run_dict(tmp_path: Path, model_dir: Path, data_dir: Path, **sections) -> dict:
    from conftest import tiny_run_dict

    return tiny_run_dict(tmp_path / "out", model_dir, data_dir, tmp_path / "cache", train={"max_steps": 2},
                         checkpoint={"every_steps": 2}, **sections)


def test_a_full_disk_while_writing_the_comfyui_file_keeps_the_finished_run(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                          monkeypatch, capsys):
    import kontext.export.comfyui as comfyui

    def full(*a, **k):
        raise FULL_DISK["SafetensorError"]()

    monkeypatch.setattr(comfyui, "save_file", full)
    d = _run_dict(tmp_path, tiny_model_dir, tiny_dataset_dir, export={"comfyui": True})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    msg = _main(["--config", str(config)], capsys)
    out = tmp_path / "out"
    assert f"The LoRA is saved ({out / 'pytorch_lora_weights.safetensors'})" in msg, msg
    assert "lora_comfyui.safetensors" in msg and "Free some space" in msg, msg
    assert f"python -m kontext.tools.comfyui {out / 'pytorch_lora_weights.safetensors'}" in msg, msg
    # The run is whole but for the ComfyUI file: history and model card were written before the LoRA.
    for name in ("pytorch_lora_weights.safetensors", "training_history.json", "README.md", "checkpoint-2"):
        assert (out / name).exists(), name
    assert not (out / "lora_comfyui.safetensors").exists()


def test_a_full_disk_while_writing_the_final_lora_names_the_checkpoint(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                       monkeypatch, capsys):
    real = tk.save_lora

    def full(transformer, out_dir, *a, write=True, **k):
        if write:
            (Path(out_dir) / "pytorch_lora_weights.safetensors").write_bytes(b"half")
            raise FULL_DISK["SafetensorError"]()
        return real(transformer, out_dir, *a, write=write, **k)

    monkeypatch.setattr(tk, "save_lora", full)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_run_dict(tmp_path, tiny_model_dir, tiny_dataset_dir)))
    msg = _main(["--config", str(config)], capsys)
    out = tmp_path / "out"
    assert msg.startswith(f"error: no space left on device while writing the final LoRA in {out}"), msg
    assert f"the newest intact checkpoint is {out / 'checkpoint-2'}" in msg, msg
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "a half-written LoRA must not look finished"


# ---------------------------------------------------------------------------------------------
# Bad paths and files given to the trainer, refused before the model loads
# ---------------------------------------------------------------------------------------------


def test_a_cache_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                      no_model_load, capsys):
    from conftest import tiny_run_dict

    blocker = tmp_path / "cache_file"
    blocker.write_text("not a folder")
    for cache_dir, where in ((blocker, "is a file"), (blocker / "sub", f"runs through the file {blocker}")):
        d = tiny_run_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, cache_dir)
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(d))
        msg = _main(["--config", str(config)], capsys)
        assert f"data.cache_dir {cache_dir} {where}" in msg and "data.cache_latents=false" in msg, msg
        assert not (tmp_path / "out").exists()
    assert blocker.read_text() == "not a folder"


# 9**6 mappings from 400 bytes (the reported 813-byte file went on to 9**9 and filled 3.7 GB while its keys were walked).
BOMB = "a: &a {" + ", ".join(f"k{i}: x" for i in range(9)) + "}\n" + "".join(
    f"{n}: &{n} {{{', '.join(f'k{i}: *{p}' for i in range(9))}}}\n" for p, n in zip("abcde", "bcdef")
)


@pytest.mark.parametrize(
    "case, content, needles",
    [
        ("latin-1", "output_dir: café\n".encode("latin-1"), ["is not UTF-8", "line 1", "iconv -f LATIN1 -t UTF-8"]),
        ("utf-16", "output_dir: café\n".encode("utf-16"), ["is UTF-16", "iconv -f UTF-16 -t UTF-8"]),
        ("alias bomb", BOMB.encode(), ["YAML aliases", "write the values out"]),
    ],
)
def test_config_files_that_cannot_be_read_are_named(case, content, needles, tmp_path, capsys):
    config = tmp_path / f"{case}.yaml"
    config.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    msg = _main(["--config", str(config)], capsys)
    assert str(config) in msg


def test_a_config_with_a_byte_order_mark_or_a_few_aliases_still_loads(tmp_path):
    config = tmp_path / "bom.yaml"
    config.write_bytes("\ufefftrain: &t {max_steps: 3}\n".encode("utf-8"))
    assert load_config(config).train.max_steps == 3


# ---------------------------------------------------------------------------------------------
# The tools and the synthetic data generator
# ---------------------------------------------------------------------------------------------


def _each_exits_2(main, cases: dict, capsys) -> None:
    """Each case's arguments make the argparse command ``main`` exit 2 with one message holding every needle."""
    for case, (args, needles) in cases.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2, (case, err)
        assert "Traceback" not in err and sum("error: " in line for line in err.splitlines()) == 1, (case, err)
        for needle in needles:
            assert needle in err, (case, needle, err)


def test_evaluate_refuses_an_out_that_is_a_file_before_the_model_loads(tmp_path, tiny_dataset_dir, no_model_load, capsys):
    from kontext.tools.evaluate import main as evaluate_main

    report = tmp_path / "report.md"
    report.write_text("mine")
    assert evaluate_main(["--base", "--model", "tiny", "--data", str(tiny_dataset_dir), "--out", str(report)]) == 2
    err = capsys.readouterr().err
    assert f"--out {report} is a file" in err and "Traceback" not in err, err
    assert report.read_text() == "mine"


def test_comfyui_names_a_bad_input_or_output(tmp_path, tiny_model_dir, random_lora, capsys):
    from kontext.tools.comfyui import main as comfyui_main

    lora = random_lora(tiny_model_dir, tmp_path / "run", seed=0)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    renamed = tmp_path / "picture.safetensors"
    renamed.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    not_lora = tmp_path / "not_lora.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(not_lora))
    cases = {
        "truncated": ([str(truncated)], [str(truncated), "not a complete safetensors file"]),
        "empty": ([str(empty)], [str(empty), "is empty (0 bytes)"]),
        "renamed": ([str(renamed)], [str(renamed), "not a complete safetensors file"]),
        "not a LoRA": ([str(not_lora)], [str(not_lora), "holds no LoRA"]),
        "--out a folder": ([str(lora), "--out", str(tmp_path)], [f"--out {tmp_path} is a folder"]),
        "--out through a file": ([str(lora), "--out", str(empty / "x.safetensors")],
                                 [f"cannot write the ComfyUI LoRA {empty / 'x.safetensors'}", "is a file; fix the path"]),
    }
    _each_exits_2(comfyui_main, cases, capsys)


def test_synthetic_command_refuses_bad_roots_and_sizes(tmp_path, tiny_dataset_dir, capsys):
    from data.synthetic import main as synthetic_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    real = tmp_path / "real"
    shutil.copytree(tiny_dataset_dir, real)
    (real / "synthetic_manifest.json").unlink(missing_ok=True)
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    cases = {
        "root is a file": (["--root", str(a_file)], [f"--root {a_file} is a file"]),
        "root through a file": (["--root", str(a_file / "set")], [f"runs through the file {a_file}"]),
        "real data": (["--root", str(real)], [str(real), "left untouched"]),
        "no samples": (["--root", str(tmp_path / "n"), "--num-samples", "0"], ["--num-samples must be >= 1"]),
        "negative samples": (["--root", str(tmp_path / "n"), "--num-samples", "-3"], ["--num-samples must be >= 1"]),
        "size 10": (["--root", str(tmp_path / "s"), "--size", "10"], ["--size '10'", "at least 16x16"]),
    }
    _each_exits_2(synthetic_main, cases, capsys)
    assert a_file.read_text() == "x"
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "n").exists() and not (tmp_path / "s").exists()


def test_tiny_model_build_refuses_an_out_through_a_file_before_building(tmp_path, monkeypatch, capsys):
    import kontext.tiny.model as tiny

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda *a, **k: pytest.fail("built although --out was bad"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _each_exits_2(tiny.main, {
        "a file": (["--out", str(a_file)], [f"--out {a_file} is a file"]),
        "through a file": (["--out", str(a_file / "m")], [f"runs through the file {a_file}"]),
    }, capsys)
    assert a_file.read_text() == "x"
