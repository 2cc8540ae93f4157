"""Preference pairs (reward models, DPO) and prompts for online RL (GRPO): validation, tokenisation, batches.

preference   TRL's layouts, plain text or conversational (lists of {role, content} messages):
               {"prompt": "...", "chosen": "...", "rejected": "..."}                    explicit prompt
               {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
               {"chosen": "...", "rejected": "..."}                                    implicit prompt: the
               {"chosen": [messages], "rejected": [messages]}                           common prefix of the two
             and OpenAI's DPO layout:
               {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
                "non_preferred_output": [{"role": "assistant", ...}]}
             An optional "margin" (a number) says how far a reward model's chosen score must beat the rejected one.
prompt_only  {"prompt": "..." | [messages]} or {"messages": [...]}; every other field (e.g. "answer") is kept
             and passed to the reward functions.

A pair is encoded as two sequences, prompt + chosen and prompt + rejected, with labels on the completion
tokens only (the prompt through the chat template when conversational). A batch of B pairs holds the B chosen
rows, then the B rejected rows: input_ids (2B, T), right-padded. A batch of prompts is left-padded, so
generated tokens follow every prompt directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import tokenize
from .formats import FLOAT32_MAX, ROLES, DataError, Problem, Record, _finite
from .tokenize import IGNORE, Encoded, _clean_message, _common_prefix, _template_ids

PREFERENCE_KEYS = ("chosen", "rejected", "preferred_output", "non_preferred_output")
PROMPT_KEYS = ("prompt", "messages")  # where a prompt-only row keeps its prompt; the rest are its fields


# ---- validation -------------------------------------------------------------------------------------------

def _kind(value) -> str:
    return "text" if isinstance(value, str) else "a list" if isinstance(value, list) else type(value).__name__


def _check_text(rec: Record, key: str, value, out: list[Problem]) -> bool:
    if not isinstance(value, str):
        out.append(Problem(rec.source, rec.line, key, f"expected text or a list of messages, got {_kind(value)}"))
    elif not value.strip():
        out.append(Problem(rec.source, rec.line, key, "is empty"))
    else:
        return True
    return False


def _check_messages(rec: Record, key: str, msgs, out: list[Problem], first_role: str | None = None) -> bool:
    """A non-empty list of {role, content} messages (first_role: what the first one must be)."""
    if not isinstance(msgs, list) or not msgs:
        out.append(Problem(rec.source, rec.line, key, "expected a non-empty list of {role, content} messages"
                           + (f", got {_kind(msgs)}" if not isinstance(msgs, list) else ", got []")))
        return False
    ok = True
    for j, m in enumerate(msgs):
        where = f"{key}[{j}]"
        if not isinstance(m, dict):
            out.append(Problem(rec.source, rec.line, where, "expected an object with 'role' and 'content'"))
            ok = False
            continue
        if m.get("role") not in ROLES:
            out.append(Problem(rec.source, rec.line, f"{where}.role", f"unknown role {m.get('role')!r}; use one of "
                                                                      f"{', '.join(ROLES)}"))
            ok = False
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            out.append(Problem(rec.source, rec.line, f"{where}.content", "is empty" if content in ("", None)
                               else f"expected text, got {type(content).__name__}"))
            ok = False
    if ok and first_role and msgs[0].get("role") != first_role:
        out.append(Problem(rec.source, rec.line, f"{key}[0].role", f"a completion starts with the {first_role}'s "
                                                                   f"message, got {msgs[0].get('role')!r}"))
        ok = False
    return ok


def _check_side(rec: Record, key: str, value, out: list[Problem], conversational: bool, explicit: bool) -> bool:
    if key not in rec.data:
        out.append(Problem(rec.source, rec.line, key, "missing"))
        return False
    if conversational:
        return _check_messages(rec, key, value, out, "assistant" if explicit else None)
    return _check_text(rec, key, value, out)


def check_preference(rec: Record, out: list[Problem]) -> None:
    """Every problem with one preference row (TRL's or OpenAI's layout)."""
    d = rec.data
    if any(k in d for k in ("input", "preferred_output", "non_preferred_output")):
        _check_openai(rec, out)
    else:
        _check_trl(rec, out)
    if "margin" in d:
        m = d["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not _finite(m):
            out.append(Problem(rec.source, rec.line, "margin", f"expected a finite number, got {m!r}"))
        elif abs(m) > FLOAT32_MAX:  # finite here, inf in the float32 loss (which would then blame the lr)
            out.append(Problem(rec.source, rec.line, "margin", f"{m:.3g} is beyond float32's range (±3.4e38), where "
                                                               "training computes; give a margin on the scale of "
                                                               "reward scores (e.g. 0 to 5)"))


def _check_trl(rec: Record, out: list[Problem]) -> None:
    d = rec.data
    explicit = "prompt" in d
    lead = d.get("prompt") if explicit else d.get("chosen", d.get("rejected"))
    conversational = isinstance(lead, list)
    before = len(out)
    if explicit:
        if conversational:
            _check_messages(rec, "prompt", lead, out)
        else:
            _check_text(rec, "prompt", lead, out)
    for key in ("chosen", "rejected"):
        value = d.get(key)
        if key in d and isinstance(value, list) != conversational:
            what = "the prompt" if explicit else "chosen"
            out.append(Problem(rec.source, rec.line, key, f"expected {'a list of messages' if conversational else 'text'}"
                                                          f" like {what}, got {_kind(value)}"))
            continue
        _check_side(rec, key, value, out, conversational, explicit)
    if len(out) > before:
        return
    if d["chosen"] == d["rejected"]:
        out.append(Problem(rec.source, rec.line, "rejected", "is the same as chosen; a pair needs two different "
                                                             "completions"))
    elif not explicit:
        pair = as_pair(d)
        if not pair.prompt:
            out.append(Problem(rec.source, rec.line, "chosen", "chosen and rejected share no prompt (implicit prompts "
                                                               "are their common beginning); add a 'prompt' field"))
        for key in ("chosen", "rejected"):
            rest = getattr(pair, key)
            if not rest:
                out.append(Problem(rec.source, rec.line, key, "nothing is left after the prompt the two share; "
                                                              "give the prompt and completions separately"))
            elif conversational and rest[0].get("role") != "assistant":
                out.append(Problem(rec.source, rec.line, key, f"after the messages the two share comes a "
                                                              f"{rest[0].get('role')!r} message; where they differ "
                                                              "must be the assistant's reply"))


def _check_openai(rec: Record, out: list[Problem]) -> None:
    d, before = rec.data, len(out)
    inp = d.get("input")
    if "input" not in d:
        out.append(Problem(rec.source, rec.line, "input", "missing (expected {\"messages\": [...]})"))
    elif not isinstance(inp, dict):
        out.append(Problem(rec.source, rec.line, "input", f"expected an object with 'messages', got {_kind(inp)}"))
    else:
        _check_messages(rec, "input.messages", inp.get("messages"), out)
    for key in ("preferred_output", "non_preferred_output"):
        if key not in d:
            out.append(Problem(rec.source, rec.line, key, "missing (expected [{\"role\": \"assistant\", \"content\": "
                                                          "...}])"))
        else:
            _check_messages(rec, key, d[key], out, "assistant")
    if len(out) == before and d["preferred_output"] == d["non_preferred_output"]:
        out.append(Problem(rec.source, rec.line, "non_preferred_output", "is the same as preferred_output"))


def check_prompt_only(rec: Record, out: list[Problem]) -> None:
    """A prompt for online RL: `prompt` (text or messages) or `messages`, ending where the model should reply."""
    d = rec.data
    key = next((k for k in PROMPT_KEYS if k in d), None)
    if key is None:
        out.append(Problem(rec.source, rec.line, "prompt", "missing (give 'prompt' as text or messages, or "
                                                           "'messages')"))
        return
    value = d[key]
    if key == "prompt" and not isinstance(value, list):
        _check_text(rec, key, value, out)
    elif _check_messages(rec, key, value, out) and value[-1].get("role") == "assistant":
        out.append(Problem(rec.source, rec.line, f"{key}[{len(value) - 1}].role",
                           "the prompt ends with an assistant message (e.g. an Alpaca row's output, a ShareGPT "
                           "gpt turn); online RL samples the reply itself: end it with the turn the model answers, "
                           "and give a reference answer as its own field (e.g. 'answer') for the reward function"))


# ---- normalised rows --------------------------------------------------------------------------------------

@dataclass
class Pair:
    """One preference pair: prompt and completions as text, or as lists of messages (conversational)."""
    prompt: str | list
    chosen: str | list
    rejected: str | list
    margin: float = 0.0

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def as_pair(d: dict) -> Pair:
    """A validated preference row as a Pair; an implicit prompt is the common beginning of chosen and rejected
    (for text, a space where they part stays with the completions, as TRL's extract_prompt does)."""
    margin = float(d.get("margin", 0.0))
    if "preferred_output" in d:
        return Pair(d["input"]["messages"], d["preferred_output"], d["non_preferred_output"], margin)
    if "prompt" in d:
        return Pair(d["prompt"], d["chosen"], d["rejected"], margin)
    chosen, rejected = d["chosen"], d["rejected"]
    k = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and k and chosen[k - 1] == " ":
        k -= 1
    return Pair(chosen[:k], chosen[k:], rejected[k:], margin)


def prompt_of(d: dict) -> str | list:
    """The prompt of a validated prompt-only row (text or messages)."""
    return d["prompt"] if "prompt" in d else d["messages"]


def fields_of(d: dict) -> dict:
    """What a prompt-only row passes to reward functions: every field but the prompt."""
    return {k: v for k, v in d.items() if k not in PROMPT_KEYS}


def prompt_text(prompt: str | list) -> str:
    """The prompt as reward functions see it: the text, or a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


# ---- tokenisation -----------------------------------------------------------------------------------------

def _clean(messages: list[dict]) -> list[dict]:
    return [_clean_message(m) for m in messages]


def _need_template(tok) -> None:
    if not getattr(tok, "chat_template", None):
        raise DataError([Problem("tokenizer", 0, "chat_template", "this model's tokenizer has no chat template, so "
                                                                  "conversational rows cannot be encoded; use plain "
                                                                  "text prompts and completions")])


def encode_prompt(tok, prompt: str | list) -> list[int]:
    """Prompt ids: the chat template with the assistant's turn opened, or the text with special tokens."""
    if isinstance(prompt, list):
        _need_template(tok)
        return _template_ids(tok, _clean(prompt), add_generation_prompt=True)
    return tok(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(tok, prompt: str | list, completion: str | list, source: str = "", line: int = 0,
                      side: str = "completion") -> tuple[list[int], list[int]]:
    """ids and labels of prompt + completion, labels on the completion only (-100 on the prompt).

    Conversational: the completion is what the chat template adds after the prompt's opened assistant turn
    (where the rendered prompt stops being a prefix, as TRL does). Text: the completion's tokens and EOS after
    the prompt's, as prompt/completion SFT data is encoded."""
    if isinstance(completion, list):
        p = encode_prompt(tok, prompt)
        ids = _template_ids(tok, _clean(prompt + completion), add_generation_prompt=False)
        k = _common_prefix(p, ids)
        for j, m in enumerate(completion):
            tokenize.check_tool_calls(tok, m, ids[k:], source, line, f"{side}[{j}].tool_calls")
        return ids, [IGNORE] * k + ids[k:]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    p = encode_prompt(tok, prompt) if prompt else []
    c = tok(completion, add_special_tokens=not p)["input_ids"] + eos
    return p + c, [IGNORE] * len(p) + c


def encode_pair(tok, pair: Pair, source: str = "", line: int = 0) -> dict:
    """A pair as one example: the chosen sequence as input_ids/labels, the rejected one beside it."""
    c_ids, c_labels = encode_completion(tok, pair.prompt, pair.chosen, source, line, "chosen")
    r_ids, r_labels = encode_completion(tok, pair.prompt, pair.rejected, source, line, "rejected")
    return {"input_ids": c_ids, "labels": c_labels, "rejected_input_ids": r_ids, "rejected_labels": r_labels,
            "margin": pair.margin}


def encode_prompt_row(tok, d: dict) -> dict:
    prompt = prompt_of(d)
    return {"input_ids": encode_prompt(tok, prompt), "prompt": prompt, "fields": fields_of(d)}


def _no_completion(labels: list[int]) -> bool:
    return all(x == IGNORE for x in labels[1:])


def encode_records(tok, records: list[Record], fmt: str, max_length: int, overlong: str = "truncate",
                   label_index: dict | None = None) -> Encoded:
    """Tokenize records of any format: pairs and prompts here, every other format by tokenize.encode_records.

    Pairs: each sequence longer than max_length keeps its start (or, with overlong=drop, the pair is dropped);
    a pair left without a completion token on either side is skipped and reported. Prompts keep their end,
    where the model's turn opens."""
    if fmt not in ("preference", "prompt_only"):
        return tokenize.encode_records(tok, records, fmt, max_length, overlong, label_index)
    out = Encoded()
    for rec in records:
        if fmt == "prompt_only":
            ex = encode_prompt_row(tok, rec.data)
            if len(ex["input_ids"]) > max_length:
                if overlong == "drop":
                    out.dropped += 1
                    continue
                out.truncated += 1
                ex["input_ids"] = ex["input_ids"][-max_length:]
            out.examples.append(ex)
            continue
        ex = encode_pair(tok, as_pair(rec.data), rec.source, rec.line)
        if max(len(ex["input_ids"]), len(ex["rejected_input_ids"])) > max_length:
            if overlong == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
            ex = {k: (v[:max_length] if isinstance(v, list) else v) for k, v in ex.items()}
        if _no_completion(ex["labels"]) or _no_completion(ex["rejected_labels"]):
            out.fully_masked.append(f"{rec.source}:{rec.line}")
            continue
        out.examples.append(ex)
    return out


# ---- batches ----------------------------------------------------------------------------------------------

def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, slice(width - len(r), None) if left else slice(0, len(r))] = torch.tensor(r)
    return out


def collate_preference(examples: list[dict], pad_id: int) -> dict:
    """Pairs -> input_ids / attention_mask / labels (2B, T): chosen rows, then rejected rows; margin (B,) and,
    when precomputed, ref_logps (B, 2). Prompts -> input_ids / attention_mask (B, P) left-padded, with each
    row's prompt and fields as lists."""
    if "rejected_input_ids" not in examples[0]:
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": _pad(ids, pad_id, left=True), "attention_mask": _pad([[1] * len(r) for r in ids], 0, left=True),
                "prompt": [e["prompt"] for e in examples], "fields": [e["fields"] for e in examples]}
    ids = [e["input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    labels = [e["labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    batch = {"input_ids": _pad(ids, pad_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0),
             "labels": _pad(labels, IGNORE),
             "margin": torch.tensor([float(e.get("margin", 0.0)) for e in examples], dtype=torch.float32)}
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
    return batch
