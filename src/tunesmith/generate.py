"""Sampling and chat for fine-tuned causal LMs (a run folder, or any model spec)."""
from __future__ import annotations

from pathlib import Path

import torch


def load_generator(spec: str, device: str = "auto", template: str = "auto"):
    """(model, tokenizer, template) from a run folder (adapter merged for speed) or a model spec, on `device`.

    template: how prompts are written for the model. 'auto' is what the run trained on (run.json's data
    format): 'raw' text for prompt/completion and text runs (the prompt exactly as `prompt` was in training),
    'chat' (the chat template) for chat runs and plain model specs."""
    from .devices import resolve_device
    if template not in ("auto", "chat", "raw"):
        raise SystemExit(f"--template {template!r}: choose auto, chat or raw")
    if (Path(spec) / "config.yaml").exists():
        from .train.artifacts import load_run
        run = load_run(spec, merge=True)
        if run.info.task != "causal_lm" or run.info.objective == "reward":
            from .errors import TunesmithError
            what = "reward model (it scores replies)" if run.info.objective == "reward" else f"{run.info.task} model"
            fix = "tunesmith score RUN --data pairs.jsonl" if run.info.objective == "reward" else "tunesmith eval"
            raise TunesmithError(f"{spec}: this run trained a {what}, not a language model that writes replies; "
                                 f"use `{fix}` instead of generate/chat")
        model, tok = run.model, run.tokenizer
        trained = "raw" if run.info.format in ("prompt_completion", "text") else "chat"
    else:
        from .models import load_model, load_tokenizer
        model, tok, trained = load_model(spec, "causal_lm").eval(), load_tokenizer(spec), "chat"
    return model.to(resolve_device(device)), tok, trained if template == "auto" else template


def chat_prompt_ids(tok, messages: list[dict], template: str = "chat") -> torch.Tensor:
    """Prompt ids: the chat template with the assistant's turn opened, or ('raw', or a tokenizer without a
    template) the messages' text as a prompt/completion run saw its prompts. `template` may also be a chat
    template's Jinja text (a run's data.chat_template, for a server holding only the base tokenizer)."""
    if template == "chat" and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    if template not in ("chat", "raw"):  # the Jinja text of a run's own template (chat_templates.saved_chat_template)
        out = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        return out["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"]


def config_context(cfg) -> int | None:
    """A transformers config's context in tokens (None when it declares none)."""
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate(model, tok, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stream: bool = False, template: str = "chat") -> str:
    """Reply to `messages`; greedy when temperature is 0. With stream=True, tokens print as they come.
    template: 'chat' or 'raw' (see chat_prompt_ids)."""
    from transformers import TextStreamer
    from .devices import model_device
    ids = chat_prompt_ids(tok, messages, template).to(model_device(model))
    context = config_context(getattr(model, "config", None))
    if context is not None:  # past it a model with learned positions fails, and a rotary one degrades
        if ids.shape[1] >= context:
            from .errors import TunesmithError
            raise TunesmithError(f"the prompt is {ids.shape[1]} tokens, and the model's context is {context}: "
                                 "shorten it")
        max_new_tokens = min(max_new_tokens, context - ids.shape[1])
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                  attention_mask=torch.ones_like(ids))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    text_stops = stop_at_turn_end(tok, kwargs) if template == "chat" else []
    if stream:
        kwargs["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for marker in text_stops:  # a turn end the vocabulary spells in several tokens (data.chat_template)
        reply = reply.split(marker)[0]
    return reply.strip()


def stop_at_turn_end(tok, kwargs: dict) -> list[str]:
    """Stop generating where the chat template ends a turn (e.g. <|im_end|>, <|eot_id|>) as well as at EOS: as
    a token id when it is one token, else as a stop string. Returns the stop strings."""
    from .chat_templates import is_single_token, turn_end_markers
    markers = turn_end_markers(tok)
    ids = [tok.convert_tokens_to_ids(m) for m in markers if is_single_token(tok, m)]
    ids = [i for i in ids if i != tok.eos_token_id]
    if ids:
        kwargs["eos_token_id"] = ([tok.eos_token_id] if tok.eos_token_id is not None else []) + ids
    text = [m for m in markers if not is_single_token(tok, m)]
    if text:
        kwargs.update(stop_strings=text, tokenizer=tok)
    return text
