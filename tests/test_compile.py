"""training.compile: the blocks compiled in place train to the eager run's losses and save the same files."""
from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from test_precision_defaults import lm_run_args
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.train import train

pytestmark = pytest.mark.slow  # about a minute of inductor compiles


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"step"' in line]


def test_compiled_blocks_train_like_eager_and_resume(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    common = ["training.bf16=false", "training.gradient_checkpointing=false", "training.log_every=1"]
    train(load_config(None, lm_run_args(lm_dir, data, tmp_path / "eager") + common), log=lambda *_: None)
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    lines = []
    started = time.perf_counter()

    def stop(event):
        if event.step == 3:
            raise KeyboardInterrupt

    compiled = lm_run_args(lm_dir, data, tmp_path / "compiled") + common + ["training.compile=true"]
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, compiled), on_step=stop, log=lines.append)
    assert any(line.startswith("torch.compile: 2 blocks (LlamaDecoderLayer)") for line in lines), lines
    train(load_config(None, compiled), resume=True, log=lines.append)  # from the step-2 checkpoint
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not run eagerly
    print(f"compiled run: {time.perf_counter() - started:.0f} s")
    eager, ours = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(ours) == 4
    assert ours == pytest.approx(eager, rel=1e-5)  # inductor reorders float sums: equal to rounding, not bits
    a = load_file(tmp_path / "eager" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()  # the compiled blocks keep their parameter names
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-5, key


def test_grpo_refuses_compile_before_making_a_run_folder(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}"} for i in range(4)])
    args = [f"model.name={lm_dir}", f"data.train={data}", "adapter.kind=lora", "objective.type=grpo",
            "objective.reward_funcs=[test_grpo:length_reward]", "training.compile=true",
            f"output.dir={tmp_path / 'run'}", "output.progress=false"]
    with pytest.raises(ConfigError, match="training.compile: grpo"):
        train(load_config(None, args), log=lambda *_: None)
    assert not (tmp_path / "run").exists()
