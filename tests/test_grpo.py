"""GRPO: group-relative advantages, the clipped objective on hand-worked values, masks that cover completion
tokens only, the sampler against transformers' generate, reward functions that fail clearly, and a tiny
online run through `tunesmith train` that resumes after a crash to the same result."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama, write_jsonl
from tunesmith.objectives.grpo import Rollout, grpo_loss, group_advantages, kl_k3, sample_completions
from tunesmith.rewards import RewardError, call_reward, load_reward_func, load_reward_funcs


def length_reward(prompt: str, completion: str, **fields) -> float:
    """A reward that differs between completions (used by the objective contract test too)."""
    return float(len(completion))


# ---- advantages and loss ----------------------------------------------------------------------------------

def test_advantages_are_zero_mean_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 3.0, -1.0, 0.0])
    adv = group_advantages(rewards, 4).view(3, 4)
    assert adv.mean(-1).abs().max() < 1e-6  # each prompt's group sums to zero
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: nothing to learn from that prompt
    assert adv[0].tolist() == pytest.approx([0.5 / (0.57735 + 1e-4)] * 1 + [-0.5 / (0.57735 + 1e-4)] * 2
                                            + [0.5 / (0.57735 + 1e-4)], rel=1e-4)  # (r - mean) / (std + eps)


def test_grpo_loss_hand_worked():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    # on-policy (ratio 1): -A per token, averaged over the completion's own tokens
    assert grpo_loss(logps, logps, adv, mask).tolist() == pytest.approx([-2.0, 1.0])
    # off-policy: ratio e^0.5 = 1.65 is clipped to 1.2 for a positive advantage, not for a negative one
    old = logps - 0.5
    got = grpo_loss(logps, old, adv, mask, epsilon=0.2)
    assert got.tolist() == pytest.approx([-1.2 * 2.0, math.exp(0.5) * 1.0], rel=1e-6)
    # KL to the reference: exp(d) - d - 1 per token, weighted by beta
    ref = logps + torch.tensor([[0.1, -0.2, 5.0], [0.0, 0.0, 0.0]])
    with_kl = grpo_loss(logps, logps, adv, mask, beta=0.5, ref_logps=ref)
    k = lambda d: math.exp(d) - d - 1  # noqa: E731
    assert with_kl.tolist() == pytest.approx([-2.0 + 0.5 * (k(0.1) + k(-0.2)) / 2, 1.0], rel=1e-6)
    assert float(kl_k3(logps, logps).abs().max()) == 0.0


def test_masked_positions_carry_no_loss():
    g = torch.Generator().manual_seed(0)
    logps, mask = torch.randn(4, 6, generator=g), torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]])
    junk = torch.where(mask.bool(), logps, torch.full_like(logps, 1e6))  # whatever sits after EOS or in padding
    adv, ref = torch.randn(4, generator=g), torch.randn(4, 6, generator=g)
    assert torch.equal(grpo_loss(junk, junk.detach() - 0.1, adv, mask, beta=0.1, ref_logps=ref),
                       grpo_loss(logps, logps.detach() - 0.1, adv, mask, beta=0.1, ref_logps=ref))


def test_a_masked_position_whose_kl_overflows_gives_no_nan():
    # after EOS the policy can give a token ~100 nats less than the reference: exp(ref - logp) is inf there
    logps = torch.tensor([[-1.0, -95.0], [-2.0, -3.0]], requires_grad=True)
    mask, adv, ref = torch.tensor([[1, 0], [1, 1]]), torch.tensor([1.0, -1.0]), torch.tensor([[-1.0, -3.0], [-2.5, -3.0]])
    loss = grpo_loss(logps, logps.detach(), adv, mask, beta=0.1, ref_logps=ref)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logps.grad).all()
    assert logps.grad[0, 1] == 0 and torch.allclose(loss[0], torch.tensor(-1.0))  # ratio 1 x advantage 1, KL 0
    rollout = Rollout(logps=logps.detach(), ref_logps=ref, mask=mask, advantages=adv, rewards=adv,
                      sources=adv[:, None], group=2)
    assert torch.isfinite(rollout.kl()).all() and rollout.kl()[0] == 0


# ---- sampling and masks -----------------------------------------------------------------------------------

def left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()


def test_greedy_sampler_matches_transformers_generate():
    model = tiny_llama()
    ids, mask = left_padded([[5, 17, 33, 9, 70], [12, 44], [8, 8, 91]])
    got, comp_mask = sample_completions(model, ids, mask, 6, temperature=0.0, seeds=[0, 0, 0], eos_ids=[-1], pad_id=0)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(got, want) and bool(comp_mask.all())


def test_completion_mask_ends_at_the_first_eos_and_rows_sample_alone():
    model = tiny_llama()
    ids, mask = left_padded([[5, 17, 33], [12, 44, 3, 9]])
    eos = [int(i) for i in range(0, 128, 2)]  # half the vocabulary ends a completion: early stops for sure
    tokens, comp_mask = sample_completions(model, ids, mask, 8, 1.0, seeds=[1, 2], eos_ids=eos, pad_id=127)
    for row, m in zip(tokens.tolist(), comp_mask.tolist()):
        first = next((i for i, tok in enumerate(row) if tok in eos), len(row) - 1)
        assert m == [True] * (first + 1) + [False] * (len(row) - first - 1)  # through the EOS, nothing after
    # a row's completion depends on its own seed only, not on the rows batched with it
    alone, _ = sample_completions(model, ids[1:], mask[1:], 8, 1.0, seeds=[2], eos_ids=eos, pad_id=127)
    assert alone[0, : int(comp_mask[1].sum())].tolist() == tokens[1, : int(comp_mask[1].sum())].tolist()


def test_rollout_masks_cover_completion_tokens_only(lm_dir):
    from tunesmith.data.preference import collate_preference
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives import objective_class
    tok, model = load_tokenizer(str(lm_dir)), load_model(str(lm_dir), "causal_lm").eval()
    grpo = objective_class("grpo")(beta=0.0, num_generations=3, max_completion_length=5,
                                   reward_funcs=["test_grpo:length_reward"])
    grpo.attach(model, tok, None, None, None)
    examples = [{"input_ids": tok(p)["input_ids"], "prompt": p, "fields": {}} for p in ("Hi there", "Two plus two is")]
    batch = collate_preference(examples, tok.pad_token_id)
    assert batch["attention_mask"][1].tolist()[0] == 1 and batch["attention_mask"][0].tolist()[0] == 0  # left-padded
    with torch.no_grad():
        out = grpo.forward(model, batch)
    assert out.logps.shape == out.mask.shape == (6, out.mask.shape[1]) and out.mask.shape[1] <= 5
    assert out.advantages.view(2, 3).sum(-1).abs().max() < 1e-5
    assert out.rewards.tolist() == [float(n) for n in out.rewards.tolist()]


# ---- reward functions -------------------------------------------------------------------------------------

def test_reward_functions_from_modules_and_files(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def exact(prompt, completion, answer, **_):\n    return float(completion.strip() == answer)\n"
                 "NOT_A_FUNCTION = 3\n")
    exact, length = load_reward_funcs([f"{f}:exact", "test_grpo:length_reward"])
    assert call_reward(exact, ["q", "q"], ["4", "5"], [{"answer": "4"}, {"answer": "4"}]) == [1.0, 0.0]
    assert call_reward(length, ["q"], ["abc"], [{}]) == [3.0]
    with pytest.raises(RewardError, match="has no 'missing' \\(it defines: exact\\)"):
        load_reward_func(f"{f}:missing")
    with pytest.raises(RewardError, match="NOT_A_FUNCTION is a int, not a function"):
        load_reward_func(f"{f}:NOT_A_FUNCTION")
    with pytest.raises(RewardError, match="no file .*nowhere.py"):
        load_reward_func("nowhere.py:f")
    with pytest.raises(RewardError, match="cannot import 'no_such_module_xyz'"):
        load_reward_func("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="expected module:function"):
        load_reward_func("just_a_name")


def test_reward_functions_that_raise_or_return_non_numbers_fail_clearly(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def boom(prompt, completion, **_):\n    raise KeyError('answer')\n"
                 "def text(prompt, completion, **_):\n    return 'yes'\n"
                 "def nan(prompt, completion, **_):\n    return float('nan')\n"
                 "def none(prompt, completion, **_):\n    return None\n"
                 "def flag(prompt, completion, **_):\n    return completion == 'a'\n")
    with pytest.raises(RewardError, match="reward function boom on prompt 'p', completion 'c' raised KeyError: 'answer'"):
        call_reward(load_reward_func(f"{f}:boom"), ["p"], ["c"], [{}])
    with pytest.raises(RewardError, match="text on prompt 'p', completion 'c' returned str 'yes'; return a number"):
        call_reward(load_reward_func(f"{f}:text"), ["p"], ["c"], [{}])
    with pytest.raises(RewardError, match="returned nan; return a finite number"):
        call_reward(load_reward_func(f"{f}:nan"), ["p"], ["c"], [{}])
    with pytest.raises(RewardError, match="returned NoneType None"):
        call_reward(load_reward_func(f"{f}:none"), ["p"], ["c"], [{}])
    assert call_reward(load_reward_func(f"{f}:flag"), ["p", "p"], ["a", "b"], [{}, {}]) == [1.0, 0.0]  # bools count


def test_reward_errors_name_the_prompt_and_reply_and_float32_overflow(tmp_path):
    """A function that raises is named with the prompt and reply it raised on (as docs/preference.md says),
    shortened; a finite value float32 cannot hold (it would become inf in the reward tensor and the run would
    then blame the learning rate) is refused at the function."""
    f = tmp_path / "odd.py"
    f.write_text("def picky(prompt, completion, **_):\n    if completion == 'b':\n        raise ValueError('no b')\n"
                 "    return 1.0\n"
                 "def huge(prompt, completion, **_):\n    return 1e39\n"
                 "def huge_int(prompt, completion, **_):\n    return 10 ** 400\n")
    long = "x" * 200
    with pytest.raises(RewardError) as e:
        call_reward(load_reward_func(f"{f}:picky"), ["p1", long], ["a", "b"], [{}, {}])
    assert str(e.value).startswith(f"reward function picky on prompt {'x' * 60!r}, completion 'b' raised ValueError: no b")

    def scorer(prompt, completion):
        return 0.0
    scorer.batch = lambda prompts, completions, fields: 1 / 0
    with pytest.raises(RewardError, match="scorer on prompt 'p1', completion 'a' \\(the first of a batch of 2\\) "
                                          "raised ZeroDivisionError"):
        call_reward(scorer, ["p1", "p2"], ["a", "b"], [{}, {}])
    with pytest.raises(RewardError, match="huge on prompt 'p', completion 'c' returned 1e\\+39; return a finite number "
                                          "within float32's range"):
        call_reward(load_reward_func(f"{f}:huge"), ["p"], ["c"], [{}])
    with pytest.raises(RewardError, match="returned an integer beyond float64; return a finite number"):
        call_reward(load_reward_func(f"{f}:huge_int"), ["p"], ["c"], [{}])


# ---- runs -------------------------------------------------------------------------------------------------

REWARDS = """\
def short(prompt, completion, **fields):
    return -len(completion) / 10


def mentions_answer(prompt, completion, answer, **fields):
    return float(answer in completion)
"""


def prompt_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say {i}"}], "answer": str(i % 3)} for i in range(n)]


def grpo_cfg(lm_dir, data, rewards, out, *extra):
    from tunesmith.config import load_config
    return load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "objective.type=grpo",
                              f"objective.reward_funcs=[{rewards}:short, {rewards}:mentions_answer]",
                              "objective.num_generations=3", "objective.max_completion_length=6",
                              "objective.beta=0.1", "data.eval_fraction=0.25", "training.max_steps=4",
                              "training.save_every=2", "training.batch_size=2", "training.lr=1e-2",
                              "training.log_every=1", f"output.dir={out}", "output.progress=false", *extra])


@pytest.mark.parametrize("extra", [["adapter.kind=lora", "adapter.r=4"], []], ids=["lora", "full_copy"])
def test_grpo_trains_online_and_resumes_exactly(tmp_path, lm_dir, extra):
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(16))  # `messages` rows, read as prompts by grpo
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    full = train(grpo_cfg(lm_dir, data, rewards, tmp_path / "full", *extra), log=lambda *_: None)
    assert {"eval_reward", "eval_kl", "eval_completion_length", "eval_reward_std"} <= set(full)
    # each source's held-out mean too (weights 1: they add up to the reward), so a hacked part shows
    assert full["eval_reward_short"] + full["eval_reward_mentions_answer"] == pytest.approx(full["eval_reward"])
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert len(steps) == 4 and {"reward", "reward_std", "kl", "completion_length", "reward_short",
                                "reward_mentions_answer"} <= set(steps[0])
    assert 1 <= steps[0]["completion_length"] <= 6 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    info = json.loads((tmp_path / "full" / "run.json").read_text())
    assert info["objective"] == "grpo" and info["format"] == "prompt_only"
    from tunesmith.train.metrics import plot_panels
    assert [p for p, _ in plot_panels(records)] == ["loss", "mean reward", "KL to the reference",
                                                     "completion length (tokens)"]
    assert (tmp_path / "full" / "loss.png").exists()

    def crash(event):
        if event.step == 3:
            raise RuntimeError("simulated crash")

    cfg = grpo_cfg(lm_dir, data, rewards, tmp_path / "crash", *extra)
    with pytest.raises(RuntimeError):
        train(cfg, on_step=crash, log=lambda *_: None)
    resumed = train(cfg, resume=True, log=lambda *_: None)
    keys = [k for k in full if k.startswith("eval_") or k.endswith("_loss")]
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}


def test_grpo_needs_a_reward_and_a_working_one(tmp_path, lm_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.train import train
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}"} for i in range(8)])
    base = [f"model.name={lm_dir}", f"data.train={data}", "training.max_steps=1", f"output.dir={tmp_path / 'r'}",
            "output.progress=false"]
    with pytest.raises(ConfigError, match="grpo needs a reward.*for supervised fine-tuning give each row a completion"):
        train(load_config(None, base), log=lambda *_: None)  # prompt-only rows: auto picks grpo
    with pytest.raises(RewardError, match="cannot import 'missing_rewards'"):
        train(load_config(None, base + ["objective.reward_funcs=[missing_rewards:f]"]), log=lambda *_: None)
    with pytest.raises(ConfigError, match="grpo samples new completions every step"):
        train(load_config(None, base + ["objective.reward_funcs=[test_grpo:length_reward]",
                                        "objective.reference=precomputed"]), log=lambda *_: None)


def test_grpo_with_a_reward_model_run(tmp_path, lm_dir):
    from tunesmith.config import load_config
    from tunesmith.rewards import reward_model_func
    from tunesmith.train import train
    from test_preference import pair_rows
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    train(load_config(None, [f"model.name={lm_dir}", f"data.train={pairs}", "objective.type=reward",
                             "head.pooling=last", "training.max_steps=2", f"output.dir={tmp_path / 'rm'}",
                             "output.progress=false"]), log=lambda *_: None)
    score = reward_model_func(tmp_path / "rm")
    one = score("2 + 2", "4")
    assert isinstance(one, float) and score.batch(["2 + 2"], ["4"], [{}]) == [one]
    long = "x " * 2000  # past the reward run's data.max_length: the end is kept, the completions still decide
    assert score(long, "4") != score(long, "five hundred")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    s = train(load_config(None, [f"model.name={lm_dir}", f"data.train={prompts}", "objective.type=grpo",
                                 f"objective.reward_model={tmp_path / 'rm'}", "objective.num_generations=2",
                                 "objective.max_completion_length=4", "adapter.kind=lora", "training.max_steps=1",
                                 "training.batch_size=2", f"output.dir={tmp_path / 'g'}", "output.progress=false"]),
              log=lambda *_: None)
    assert math.isfinite(s["eval_reward"])
    with pytest.raises(RewardError, match="that run trained 'grpo'; give a run of objective.type: reward"):
        reward_model_func(tmp_path / "g")
