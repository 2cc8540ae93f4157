"""Prompted labeling functions: ask a local chat model a yes/no question about each text (zero-shot labelling).

    - {name: ask_sport, label: sport, prompt: "Is this news article about sport?", max_chars: 1000}

The text (cut to `max_chars` characters) and the question go into one user turn of the model's chat
template; the answer is read from the next-token distribution instead of generated: the function votes
`label` when P(Yes) > P(No) (summed over the spellings "Yes", " Yes", "yes", ...), else `no_label` if the
rule gives one, else it abstains. Texts go through the model in batches (left-padded); the votes are cached
with the other columns of the label matrix, so a question is asked once per text.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .functions import ABSTAIN, LabelingFunction, LabelingFunctionError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MAX_CHARS = 1000


def answer_ids(tok, word: str) -> list[int]:
    """First token ids of the spellings of a one-word answer (with and without a leading space, any case)."""
    ids = set()
    for spelling in (word, word.lower(), " " + word, " " + word.lower()):
        encoded = tok(spelling, add_special_tokens=False)["input_ids"]
        if encoded:
            ids.add(encoded[0])
    return sorted(ids)


def prompt_ids(tok, question: str, text: str, max_chars: int) -> list[int]:
    """The chat prompt for one text, the assistant's turn opened: the answer is the next token."""
    content = f"{text[:max_chars]}\n\nQuestion: {question.strip()} Answer Yes or No."
    messages = [{"role": "user", "content": content}]
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out)
    return tok(content + "\nAnswer:", add_special_tokens=True)["input_ids"]


def yes_probability(model, tok, question: str, texts: list[str], max_chars: int, batch_size: int = 16) -> np.ndarray:
    """(n,) P(Yes) / (P(Yes) + P(No)) for each text."""
    import torch  # here, not at import: rule-only labelling never needs it
    yes, no = answer_ids(tok, "Yes"), answer_ids(tok, "No")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [prompt_ids(tok, question, t, max_chars) for t in texts[start:start + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding: every prompt ends at the last position
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           use_cache=False).logits[:, -1].float()  # (B, V)
        logp = torch.log_softmax(logits, -1)
        p_yes, p_no = logp[:, yes].logsumexp(-1), logp[:, no].logsumexp(-1)
        out.append(torch.sigmoid(p_yes - p_no).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def prompted_columns(functions: list[LabelingFunction], texts: list[str], class_id: Callable, default_model: str,
                     batch_size: int = 16, log: Callable = print) -> dict[str, np.ndarray]:
    """{function name: (n,) class ids or ABSTAIN} for prompted functions; each model is loaded once."""
    from ..devices import resolve_device
    from ..models import load_model, load_tokenizer
    columns: dict[str, np.ndarray] = {}
    by_model: dict[str, list[LabelingFunction]] = {}
    for lf in functions:
        by_model.setdefault(str(lf.options.get("model") or default_model), []).append(lf)
    device = resolve_device("auto")
    for spec, group in by_model.items():
        try:
            model, tok = load_model(spec, "causal_lm").to(device).eval(), load_tokenizer(spec)
        except Exception as e:
            names = ", ".join(lf.name for lf in group)
            raise LabelingFunctionError(f"prompted functions {names}: cannot load chat model {spec!r} "
                                        f"({type(e).__name__}: {e})") from e
        for lf in group:
            log(f"weak: asking {spec} for {lf.name} on {len(texts)} texts")
            p = yes_probability(model, tok, lf.options["prompt"], texts, int(lf.options.get("max_chars", DEFAULT_MAX_CHARS)),
                                batch_size)
            no = lf.options.get("no_label")
            columns[lf.name] = np.where(p > 0.5, class_id(lf.label), ABSTAIN if no is None else class_id(no))
    return columns
