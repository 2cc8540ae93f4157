"""The training loop on tiny local models: schedules, accumulation, exact resume, artifacts."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, class_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.train import train
from tunesmith.train.optim import lr_factor, param_groups


def test_lr_schedules_hand_worked():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == 0.5
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5) and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_loraplus_and_head_groups():
    from conftest import tiny_bert
    from tunesmith.adapters import LoraConfig, add_adapter
    model = tiny_bert()
    add_adapter(model, LoraConfig(targets=["query"], r=2, modules_to_save=["classifier"]))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, loraplus_ratio=16, head_lr=5e-3, head_names=("classifier.",))
    by_lr = {g["lr"]: g for g in groups}
    assert set(by_lr) == {1e-3, 1.6e-2, 5e-3}
    assert all(p.ndim < 2 for g in groups if g["weight_decay"] == 0 for p in g["params"])


def lm_config(lm_dir, data, out, *extra):
    return load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.max_length=64", "data.eval_fraction=0",
                              "adapter.kind=lora", "adapter.targets=[q_proj,v_proj]", "adapter.r=4",
                              "training.lr=5e-3", "training.batch_size=4", "training.log_every=1", "training.save_every=0",
                              "data.packing=false", "training.bf16=false",  # the unpacked fp32 semantics tested here
                              f"output.dir={out}", "output.progress=false", *extra])


def adapter_weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_accumulation_equals_large_batch(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    big = train(lm_config(lm_dir, data, tmp_path / "big", "training.max_steps=3", "training.max_grad_norm=null"), log=lambda *_: None)
    acc = train(lm_config(lm_dir, data, tmp_path / "acc", "training.max_steps=3", "training.batch_size=2",
                          "training.grad_accum=2", "training.max_grad_norm=null"), log=lambda *_: None)
    a, b = adapter_weights(tmp_path / "big"), adapter_weights(tmp_path / "acc")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert big["final_loss"] == pytest.approx(acc["final_loss"], abs=1e-6)


def test_resume_after_crash_matches_uninterrupted(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    common = ["training.max_steps=9", "training.save_every=3", "adapter.dropout=0.1", "data.packing=true"]
    full = train(lm_config(lm_dir, data, tmp_path / "full", *common), log=lambda *_: None)

    def crash(event):
        if event.step == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(lm_config(lm_dir, data, tmp_path / "crash", *common), on_step=crash, log=lambda *_: None)
    assert (tmp_path / "crash" / "checkpoints" / "step-6").exists()
    with pytest.raises(ConfigError, match="--resume"):
        train(lm_config(lm_dir, data, tmp_path / "crash", *common), log=lambda *_: None)
    resumed = train(lm_config(lm_dir, data, tmp_path / "crash", *common), resume=True, log=lambda *_: None)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    a, b = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "crash")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "train"]
    assert steps == list(range(1, 10)), "metrics after the checkpoint are rewritten, not duplicated"


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "tunesmith.cli", *args], env


KILL_ARGS = ["data.max_length=64", "data.eval_fraction=0", "adapter.kind=lora", "adapter.targets=[q_proj,v_proj]",
             "adapter.r=4", "training.lr=5e-3", "training.batch_size=4", "training.max_steps=60",
             "training.save_every=10", "training.log_every=1", "output.progress=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, lm_dir):
    tmp = tmp_path_factory.mktemp("kill")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(24))
    cmd, env = _cli("train", f"model.name={lm_dir}", f"data.train={data}", *KILL_ARGS, f"output.dir={tmp / 'ref'}")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return data, tmp / "ref"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_process_resumes_to_same_result(tmp_path, lm_dir, uninterrupted, sig):
    """A real `tunesmith train` process killed mid-run (SIGKILL) or interrupted (Ctrl-C) resumes exactly."""
    data, ref = uninterrupted
    args = [f"model.name={lm_dir}", f"data.train={data}", *KILL_ARGS, f"output.dir={tmp_path / 'run'}"]
    cmd, env = _cli("train", *args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints" / "step-20").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.005)
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0, "the run should have been stopped before finishing"
    if sig == signal.SIGINT:
        assert "checkpoint saved" in out
    assert not (tmp_path / "run" / "adapter").exists()
    cmd, env = _cli("train", *args, "--resume")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resumed from" in done.stdout
    a, b = adapter_weights(ref), adapter_weights(tmp_path / "run")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    want = json.loads((ref / "summary.json").read_text())
    got = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert got["final_loss"] == pytest.approx(want["final_loss"], abs=1e-6)


def test_classification_full_finetune_and_artifacts(tmp_path, encoder_dir):
    from tunesmith.train import load_run
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(40))
    cfg = load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                             "training.max_steps=12", "training.lr=1e-3", "training.eval_every=6",
                             "training.eval_at_start=true", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    result = train(cfg, log=lambda *_: None)
    assert result["final_loss"] < result["first_loss"]
    assert result["trainable"] == result["total_params"]  # no adapter: full fine-tuning
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "labels.json", "model/head.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["event"] == "eval"] == [0, 6, 12]
    assert all(0 <= r["accuracy"] <= 1 for r in evals if r["event"] == "train")
    from PIL import Image
    width, height = Image.open(tmp_path / "run" / "loss.png").size
    assert width > 3 * height, "loss and accuracy panels side by side"
    run = load_run(tmp_path / "run")
    model, tok = run.model, run.tokenizer
    assert run.info.task == "classification" and run.info.labels == ["sport", "tech"]
    batch = tok(["match goal team win 99"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).argmax(-1).item() == 0


def test_freeze_first_blocks_with_head(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    cfg = load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "freeze.first_blocks=1",
                             "training.max_steps=2", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    from tunesmith.train.setup import build
    s = build(cfg)
    frozen = {n for n, p in s.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("backbone.encoder.layer.0.") for n in frozen)
    assert not any(n.startswith("backbone.encoder.layer.1.") for n in frozen)
    assert "backbone.embeddings.word_embeddings.weight" in frozen and "head.weight" not in frozen


def test_bf16_checkpointing_and_early_stopping(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    r = train(lm_config(lm_dir, data, tmp_path / "bf16", "training.max_steps=4", "training.bf16=true",
                        "training.gradient_checkpointing=true"), log=lambda *_: None)
    assert math.isfinite(r["final_loss"])
    # lr so large that eval loss rises: patience 1 stops after the second evaluation
    r = train(lm_config(lm_dir, data, tmp_path / "es", "training.max_steps=40", "training.lr=3.0",
                        "training.schedule=constant", "data.eval_fraction=0.25", "training.eval_every=2",
                        "training.early_stopping_patience=1"), log=lambda *_: None)
    assert r["stopped_early"] and r["steps"] < 40
