"""Chat completions: one shared base model per base name, fine-tuned models attached as named LoRA adapters.

The Engine admits a request in the server (tokenizes it as the model was trained — the chat template, or the
raw prompt for a prompt/completion fine-tune — and checks it against the model's context) and sends it to the
inference process (inference_process.py), whose scheduler owns the models and runs every generation. Each
request's adapter is fixed when it is admitted; nothing another request does can change it.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .inference_process import MAX_ADAPTERS, InferenceProcess, Reply
from .store import Store, new_id

DEFAULT_MAX_TOKENS = 256  # a reply's length when the request names no max_tokens (bounded by the context)
MAX_GENERATION_S = float(os.environ.get("TUNESMITH_MAX_GENERATION_S", "120"))  # per request, then cut


class ContextLengthError(ValueError):
    """A prompt (plus the requested reply) longer than the model's context: OpenAI's context_length_exceeded."""

    def __init__(self, context: int, prompt: int, completion: int | None) -> None:
        if completion is None:
            detail = f"your messages resulted in {prompt} tokens"
            fix = "Please reduce the length of the messages."
        else:
            detail = (f"you requested {prompt + completion} tokens ({prompt} in the messages, {completion} in the "
                      "completion)")
            fix = "Please reduce the length of the messages or completion."
        super().__init__(f"This model's maximum context length is {context} tokens. However, {detail}. {fix}")
        self.message, self.param, self.code = str(self), "messages", "context_length_exceeded"


@dataclass
class Base:
    """What admission needs of a base model, without loading it: its tokenizer and its context length."""
    tokenizer: object
    context: int | None


class Engine:
    def __init__(self, store: Store, bases: dict[str, str], device: str = "auto",
                 max_generation_s: float = MAX_GENERATION_S, max_batch: int = 16, max_adapters: int = MAX_ADAPTERS) -> None:
        from ..devices import resolve_device
        self.store, self.bases = store, bases
        self.max_generation_s = max_generation_s
        self.info: dict[str, Base] = {}  # base name -> tokenizer and context (admission)
        self.templates: dict[str, str] = {}  # fine-tuned model -> how its prompts are written (chat | raw)
        self.token_lock = threading.Lock()  # a tokenizer is not safe to call from two threads at once
        self.info_lock = threading.Lock()
        self.process = InferenceProcess(bases, str(resolve_device(device)), max_batch, max_adapters)

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the inference process. Called from the main thread (the app's startup), it also makes SIGTERM
        and SIGINT cut running generations short, so the server's graceful shutdown does not wait on them."""
        self.process.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(sig)

                def handler(signum, frame, previous=previous):
                    self.process.stop()
                    if callable(previous):
                        previous(signum, frame)

                signal.signal(sig, handler)

    def stop(self) -> None:
        self.process.close()

    # -- admission ----------------------------------------------------------------------------------
    def base_of(self, model_id: str) -> tuple[str, str | None, dict | None]:
        """(base name, adapter name or None, the fine-tuned model's row) for a base name or fine-tuned id."""
        row = None if model_id in self.bases else self.store.get_model(model_id)
        base = model_id if row is None else row["base"]
        if base not in self.bases:
            raise KeyError(model_id)
        adapter = None if row is None else "ft_" + hashlib.sha1(model_id.encode()).hexdigest()[:12]
        return base, adapter, row

    def _base_info(self, base: str) -> Base:
        with self.info_lock:
            if base not in self.info:
                from ..models import load_tokenizer
                self.info[base] = Base(load_tokenizer(self.bases[base]), context_length(self.bases[base]))
            return self.info[base]

    def _template(self, model_id: str, row: dict | None) -> str:
        """'raw' for a fine-tune trained on prompt/completion or text data (its prompts had no chat template),
        the run's own template text when it chose one (data.chat_template), else 'chat' — what `tunesmith chat`
        does for the same run."""
        if row is None:
            return "chat"
        if model_id not in self.templates:
            from ..chat_templates import saved_chat_template
            from ..runinfo import read_run_info
            try:
                fmt = read_run_info(Path(row["path"])).format
            except Exception:  # noqa: BLE001 - a run folder without run.json (older jobs): the chat template
                fmt = "chat"
            own = saved_chat_template(row["path"])
            self.templates[model_id] = "raw" if fmt in ("prompt_completion", "text") else own or "chat"
        return self.templates[model_id]

    def prompt_ids(self, model_id: str, messages: list[dict]) -> list[int]:
        from ..generate import chat_prompt_ids
        base, _, row = self.base_of(model_id)
        info = self._base_info(base)
        template = self._template(model_id, row)
        with self.token_lock:
            return chat_prompt_ids(info.tokenizer, messages, template)[0].tolist()

    def submit(self, model_id: str, messages: list[dict], max_tokens: int | None, temperature: float, top_p: float,
               stop: list[str], seeds: list[int | None], loop: asyncio.AbstractEventLoop) -> list[Reply]:
        """Admit a request: one generation per seed (n choices), sent to the inference process. Raises
        ContextLengthError when the prompt, or the prompt plus an explicit max_tokens, exceeds the context.
        Blocking (tokenizes, may load a tokenizer): call it from a worker thread."""
        base, adapter, row = self.base_of(model_id)
        context = self._base_info(base).context
        ids = self.prompt_ids(model_id, messages)
        if context is not None:
            if len(ids) >= context:
                raise ContextLengthError(context, len(ids), None)
            if max_tokens is not None and len(ids) + max_tokens > context:
                raise ContextLengthError(context, len(ids), max_tokens)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS if context is None else min(DEFAULT_MAX_TOKENS, context - len(ids))
        path = None if row is None else str(Path(row["path"]) / "adapter")
        return [self.process.submit(dict(base=base, adapter=adapter, adapter_path=path, prompt_ids=ids,
                                         max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                         seed=seed, time_limit_s=self.max_generation_s, context=context), loop)
                for seed in seeds]


def context_length(spec: str) -> int | None:
    """The model's context in tokens, read from its config (None when it declares none)."""
    from transformers import AutoConfig

    from ..models import resolve_model
    try:
        cfg = AutoConfig.from_pretrained(resolve_model(spec), local_files_only=True)
    except (OSError, ValueError, KeyError):  # no readable config: only max_tokens bounds the work
        return None
    from ..generate import config_context
    return config_context(cfg)


def completion_id() -> str:
    return new_id("chatcmpl-")


def created() -> int:
    return int(time.time())
