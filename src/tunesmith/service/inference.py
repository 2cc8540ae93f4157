"""Chat completions: one shared base model per base name, fine-tuned models attached as named LoRA adapters."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from .store import Store, new_id


class Engine:
    def __init__(self, store: Store, bases: dict[str, str], device: str = "auto") -> None:
        from ..devices import resolve_device
        self.store, self.bases, self.device = store, bases, resolve_device(device)
        self.loaded: dict[str, tuple] = {}  # base name -> (model, tokenizer)
        self.lock = threading.Lock()  # one generation at a time per process: adapters are switched per request

    def resolve(self, model_id: str) -> tuple[object, object, str | None]:
        """(model, tokenizer, adapter name or None) for a base name or a fine-tuned model id."""
        from ..adapters import adapter_configs, load_adapter
        from ..models import load_model, load_tokenizer
        row = None if model_id in self.bases else self.store.get_model(model_id)
        base = model_id if row is None else row["base"]
        if base not in self.bases:
            raise KeyError(model_id)
        if base not in self.loaded:
            model = load_model(self.bases[base], "causal_lm").eval().to(self.device)
            self.loaded[base] = (model, load_tokenizer(self.bases[base]))
        model, tok = self.loaded[base]
        if row is None:
            return model, tok, None
        name = "ft_" + hashlib.sha1(model_id.encode()).hexdigest()[:12]
        if name not in adapter_configs(model):
            load_adapter(model, Path(row["path"]) / "adapter", name=name, activate=False)
            model.to(self.device)  # the new adapter's weights
        return model, tok, name

    def complete(self, model_id: str, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None) -> Iterator[tuple[str, dict | None]]:
        """Yield text pieces; the last item carries (finish_reason, usage)."""
        from transformers import TextIteratorStreamer
        from ..adapters import disable_adapters, set_active_adapters
        from ..generate import chat_prompt_ids
        with self.lock:
            model, tok, adapter = self.resolve(model_id)
            ids = chat_prompt_ids(tok, messages).to(self.device)
            if seed is not None:
                torch.manual_seed(seed)
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            kwargs = dict(max_new_tokens=max_tokens, attention_mask=torch.ones_like(ids), streamer=streamer,
                          pad_token_id=tok.pad_token_id or tok.eos_token_id, do_sample=temperature > 0)
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=top_p)
            out: dict = {}

            def run() -> None:
                with torch.no_grad():
                    if adapter is None:
                        with disable_adapters(model):
                            out["ids"] = model.generate(ids, **kwargs)
                    else:
                        set_active_adapters(model, adapter)
                        out["ids"] = model.generate(ids, **kwargs)

            thread = threading.Thread(target=run)
            thread.start()
            text, emitted, finish = "", 0, None
            hold = max((len(s) for s in stop), default=1) - 1  # text that may still turn into a stop sequence
            for piece in streamer:
                text += piece
                cut = _stop_at(text, stop)
                if cut is not None:
                    text, finish = cut, "stop"
                    break
                if len(text) - hold > emitted:
                    yield text[emitted:len(text) - hold], None
                    emitted = len(text) - hold
            if len(text) > emitted:
                yield text[emitted:], None
            thread.join()
            new_tokens = out["ids"].shape[1] - ids.shape[1]
            if finish is None:
                finish = "length" if new_tokens >= max_tokens else "stop"
            completion = len(tok(text, add_special_tokens=False)["input_ids"]) if finish == "stop" and stop else new_tokens
            yield "", {"finish_reason": finish, "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": completion,
                                                          "total_tokens": ids.shape[1] + completion}}


def _stop_at(text: str, stop: list[str]) -> str | None:
    hits = [text.index(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None


def completion_id() -> str:
    return new_id("chatcmpl-")


def created() -> int:
    return int(time.time())
