"""Turn validated records into token ids and loss labels (-100 = no loss).

Chat: rendered with the model's chat template; only assistant turns are learned (weight 0 turns are
not). Prompt/completion: loss on the completion only. Text: loss on every token. Classification: ids +
class index. Regression: ids + float value. Token classification: ids + one tag index per token id, set on
the first sub-token of each word and -100 on special tokens and continuation sub-tokens. Examples longer
than max_length are truncated or dropped, and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .formats import DataError, Problem, Record

IGNORE = -100


@dataclass
class Encoded:
    # {"input_ids", "labels"} (LM), {"input_ids", "label"}, {"input_ids", "value"} or {"input_ids", "tags"}
    examples: list[dict] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    fully_masked: list[str] = field(default_factory=list)  # "file:line" of examples with no label left


def _template_ids(tok, messages, add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def message_text(content) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts ({"type": "text", "text": ...})."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _clean_message(m: dict) -> dict:
    """What the chat template reads: role, content as text, and the tool-call fields tools-aware templates render."""
    out = {"role": m["role"], "content": message_text(m.get("content"))}
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_chat(tok, messages: list[dict], source: str = "tokenizer", line: int = 0) -> tuple[list[int], list[int]]:
    """ids and labels for a conversation: labels are the ids inside trained assistant turns, else -100.

    A turn starts at the first token that reaches past the prompt the template renders for generating it (its
    generation prompt), even where the two tokenize differently: a prompt ending in a space that the reply's
    first word absorbs ("assistant: " + "Sure" -> "ĠSure") still trains that word."""
    if not getattr(tok, "chat_template", None):
        raise DataError([Problem("tokenizer", 0, "chat_template", "this model's tokenizer has no chat template; "
                                                                  "set data.chat_template (chatml, llama3 or a "
                                                                  ".jinja file), or use prompt/completion or text data")])
    clean = [_clean_message(m) for m in messages]
    ids = _template_ids(tok, clean, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        try:
            prompt = _template_ids(tok, clean[:i], add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot render an empty conversation (a first turn)
            if i:
                raise
            # what comes before the reply's text: where two replies of other texts stop sharing tokens
            other = [{**clean[0], "content": "A"}], [{**clean[0], "content": "B"}]
            prompt = ids[:_common_prefix(*(_template_ids(tok, o, add_generation_prompt=False) for o in other))]
        start = _common_prefix(prompt, ids)
        prefix = _template_ids(tok, clean[: i + 1], add_generation_prompt=False)
        end = len(prefix)
        if ids[:end] != prefix or len(prompt) - start > 2:
            raise DataError([Problem(source, line, "messages", "the chat template does not render conversations "
                                                               "prefix by prefix, so assistant turns cannot be located; "
                                                               "use another data.chat_template")])
        if start < len(prompt):  # the prompt's last characters are tokenized with the reply's first ones
            prompt_text = tok.decode(prompt)
            while start < end and prompt_text.startswith(tok.decode(ids[: start + 1])):
                start += 1  # tokens wholly inside the prompt's text ("\n" of a "\n\n" header) stay untrained
        check_tool_calls(tok, m, ids[start:end], source, line, f"messages[{i}].tool_calls")
        labels[start:end] = ids[start:end]
    return ids, labels


def check_tool_calls(tok, message: dict, trained: list[int], source: str, line: int, where: str) -> None:
    """A tool call the chat template does not write would be trained as an empty reply: refused."""
    for call in message.get("tool_calls") or []:
        name = (call.get("function") or {}).get("name") if isinstance(call, dict) else None
        if name and name not in tok.decode(trained):
            raise DataError([Problem(source, line, where, f"the chat template does not render tool calls (no {name!r} "
                                                          "in the assistant turn), so the call would be trained as an "
                                                          "empty reply; use a tools-aware data.chat_template or leave "
                                                          "such rows out")])


def encode_word_tags(tok, rec: Record, label_index: dict) -> tuple[list[int], list[int]]:
    """ids and per-token tag indices for pre-split words: the word's tag on its first sub-token, else -100.

    e.g. ["Saarbrücken"] -> [CLS] sa ##ar ##bruck ##en [SEP] -> tags [-100, B-LOC, -100, -100, -100, -100].
    """
    if not getattr(tok, "is_fast", False):
        raise DataError([Problem("tokenizer", 0, "is_fast", f"token classification needs a fast tokenizer (its "
                                                            f"word_ids() align tags to sub-tokens); {type(tok).__name__} "
                                                            "is a slow one: use a model that ships a tokenizer.json")])
    words, tags = rec.data["tokens"], rec.data["tags"]
    unknown = [Problem(rec.source, rec.line, f"tags[{j}]", f"tag {t!r} not seen in training "
                                                           f"(known: {', '.join(map(str, label_index))})")
               for j, t in enumerate(tags) if t not in label_index]
    if unknown:
        raise DataError(unknown)
    _check_word_splitting(tok)
    enc = tok(words, is_split_into_words=True, add_special_tokens=True)
    tag_ids, previous = [], None
    for word in enc.word_ids():  # None for special tokens, else the index of the word the sub-token came from
        tag_ids.append(IGNORE if word is None or word == previous else label_index[tags[word]])
        previous = word
    lost = sorted(set(range(len(words))) - {w for w in enc.word_ids() if w is not None})
    if lost:  # e.g. a zero-width space or a lone combining mark: the word, and its tag, would vanish
        raise DataError([Problem(rec.source, rec.line, f"tokens[{j}]", f"{words[j]!r} becomes no token at all in this "
                                                                       "tokenizer (invisible or control characters); "
                                                                       "remove it with its tag") for j in lost])
    return enc["input_ids"], tag_ids


def _check_word_splitting(tok) -> None:
    """Pre-split words must stay words: byte-level BPE tokenizers without add_prefix_space join them
    ("John", "lives" -> "Johnlives"), which no pretrained model has seen."""
    if getattr(tok, "_tunesmith_words_ok", False):
        return
    ids = tok(["word", "word"], is_split_into_words=True, add_special_tokens=False)["input_ids"]
    if " " not in tok.decode(ids).strip():
        raise DataError([Problem("tokenizer", 0, "tokens", f"{type(tok).__name__} joins pre-split words without "
                                                           "spaces (byte-level BPE without add_prefix_space); "
                                                           "token classification needs an encoder tokenizer such "
                                                           "as all-minilm-l6-v2's (WordPiece) or a SentencePiece one")])
    tok._tunesmith_words_ok = True


def encode_record(tok, rec: Record, fmt: str, label_index: dict | None) -> dict:
    d = rec.data
    if fmt == "classification":
        ids = tok(d["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": ids, "label": label_index[d["label"]]}
    if fmt == "regression":
        ids = tok(d["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": ids, "value": float(d["value"])}
    if fmt == "token_classification":
        ids, tags = encode_word_tags(tok, rec, label_index)
        return {"input_ids": ids, "tags": tags}
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if fmt == "chat":
        from jinja2 import TemplateError
        try:
            ids, labels = encode_chat(tok, d["messages"], rec.source, rec.line)
        except TemplateError as e:  # e.g. raise_exception() in Gemma's and Mistral's templates
            raise DataError([Problem(rec.source, rec.line, "messages", f"the chat template refused this "
                                                                       f"conversation: {e}")]) from None
    elif fmt == "prompt_completion":
        p = tok(d["prompt"], add_special_tokens=True)["input_ids"]
        c = tok(d["completion"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = p + c, [IGNORE] * len(p) + c
    else:  # text
        ids = tok(d["text"], add_special_tokens=True)["input_ids"] + eos
        labels = list(ids)
    return {"input_ids": ids, "labels": labels}


def encode_records(tok, records: list[Record], fmt: str, max_length: int, overlong: str = "truncate",
                   label_index: dict | None = None) -> Encoded:
    """Tokenize every record, applying the overlong policy and tracking what it cost."""
    out = Encoded()
    for rec in records:
        ex = encode_record(tok, rec, fmt, label_index)
        if len(ex["input_ids"]) > max_length:
            if overlong == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
            ex = {k: (v[:max_length] if isinstance(v, list) else v) for k, v in ex.items()}
        if nothing_to_learn(ex):
            out.fully_masked.append(f"{rec.source}:{rec.line}")
            continue
        out.examples.append(ex)
    return out


def nothing_to_learn(ex: dict) -> bool:
    """True when every target of an encoded example is masked (-100)."""
    if "labels" in ex:  # LM labels are shifted by one for next-token loss, so the first one never counts
        return all(x == IGNORE for x in ex["labels"][1:])
    if "tags" in ex:  # one tag per token, no shift
        return all(x == IGNORE for x in ex["tags"])
    return False
