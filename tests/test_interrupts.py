"""Ctrl-C resumes exactly wherever it lands: mid-step, while the step's metrics are written, during an
evaluation, while a checkpoint is written, in the on_step callback, while the final artifact is saved. Each interrupted run, resumed, ends
bitwise equal to one never interrupted (LoRA dropout on, so the RNG matters), with the same metrics lines."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import chat_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.train import loop, train
from tunesmith.train.metrics import MetricsLog

STEP = 4  # the step the interrupt lands in (or after)


def config(lm_dir, data, eval_data, out):
    return load_config(None, [f"model.name={lm_dir}", f"data.train={data}", f"data.eval={eval_data}",
                              "data.max_length=64", "adapter.kind=lora", "adapter.targets=[q_proj,v_proj]",
                              "adapter.r=4", "adapter.dropout=0.1", "training.lr=5e-3", "training.batch_size=4",
                              "training.max_steps=8", "training.log_every=2", "training.eval_every=2",
                              "training.save_every=2", "training.eval_at_start=true", f"output.dir={out}",
                              "output.progress=false"])


def ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)


def lines(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, lm_dir):
    tmp = tmp_path_factory.mktemp("ref")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(24))
    eval_data = write_jsonl(tmp / "eval.jsonl", chat_rows(8))
    summary = train(config(lm_dir, data, eval_data, tmp / "ref"), log=lambda *_: None)
    return data, eval_data, tmp / "ref", summary


def _patch_point(point: str, monkeypatch) -> dict:
    """Make the run receive SIGINT at `point` of step STEP; returns kwargs for train()."""
    if point == "mid-step":  # while the second micro-batch of step STEP is prepared
        real = loop.micro_batch

        def micro_batch(run, micro):
            if micro == STEP - 1 and run.state.step == STEP - 1:
                ctrl_c()
            return real(run, micro)
        monkeypatch.setattr(loop, "micro_batch", micro_batch)
    elif point == "metrics":  # while step STEP's metrics line is written
        real_write = MetricsLog.write

        def write(self, **record):
            if record.get("event") == "train" and record.get("step") == STEP:
                ctrl_c()
            return real_write(self, **record)
        monkeypatch.setattr(MetricsLog, "write", write)
    elif point == "eval":
        real_eval = loop.evaluate

        def evaluate(*a, **k):  # evaluations run at steps 0, 2, 4, ...: interrupt the one at STEP
            evaluate.calls = getattr(evaluate, "calls", 0) + 1
            if evaluate.calls == STEP // 2 + 1:
                ctrl_c()
            return real_eval(*a, **k)
        monkeypatch.setattr(loop, "evaluate", evaluate)
    elif point == "checkpoint":
        real_save = loop.save_checkpoint

        def save_checkpoint(folder, *a, **k):
            if folder.name == f"step-{STEP}" and not getattr(save_checkpoint, "done", False):
                save_checkpoint.done = True
                ctrl_c()
            return real_save(folder, *a, **k)
        monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    elif point == "final-save":  # after the last step, while the artifact is written (finish)
        real_result = loop.save_result

        def save_result(*a, **k):
            if not getattr(save_result, "done", False):
                save_result.done = True
                ctrl_c()
            return real_result(*a, **k)
        monkeypatch.setattr(loop, "save_result", save_result)
    elif point == "on_step":
        def on_step(event):
            if event.step == STEP:
                ctrl_c()
        return {"on_step": on_step}
    return {}


@pytest.mark.parametrize("point", ["mid-step", "metrics", "eval", "checkpoint", "on_step", "final-save"])
def test_ctrl_c_anywhere_resumes_bitwise(point, reference, tmp_path, lm_dir, monkeypatch):
    from safetensors.torch import load_file
    data, eval_data, ref, ref_summary = reference
    cfg = config(lm_dir, data, eval_data, tmp_path / "run")
    with monkeypatch.context() as m:
        kwargs = _patch_point(point, m)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, log=lambda *_: None, **kwargs)
    assert not (tmp_path / "run" / "adapter").exists(), "interrupted before the end"
    summary = train(cfg, resume=True, log=lambda *_: None)
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), point
    assert lines(tmp_path / "run") == lines(ref)
    assert summary["final_loss"] == ref_summary["final_loss"] and summary["first_loss"] == ref_summary["first_loss"]
    assert summary["before"] == ref_summary["before"] and summary["before"]
