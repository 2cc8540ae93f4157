"""Nothing lost, nothing silently wrong at the command line (issue 11, items 6-12): every command that
writes refuses to replace what is there unless asked; values are taken as written; generation uses the
prompt format the run trained on; the small things (JSON columns, flags anywhere, file modes, shapes)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import chat_rows, class_rows, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.train import train

QUIET = {"log": lambda *_: None}


def cls_config(encoder_dir, data, out, *extra):
    return load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0",
                              "training.max_steps=2", f"output.dir={out}", "output.progress=false", *extra])


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path, encoder_dir):
    """Item 6: runs shorter than save_every have no checkpoint, and the old guard only looked for those."""
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    train(cls_config(encoder_dir, data, run), **QUIET)
    before = (run / "summary.json").read_text()
    with pytest.raises(ConfigError, match="already holds a finished run; pass --resume .* --overwrite"):
        train(cls_config(encoder_dir, data, run, "training.lr=1e-3"), **QUIET)
    assert (run / "summary.json").read_text() == before
    with pytest.raises(ConfigError, match="the run has finished, there is nothing to resume"):
        train(cls_config(encoder_dir, data, run), resume=True, **QUIET)
    (run / "interpolation").mkdir()  # a stale extra from the old run goes with it
    train(cls_config(encoder_dir, data, run, "training.max_steps=3"), overwrite=True, **QUIET)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3 and not (run / "interpolation").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="already holds files"):
        train(cls_config(encoder_dir, data, other), **QUIET)
    with pytest.raises(ConfigError, match="not a tunesmith run folder .* --overwrite will not delete it"):
        train(cls_config(encoder_dir, data, other), overwrite=True, **QUIET)
    assert (other / "thesis.tex").read_text() == "years of work"
    (other / "config.yaml").write_text("model: {name: mine}\n")  # a user's project with its own config.yaml
    with pytest.raises(ConfigError, match="not a tunesmith run folder .* --overwrite will not delete it"):
        train(cls_config(encoder_dir, data, other), overwrite=True, **QUIET)
    assert (other / "thesis.tex").read_text() == "years of work"
    cwd = os.getcwd()
    try:  # a real run, but the folder the user is working in: never deleted
        os.chdir(run)
        with pytest.raises(ConfigError, match="is the current folder or holds it"):
            train(cls_config(encoder_dir, data, "."), overwrite=True, **QUIET)
    finally:
        os.chdir(cwd)
    assert (run / "summary.json").exists()


def test_a_failed_setup_leaves_nothing_that_blocks_a_retry(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    with pytest.raises(ConfigError):
        train(cls_config(encoder_dir, data, tmp_path / "run", "objective.type=sft"), **QUIET)
    train(cls_config(encoder_dir, data, tmp_path / "run"), **QUIET)  # the fixed config just runs
    assert (tmp_path / "run" / "summary.json").exists()


def test_merge_and_interpolate_refuse_to_replace_folders(tmp_path, encoder_dir, capsys):
    """Item 7: `merge --out RUN` used to delete the run."""
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run, other = tmp_path / "run", tmp_path / "other"
    train(cls_config(encoder_dir, data, run, "adapter.kind=lora", "adapter.targets=[query,value]"), **QUIET)
    train(cls_config(encoder_dir, data, other), **QUIET)
    assert main(["merge", str(run), "--out", str(other)]) == 2
    assert main(["merge", str(run), "--out", str(other), "--overwrite"]) == 2
    assert "holds a tunesmith run" in capsys.readouterr().err and (other / "summary.json").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert main(["merge", str(run), "--out", str(full)]) == 2
    assert "is not empty (keep.txt); pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(run), "--out", str(full), "--overwrite"]) == 0
    assert (full / "head.safetensors").exists() and not (full / "keep.txt").exists()
    args = ["interpolate", "--finetuned", str(other), "--alphas", "0,1", "--eval", f"d={data}", "--missing", "finetuned"]
    assert main([*args, "--save", str(run)]) == 2 and (run / "adapter").exists()
    assert main([*args, "--save", str(tmp_path / "half")]) == 0
    assert main([*args, "--save", str(tmp_path / "half")]) == 2  # a second time: asked before replacing
    assert main([*args, "--save", str(tmp_path / "half"), "--overwrite"]) == 0


def test_override_values_are_taken_as_written(tmp_path, encoder_dir):
    """Items 8-9: a ' #' in a path was read as a YAML comment; adapter values skipped the coercion."""
    folder = tmp_path / "my set #2"
    folder.mkdir()
    data = write_jsonl(folder / "x: y.jsonl", class_rows(20))
    cfg = load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "adapter.kind=lora",
                             "adapter.dropout=5e-2", "adapter.alpha=1e1", "adapter.r=16", "adapter.targets=[query, value]",
                             "training.lr=1e-4", "data.eval=null", "training.device=cpu", f"output.dir={folder / 'run'}"])
    assert cfg.data.train == data and cfg.output.dir == str(folder / "run")
    assert (cfg.adapter.dropout, cfg.adapter.alpha, cfg.adapter.r) == (0.05, 10.0, 16)
    assert cfg.adapter.targets == ["query", "value"] and cfg.data.eval is None
    assert load_config(None, ['data.train=" padded.jsonl "']).data.train == " padded.jsonl "
    with pytest.raises(ConfigError, match="adapter.dropout: expected a number"):
        load_config(None, ["data.train=x.jsonl", "adapter.kind=lora", "adapter.dropout=lots"])


def test_service_jobs_pass_values_not_strings(tmp_path):
    """Item 9: the service built `data.train={path}` strings, so a data folder with ' #' broke every job."""
    from tunesmith.config import config_from_dict, set_values
    weird = str(tmp_path / "data #1" / "files" / "file-abc.jsonl")
    cfg = config_from_dict(set_values({"training": {"lr": 2e-4}}, {"data.train": weird, "data.eval": None,
                                                                    "output.dir": str(tmp_path / "a: b #c")}))
    assert cfg.data.train == weird and cfg.output.dir == str(tmp_path / "a: b #c") and cfg.data.eval is None


def test_generate_uses_the_prompt_format_the_run_trained_on(tmp_path, lm_dir):
    """Item 11: a prompt/completion run saw raw `prompt + completion` text, never the chat template."""
    from tunesmith.generate import chat_prompt_ids, load_generator
    rows = [{"prompt": f"Q{i}: 2+2=", "completion": " 4"} for i in range(12)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0", "training.max_steps=1",
                             f"output.dir={tmp_path / 'pc'}", "output.progress=false"])
    train(cfg, **QUIET)
    model, tok, template = load_generator(str(tmp_path / "pc"), "cpu")
    assert template == "raw"
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "Q1: 2+2="}], template)[0].tolist()
    assert ids == tok("Q1: 2+2=", add_special_tokens=True)["input_ids"]  # exactly the training prompt's ids
    assert load_generator(str(tmp_path / "pc"), "cpu", "chat")[2] == "chat"
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    cfg = load_config(None, [f"model.name={lm_dir}", f"data.train={chat}", "data.eval_fraction=0", "training.max_steps=1",
                             f"output.dir={tmp_path / 'chat'}", "output.progress=false"])
    train(cfg, **QUIET)
    assert load_generator(str(tmp_path / "chat"), "cpu")[2] == "chat"


def test_json_problems_name_the_right_column_and_arrays_get_one_hint(tmp_path):
    """Item 12: the column counted the line's newline; a JSON array gave an error per line."""
    from tunesmith.data import DataError, read_records
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1\n')
    _, problems = read_records(bad)
    assert str(problems[0]) == f"{bad}:2: json: invalid JSON at column 25: Expecting ',' delimiter"
    array = tmp_path / "data.json"
    array.write_text(json.dumps([{"text": f"t{i}", "label": i % 2} for i in range(300)], indent=2))
    records, problems = read_records(array)  # a JSON array is read as records (data/convert.py), one per element
    assert not problems and len(records) == 300 and records[299].data == {"text": "t299", "label": 1}
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\n')
    assert read_records(bom)[0][0].data == {"text": "a", "label": "x"}
    with pytest.raises(DataError, match="is a folder"):
        read_records(tmp_path)


def test_flags_between_overrides_and_resume_by_run_folder(tmp_path, lm_dir):
    """Item 12: `train cfg --resume training.x=1` was rejected; a run made with overrides only resumes by its folder."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    run = tmp_path / "run"
    args = [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0", "data.max_length=64",
            "adapter.kind=lora", "adapter.targets=[q_proj,v_proj]", "training.max_steps=6", "training.save_every=2",
            f"output.dir={run}"]

    def stop(event):
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args + ["output.progress=false"]), on_step=stop, **QUIET)
    assert main(["train", str(run), "--quiet", "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert main(["train", f"model.name={lm_dir}", "--quiet", f"data.train={data}", "--overwrite", *args[2:]]) == 0


def test_summary_first_loss_is_the_first_step_and_files_follow_the_umask(tmp_path, encoder_dir):
    """Item 12: first_loss was the first logged window's average; atomic writes made 0600 files."""
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(40))
    run = tmp_path / "run"
    first = []
    s = train(cls_config(encoder_dir, data, run, "training.max_steps=4", "training.log_every=4"),
              on_step=lambda e: first.append(e.loss), **QUIET)
    assert s["first_loss"] == first[0] != s["final_loss"]
    from tunesmith.io import UMASK
    for name in ("summary.json", "run.json", "config.yaml"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o666 & ~UMASK, name
    assert stat.S_IMODE(os.stat(run / "model").st_mode) == 0o777 & ~UMASK


def test_inspect_prints_layers_as_their_constructors_read(capsys):
    from tunesmith.cli import _signature
    from torch import nn
    assert _signature(nn.Linear(576, 1536)) == "Linear(576, 1536)"
    assert _signature(nn.Conv2d(3, 32, 3)) == "Conv2d(3, 32, 3x3)"
    from transformers.pytorch_utils import Conv1D
    assert _signature(Conv1D(96, 32)) == "Conv1D(32, 96)"  # GPT-2's: nx=32 inputs, nf=96 outputs


def test_wise_ft_breaks_accuracy_ties_by_loss():
    from tunesmith.wise_ft import choose_alpha
    rows = [{"alpha": 0.0, "d_score": 0.9, "d_loss": 0.6}, {"alpha": 0.5, "d_score": 0.9, "d_loss": 0.1},
            {"alpha": 1.0, "d_score": 0.8, "d_loss": 0.05}]
    assert choose_alpha(rows, ["d"], "mean") == 0.5 and choose_alpha(rows, ["d"], "d") == 0.5
    with pytest.raises(TunesmithError, match="--select 'x'"):
        choose_alpha(rows, ["d"], "x")


# ---- found by trying the objective interface as an attacker would ----------------------------------------

def test_load_run_takes_the_artifact_run_json_names(tmp_path, encoder_dir):
    """A stale adapter/ beside a newer model/ (a rerun of another kind) must not be what eval loads."""
    from tunesmith.train import load_run
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    train(cls_config(encoder_dir, data, run), **QUIET)
    stale = tmp_path / "lora"
    train(cls_config(encoder_dir, data, stale, "adapter.kind=lora", "adapter.targets=[query]"), **QUIET)
    (stale / "adapter").rename(run / "adapter")
    assert json.loads((run / "run.json").read_text())["artifact"] == "model"
    model = load_run(run).model
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_resume_refuses_data_that_remaps_the_classes(tmp_path, encoder_dir):
    data = tmp_path / "cls.jsonl"
    write_jsonl(data, class_rows(40))
    run = tmp_path / "run"

    def stop(event):
        if event.step == 2:
            raise KeyboardInterrupt

    cfg = cls_config(encoder_dir, str(data), run, "training.max_steps=4", "training.save_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop, **QUIET)
    original = data.read_text()
    data.write_text(original.replace('"sport"', '"athletics"'))  # edited in place: classes re-ordered
    with pytest.raises(ConfigError, match=r"data.train \(.*\) changed since the run started"):
        train(cfg, resume=True, **QUIET)
    info = json.loads((run / "run.json").read_text())  # a run from before run.json kept the data's hash
    (run / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "data_sources"}))
    with pytest.raises(ConfigError, match="the data now gives labels .* but the run trained with"):
        train(cfg, resume=True, **QUIET)


def test_resume_refuses_a_training_file_edited_in_place(tmp_path, encoder_dir):
    """Same classes, other examples: only the recorded hash can tell. The same bytes written again resume."""
    data = tmp_path / "my data #1.jsonl"
    write_jsonl(data, class_rows(40))
    run = tmp_path / "run"

    def stop(event):
        if event.step == 2:
            raise KeyboardInterrupt

    cfg = cls_config(encoder_dir, str(data), run, "training.max_steps=4", "training.save_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop, **QUIET)
    sources = json.loads((run / "run.json").read_text())["data_sources"]
    assert sources["train"]["bytes"] == data.stat().st_size and len(sources["train"]["sha256"]) == 64
    original = data.read_text()
    lines = original.splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # the same examples in another order: other batches
    with pytest.raises(ConfigError, match=r"data.train \(.*my data #1.jsonl\) changed since the run started .* "
                                          r"Restore it"):
        train(cfg, resume=True, **QUIET)
    info_file = run / "run.json"
    info = json.loads(info_file.read_text())
    for bad in ("abc", ["x"], {"train": "x"}, {"train": None}):  # hand-edited: a clear error, not a traceback
        info_file.write_text(json.dumps({**info, "data_sources": bad}))
        with pytest.raises(ConfigError, match="run.json: data_sources is malformed"):
            train(cfg, resume=True, **QUIET)
    data.write_text(original)  # restored (a new mtime, the same content)
    from tunesmith.data.fingerprint import legacy_fingerprint
    legacy = legacy_fingerprint(str(data))  # as runs started before the hash left out a file's name kept it
    assert legacy["sha256"] != info["data_sources"]["train"]["sha256"]
    info_file.write_text(json.dumps({**info, "data_sources": {"train": legacy}}))
    assert train(cfg, resume=True, **QUIET)["steps"] == 4


def test_resume_by_run_folder_from_another_folder_continues_that_run(tmp_path, lm_dir, monkeypatch, capsys):
    """The saved output.dir is relative to where the run started; `train RUN --resume` elsewhere must not start
    a new run there. A relative data path that is not found from here says so."""
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    write_jsonl(tmp_path / "start" / "chat.jsonl", chat_rows(24))
    args = [f"model.name={lm_dir}", "data.eval_fraction=0", "data.max_length=64", "adapter.kind=lora",
            "adapter.targets=[q_proj,v_proj]", "training.max_steps=6", "training.save_every=2", "output.dir=run",
            "output.progress=false"]

    def stop(event):
        if event.step == 3:
            raise KeyboardInterrupt

    for data, name in ((str(tmp_path / "start" / "chat.jsonl"), "run"), ("chat.jsonl", "run2"), ("chat.jsonl", "run3")):
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, [f"data.train={data}", *args[:-2], f"output.dir={name}", args[-1]]),
                  on_step=stop, **QUIET)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", str(tmp_path / "start" / "run"), "--quiet", "--resume"]) == 0
    assert json.loads((tmp_path / "start" / "run" / "summary.json").read_text())["steps"] == 6
    assert not any((tmp_path / "elsewhere").iterdir())  # no new run beside
    # a relative data path is read from the folder the run started in (run.json's started_in)
    assert main(["train", str(tmp_path / "start" / "run2"), "--quiet", "--resume"]) == 0
    assert json.loads((tmp_path / "start" / "run2" / "summary.json").read_text())["steps"] == 6
    # ... and when the file has moved since, the error's fix works: the content is the same, so the run resumes
    moved = tmp_path / "elsewhere" / "moved chat #1.jsonl"
    (tmp_path / "start" / "chat.jsonl").rename(moved)
    with pytest.raises(SystemExit, match="data.train: 'chat.jsonl' is relative, as saved in .* nor from the folder "
                                         "the run started in .*; pass data.train=/absolute/path/to/it"):
        main(["train", str(tmp_path / "start" / "run3"), "--quiet", "--resume"])
    assert main(["train", str(tmp_path / "start" / "run3"), "--quiet", "--resume", f"data.train={moved}"]) == 0
    assert json.loads((tmp_path / "start" / "run3" / "summary.json").read_text())["steps"] == 6
    # the content is what counts: another file passed as data.train is refused
    write_jsonl(moved, chat_rows(30))
    run4 = tmp_path / "start" / "run4"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, [f"data.train={moved}", *args[:-2], f"output.dir={run4}", args[-1]]), on_step=stop,
              **QUIET)
    other = tmp_path / "elsewhere" / "other.jsonl"
    other.write_text("\n".join(moved.read_text().splitlines()[::-1]) + "\n")
    capsys.readouterr()
    assert main(["train", str(run4), "--quiet", "--resume", f"data.train={other}"]) == 2
    assert "data.train (" + str(other) + ") changed since the run started" in capsys.readouterr().err


def test_builtin_data_resumes_by_run_folder(tmp_path, monkeypatch):
    """`data.train: digits` (a built-in dataset named without a split) is not a relative path."""
    monkeypatch.chdir(tmp_path)
    args = ["model.name=mobilenet-v2-imagenet", "data.train=digits", "data.eval_fraction=0", "data.image_size=32",
            "freeze.train_only=[classifier]",
            "training.max_steps=4", "training.save_every=2", "training.batch_size=4", "output.dir=run",
            "output.progress=false"]

    def stop(event):
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args), on_step=stop, **QUIET)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", str(tmp_path / "run"), "--quiet", "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_overwrite_deletes_the_old_run_only_once_the_new_one_has_loaded(tmp_path, encoder_dir):
    """A typo in the new config must not cost the old run; nor may --overwrite delete what the new run reads,
    or follow a link."""
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    train(cls_config(encoder_dir, data, run), **QUIET)
    before = (run / "summary.json").read_text()
    with pytest.raises(TunesmithError, match="typo.jsonl"):
        train(cls_config(encoder_dir, tmp_path / "typo.jsonl", run), overwrite=True, **QUIET)
    with pytest.raises(TunesmithError, match="not-a-model"):
        train(cls_config(tmp_path / "not-a-model", data, run), overwrite=True, **QUIET)
    assert (run / "summary.json").read_text() == before
    inside = write_jsonl(run / "kept.jsonl", class_rows(20))
    with pytest.raises(ConfigError, match=r"--overwrite would delete .* reads data.train \(.*kept.jsonl\) from inside it"):
        train(cls_config(encoder_dir, inside, run), overwrite=True, **QUIET)
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(ConfigError, match="is a symbolic link .* does not delete through a link"):
        train(cls_config(encoder_dir, data, link), overwrite=True, **QUIET)
    assert (run / "summary.json").read_text() == before and (run / "kept.jsonl").exists()
    train(cls_config(encoder_dir, data, run, "training.max_steps=3"), overwrite=True, **QUIET)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3 and not (run / "kept.jsonl").exists()


def test_divergence_stops_with_a_message_and_keeps_the_weights(tmp_path, encoder_dir):
    from tunesmith.train.loop import TrainingDiverged
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    with pytest.raises(TrainingDiverged, match="training diverged. Lower training.lr"):
        train(cls_config(encoder_dir, data, tmp_path / "run", "training.lr=1e30", "training.max_grad_norm=null",
                         "training.max_steps=6", "training.schedule=constant"), **QUIET)
    assert not (tmp_path / "run" / "model").exists()


def test_regression_guards(tmp_path, encoder_dir):
    """Values float32 cannot hold are data errors; constant targets give no NaN metrics (strict JSON)."""
    from tunesmith.data import DataError, read_records, validate
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "a", "value": 1e39}, {"text": "b", "value": 10 ** 400}])
    with pytest.raises(DataError) as e:
        validate(*read_records(big))
    assert "beyond float32's range" in str(e.value) and "must be a finite number" in str(e.value)
    same = write_jsonl(tmp_path / "same.jsonl", [{"text": f"t {i}", "value": 2.0} for i in range(20)])
    s = train(cls_config(encoder_dir, same, tmp_path / "run", "data.eval_fraction=0.2"), **QUIET)
    assert "eval_r2" not in s and "eval_rmse" in s
    json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    header = tmp_path / "h.csv"
    header.write_text("text,value\n")
    assert "has a header but no rows" in str(read_records(header)[1][0])


def test_merged_regression_folder_says_how_to_read_its_head(tmp_path, encoder_dir):
    rows = [{"text": f"w{i % 5} x", "value": float(100 + i % 5)} for i in range(30)]
    data = write_jsonl(tmp_path / "reg.jsonl", rows)
    train(cls_config(encoder_dir, data, tmp_path / "run", "adapter.kind=lora", "adapter.targets=[query]"), **QUIET)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    head = json.loads((tmp_path / "merged" / "head.json").read_text())
    assert head["task"] == "regression" and head["target_mean"] == pytest.approx(102.0) and head["outputs"] == 1


def test_rare_tag_in_the_held_out_share_is_not_an_error(tmp_path, encoder_dir):
    rows = [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}] * 19 + [{"tokens": ["c"], "tags": ["B-RARE"]}]
    data = write_jsonl(tmp_path / "tags.jsonl", rows)
    for seed in range(3):  # whichever share the rare example lands in
        s = train(cls_config(encoder_dir, data, tmp_path / f"r{seed}", "data.eval_fraction=0.2",
                             f"training.seed={seed}"), **QUIET)
        assert json.loads((tmp_path / f"r{seed}" / "run.json").read_text())["labels"] == ["B-RARE", "B-X", "O"]
        assert "eval_f1" in s


def test_words_that_vanish_or_run_together_are_refused(tmp_path, encoder_dir, lm_dir):
    from tunesmith.data import DataError
    from tunesmith.data.tokenize import encode_word_tags
    from tunesmith.data.formats import Record
    from tunesmith.models import load_tokenizer
    rec = Record("f.jsonl", 3, {"tokens": ["Paris", "\u200b"], "tags": ["B-LOC", "O"]})
    with pytest.raises(DataError, match=r"f.jsonl:3: tokens\[1\]: '\\u200b' becomes no token"):
        encode_word_tags(load_tokenizer(str(encoder_dir)), rec, {"B-LOC": 0, "O": 1})
    with pytest.raises(DataError, match="joins pre-split words without spaces"):
        encode_word_tags(load_tokenizer(str(lm_dir)), Record("f.jsonl", 1, {"tokens": ["a", "b"], "tags": ["O", "O"]}),
                         {"O": 0})


@pytest.mark.parametrize("override, message", [
    ("training.log_every=0", "training.log_every: must be at least 1"),
    ("training.eval_batch_size=0", "training.eval_batch_size: must be at least 1"),
    ("training.max_steps=-1", "training.max_steps: must be at least 1"),
    ("training.eval_every=-1", "training.eval_every: must be >= 0"),
    ("training.lr=inf", "training.lr: must be positive"),
    ("training.epochs=inf", "must be positive .and finite"),
    ("head.dropout=2", r"head.dropout: must be in \[0, 1\)"),
    ("objective.label_smoothing=1", "objective.label_smoothing"),
    ("data.max_examples=0", "data.max_examples: must be at least 1"),
])
def test_out_of_range_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=x.jsonl", override])


def test_a_single_logged_point_is_visible_in_loss_png(tmp_path):
    """Item 12: a one-point line has no length, so without a marker the plot was empty."""
    import numpy as np
    from PIL import Image
    from tunesmith.train.metrics import plot_losses
    plot_losses([{"event": "train", "step": 1, "loss": 0.7}], tmp_path / "loss.png")
    pixels = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)
    blue = np.abs(pixels - np.array([0x1F, 0x77, 0xB4])).sum(-1) < 40  # matplotlib's first line colour
    # the legend's sample line alone is ~60 such pixels; the point's marker (and its legend marker) adds ~100
    assert blue.sum() > 120, blue.sum()


@pytest.mark.parametrize("kind", ["ia3", "bottleneck"])
def test_every_adapter_kind_trains_end_to_end(kind, tmp_path, lm_dir):
    """IA3's merge helper was named `_apply`, shadowing nn.Module._apply: `model.to(device)` crashed every IA3 run."""
    from tunesmith.train import load_run
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    targets = "[down_proj]" if kind == "bottleneck" else "[q_proj,v_proj,down_proj]"
    extra = ["adapter.feedforward=[down_proj]"] if kind == "ia3" else []
    s = train(load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0",
                                 f"adapter.kind={kind}", f"adapter.targets={targets}", *extra, "training.max_steps=2",
                                 f"output.dir={tmp_path / 'run'}", "output.progress=false"]), **QUIET)
    assert s["steps"] == 2 and load_run(tmp_path / "run").model is not None


def test_resume_past_the_new_max_steps_says_so(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(40))

    def stop(event):
        if event.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cls_config(encoder_dir, data, tmp_path / "run", "training.max_steps=8", "training.save_every=2"),
              on_step=stop, **QUIET)
    said = []
    s = train(cls_config(encoder_dir, data, tmp_path / "run", "training.max_steps=2"), resume=True, log=said.append)
    assert s["steps"] == 4 and any("already past the 2 steps" in m for m in said)


def test_epoch_end_steps_are_exact_with_gradient_accumulation(tmp_path, encoder_dir):
    """3 micro-batches an epoch, 2 per step, 3 epochs: epochs end at steps 2, 3 and 5 (the service saved its
    epoch checkpoints at 2, 4 and 5, estimating epochs from the step count)."""
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(6))
    seen = []
    train(cls_config(encoder_dir, data, tmp_path / "run", "data.eval_fraction=0", "training.batch_size=2",
                     "training.grad_accum=2", "training.epochs=3", "training.max_steps=null"), on_step=lambda e: seen.append(e.epoch_end), **QUIET)
    assert [step for step, end in enumerate(seen, start=1) if end] == [2, 3, 5]


def test_all_examples_truncated_away_says_why_and_the_fix(tmp_path, lm_dir):
    from tunesmith.data.formats import DataError
    rows = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}] * 4
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0", "data.max_length=32",
                             "data.packing=false", "training.max_steps=1", f"output.dir={tmp_path / 'run'}",
                             "output.progress=false"])
    with pytest.raises(DataError, match=r"no usable training examples remain \(4 had no trainable token left after "
                                        r"truncation: raise data.max_length, now 32\)"):
        train(cfg, **QUIET)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_training_file_says_so_whatever_the_objective(tmp_path, lm_dir, content, capsys):
    (tmp_path / "pairs.jsonl").write_text(content)
    assert main(["train", f"model.name={lm_dir}", f"data.train={tmp_path / 'pairs.jsonl'}", "objective.type=dpo",
                 f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:0: file: is empty" in err and "does not train on" not in err
