"""The speed defaults (issue 14): bf16 autocast chosen where the hardware does bf16 natively, with a loss check
that falls back to fp32; packing on for next-token objectives only; both choices saved in config.yaml and kept
by a resumed run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import chat_rows, class_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.train import train
from tunesmith.train.precision import bf16_loss_agrees, choose_bf16, native_bf16

QUIET = {"log": lambda *_: None}


def test_an_explicit_setting_wins_and_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert choose_bf16(False, cpu)[0] is False and choose_bf16(True, cpu)[0] is True
    native, why = native_bf16(cpu)
    chosen, line = choose_bf16(None, cpu)
    assert chosen == native and "auto" in line and why in line
    flags = open("/proc/cpuinfo").read()
    assert native == ("amx_tile" in flags or "avx512_bf16" in flags)


class _Fragile(nn.Module):
    """A loss that bf16 ruins: (w.x - c)^2 where w.x equals c to 1e-4 in fp32."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(64, 1, bias=False)
        torch.nn.init.normal_(self.w.weight, std=1.0)


class _FragileObjective:
    def forward(self, model, batch):
        return model.w(batch["x"]).squeeze(-1)

    def loss(self, out, batch):
        return ((out.float() - batch["c"]) ** 2).sum() + 1e-6, out.numel()


def test_the_loss_check_refuses_bf16_where_it_changes_the_loss():
    torch.manual_seed(0)
    model = _Fragile()
    x = torch.randn(8, 64) * 100
    with torch.no_grad():
        c = model.w(x).squeeze(-1)
    agree, fp32, bf16 = bf16_loss_agrees(model, _FragileObjective(), {"x": x, "c": c}, torch.device("cpu"))
    assert not agree and fp32 < 1e-3 < bf16
    before = torch.get_rng_state()
    agree, _, _ = bf16_loss_agrees(model, _FragileObjective(), {"x": x, "c": c + 1000.0}, torch.device("cpu"))
    assert agree and torch.equal(before, torch.get_rng_state())  # a loss far from 0: bf16 agrees; no RNG used


def lm_run_args(lm_dir, data, run) -> list[str]:
    """A tiny LoRA chat run of 4 steps with a checkpoint every 2."""
    return [f"model.name={lm_dir}", f"data.train={data}", "data.max_length=64", "data.eval_fraction=0",
            "adapter.kind=lora", "adapter.r=4", "training.batch_size=2", "training.max_steps=4",
            "training.save_every=2", f"output.dir={run}", "output.progress=false"]


@pytest.mark.skipif(not native_bf16(torch.device("cpu"))[0], reason="this CPU has no native bf16")
def test_a_new_run_saves_its_auto_choices_and_a_resume_keeps_them(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    run = tmp_path / "run"
    args = lm_run_args(lm_dir, data, run)
    lines = []

    def stop(event):
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args), on_step=stop, log=lines.append)
    saved = load_config(run / "config.yaml")
    assert saved.training.bf16 is True and saved.data.packing is True and saved.training.gradient_checkpointing is True
    assert any(line.startswith("precision: bf16 autocast (auto") for line in lines), lines
    assert any(line.startswith("gradient checkpointing: on (auto") for line in lines), lines
    assert any("packed 24 training examples" in line for line in lines), lines
    lines.clear()
    train(load_config(None, args), resume=True, log=lines.append)  # the original overrides: bf16 and packing null
    assert any("resumed from" in line for line in lines)
    assert load_config(run / "config.yaml").training.bf16 is True


def test_packing_is_off_for_classification(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    s = train(load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0",
                                 "training.max_steps=1", f"output.dir={tmp_path / 'run'}", "output.progress=false"]),
              **QUIET)
    assert s["steps"] == 1 and load_config(tmp_path / "run" / "config.yaml").data.packing is False


def test_a_run_saved_before_new_config_fields_existed_still_resumes(tmp_path, encoder_dir):
    """A config.yaml written before a field existed (here data.weak, training.bf16 and data.packing missing)
    compares as the defaults, so --resume is not refused for 'section data differs'."""
    import yaml
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    args = [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0", "training.max_steps=4",
            "training.save_every=2", "training.bf16=false", f"output.dir={run}", "output.progress=false"]

    def stop(event):
        if event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args), on_step=stop, **QUIET)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in (("data", "weak"), ("data", "packing"), ("training", "bf16"),
                         ("training", "gradient_checkpointing")):
        saved[section].pop(key)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train(load_config(None, args), resume=True, **QUIET)["steps"] == 4
    assert load_config(run / "config.yaml").training.gradient_checkpointing is False  # what that run had


def test_a_language_model_run_from_before_the_checkpointing_default_resumes_without_it(tmp_path, lm_dir):
    import yaml
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    run = tmp_path / "run"
    args = lm_run_args(lm_dir, data, run)

    def stop(event):
        if event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args), on_step=stop, **QUIET)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"].pop("gradient_checkpointing") is True  # the new default for a language model
    (run / "config.yaml").write_text(yaml.safe_dump(saved))  # as a run saved before the field existed
    lines = []
    train(load_config(None, args), resume=True, log=lines.append)
    assert load_config(run / "config.yaml").training.gradient_checkpointing is False
    assert not any(line.startswith("gradient checkpointing: on") for line in lines)


def test_checkpointing_defaults_off_for_a_language_model_that_cannot_checkpoint(tmp_path):
    """CTRL (like XLNet, XLM, OpenAI-GPT) has no gradient checkpointing in transformers: the default leaves it
    off and says why; asking for it is a config error that names the fix, not transformers' ValueError."""
    from transformers import CTRLConfig, CTRLLMHeadModel

    from tunesmith.errors import ConfigError
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-ctrl"
    CTRLLMHeadModel(CTRLConfig(vocab_size=len(tok), n_embd=32, dff=64, n_layer=2, n_head=4, n_positions=128)) \
        .save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"line {i}: the cat sat on mat number {i}."} for i in range(16)])
    args = [f"model.name={model_dir}", f"data.train={data}", "data.max_length=32", "data.eval_fraction=0",
            "objective.type=causal_lm", "adapter.kind=lora", "adapter.r=4", "adapter.targets=all-linear",
            "training.batch_size=4", "training.max_steps=2", "output.progress=false"]
    lines = []
    s = train(load_config(None, args + [f"output.dir={tmp_path / 'run'}"]), log=lines.append)
    assert s["steps"] == 2
    assert load_config(tmp_path / "run" / "config.yaml").training.gradient_checkpointing is False
    assert "gradient checkpointing: off (auto: this model does not support it)" in lines
    with pytest.raises(ConfigError, match="CTRLLMHeadModel does not support gradient checkpointing; set "
                                          "training.gradient_checkpointing=false"):
        train(load_config(None, args + [f"output.dir={tmp_path / 'run2'}", "training.gradient_checkpointing=true"]),
              log=lambda *_: None)
    assert not (tmp_path / "run2").exists()


def test_checkpointing_asked_for_on_a_model_without_it_is_refused():
    """Our MobileNetV2 has no checkpointing hook: `true` must not be written to config.yaml and then ignored."""
    from tunesmith.errors import ConfigError
    from tunesmith.train.setup import build
    cfg = load_config(None, ["model.name=mobilenet-v2-imagenet", "data.train=digits", "data.eval_fraction=0",
                             "training.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="MobileNetV2 does not support gradient checkpointing; set "
                                          "training.gradient_checkpointing=false"):
        build(cfg)
