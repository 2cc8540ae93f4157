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


def test_a_relative_base_model_is_the_one_the_run_started_with(tmp_path, encoder_dir, monkeypatch):
    """run.json keeps model.name as given; read from another folder, a relative name means the folder the run
    started in, never a same-named folder where the reader stands (that would be another model, silently)."""
    import shutil

    from tunesmith.train.artifacts import load_run
    project = tmp_path / "project"
    shutil.copytree(encoder_dir, project / "base")
    data = write_jsonl(project / "cls.jsonl", class_rows(20))
    monkeypatch.chdir(project)
    train(cls_config("base", data, "run", "adapter.kind=lora", "adapter.targets=[query,value]"), **QUIET)
    want = load_run("run").model.state_dict()
    elsewhere = project / "elsewhere"
    import torch

    from tunesmith.models import load_model
    other = load_model(str(encoder_dir), "classification", num_labels=2)  # a folder called base here, other weights
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.backbone.save_pretrained(elsewhere / "base")
    shutil.copy(encoder_dir / "tokenizer.json", elsewhere / "base")
    monkeypatch.chdir(elsewhere)
    got = load_run(project / "run")
    assert got.info.model["name"] == str(project / "base")
    from tunesmith.cli import _settle_run_folder  # `train RUN --resume` from here reads the same base
    cfg = load_config(project / "run" / "config.yaml")
    _settle_run_folder(cfg, project / "run", [])
    assert cfg.model.name == str(project / "base")
    # every weight equal, but the new head's untrained original (random at each load; the trained copy is used)
    assert [k for k, v in got.model.state_dict().items() if not torch.equal(want[k], v)
            and not k.startswith("head.original_module.")] == []


def test_merge_never_replaces_the_run_s_own_base_model_or_the_current_folder(tmp_path, encoder_dir, monkeypatch,
                                                                             capsys):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(encoder_dir, base)
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    train(cls_config(base, data, run, "adapter.kind=lora", "adapter.targets=[query,value]"), **QUIET)
    before = sorted(p.name for p in base.iterdir())
    assert main(["merge", str(run), "--out", str(base), "--overwrite"]) == 2
    assert "which this command reads" in capsys.readouterr().err and sorted(p.name for p in base.iterdir()) == before
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["merge", str(run), "--out", ".", "--overwrite"]) == 2
    assert "is the current folder" in capsys.readouterr().err and (tmp_path / "work" / "notes.txt").exists()


@pytest.mark.parametrize("override, message", [
    ("training.seed=99999999999999999999", "training.seed: must be in [0, 2**32)"),
    ("training.seed=-1", "training.seed: must be in [0, 2**32)"),
    ("adapter.alpha=nan", "alpha: must be a positive number"),
    ("adapter.alpha=inf", "alpha: must be a positive number"),
])
def test_out_of_range_numbers_are_config_errors(override, message):
    import re
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.train=x.jsonl", "adapter.kind=lora", override])


def test_weak_outputs_never_replace_an_input_or_a_file_without_overwrite(tmp_path, capsys):
    from test_weak import TOPIC_RULES, topic_rows
    data = write_jsonl(tmp_path / "d.jsonl", topic_rows(30, 0, labelled=True))
    rules = tmp_path / "rules.yaml"
    rules.write_text(TOPIC_RULES)
    label = ["weak", "label", "--functions", str(rules), "--data", data, "--label-model", "majority", "--out"]
    original = open(data).read()
    assert main([*label, data, "--overwrite"]) == 2  # the data itself: refused even with --overwrite
    assert "is an input of this command" in capsys.readouterr().err
    assert open(data).read() == original
    out = tmp_path / "labelled.jsonl"
    out.write_text("my own notes\n")
    assert main([*label, str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "my own notes\n"
    assert main([*label, str(out), "--overwrite"]) == 0 and '"label"' in out.read_text()
    analyze = ["weak", "analyze", "--functions", str(rules), "--data", data, "--out"]
    png = tmp_path / "weak.png"
    assert main([*analyze, str(png)]) == 0 and main([*analyze, str(png)]) == 0  # its own plot, drawn again
    png.with_suffix(".json").write_text('{"mine": 1}')  # a file of the user's where the numbers would go
    assert main([*analyze, str(png)]) == 2
    assert "is not a weak analysis" in capsys.readouterr().err and "mine" in png.with_suffix(".json").read_text()


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_only_a_plot_tunesmith_drew_is_drawn_over_without_overwrite(tmp_path, suffix):
    from PIL import Image

    from tunesmith.io import check_output_file
    from tunesmith.train.metrics import plot_losses
    ours, photo, text = tmp_path / f"loss{suffix}", tmp_path / "photo.png", tmp_path / "grid2.png"
    plot_losses([{"event": "train", "step": 1, "loss": 0.7}], ours)
    Image.new("RGB", (4, 4)).save(photo)  # a user's own picture
    text.write_text("results I typed\n")
    assert check_output_file(ours, "plot", overwrite=None) == ours  # drawn again
    for theirs in (photo, text):
        with pytest.raises(ConfigError, match="exists and is not a plot; choose another file"):
            check_output_file(theirs, "plot", overwrite=None)
    assert check_output_file(photo, "plot", overwrite=True) == photo  # --overwrite says so
    with pytest.raises(ConfigError, match="is a folder"):
        check_output_file(tmp_path, "plot")


def test_pruning_removes_what_a_killed_save_left(tmp_path):
    """kill -9 during a save leaves a hidden temp folder (the rename never came); the next save's pruning
    removes it with the checkpoints beyond keep_checkpoints, and never a finished one it keeps."""
    from tunesmith.train.checkpoint import latest_checkpoint, prune_checkpoints
    ckpts = tmp_path / "checkpoints"
    for name in ("step-2", "step-4", "step-6", ".step-8.k2j3.tmp", ".step-6.old"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step-6"  # a temp folder is never resumed from
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-6"]


def test_export_never_writes_over_what_it_reads(tmp_path, capsys):
    model = tmp_path / "my model #1.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)  # the user's only copy of a quantized model
    assert main(["export", str(model), "--gguf", str(model), "--overwrite"]) == 2
    assert "is what the export reads" in capsys.readouterr().err
    assert model.read_bytes() == b"GGUF" + b"\0" * 60


def test_interpolate_never_saves_over_its_eval_data(finished, tmp_path, capsys):
    import shutil
    run, data = finished
    evals = tmp_path / "evals"
    evals.mkdir()
    held = shutil.copy(data, evals / "held out.jsonl")
    args = ["interpolate", "--finetuned", str(run), "--alphas", "0,1", "--eval", f"d={held}", "--missing", "finetuned"]
    assert main([*args, "--save", str(evals), "--overwrite"]) == 2
    assert "which this command reads" in capsys.readouterr().err and (evals / "held out.jsonl").exists()


def test_a_home_path_in_a_config_means_the_home_folder(tmp_path, monkeypatch):
    """YAML and quoted overrides do not go through the shell: `~/runs/x` must not become a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.train=~/data/train.jsonl", "data.eval=~/data/eval.jsonl", "output.dir=~/runs/x"])
    assert (cfg.data.train, cfg.data.eval, cfg.output.dir) == (
        f"{tmp_path}/data/train.jsonl", f"{tmp_path}/data/eval.jsonl", f"{tmp_path}/runs/x")
    assert load_config(None, ["data.train=bbc-news:train"]).data.train == "bbc-news:train"


def test_generation_stays_inside_the_model_s_context(lm_dir):
    """The tiny model has 512 positions: a reply asked for more stops at the context, and a prompt past it is a
    clear error (a model with learned positions would fail on an index; a rotary one degrades)."""
    from tunesmith.generate import chat_prompt_ids, generate
    from tunesmith.models import load_model, load_tokenizer
    model, tok = load_model(str(lm_dir), "causal_lm").eval(), load_tokenizer(str(lm_dir))
    messages = [{"role": "user", "content": "cats " * 200}]
    prompt = chat_prompt_ids(tok, messages, "chat").shape[1]
    assert 200 < prompt < 512
    calls = []
    original = model.generate
    model.generate = lambda ids, **kw: calls.append(kw["max_new_tokens"]) or original(ids, **kw)
    generate(model, tok, messages, max_new_tokens=100_000)
    assert calls == [512 - prompt]
    with pytest.raises(TunesmithError, match="the model's context is 512: shorten it"):
        generate(model, tok, [{"role": "user", "content": "cats " * 600}], max_new_tokens=4)


def test_a_truncated_or_corrupt_model_is_a_clear_error(tmp_path, encoder_dir, capsys):
    import shutil
    broken = tmp_path / "my model #2"
    shutil.copytree(encoder_dir, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(5000)  # a copy cut short
    gguf = tmp_path / "cut short.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    for model, message in ((broken, "cannot be loaded (SafetensorError"), (gguf, "cannot be read as GGUF")):
        assert main(["inspect", str(model)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    import tunesmith.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert main(["inspect", "anything"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; nothing half-written was left"


def test_interpolate_tables_and_names(finished, tmp_path, capsys):
    """--out replaces an earlier sweep's files but no file of the user's; an --eval name given twice is refused
    (the second set used to replace the first silently)."""
    run, data = finished
    args = ["interpolate", "--finetuned", str(run), "--alphas", "0,1", "--missing", "finetuned", "--eval", f"a={data}"]
    assert main([*args, "--eval", f"a={data}", "--out", str(tmp_path / "s")]) == 2
    assert "--eval name 'a' is given twice" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    assert main([*args, "--out", str(sweep)]) == 0 and main([*args, "--out", str(sweep)]) == 0  # its own: redrawn
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "interpolation.csv").write_text("my own table\n")
    assert main([*args, "--out", str(mine)]) == 2
    assert "exists" in capsys.readouterr().err and (mine / "interpolation.csv").read_text() == "my own table\n"


def test_weak_outputs_never_go_inside_a_run(finished, tmp_path, capsys):
    from test_weak import TOPIC_RULES, topic_rows
    run, _ = finished
    data = write_jsonl(tmp_path / "d.jsonl", topic_rows(10, 0, labelled=True))
    (tmp_path / "rules.yaml").write_text(TOPIC_RULES)
    before = (run / "metrics.jsonl").read_text()
    assert main(["weak", "label", "--functions", str(tmp_path / "rules.yaml"), "--data", data,
                 "--out", str(run / "metrics.jsonl"), "--overwrite"]) == 2
    assert "is inside the tunesmith run" in capsys.readouterr().err and (run / "metrics.jsonl").read_text() == before
