"""Sample replies during training (`training.sample_prompts`): at each evaluation the model answers each prompt
greedily, so a user sees what it says, not only its loss.

Each evaluation adds one line per prompt to RUN/samples.jsonl ({"step", "prompt", "reply"}; a resumed run
replaces the lines of the steps it redoes), prints them, and sends them to output.report_to's trackers. Prompts are written as the run trains: with the chat template
for chat data, as raw text for prompt/completion and text data. Sampling touches no random state (greedy,
and the RNG is restored), so a run with samples trains exactly as one without.
"""
from __future__ import annotations

from contextlib import nullcontext

import json

import torch

SAMPLES_FILE = "samples.jsonl"


def sample_replies(model, tok, prompts: list[str], template: str, max_new_tokens: int, bf16_ctx) -> list[str]:
    """Greedy replies of `model` to each user message (one at a time: no padding to get wrong)."""
    from ..generate import generate
    replies = []
    # eager under training.compile: a KV cache's shape changes at every token, and each would compile again
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with torch.random.fork_rng(devices=[]), bf16_ctx, eager:
        for prompt in prompts:
            replies.append(generate(model, tok, [{"role": "user", "content": prompt}], max_new_tokens,
                                    template=template))
    return replies


def write_samples(run, step: int) -> list[dict]:
    """The run's sample replies at `step`: appended to samples.jsonl, printed and sent to the trackers."""
    t = run.cfg.training
    if not t.sample_prompts or (run.dist is not None and not run.dist.is_main):
        return []
    if run.info.task != "causal_lm" or run.tokenizer is None or run.dist is not None:
        if not getattr(run, "_samples_skipped", False):  # said once, not at every evaluation
            why = "under torchrun" if run.dist is not None else f"a {run.info.task} model does not generate text"
            run.log(f"training.sample_prompts: skipped ({why})")
            run._samples_skipped = True
        return []
    from ..freeze import set_train_mode
    template = "raw" if run.info.format in ("prompt_completion", "text") else "chat"
    run.model.eval()
    try:
        replies = sample_replies(run.model, run.tokenizer, t.sample_prompts, template, t.sample_max_new_tokens,
                                 run.autocast())
    finally:
        set_train_mode(run.model, run.cfg.freeze.batchnorm)
    rows = [{"step": step, "prompt": p, "reply": r} for p, r in zip(t.sample_prompts, replies)]
    append_samples(run.run_dir / SAMPLES_FILE, rows, step)
    for row in rows:
        run.log(f"sample at step {step}: {row['prompt']!r} -> {row['reply']!r}")
    log_samples = getattr(run.metrics, "log_samples", None)  # set when output.report_to has trackers
    if log_samples is not None:
        log_samples(step, rows)
    return rows


def append_samples(path, rows: list[dict], step: int) -> None:
    """Add this evaluation's rows; rows of this step or later (written before a resume went back) are dropped."""
    from ..io import atomic_write_text
    kept = [line for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else [])
            if line.strip() and json.loads(line)["step"] < step]
    atomic_write_text(path, "".join(line + "\n" for line in kept + [json.dumps(r, ensure_ascii=False) for r in rows]))
