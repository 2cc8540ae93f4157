"""Weight interpolation (WiSE-FT), soups and task arithmetic: exact ends, LoRA == merged, clear errors."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import perturb_adapters, tiny_bert, tiny_llama, token_batch
from tunesmith.adapters import LoraConfig, add_adapter, merge_and_unload
from tunesmith.errors import AdapterStateError
from tunesmith.interpolate import (
    InterpolationError, apply_task_vectors, average_weights, interpolate_weights, parse_alphas, scale_lora, task_vector,
)


def two_models():
    a = tiny_llama()
    b = tiny_llama()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return a.state_dict(), b.state_dict()


def test_alpha_ends_are_exact_and_middle_is_linear():
    t0, t1 = two_models()
    at0, at1 = interpolate_weights(t0, t1, 0.0), interpolate_weights(t0, t1, 1.0)
    assert all(torch.equal(at0[k], t0[k]) for k in t0)
    assert all(torch.equal(at1[k], t1[k]) for k in t1)
    mid = interpolate_weights(t0, t1, 0.3)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(mid[k], 0.7 * t0[k] + 0.3 * t1[k], atol=1e-7)


def test_integer_buffers_come_from_the_nearer_end():
    t0 = {"bn.num_batches_tracked": torch.tensor(5), "w": torch.zeros(2)}
    t1 = {"bn.num_batches_tracked": torch.tensor(9), "w": torch.ones(2)}
    assert interpolate_weights(t0, t1, 0.2)["bn.num_batches_tracked"] == 5
    assert interpolate_weights(t0, t1, 0.8)["bn.num_batches_tracked"] == 9


def test_mismatched_models_give_clear_errors():
    llama, bert = tiny_llama().state_dict(), tiny_bert().state_dict()
    with pytest.raises(InterpolationError, match="models do not match"):
        interpolate_weights(llama, bert, 0.5)
    t0, t1 = two_models()
    t1 = dict(t1)
    t1["model.norm.weight"] = torch.ones(7)
    with pytest.raises(InterpolationError, match=r"model.norm.weight: shape \(32,\) in theta_0 vs \(7,\) in theta_1"):
        interpolate_weights(t0, t1, 0.5)
    head_only = dict(two_models()[1])
    head_only["head.weight"] = torch.ones(3, 32)
    with pytest.raises(InterpolationError, match="linear-probe head"):
        interpolate_weights(two_models()[0], head_only, 0.5)
    out = interpolate_weights(two_models()[0], head_only, 0.5, missing="finetuned")
    assert torch.equal(out["head.weight"], head_only["head.weight"])


def test_lora_interpolation_equals_interpolating_merged_weights():
    ids = token_batch()
    model = tiny_llama()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, LoraConfig(targets="all-linear", r=4, alpha=8, use_rslora=True))
    perturb_adapters(model)
    theta1 = merge_and_unload(copy.deepcopy(model)).state_dict()
    for alpha in (0.0, 0.25, 0.7, 1.0):
        scale_lora(model, alpha)  # in place: no second model
        with torch.no_grad():
            got = model(input_ids=ids).logits
        reference = tiny_llama()
        reference.load_state_dict(interpolate_weights(theta0, theta1, alpha))
        with torch.no_grad():
            want = reference(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5), alpha
    dora = tiny_llama()
    add_adapter(dora, LoraConfig(targets=["q_proj"], use_dora=True))
    with pytest.raises(AdapterStateError, match="DoRA"):
        scale_lora(dora, 0.5)


def test_soup_and_task_arithmetic_hand_worked():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(3)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(3)}
    assert torch.allclose(average_weights([a, b, c])["w"], torch.tensor([3.0, 3.0]))
    assert torch.allclose(average_weights([a, b], [3, 1])["w"], torch.tensor([1.5, 3.0]))
    tau_b, tau_c = task_vector(a, b), task_vector(a, c)
    assert torch.equal(tau_b["w"], torch.tensor([2.0, 4.0])) and "n" not in tau_b
    both = apply_task_vectors(a, [tau_b, tau_c], [0.5, -1.0])
    assert torch.allclose(both["w"], torch.tensor([1 + 1 - 4.0, 2 + 2 + 1.0]))
    with pytest.raises(InterpolationError):
        average_weights([a, {"w": torch.ones(3)}])


def test_parse_alphas():
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0,0.5,1") == [0.0, 0.5, 1.0]
    assert len(parse_alphas("0:1:0.1")) == 11


@pytest.mark.parametrize("adapter", [[], ["adapter.kind=lora", "adapter.targets=[query,value]"]], ids=["full", "lora"])
def test_cli_sweep_on_a_probed_fine_tune(tmp_path, encoder_dir, adapter):
    """LP-FT run -> `tunesmith interpolate` -> CSV, PNG, and a saved alpha that evaluates to the swept number."""
    import json
    from conftest import class_rows, write_jsonl
    from tunesmith.cli import main
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(40))
    shifted = write_jsonl(tmp_path / "shift.jsonl", [{"text": r["text"].split()[0], "label": r["label"]} for r in class_rows(20)])
    run = tmp_path / "run"
    assert main(["train", f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                 "training.max_steps=6", "training.lr=1e-3", "training.linear_probe_epochs=3", f"output.dir={run}",
                 *adapter, "--quiet"]) == 0
    assert (run / "probe_head.safetensors").exists()
    assert main(["interpolate", "--finetuned", str(run), "--alphas", "0,0.5,1", "--eval", f"id={data}",
                 "--eval", f"ood={shifted}", "--select", "0.5", "--save", str(tmp_path / "half")]) == 0
    rows = (run / "interpolation" / "interpolation.csv").read_text().splitlines()
    assert rows[0].startswith("alpha,id_loss,id_accuracy") and len(rows) == 4
    assert (run / "interpolation" / "interpolation.png").stat().st_size > 1000
    sweep = json.loads((run / "interpolation" / "interpolation.json").read_text())
    half = next(r for r in sweep["rows"] if r["alpha"] == 0.5)
    from tunesmith.train import evaluate, load_run
    from tunesmith.wise_ft import encode_eval_set
    half_run = load_run(tmp_path / "half")
    m = evaluate(half_run.model, encode_eval_set(str(shifted), half_run), half_run.objective, half_run.pad_id, 64)
    assert m["eval_accuracy"] == pytest.approx(half["ood_accuracy"]) and m["eval_loss"] == pytest.approx(half["ood_loss"], abs=1e-5)


def test_llm_sweep_scores_loss(tmp_path, lm_dir):
    """For LLMs each alpha is scored by loss/perplexity; alpha 0 is the base model, exactly."""
    from conftest import chat_rows, write_jsonl
    from tunesmith.config import load_config
    from tunesmith.train import evaluate, train
    from tunesmith.wise_ft import run_sweep
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    cfg = load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0", "adapter.kind=lora",
                             "adapter.targets=[q_proj,v_proj]", "training.max_steps=4", "training.lr=1e-2",
                             f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    train(cfg, log=lambda *_: None)
    res = run_sweep(tmp_path / "run", [0.0, 1.0], {"train": data}, log=lambda *_: None)
    r0, r1 = res["rows"]
    assert set(r0) >= {"train_loss", "train_perplexity", "train_token_accuracy"}
    assert r1["train_loss"] < r0["train_loss"] and res["best_alpha"] == 1.0  # lower loss wins
    from tunesmith.models import load_model
    from tunesmith.train import load_run
    from tunesmith.wise_ft import encode_eval_set
    run = load_run(tmp_path / "run")
    base = evaluate(load_model(str(lm_dir), "causal_lm"), encode_eval_set(data, run), run.objective, run.pad_id, 64)
    assert base["eval_loss"] == pytest.approx(r0["train_loss"], abs=1e-5)


def test_base_can_be_a_linear_probe_run(tmp_path, encoder_dir):
    """--base RUN: theta_0 is a separately trained head-only run (WiSE-FT's zero-shot/probe end)."""
    from conftest import class_rows, write_jsonl
    from tunesmith.config import load_config
    from tunesmith.train import evaluate, load_run, train
    from tunesmith.wise_ft import encode_eval_set, run_sweep
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(40))
    common = [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0", "training.max_steps=4",
              "training.lr=1e-3", "output.progress=false"]
    train(load_config(None, common + ["freeze.train_only=[head]", f"output.dir={tmp_path / 'probe'}"]), log=lambda *_: None)
    train(load_config(None, common + [f"output.dir={tmp_path / 'ft'}"]), log=lambda *_: None)
    res = run_sweep(tmp_path / "ft", [0.0, 1.0], {"d": data}, base=str(tmp_path / "probe"), log=lambda *_: None)
    probe_run = load_run(tmp_path / "probe")
    probe = evaluate(probe_run.model, encode_eval_set(data, probe_run), probe_run.objective, probe_run.pad_id, 64)
    assert res["rows"][0]["d_loss"] == pytest.approx(probe["eval_loss"], abs=1e-6)
    assert (tmp_path / "probe" / "head" / "head.safetensors").exists() and not (tmp_path / "probe" / "model").exists()
    from tunesmith.cli import main  # a head-only run merges into a full folder like any other
    assert main(["merge", str(tmp_path / "probe"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "head.safetensors").exists() and (tmp_path / "merged" / "config.json").exists()
