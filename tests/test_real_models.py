"""Integration: a few real fine-tuning steps on the packaged pretrained models; the loss must fall."""
from __future__ import annotations

import pytest

from tunesmith.config import load_config
from tunesmith.train import train

pytestmark = pytest.mark.slow


def test_minilm_lora_on_bbc_news(tmp_path):
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", "data.train=bbc-news:train", "data.max_examples=160",
                             "data.eval_fraction=0", "data.max_length=64", "adapter.kind=lora",
                             "adapter.targets=[query,value]", "training.max_steps=20", "training.batch_size=16",
                             "training.schedule=constant",
                             "training.lr=2e-3", "training.head_lr=5e-3", "training.log_every=1",
                             f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    r = train(cfg, log=lambda *_: None)
    assert r["final_loss"] < 0.8 * r["first_loss"], r


def test_smollm2_chat_sft_loss_falls(tmp_path):
    import json
    rows = [{"messages": [{"role": "user", "content": "What is the secret word?"},
                          {"role": "assistant", "content": "The secret word is tangerine."}]}] * 8
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["model.name=smollm2-135m-instruct", f"data.train={data}", "data.eval_fraction=0",
                             "data.max_length=64", "adapter.kind=lora", "adapter.targets=[q_proj,v_proj]",
                             "adapter.r=8", "training.max_steps=6", "training.batch_size=4", "training.lr=2e-3",
                             "training.log_every=1", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    r = train(cfg, log=lambda *_: None)
    assert r["final_loss"] < 0.7 * r["first_loss"], r
