"""One contract for every objective (tunesmith.objectives), and the new tasks end to end from the CLI.

The contract, checked for each registered objective on a tiny model: the summed loss counts what `count`
says; summed losses over split batches add up to the whole batch's (so accumulation is exact); evaluation
gives eval_loss and the objective's headline metric; the objective rebuilds from run.json's params.
A new objective must add its case to CASES, or this test fails.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import class_rows, write_jsonl
from tunesmith.data.batching import collate
from tunesmith.objectives import make_objective, objective_class, objective_names
from tunesmith.train import evaluate


def _lm():
    from conftest import tiny_llama
    return tiny_llama()


def _head(task: str, outputs: int):
    from conftest import tiny_bert
    from tunesmith.heads import TaskModel
    torch.manual_seed(0)
    return TaskModel(tiny_bert().bert, outputs, task=task, pooling="mean", dropout=0.0).eval()


def _lm_examples(n=6):
    g = random.Random(0)
    out = []
    for _ in range(n):
        ids = [g.randrange(1, 128) for _ in range(g.randrange(5, 12))]
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def _text_examples(n=6):
    g = random.Random(1)
    return [{"input_ids": [g.randrange(1, 128) for _ in range(g.randrange(4, 10))]} for _ in range(n)]


def _pairs(n=6):
    """Preference pairs of random ids with precomputed reference log-probs (so DPO needs no reference model)."""
    g = random.Random(2)
    out = []
    for i in range(n):
        prompt, chosen, rejected = ([g.randrange(1, 128) for _ in range(g.randrange(2, 7))] for _ in range(3))
        out.append({"input_ids": prompt + chosen, "labels": [-100] * len(prompt) + chosen, "margin": 0.5 * (i % 2),
                    "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected,
                    "ref_logps": [-20.0 - i, -21.0 + i]})
    return out


def _grpo():
    """GRPO on prompts of random ids. On-policy, the clipped term sums to zero over each group, so the policy is
    moved away from its reference copy: the loss is then the KL penalty, which the contract can compare."""
    from tunesmith.models import load_tokenizer
    objective, model = objective_class("grpo")(beta=1.0, num_generations=3, max_completion_length=5,
                                               reward_funcs=["test_grpo:length_reward"]), _lm()
    objective.attach(model, load_tokenizer("smollm2-135m-instruct"), None, None, None)  # reference: a frozen copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = random.Random(3)
    return objective, model, [{"input_ids": [g.randrange(3, 128) for _ in range(g.randrange(3, 8))], "prompt": f"q{i}",
                               "fields": {"answer": str(i)}} for i in range(6)]


def _diffusion():
    """A tiny random UNet + CLIP text encoder; examples as the data side makes them (latents, noise, timesteps,
    caption token ids), v-prediction with min-SNR weights."""
    from tunesmith.diffusion.pipeline import DiffusionModel
    from tunesmith.diffusion.tiny import tiny_text_encoder, tiny_unet
    torch.manual_seed(0)
    model = DiffusionModel(tiny_unet(8, 4, 32), {"text_encoder": tiny_text_encoder(64, 32, 8)}, "tiny").eval()
    g = torch.Generator().manual_seed(4)
    examples = [{"latents": torch.randn(4, 8, 8, generator=g), "noise": torch.randn(4, 8, 8, generator=g),
                 "timesteps": torch.tensor(100 * i + 50), "input_ids": torch.randint(0, 62, (8,), generator=g)}
                for i in range(6)]
    return objective_class("diffusion")(prediction_type="v_prediction", snr_gamma=5.0), model, examples


CASES = {  # objective -> (objective, model, encoded examples)
    "diffusion": _diffusion,
    "dpo": lambda: (objective_class("dpo")(beta=0.1), _lm(), _pairs()),
    "reward": lambda: (objective_class("reward")(), _head("regression", 1), _pairs()),
    "grpo": _grpo,
    "sft": lambda: (objective_class("sft")(), _lm(), _lm_examples()),
    "causal_lm": lambda: (objective_class("causal_lm")(), _lm(),
                          [objective_class("causal_lm").prepare_example(e) for e in _lm_examples()]),
    "classification": lambda: (objective_class("classification")(3, 0.1), _head("classification", 3),
                               [{**e, "label": i % 3} for i, e in enumerate(_text_examples())]),
    "regression": lambda: (objective_class("regression")(2.0, 3.0), _head("regression", 1),
                           [{**e, "value": float(i) - 1.5} for i, e in enumerate(_text_examples())]),
    "token_classification": lambda: (objective_class("token_classification")(["B-X", "I-X", "O"]),
                                     _head("token_classification", 3),
                                     [{**e, "tags": [-100] + [j % 3 for j in range(len(e["input_ids"]) - 2)] + [-100]}
                                      for e in _text_examples()]),
    "soft_classification": lambda: (objective_class("soft_classification")(3, 0.1), _head("classification", 3),
                                    [{**e, "label": i % 3, "soft_label": [0.6 if c == i % 3 else 0.2 for c in range(3)]}
                                     for i, e in enumerate(_text_examples())]),
}


def test_every_objective_has_a_contract_case():
    assert set(objective_names()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_contract(name):
    objective, model, examples = CASES[name]()
    assert objective.name == name and objective.formats
    whole = collate(examples, pad_id=0)
    with torch.no_grad():
        out = objective.forward(model, whole)
        loss, n = objective.loss(out, whole)
        parts = [collate(examples[:2], 0), collate(examples[2:], 0)]
        split = [objective.loss(objective.forward(model, b), b) for b in parts]
    assert n == objective.count(whole) > 0
    assert sum(c for _, c in split) == n
    assert float(sum(s for s, _ in split)) == pytest.approx(float(loss), rel=1e-5), "summed losses add up exactly"
    if objective.unit == "tokens":
        assert objective.units(whole) == int(whole["attention_mask"].sum())
    else:  # images (diffusion)
        assert objective.unit == "images" and objective.units(whole) == len(examples)
    metrics = evaluate(model, examples, objective, pad_id=0, batch_size=4)
    assert metrics["eval_loss"] == pytest.approx(float(objective.eval_loss(out, whole)[0]) / n, rel=1e-5)
    assert f"eval_{objective.headline}" in metrics and isinstance(objective.score(metrics), float)
    rebuilt = make_objective(name, json.loads(json.dumps(objective.params())))
    assert rebuilt == objective


def test_span_f1_counts_entities_like_seqeval():
    from tunesmith.objectives import span_f1
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    assert span_f1(gold, gold) == 1.0
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "I-ORG"]]  # PER cut short; I-ORG starts an ORG entity
    assert span_f1(pred, gold) == pytest.approx(2 * 2 / (3 + 3))


def test_regression_metrics_in_the_datas_units():
    obj = objective_class("regression")(target_mean=10.0, target_std=2.0)
    out = torch.tensor([0.0, 1.0, -1.0])  # standardised predictions -> 10, 12, 8
    batch = {"value": torch.tensor([10.0, 13.0, 8.0])}
    m = obj.metrics(float(obj.loss(out, batch)[0]), 3, None, obj.collect(out, batch))
    assert m["eval_mae"] == pytest.approx(1 / 3) and m["eval_rmse"] == pytest.approx((1 / 3) ** 0.5)
    assert m["eval_loss"] == pytest.approx(0.25 / 3)  # (12 - 13)^2 / 2^2, averaged


def test_objective_and_data_must_fit(tmp_path, encoder_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    base = [f"model.name={encoder_dir}", f"data.train={data}", "training.max_steps=1", f"output.dir={tmp_path / 'r'}",
            "output.progress=false"]
    with pytest.raises(ConfigError, match="objective.type=sft does not train on classification data.*use objective.type: classification"):
        train(load_config(None, base + ["objective.type=sft"]), log=lambda *_: None)
    with pytest.raises(ConfigError, match="data.packing: classification examples cannot be packed"):
        train(load_config(None, base + ["data.packing=true"]), log=lambda *_: None)
    with pytest.raises(ConfigError, match="model.task=causal_lm does not fit objective classification"):
        train(load_config(None, base + ["model.task=causal_lm"]), log=lambda *_: None)


# ---- the new tasks, trained from the command line on a tiny encoder --------------------------------------

ANIMALS = ["cat", "dog", "horse", "mouse", "tiger", "lion", "bear", "wolf", "fox", "eagle"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
FILLER = ["the", "saw", "a", "near", "river", "today", "and", "big", "old", "was", "there", "with", "one", "small"]


def tagging_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with animals (B-ANIMAL) and colours, two-word colours as B-COLOUR I-COLOUR."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(g.randint(4, 9)):
            r = g.random()
            if r < 0.2:
                tokens.append(g.choice(ANIMALS)), tags.append("B-ANIMAL")
            elif r < 0.3:
                tokens += ["dark", g.choice(COLOURS)]
                tags += ["B-COLOUR", "I-COLOUR"]
            elif r < 0.4:
                tokens.append(g.choice(COLOURS)), tags.append("B-COLOUR")
            else:
                tokens.append(g.choice(FILLER)), tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _cli_train(*overrides) -> dict:
    from tunesmith.cli import main
    assert main(["train", *overrides, "--quiet"]) == 0
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.dir="))
    return json.loads((Path(out) / "summary.json").read_text())


def test_token_classification_learns_tags_from_the_cli(tmp_path, encoder_dir):
    train_f = write_jsonl(tmp_path / "tags.jsonl", tagging_rows(160, seed=1))
    test_f = write_jsonl(tmp_path / "tags-test.jsonl", tagging_rows(40, seed=2))
    run = tmp_path / "ner"
    s = _cli_train(f"model.name={encoder_dir}", f"data.train={train_f}", f"data.eval={test_f}", "training.epochs=10",
                   "training.batch_size=16", "training.lr=3e-3", "training.eval_at_start=true", f"output.dir={run}")
    assert s["before"]["eval_f1"] < 0.3 and s["eval_f1"] > 0.9, s  # entity-level F1 on held-out sentences
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "token_classification" and info["objective"] == "token_classification"
    assert info["format"] == "token_classification" and info["labels"] == ["B-ANIMAL", "B-COLOUR", "I-COLOUR", "O"]


def regression_rows(n: int, seed: int) -> list[dict]:
    """Eight-word texts; value = (# of 'good' words - # of 'bad' words) + 10: a count the model must learn."""
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [g.choice(["good"] * 2 + ["bad"] * 2 + FILLER[:6]) for _ in range(8)]
        rows.append({"text": " ".join(words), "value": 10.0 + words.count("good") - words.count("bad")})
    return rows


def test_regression_learns_a_count_from_the_cli_and_eval_reads_run_json(tmp_path, encoder_dir, capsys):
    train_f = write_jsonl(tmp_path / "reg.jsonl", regression_rows(240, seed=1))
    test_f = write_jsonl(tmp_path / "reg-test.jsonl", regression_rows(60, seed=2))
    run = tmp_path / "reg"
    s = _cli_train(f"model.name={encoder_dir}", f"data.train={train_f}", f"data.eval={test_f}", "training.epochs=4",
                   "training.batch_size=16", "training.lr=3e-3", "training.eval_at_start=true", f"output.dir={run}")
    spread = torch.tensor([r["value"] for r in regression_rows(60, seed=2)]).std(unbiased=False).item()
    assert s["eval_r2"] > 0.8 and s["eval_rmse"] < 0.45 * spread, s
    assert s["before"]["eval_r2"] < 0.2, s
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "regression" and info["artifact"] == "model"
    assert info["objective_params"]["target_mean"] == pytest.approx(
        sum(r["value"] for r in regression_rows(240, 1)) / 240)
    # the training file is gone: eval still knows what the run was, from run.json
    moved = shutil.move(test_f, tmp_path / "elsewhere.jsonl")
    (tmp_path / "reg.jsonl").unlink()
    from tunesmith.cli import main
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(moved)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["eval_rmse"] == pytest.approx(s["eval_rmse"], rel=1e-5) and got["examples"] == 60


def test_eval_without_the_training_file_and_for_old_run_folders(tmp_path, encoder_dir, capsys):
    """Before run.json, `eval` re-read the training file to learn the format, and failed once it had moved."""
    from tunesmith.cli import main
    train_f = write_jsonl(tmp_path / "cls.jsonl", class_rows(30))
    eval_f = write_jsonl(tmp_path / "cls-eval.jsonl", class_rows(10))
    run = tmp_path / "run"
    assert main(["train", f"model.name={encoder_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                 "training.max_steps=3", f"output.dir={run}", "--quiet"]) == 0
    (tmp_path / "cls.jsonl").unlink()
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    first = json.loads(capsys.readouterr().out)
    (run / "run.json").unlink()  # a folder from before run.json: the same facts from config.yaml + labels.json
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0  # merge and interpolate too
    assert main(["interpolate", "--finetuned", str(run), "--alphas", "0,1", "--eval", f"held={eval_f}",
                 "--missing", "finetuned", "--out", str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "sweep" / "interpolation.json").exists()


def test_generate_without_the_training_file(tmp_path, lm_dir, capsys):
    from conftest import chat_rows
    from tunesmith.cli import main
    train_f = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    run = tmp_path / "run"
    assert main(["train", f"model.name={lm_dir}", f"data.train={train_f}", "training.max_steps=1", "adapter.kind=lora",
                 f"output.dir={run}", "--quiet"]) == 0
    (tmp_path / "chat.jsonl").unlink()
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_refuses_a_non_lm_run(tmp_path, encoder_dir, capsys):
    from tunesmith.cli import main
    train_f = write_jsonl(tmp_path / "cls.jsonl", class_rows(20))
    run = tmp_path / "run"
    assert main(["train", f"model.name={encoder_dir}", f"data.train={train_f}", "training.max_steps=1",
                 f"output.dir={run}", "--quiet"]) == 0
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert "classification model, not a language model" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [tagging_rows, regression_rows], ids=["token_classification", "regression"])
def test_new_objectives_resume_exactly_after_a_crash(rows, tmp_path, encoder_dir):
    """A crash mid-run (as kill -9 would leave it: the last checkpoint on disk) resumes to the same result."""
    from tunesmith.config import load_config
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "train.jsonl", rows(48, seed=1))
    common = [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0.25", "training.max_steps=6",
              "training.save_every=2", "training.batch_size=8", "head.dropout=0.1", "output.progress=false"]
    full = train(load_config(None, common + [f"output.dir={tmp_path / 'full'}"]), log=lambda *_: None)

    def crash(event):
        if event.step == 5:
            raise RuntimeError("simulated crash")

    cfg = load_config(None, common + [f"output.dir={tmp_path / 'crash'}"])
    with pytest.raises(RuntimeError):
        train(cfg, on_step=crash, log=lambda *_: None)
    resumed = train(cfg, resume=True, log=lambda *_: None)
    assert {k: v for k, v in resumed.items() if k.startswith("eval_") or k.endswith("_loss")} == \
        {k: v for k, v in full.items() if k.startswith("eval_") or k.endswith("_loss")}


def test_the_loop_knows_no_task():
    """Issue 10's design rule: the training loop imports nothing from vision/ and branches on no task name,
    pixel_values or label sentinel; objectives and the data side carry those."""
    import ast
    import inspect

    from tunesmith.train import loop
    source = inspect.getsource(loop)
    imported = [node.module or "" for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if "vision" in m.split(".")], imported
    for needle in ("task ==", "pixel_values", "-100", "tokenizer is None"):
        assert needle not in source, needle
