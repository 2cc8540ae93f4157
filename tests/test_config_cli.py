"""Config validation and the command line (real subprocesses where it matters)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import chat_rows, write_jsonl
from tunesmith.cli import build_parser, main
from tunesmith.config import config_from_dict, dump_config, load_config
from tunesmith.errors import ConfigError


def test_unknown_keys_name_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.lrr: unknown key; did you mean training\.lr\?"):
        load_config(None, ["data.train=x.jsonl", "training.lrr=1e-3"])
    with pytest.raises(ConfigError, match="trainig: unknown section; did you mean training"):
        load_config(None, ["data.train=x.jsonl", "trainig.lr=1"])
    with pytest.raises(ConfigError, match=r"adapter\.alpah: not a lora adapter option; did you mean 'alpha'"):
        load_config(None, ["data.train=x.jsonl", "adapter.kind=lora", "adapter.alpah=3"])
    with pytest.raises(ConfigError, match=r"training\.batch_size: expected an integer, got 'eight'"):
        load_config(None, ["data.train=x.jsonl", "training.batch_size=eight"])
    with pytest.raises(ConfigError, match="model.task: must be one of"):
        load_config(None, ["data.train=x.jsonl", "model.task=translation"])


def test_yaml_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  name: x\ntraining:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_config(f)


def test_overrides_and_roundtrip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {train: a.jsonl}\nadapter: {kind: lora, r: 4, targets: [q_proj]}\ntraining: {lr: 1.0e-3}\n")
    cfg = load_config(f, ["training.lr=2e-4", "adapter.r=16", "freeze.first_blocks=2"])
    assert cfg.training.lr == 2e-4 and cfg.adapter.r == 16 and cfg.freeze.first_blocks == 2
    import yaml
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert dump_config(again) == dump_config(cfg)
    assert load_config(None, ["data.train=a", "adapter=null"]).adapter is None


def test_every_command_has_help_for_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= {"train", "eval", "generate", "chat", "merge", "inspect"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"tunesmith {name}: {action.dest} has no help text"
        text = p.format_help()
        assert "usage:" in text


def test_cli_train_merge_generate(tmp_path, lm_dir, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    run = tmp_path / "run"
    rc = main(["train", f"model.name={lm_dir}", f"data.train={data}", "data.max_length=64", "adapter.kind=lora",
               "adapter.targets=all-linear", "training.max_steps=3", "training.batch_size=4", f"output.dir={run}", "--quiet"])
    assert rc == 0 and (run / "adapter" / "adapter_config.json").exists()
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Tell me about cats", "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(run), "--data", data]) == 0
    out = capsys.readouterr().out
    assert '"eval_loss"' in out and '"eval_perplexity"' in out


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    p = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "model.name=nonexistent-model",
                        f"data.train={bad}", f"output.dir={tmp_path / 'r'}"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "model 'nonexistent-model' not found" in p.stderr


def test_cli_data_errors_listed(tmp_path, lm_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"text": 3}])
    p = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", f"model.name={lm_dir}",
                        f"data.train={bad}", f"output.dir={tmp_path / 'r'}"], capture_output=True, text=True)
    assert p.returncode == 2 and "bad.jsonl:1: messages: no assistant message" in p.stderr
    assert "bad.jsonl:2: keys: looks like text but the file is chat" in p.stderr


def test_inspect_suggests_targets(lm_dir, capsys):
    assert main(["inspect", str(lm_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.layers (2 blocks)" in out and "q_proj" in out and "all-linear" in out
    assert main(["inspect", "mobilenet-v2-imagenet", "--task", "classification"]) == 0
    out = capsys.readouterr().out  # a CNN's numbered convolutions are grouped by kind, and all-conv suggested
    assert "features (19 blocks)" in out and "depthwise 3x3 conv       x17" in out and "all-conv" in out


def test_chat_streams_and_keeps_history(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    run = tmp_path / "run"
    assert main(["train", f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0", "adapter.kind=lora",
                 "adapter.targets=[q_proj]", "training.max_steps=1", f"output.dir={run}", "--quiet"]) == 0
    p = subprocess.run([sys.executable, "-m", "tunesmith.cli", "chat", str(run), "--max-new-tokens", "3"],
                       input="hello\n/reset\nagain\n/exit\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("bot> ") == 2 and "you> " in p.stdout


def test_missing_model_and_tokenizer_errors(tmp_path, lm_dir):
    from tunesmith.models import load_tokenizer, resolve_model
    from tunesmith.models.loading import ModelNotFoundError
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="exists but has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    import shutil
    shutil.copy(lm_dir / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_gguf_file_path_uses_the_cache():
    from tunesmith.models import PACKAGED, resolve_model
    gguf = PACKAGED["smollm2-135m-instruct"]()
    folder = resolve_model(str(gguf))
    assert (folder / "config.json").exists() and any(folder.glob("*.safetensors"))
