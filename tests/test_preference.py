"""Preference data, DPO and reward models: hand-worked loss values, the reference contract (policy ==
reference gives log 2; the disabled-adapter reference is the base model exactly), data validation as
file:line: field, and tiny DPO / reward runs through `tunesmith train` that resume after a crash."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import perturb_adapters, tiny_llama, write_jsonl
from tunesmith.data import DataError, read_records, validate
from tunesmith.data.formats import detect_format
from tunesmith.data.preference import as_pair, collate_preference, encode_pair
from tunesmith.objectives import objective_class
from tunesmith.objectives.dpo import dpo_loss
from tunesmith.objectives.logprobs import sequence_logps
from tunesmith.objectives.reward import bradley_terry_loss

LOG2 = math.log(2)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---- losses on hand-worked values --------------------------------------------------------------------------

def sig(x):
    return 1 / (1 + math.exp(-x))


# policy chosen/rejected -10 / -14, reference -11 / -12, lengths 4 and 8:
# h_c = 1, h_r = -2, delta = 3
@pytest.mark.parametrize("loss_type, ls, expected, rewards", [
    ("sigmoid", 0.0, -math.log(sig(0.3)), (0.1, -0.2)),                                   # -log s(0.1 * 3)
    ("sigmoid", 0.2, -0.8 * math.log(sig(0.3)) - 0.2 * math.log(sig(-0.3)), (0.1, -0.2)),  # conservative DPO
    ("ipo", 0.0, (1 / 4 - (-2 / 8) - 1 / (2 * 0.1)) ** 2, (0.1, -0.2)),                   # per-token averaged ratios
    ("hinge", 0.0, 1 - 0.1 * 3, (0.1, -0.2)),
    ("simpo", 0.0, -math.log(sig(0.1 * (-10 / 4 + 14 / 8) - 0.5)), (0.1 * -10 / 4, 0.1 * -14 / 8)),
])
def test_dpo_loss_hand_worked(loss_type, ls, expected, rewards):
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-14.0), t(-11.0), t(-12.0), t(4.0), t(8.0), beta=0.1,
                                        loss_type=loss_type, label_smoothing=ls, simpo_gamma=0.5)
    assert float(losses[0]) == pytest.approx(expected, rel=1e-12)
    assert (float(chosen[0]), float(rejected[0])) == pytest.approx(rewards, rel=1e-12)


def test_hinge_is_zero_past_the_margin():
    losses, _, _ = dpo_loss(t(0.0), t(-20.0), t(0.0), t(0.0), t(1.0), t(1.0), beta=0.1, loss_type="hinge")
    assert float(losses[0]) == 0.0  # beta * delta = 2 > 1


def test_bradley_terry_values():
    loss = bradley_terry_loss(t(2.0, 0.0, 1.0), t(1.0, 0.0, 3.0))
    assert loss.tolist() == pytest.approx([-math.log(sig(1)), LOG2, -math.log(sig(-2))], rel=1e-6)  # float32
    with_margin = bradley_terry_loss(t(2.0), t(1.0), t(1.0))  # r_c - r_r - margin = 0
    assert float(with_margin[0]) == pytest.approx(LOG2, rel=1e-6)


# ---- the reference ----------------------------------------------------------------------------------------

def pair_batch(n=3, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        p, c, r = (torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in (3 + i, 2 + i, 4))
        examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "rejected_input_ids": p + r,
                         "rejected_labels": [-100] * len(p) + r, "margin": 0.0})
    return collate_preference(examples, pad_id=0)


def lora_llama():
    from tunesmith.adapters import apply_lora
    model = tiny_llama()
    apply_lora(model, targets=["q_proj", "v_proj"], r=4)
    return model


def test_policy_equal_to_reference_gives_log2_and_zero_margins():
    model, batch = lora_llama(), pair_batch()  # a fresh LoRA (B = 0) is exactly the base model
    dpo = objective_class("dpo")(beta=0.1)
    with torch.no_grad():
        out = dpo.forward(model, batch)
        loss, n = dpo.loss(out, batch)
    assert n == 3 and float(loss) / n == pytest.approx(LOG2, abs=1e-7)
    metrics = dpo.step_metrics(out, batch)
    assert metrics["reward_margin"][0] == 0.0 and metrics["chosen_reward"][0] == 0.0
    assert dpo.correct(out, batch) == 0  # a tie is not a win (TRL's rewards/accuracies)


def test_disabled_adapter_reference_equals_the_base_model_exactly():
    base, model, batch = tiny_llama(), lora_llama(), pair_batch()
    perturb_adapters(model)  # a trained adapter: the policy differs from the base
    dpo = objective_class("dpo")(beta=0.1)
    with torch.no_grad():
        out = dpo.forward(model, batch)
        want, _ = sequence_logps(base, batch)
    assert torch.equal(out[:, 2], want[:3]) and torch.equal(out[:, 3], want[3:])  # bitwise: the same computation
    assert not torch.allclose(out[:, 0], out[:, 2])  # and the policy itself has moved


def test_frozen_copy_reference_stays_the_starting_model():
    from tunesmith.objectives.logprobs import frozen_copy
    model, batch = tiny_llama(), pair_batch()
    start = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
        moved, _ = sequence_logps(model, batch)
        kept, _ = sequence_logps(start, batch)
        want, _ = sequence_logps(tiny_llama(), batch)
    assert torch.equal(kept, want) and not torch.allclose(moved, want)
    assert not any(p.requires_grad for p in start.parameters())


def test_sequence_logps_counts_completion_tokens_only():
    model, batch = tiny_llama(), pair_batch()
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    manual = []
    for row in range(batch["input_ids"].shape[0]):
        lp = torch.log_softmax(logits[row, :-1], -1)
        targets = batch["labels"][row, 1:]
        manual.append(sum(float(lp[i, tok]) for i, tok in enumerate(targets.tolist()) if tok != -100))
    assert counts.tolist() == [2, 3, 4, 4, 4, 4]
    assert logps.tolist() == pytest.approx(manual, abs=1e-4)


# ---- data -------------------------------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "What is 2 + 2?"}]
CHOSEN = [{"role": "assistant", "content": "4"}]
REJECTED = [{"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "Q", "chosen": "a", "rejected": "b"}, "preference"),
    ({"chosen": MSGS + CHOSEN, "rejected": MSGS + REJECTED}, "preference"),
    ({"input": {"messages": MSGS}, "preferred_output": CHOSEN, "non_preferred_output": REJECTED}, "preference"),
    ({"prompt": "What is 2 + 2?", "answer": "4"}, "prompt_only"),
    ({"prompt": "x", "completion": "y"}, "prompt_completion"),
    ({"messages": MSGS}, "chat"),  # chat unless the objective reads prompts (grpo)
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_every_layout_gives_the_same_pair():
    explicit = as_pair({"prompt": MSGS, "chosen": CHOSEN, "rejected": REJECTED})
    implicit = as_pair({"chosen": MSGS + CHOSEN, "rejected": MSGS + REJECTED})
    openai = as_pair({"input": {"messages": MSGS}, "preferred_output": CHOSEN, "non_preferred_output": REJECTED})
    assert explicit == implicit == openai and explicit.conversational
    text = as_pair({"chosen": "Q: 2 + 2? A: 4", "rejected": "Q: 2 + 2? A: 5", "margin": 2})
    assert (text.prompt, text.chosen, text.rejected, text.margin) == ("Q: 2 + 2? A:", " 4", " 5", 2.0)


def problems(tmp_path, rows, fmt="auto"):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    recs, probs = read_records(f)
    with pytest.raises(DataError) as e:
        validate(recs, probs, fmt)
    return str(e.value), str(f)


def test_preference_problems_name_file_line_field(tmp_path):
    text, f = problems(tmp_path, [
        {"prompt": "Q", "chosen": "a", "rejected": "b"},                                          # 1 ok
        {"prompt": "Q", "chosen": "a"},                                                           # 2 missing
        {"prompt": "Q", "chosen": 3, "rejected": "b"},                                            # 3 wrong type
        {"prompt": MSGS, "chosen": "a", "rejected": REJECTED},                                    # 4 mixed
        {"prompt": MSGS, "chosen": [{"role": "user", "content": "x"}], "rejected": REJECTED},     # 5 not assistant
        {"chosen": "same", "rejected": "same"},                                                   # 6 identical
        {"input": {"messages": [{"role": "wizard", "content": "x"}]}, "preferred_output": CHOSEN},  # 7
        {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"},                         # 8 margin
        {"chosen": "abc", "rejected": "xyz"},                                                     # 9 no common prompt
        {"chosen": MSGS + CHOSEN, "rejected": [{"role": "system", "content": "s"}] + REJECTED},   # 10 no common msgs
        {"input": {"messages": MSGS}, "preferred_output": CHOSEN, "non_preferred_output": CHOSEN},  # 11 identical
    ])
    for expected in [f"{f}:2: rejected: missing", f"{f}:3: chosen: expected text or a list of messages, got int",
                     f"{f}:4: chosen: expected a list of messages like the prompt, got text",
                     f"{f}:5: chosen[0].role: a completion starts with the assistant's message, got 'user'",
                     f"{f}:6: rejected: is the same as chosen",
                     f"{f}:7: input.messages[0].role: unknown role 'wizard'", f"{f}:7: non_preferred_output: missing",
                     f"{f}:8: margin: expected a finite number, got 'big'",
                     f"{f}:9: chosen: chosen and rejected share no prompt",
                     f"{f}:10: chosen: chosen and rejected share no prompt",
                     f"{f}:11: non_preferred_output: is the same as preferred_output"]:
        assert expected in text, expected
    assert f"{f}:1:" not in text


def test_prompt_only_problems_and_messages_rows(tmp_path):
    text, f = problems(tmp_path, [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": ""},
        {"prompt": MSGS + CHOSEN},
        {"messages": [{"role": "user", "content": ""}]},
    ], fmt="prompt_only")
    for expected in [f"{f}:2: prompt: is empty", f"{f}:3: prompt[1].role: the prompt ends with an assistant message",
                     f"{f}:4: messages[0].content: is empty"]:
        assert expected in text, expected
    f2 = write_jsonl(tmp_path / "ok.jsonl", [{"messages": MSGS, "answer": "4"}, {"prompt": "x", "id": 3}])
    assert validate(*read_records(f2), "prompt_only") == "prompt_only"


def test_a_prompt_completion_file_still_reports_a_missing_completion(tmp_path):
    text, f = problems(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    assert f"{f}:2: completion: missing" in text


@pytest.fixture(scope="module")
def smol_tok():
    from tunesmith.models import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


def test_pair_tokens_labels_on_completions_only(smol_tok):
    ex = encode_pair(smol_tok, as_pair({"prompt": MSGS, "chosen": CHOSEN, "rejected": REJECTED}))
    prompt = smol_tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert smol_tok.decode(ex["input_ids"]).startswith(prompt)  # the prompt through the chat template
    learned = smol_tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert learned == "4<|im_end|>\n"
    assert smol_tok.decode([i for i, lab in zip(ex["rejected_input_ids"], ex["rejected_labels"]) if lab != -100]) \
        == "5<|im_end|>\n"
    plain = encode_pair(smol_tok, as_pair({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}))
    assert [i for i in plain["labels"] if i != -100] == smol_tok(" 4", add_special_tokens=False)["input_ids"] + \
        [smol_tok.eos_token_id]


def test_collated_pairs_are_chosen_rows_then_rejected_rows():
    batch = pair_batch(n=2)
    assert batch["input_ids"].shape[0] == 4 and batch["margin"].tolist() == [0.0, 0.0]
    assert batch["labels"][0].ne(-100).sum() == 2 and batch["labels"][2].ne(-100).sum() == 4


# ---- runs -------------------------------------------------------------------------------------------------

def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Short sums: chosen = the right answer, rejected = a wrong one (a signal a tiny model can pick up)."""
    import random
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = g.randint(1, 9), g.randint(1, 9)
        rows.append({"prompt": [{"role": "user", "content": f"{a} + {b}"}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": f"not {a * b + 1}"}]})
    return rows


def run_cfg(lm_dir, data, out, *extra):
    from tunesmith.config import load_config
    return load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                              "training.max_steps=6", "training.save_every=2", "training.batch_size=4",
                              "training.lr=1e-3", "training.log_every=1", f"output.dir={out}",
                              "output.progress=false", *extra])


def crash_and_resume(cfg, at=5):
    from tunesmith.train import train

    def crash(event):
        if event.step == at:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(cfg, on_step=crash, log=lambda *_: None)
    return train(cfg, resume=True, log=lambda *_: None)


def same_result(a: dict, b: dict) -> bool:
    keys = [k for k in a if k.startswith("eval_") or k.endswith("_loss")]
    return {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("extra", [["adapter.kind=lora", "adapter.r=4"], ["objective.reference=precomputed"]],
                         ids=["lora_adapters_disabled", "full_precomputed"])
def test_dpo_trains_from_the_cli_and_resumes_exactly(tmp_path, lm_dir, extra):
    from tunesmith.cli import main
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    run = tmp_path / "dpo"
    assert main(["train", f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                 "training.max_steps=6", "training.save_every=2", "training.batch_size=4", "training.lr=1e-3",
                 "training.log_every=1", "training.eval_at_start=true", f"output.dir={run}", *extra, "--quiet"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["before"]["eval_loss"] == pytest.approx(LOG2, abs=1e-6) and s["before"]["eval_reward_margin"] == 0
    assert s["eval_reward_margin"] > 0 and s["eval_loss"] < LOG2
    info = json.loads((run / "run.json").read_text())
    assert info["objective"] == "dpo" and info["task"] == "causal_lm" and info["format"] == "preference"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["event"] == "train"]
    assert len(train_lines) == 6 and {"reward_margin", "chosen_reward", "rejected_reward", "accuracy"} <= set(train_lines[0])
    assert (run / "loss.png").exists()
    from tunesmith.train.metrics import plot_panels
    panels = {ylabel: [label for label, rows, key in series if any(key in r for r in rows)]
              for ylabel, series in plot_panels(lines)}
    assert panels["rewards"] == ["train chosen reward", "eval chosen reward", "train rejected reward",
                                 "eval rejected reward", "train reward margin", "eval reward margin"]
    assert panels["accuracy"] == ["train accuracy", "eval accuracy"]
    full = train(run_cfg(lm_dir, data, tmp_path / "full", *extra), log=lambda *_: None)
    resumed = crash_and_resume(run_cfg(lm_dir, data, tmp_path / "crash", *extra))
    assert same_result(resumed, full)
    if "objective.reference=precomputed" in extra:
        assert (tmp_path / "crash" / "reference_logps.safetensors").exists()


def test_precomputed_reference_is_read_back_not_recomputed(tmp_path, lm_dir):
    from safetensors.torch import load_file

    from tunesmith.errors import TunesmithError
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    cfg = run_cfg(lm_dir, data, tmp_path / "run", "objective.reference=precomputed")
    with pytest.raises(RuntimeError):
        train(cfg, on_step=lambda e: (_ for _ in ()).throw(RuntimeError("crash")) if e.step == 3 else None,
              log=lambda *_: None)
    table = load_file(str(tmp_path / "run" / "reference_logps.safetensors"))
    assert table["train"].shape == (12, 2) and table["eval"].shape == (4, 2)
    said = []
    train(cfg, resume=True, log=said.append)
    assert any("reference log-probs read from" in str(s) for s in said)
    # data edited in place: the stored log-probs no longer fit, and resume says so
    write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16, seed=5))
    cfg2 = run_cfg(lm_dir, data, tmp_path / "run2", "objective.reference=precomputed")
    with pytest.raises(RuntimeError):
        train(cfg2, on_step=lambda e: (_ for _ in ()).throw(RuntimeError("crash")) if e.step == 2 else None,
              log=lambda *_: None)
    write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16, seed=6))
    with pytest.raises(TunesmithError, match=r"data.train \(.*pairs.jsonl\) changed since the run started"):  # run.json's hash
        train(cfg2, resume=True, log=lambda *_: None)
    info_file = tmp_path / "run2" / "run.json"  # a run from before run.json kept the hash: the stored log-probs
    info = json.loads(info_file.read_text())   # still know which pairs they were computed for
    info_file.write_text(json.dumps({k: v for k, v in info.items() if k != "data_sources"}))
    with pytest.raises(TunesmithError, match="computed for other data"):
        train(cfg2, resume=True, log=lambda *_: None)


def test_simpo_needs_no_reference_and_dpo_options_are_checked(tmp_path, lm_dir):
    from tunesmith.errors import ConfigError
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    s = train(run_cfg(lm_dir, data, tmp_path / "simpo", "objective.loss_type=simpo", "training.max_steps=2"),
              log=lambda *_: None)
    assert s["eval_loss"] > 0 and "eval_reward_margin" in s
    with pytest.raises(ConfigError, match="objective.reference=adapters_disabled: this run trains no adapter"):
        train(run_cfg(lm_dir, data, tmp_path / "x", "objective.reference=adapters_disabled"), log=lambda *_: None)
    assert not (tmp_path / "x").exists()  # a run that could not start leaves no folder to block a retry
    with pytest.raises(ConfigError, match="conservative smoothing applies to the sigmoid and simpo"):
        train(run_cfg(lm_dir, data, tmp_path / "y", "objective.loss_type=hinge", "objective.label_smoothing=0.1"),
              log=lambda *_: None)
    odd = run_cfg(lm_dir, data, tmp_path / "z", "objective.loss_type=simpo", "objective.reference=precomputed")
    with pytest.raises(ConfigError, match="objective.reference=precomputed: loss_type simpo uses no reference"):
        train(odd, log=lambda *_: None)  # refused when a run starts; a config saved so before still loads
    assert not (tmp_path / "z").exists()


def test_reward_model_trains_resumes_and_scores(tmp_path, lm_dir, capsys):
    from tunesmith.cli import main
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    extra = ["objective.type=reward", "head.pooling=last", "training.max_steps=8"]
    assert main(["train", f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0.25", "training.save_every=2",
                 "training.batch_size=4", "training.lr=1e-3", "training.log_every=1", f"output.dir={tmp_path / 'rm'}",
                 *extra, "--quiet"]) == 0
    full = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert full["eval_accuracy"] == 1.0 and full["eval_reward_margin"] > 0
    info = json.loads((tmp_path / "rm" / "run.json").read_text())
    assert info["objective"] == "reward" and info["task"] == "regression"
    resumed = crash_and_resume(run_cfg(lm_dir, data, tmp_path / "crash", *extra), at=6)
    assert same_result(resumed, full)
    capsys.readouterr()
    assert main(["score", str(tmp_path / "rm"), "--data", data]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 33 and lines[0]["line"] == 1 and lines[0]["margin"] == pytest.approx(
        lines[0]["chosen"] - lines[0]["rejected"])
    assert lines[-1]["summary"]["pairs"] == 32 and lines[-1]["summary"]["accuracy"] > 0.9
    rows = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "1 + 1", "completion": "2"}])
    assert main(["score", str(tmp_path / "rm"), "--data", rows]) == 0
    assert set(json.loads(capsys.readouterr().out.splitlines()[0])) == {"line", "score"}
    assert main(["generate", str(tmp_path / "rm"), "--prompt", "hi"]) == 2  # it scores, it does not write
    assert "reward model" in (err := capsys.readouterr().err) and "tunesmith score" in err


def test_score_refuses_a_run_that_is_not_a_reward_model(tmp_path, lm_dir):
    from tunesmith.cli import main
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    train(run_cfg(lm_dir, data, tmp_path / "dpo", "objective.loss_type=simpo", "training.max_steps=1"),
          log=lambda *_: None)
    assert main(["score", str(tmp_path / "dpo"), "--data", data]) == 2


def test_score_skips_rows_whose_completion_does_not_fit_the_runs_max_length(tmp_path, lm_dir, capsys):
    """`score` cuts rows to the run's data.max_length as training does; a row the cut leaves without its
    completion, or a pair it leaves with two equal sides (margin 0: a wrong pair by accident), is skipped with a
    line saying why, named in a note and left out of the summary, not scored as if it were whole."""
    from tunesmith.cli import main
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{a} + 1 =", "chosen": f" {a + 1}", "rejected": " 0"}
                                                  for a in range(8)])
    train(run_cfg(lm_dir, data, tmp_path / "rm", "objective.type=reward", "head.pooling=last", "data.max_length=16",
                  "training.max_steps=1"), log=lambda *_: None)
    same_start = " the answer, after some careful thought about it all, is"
    rows = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 4"},
        {"prompt": "add these " * 20 + "1 + 2 =", "chosen": " 3", "rejected": " 4"},  # the prompt fills 16 tokens
        {"prompt": "1 + 2 =", "chosen": same_start + " 3", "rejected": same_start + " 4"},  # differ after the cut
        {"prompt": "1 + 2 =", "chosen": " 3, since" + " one and" * 9, "rejected": " 4"}])  # cut, still scored
    capsys.readouterr()
    assert main(["score", str(tmp_path / "rm"), "--data", rows]) == 0
    out = capsys.readouterr()
    lines = [json.loads(x) for x in out.out.splitlines()]
    assert [x["line"] for x in lines[:4]] == [1, 2, 3, 4] and "margin" in lines[0] and "margin" in lines[3]
    assert lines[1]["skipped"] == "no completion token within data.max_length=16 (the prompt fills it)"
    assert lines[2]["skipped"] == "chosen and rejected are the same within data.max_length=16"
    assert lines[4]["summary"]["pairs"] == 2 and lines[4]["summary"]["skipped"] == 2
    assert lines[4]["summary"]["truncated"] == 1
    assert f"skipped 2 pairs, left out of the summary ({rows}:2, {rows}:3;" in out.err
    assert "Shorten their prompts" in out.err and "note: 1 pair longer than data.max_length=16 (the run's) scored" in out.err
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "add these " * 20, "completion": "2"}])
    assert main(["score", str(tmp_path / "rm"), "--data", pc]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "skipped" in lines[0] and lines[1]["summary"] == {"rows": 0, "mean_score": 0.0, "skipped": 1, "truncated": 0}


def test_a_margin_beyond_float32_is_a_data_error_naming_the_line(tmp_path):
    """1e39 is finite in Python but inf in the float32 loss, which would then be blamed on the learning rate."""
    rows = [{"prompt": "1 + 1 =", "chosen": " 2", "rejected": " 3", "margin": m} for m in (1.5, 1e39, -10 ** 39, 10 ** 400)]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as e:
        validate(*read_records(f))
    msg = str(e.value)
    assert f"{f}:2: margin: 1e+39 is beyond float32's range (±3.4e38), where training computes; give a margin" in msg
    assert f"{f}:3: margin: -1e+39 is beyond float32's range" in msg
    assert f"{f}:4: margin: expected a finite number" in msg and ":1:" not in msg
