"""The commands around a run, tried as a careless user would: outputs inside or above a run folder, a second
process on a run still training, bad --alphas / --select / --out for interpolate, a config that is not a
mapping, GGUF file modes, an empty image folder to evaluate."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import class_rows, write_jsonl
from test_cli_reliability import QUIET, cls_config
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.interpolate import parse_alphas
from tunesmith.train import train


@pytest.fixture
def finished(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    train(cls_config(encoder_dir, data, run, "adapter.kind=lora", "adapter.targets=[query,value]"), **QUIET)
    return run, data


def test_outputs_inside_or_holding_a_run_are_refused(finished, tmp_path, capsys):
    run, data = finished
    assert main(["merge", str(run), "--out", str(run / "adapter"), "--overwrite"]) == 2
    assert "is inside the tunesmith run" in capsys.readouterr().err
    assert (run / "adapter" / "adapter_config.json").exists()
    assert main(["merge", str(run), "--out", str(tmp_path), "--overwrite"]) == 2  # the run's parent: holds it
    assert "holds a tunesmith run" in capsys.readouterr().err and (run / "summary.json").exists()
    args = ["interpolate", "--finetuned", str(run), "--alphas", "0,1", "--eval", f"d={data}", "--missing", "finetuned"]
    assert main([*args, "--save", str(run / "adapter"), "--overwrite"]) == 2
    assert "is inside the tunesmith run" in capsys.readouterr().err
    assert (run / "adapter" / "adapter_config.json").exists()


def test_a_run_still_training_cannot_be_resumed_or_replaced_by_another_process(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    args = [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0", "training.max_steps=100000",
            "training.save_every=1", f"output.dir={run}", "output.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", *args, "--quiet"],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints").is_dir() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        for flags in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(ConfigError, match=rf"is in use: process {proc.pid} is training this run"):
                train(load_config(None, args), **flags, **QUIET)
        assert proc.poll() is None and (run / "config.yaml").exists()  # the first run trains on
    finally:
        proc.kill()
        proc.wait()
    train(load_config(None, args[:-4] + ["training.max_steps=2", *args[-3:]]), overwrite=True, **QUIET)  # free again


@pytest.mark.parametrize("spec, message", [
    ("abc", "'abc' is not a number"), ("0:1", "a range is start:stop:step"), ("1:0:0.5", "stop at least start"),
    ("", "give start:stop:step"), ("nan", "not a finite number"), ("0,inf", "not a finite number"),
    ("0:1:0.000001", "at most 1000"),
])
def test_bad_alphas_are_refused_with_the_fix(spec, message):
    with pytest.raises(TunesmithError, match=message):
        parse_alphas(spec)


def test_a_range_never_passes_its_stop():
    assert parse_alphas("0:1:0.6") == [0.0, 0.6]
    assert parse_alphas("0:1:0.1")[-1] == 1.0 and len(parse_alphas("0:1:0.1")) == 11


def test_select_and_out_are_checked_before_the_sweep(finished, tmp_path, capsys):
    run, data = finished
    args = ["interpolate", "--finetuned", str(run), "--alphas", "0,1", "--eval", f"d={data}", "--missing", "finetuned"]
    for select in ("nan", "0.5", "5"):
        assert main([*args, "--select", select, "--save", str(tmp_path / "w")]) == 2
        assert "not one of the alphas swept (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    (tmp_path / "afile").write_text("x")
    assert main([*args, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*args, "--select", "1", "--save", str(tmp_path / "w")]) == 0
    assert "model at alpha 1 saved" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["xx\n", "[1]\n"])
def test_a_config_that_is_not_a_mapping_is_a_clear_error(tmp_path, text):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"bad.yaml: expected a mapping of sections"):
        load_config(tmp_path / "bad.yaml")


def test_gguf_files_follow_the_umask(tmp_path):
    from tunesmith.export.gguf_model import temp_beside
    from tunesmith.io import UMASK
    with temp_beside(tmp_path / "out" / "m.gguf") as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o666 & ~UMASK


def test_evaluating_an_empty_image_folder_is_an_error(tmp_path, capsys):
    from PIL import Image
    images = tmp_path / "imgs"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (40 * i, 90, 20)).save(images / label / f"{i}.png")
    run = tmp_path / "vis"
    train(load_config(None, ["model.name=mobilenet-v2-imagenet", f"data.train={images}", f"data.eval={images}",
                             "data.image_size=32", "freeze.first_blocks=17", "training.max_steps=1",
                             "training.batch_size=4", f"output.dir={run}", "output.progress=false"]), **QUIET)
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(run), "--data", str(tmp_path / "empty")]) == 2
    assert "no examples to evaluate" in capsys.readouterr().err
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "load_vision_model" in capsys.readouterr().out


def test_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    from tunesmith import io

    def no_locks(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    io.lock_run_folder(tmp_path)
    io.check_run_folder_free(tmp_path)
    assert str(tmp_path.resolve()) not in io._held
    io.release_run_folder(tmp_path)


def test_overwrite_checks_the_lock_again_right_before_deleting(tmp_path):
    from tunesmith.train.run import replace_run_folder
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('locked', flush=True); "
                               "time.sleep(60)", str(run / ".tunesmith.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="is in use: process 4242"):
            replace_run_folder(run, lambda *_: None)
        assert (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "1", "--top-p", "-0.5"], "--top-p: must be above 0 and at most 1"),
    (["--temperature", "1", "--top-p", "nan"], "--top-p: must be above 0 and at most 1"),
    (["--temperature", "-1"], "--temperature: must be 0 (greedy) or a positive number"),
    (["--temperature", "inf"], "--temperature: must be 0 (greedy) or a positive number"),
])
def test_sampling_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "some-run", "--prompt", "hi", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_a_clear_error():
    from tunesmith.cli_types import unicode_text
    with pytest.raises(TunesmithError, match="not valid UTF-8"):
        unicode_text(b"\xed\xa0\x80 \xff".decode("utf-8", "surrogateescape"))


def test_nproc_beyond_the_machine_is_refused(tmp_path):
    from tunesmith.train.distributed import exec_torchrun
    with pytest.raises(ConfigError, match=r"--nproc 100000: this machine has \d+"):
        exec_torchrun(100000, ["train", "x.yaml"])


def test_ctrl_c_stops_a_chat_reply_not_the_session(monkeypatch, capsys):
    import tunesmith.generate as gen
    lines = iter(["first", "second", "/exit"])
    calls = []

    def fake_generate(model, tok, history, *args, **kwargs):
        calls.append([m["content"] for m in history])
        if len(calls) == 1:
            raise KeyboardInterrupt
        return "ok"

    monkeypatch.setattr(gen, "load_generator", lambda *a: (None, None, None))
    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setattr("builtins.input", lambda *_: next(lines))
    assert main(["chat", "some-run"]) == 0
    assert "(stopped)" in capsys.readouterr().out
    assert calls == [["first"], ["second"]]  # the stopped turn left the history
