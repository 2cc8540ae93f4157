"""The tokenizer of a GGUF file (`tokenizer.ggml.*` and `tokenizer.chat_template`), written with the gguf package.

Two sources, in this order:
  1. the base model's own GGUF file, when the run's base came from one (the packaged SmolLM2 ships as GGUF):
     its tokenizer keys are copied as they are, so llama.cpp tokenizes exactly as it did for the original;
  2. a transformers tokenizer with a byte-level BPE (GPT-2 style) vocabulary: tokens and their types from
     the vocabulary, merges and special token ids through gguf.SpecialVocab, and the pre-tokenizer named by
     its structure in tokenizer.json (llama.cpp needs the name: its splitting rules are built in).
Either way the chat template is the run's (data.chat_template, else the tokenizer's own).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import TunesmithError

LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def copy_tokenizer_from_gguf(writer, source: Path, chat_template: str | None) -> None:
    """Every tokenizer.* key of `source` into `writer` (the chat template replaced by `chat_template`)."""
    from gguf import GGUFReader, GGUFValueType
    reader = GGUFReader(source)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.") or (name == "tokenizer.chat_template" and chat_template):
            continue
        kind = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    if chat_template:
        writer.add_chat_template(chat_template)


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, recognised by its structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and LLAMA3_SPLIT in json.dumps(parts[0].get("pattern", {})).replace("\\\\", "\\"):
        return "llama-bpe"
    raise TunesmithError(f"GGUF export: this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one tunesmith "
                         "can name for llama.cpp (gpt-2, smollm or llama-bpe); export from a base model loaded from "
                         "a .gguf file, whose tokenizer is copied as it is")


def write_hf_tokenizer(writer, tok, vocab_size: int) -> None:
    """A transformers byte-level BPE tokenizer as GGUF tokenizer keys (tokenizer.ggml.model = gpt2)."""
    import gguf
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = Path(tmp)
        if not (files / "tokenizer.json").exists():
            raise TunesmithError("GGUF export needs a fast tokenizer (tokenizer.json)")
        tokenizer_json = json.loads((files / "tokenizer.json").read_text(encoding="utf-8"))
        model = tokenizer_json.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise TunesmithError("GGUF export: only byte-level BPE (GPT-2 style) tokenizers are supported when the base "
                                 f"model is not a .gguf file; this one is {model.get('type')} (byte_fallback="
                                 f"{model.get('byte_fallback')})")
        pre = bpe_pre_tokenizer(tokenizer_json)
        special = gguf.SpecialVocab(files, load_merges=True, n_vocab=vocab_size)
    ids = tok.get_vocab()
    by_id = {i: t for t, i in ids.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the vocabulary (padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.chat_template = getattr(tok, "chat_template", None) or special.chat_template
    if "bos" not in special.add_special_token:  # say it either way: llama.cpp's default differs by vocab type
        ids = tok("a")["input_ids"]
        special.add_special_token["bos"] = bool(ids) and ids[0] == tok.bos_token_id
    special.add_to_gguf(writer, quiet=True)


def write_tokenizer(writer, tok, vocab_size: int, source_gguf: Path | None) -> str:
    """The tokenizer keys, from the base's GGUF file when there is one. Returns where they came from."""
    template = getattr(tok, "chat_template", None)
    if source_gguf is not None:
        copy_tokenizer_from_gguf(writer, source_gguf, template)
        return f"tokenizer copied from {source_gguf.name}"
    write_hf_tokenizer(writer, tok, vocab_size)
    return "tokenizer built from the transformers tokenizer"
