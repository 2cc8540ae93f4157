"""Reward functions for online RL (the `grpo` objective).

A reward function is a plain callable `(prompt, completion, **fields) -> float`: `prompt` and `completion`
are text (a conversational prompt is given as its last user message, the whole conversation as
`messages=`), and `fields` are the prompt row's other fields (e.g. `answer`). A callable may also carry
`batch(prompts, completions, fields) -> list[float]`, which is used instead when present (a reward model
scores a whole batch in one forward pass). Anything that makes such callables (Python functions named in the
config, a trained reward-model run, the service's OpenAI graders) plugs in the same way.

    from tunesmith.rewards import load_reward_funcs
    funcs = load_reward_funcs(["my_rewards:exact", "rewards.py:short"])
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import numbers
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import TunesmithError

RewardFn = Callable[..., float]  # (prompt: str, completion: str, **fields) -> float


class RewardError(TunesmithError):
    """A reward function could not be loaded, raised, or returned something that is not a number."""


def reward_name(func: RewardFn, i: int = 0) -> str:
    """A short name for metrics: the function's own name."""
    return getattr(func, "__name__", None) or getattr(type(func), "__name__", f"reward_{i}")


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: no file {path} (give module:function, or path/to/file.py:function "
                          "relative to where tunesmith runs)")
    name = f"tunesmith_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: say which and why
        raise RewardError(f"reward function {spec!r}: importing {path} raised {type(e).__name__}: {e}") from None
    sys.modules[name] = module
    return module


def load_reward_func(spec: str) -> RewardFn:
    """`module:function` (importable) or `path/to/file.py:function`; the error names what is missing."""
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(f"reward function {spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py"):
        module = _load_file(Path(target).expanduser(), spec)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise RewardError(f"reward function {spec!r}: cannot import {target!r} ({e}); is it on the Python path? "
                              "A file can be named directly: path/to/file.py:function") from None
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"reward function {spec!r}: importing {target} raised {type(e).__name__}: {e}") from None
    func = getattr(module, attr, None)
    if func is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"reward function {spec!r}: {target} has no {attr!r} (it defines: "
                          f"{', '.join(found[:12]) or 'no functions'})")
    if not callable(func):
        raise RewardError(f"reward function {spec!r}: {attr} is a {type(func).__name__}, not a function")
    return func


def load_reward_funcs(specs: Sequence[str]) -> list[RewardFn]:
    """The reward functions named by `specs`, each checked to exist and be callable."""
    return [load_reward_func(s) for s in specs]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are float32 tensors: a larger finite value is inf


def _where(func: RewardFn, prompt: str, completion: str) -> str:
    return f"reward function {reward_name(func)} on prompt {prompt[:60]!r}, completion {completion[:60]!r}"


def _number(value, func: RewardFn, prompt: str, completion: str) -> float:
    where = _where(func, prompt, completion)
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{where} returned {type(value).__name__} {value!r}; return a number (e.g. 0.0 for no "
                          "reward)")
    if not abs(value) <= FLOAT32_MAX:  # also NaN, inf, and ints float64 cannot hold (float() would raise)
        try:
            shown = f"{float(value):.3g}"
        except OverflowError:
            shown = "an integer beyond float64"
        raise RewardError(f"{where} returned {shown}; return a finite number within float32's range (±3.4e38), "
                          "where rewards are computed")
    return float(value)


def _raised(func: RewardFn, e: Exception, prompt: str, completion: str, batch: int = 1) -> RewardError:
    where = _where(func, prompt, completion) + (f" (the first of a batch of {batch})" if batch > 1 else "")
    if isinstance(e, TunesmithError):  # ours (a grader's formula that cannot be computed): its message says why
        return RewardError(f"{where}: {e}")
    return RewardError(f"{where} raised {type(e).__name__}: {e} (its signature must be "
                       "f(prompt, completion, **fields) -> float)")


def call_reward(func: RewardFn, prompts: list[str], completions: list[str], fields: list[dict]) -> list[float]:
    """One reward source over a batch: its `batch` method if it has one, else one call per completion. An error
    names the function, the prompt and the completion (for a batch, its first)."""
    if callable(getattr(func, "batch", None)):
        try:
            values = list(func.batch(prompts, completions, fields))
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function: say which, on what, and why
            raise _raised(func, e, (prompts or [""])[0], (completions or [""])[0], len(completions)) from e
        if len(values) != len(completions):
            raise RewardError(f"reward {reward_name(func)}: batch returned {len(values)} values for "
                              f"{len(completions)} completions")
    else:
        values = []
        for p, c, f in zip(prompts, completions, fields):
            try:
                values.append(func(p, c, **f))
            except RewardError:
                raise
            except Exception as e:  # as above, on the one completion that raised
                raise _raised(func, e, p, c) from e
    return [_number(v, func, p, c) for v, p, c in zip(values, prompts, completions)]


def compute_rewards(funcs: Sequence[RewardFn], prompts: list[str], completions: list[str],
                    fields: list[dict]) -> torch.Tensor:
    """(N, K) float32: reward source k of completion i."""
    columns = [call_reward(f, prompts, completions, fields) for f in funcs]
    return torch.tensor(columns, dtype=torch.float32).t().reshape(len(completions), len(funcs))


def reward_model_func(run_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> RewardFn:
    """A finished `reward` run as a reward function: the score of prompt + completion (the prompt through the
    chat template when the row gave `messages` and the tokenizer has one)."""
    from .data.batching import collate, model_inputs
    from .data.preference import encode_completion
    from .devices import resolve_device, to_device
    from .train.artifacts import load_run
    run = load_run(run_dir)
    if run.info.objective != "reward":
        raise RewardError(f"objective.reward_model {str(run_dir)!r}: that run trained {run.info.objective!r}; give a "
                          "run of objective.type: reward")
    device = resolve_device(device) if isinstance(device, str) else device
    model, tok, max_length = run.model.to(device).eval(), run.tokenizer, run.cfg.data.max_length

    def encode(prompt: str, completion: str, field: dict) -> dict:
        messages = field.get("messages")
        if isinstance(messages, list) and getattr(tok, "chat_template", None):
            ids, _ = encode_completion(tok, messages, [{"role": "assistant", "content": completion}])
        else:
            ids, _ = encode_completion(tok, prompt, completion)
        # too long for the reward model: keep the end, so the completion (what is scored) is never cut away and
        # replies to a long prompt still score differently; and a leading special token (BOS / [CLS]: what a
        # cls-pooled head reads), as every training row began with it
        if len(ids) > max_length:
            keep = 1 if ids[0] in set(getattr(tok, "all_special_ids", ())) else 0
            ids = ids[:keep] + ids[len(ids) - (max_length - keep):]
        return {"input_ids": ids}

    @torch.no_grad()
    def score_batch(prompts: list[str], completions: list[str], fields: list[dict]) -> list[float]:
        rows = [encode(p, c, f) for p, c, f in zip(prompts, completions, fields)]
        out: list[float] = []
        for i in range(0, len(rows), batch_size):
            batch = to_device(collate(rows[i:i + batch_size], run.pad_id), device)
            out += model(**model_inputs(batch)).squeeze(-1).float().tolist()
        return out

    def reward_model(prompt: str, completion: str, **fields) -> float:
        return score_batch([prompt], [completion], [fields])[0]

    reward_model.batch = score_batch
    return reward_model
