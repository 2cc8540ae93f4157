"""The generation scheduler: one thread owns the models and runs every generation, so no request can change the
adapter another request is generating with. It runs in the inference process (inference_process.py).

Requests wait in a queue as `Generation`s. The thread takes the oldest one and, if it is greedy, every other
queued greedy request on the same base model (up to `max_batch`), and generates them as one left-padded batch,
each row with its own adapter (multi_lora.py). Sampled requests run alone, so a `seed` reproduces a reply.
Each row stops on its own: end of sequence, a stop string, its `max_tokens`, its time limit, its client
going away (`Generation.cancel()`), or the engine stopping. A row whose adapter cannot be loaded fails alone.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class AsyncEvents:
    """A generation's events, delivered from any thread to one asyncio event loop: call it with (kind, value);
    read them with `events()`. Events: ("text", str) pieces, then one ("done", {"finish_reason", "usage"}) or
    ("error", message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the request's event loop is gone (server shutting down): nobody is listening
            pass

    async def events(self):
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind != "text":
                return


@dataclass(eq=False)  # each request is itself: identical requests are still two
class Generation:
    """One reply being generated. The scheduler thread writes its events through `emit`."""
    base: str
    adapter: str | None  # the fine-tuned model's adapter name on its base; None for the base model
    adapter_path: str | None  # its PEFT folder, loaded on first use
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    time_limit_s: float
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # scheduler-side state of the row
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: str | None = None
    deadline: float = float("inf")
    context: int | None = None  # the base model's context: a batch's prompt width plus new tokens must fit it
    closed: bool = False  # its last event ("done" or "error") is sent

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def cancel(self) -> None:
        """Stop generating (the client went away); safe from any thread, any number of times."""
        self.cancelled.set()

    def push(self, kind: str, value) -> None:
        if self.closed:
            return
        self.closed = kind != "text"
        self.emit(kind, value)


class _RowStreamer:
    """transformers' streamer protocol: receives each step's new token per row (the first call is the prompt)."""

    def __init__(self, rows: list[Generation], on_token: Callable[[Generation, int], None]) -> None:
        self.rows, self.on_token, self.prompt_seen = rows, on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            if row.finish is None:
                self.on_token(row, token)

    def end(self) -> None:
        pass


Loader = Callable[[list[Generation]], tuple[Any, Any, dict[Generation, str]]]


class Scheduler:
    """The thread that runs all generation. `load(batch)` -> (model, tokenizer, failed): the batch's base model
    with every row's adapter loaded (not activated), and {row: error} for rows whose adapter could not be
    loaded; it is only called from this thread."""

    def __init__(self, load: Loader, token_lock: threading.Lock, max_batch: int = 16) -> None:
        self.load, self.token_lock, self.max_batch = load, token_lock, max_batch
        self.pending: list[Generation] = []
        self.wake = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tunesmith-generation", daemon=True)
        self.thread.start()

    def submit(self, gen: Generation) -> None:
        with self.wake:
            if self.stopping.is_set():
                gen.push("error", "The server is shutting down")
                return
            self.pending.append(gen)
            self.wake.notify()

    def stop(self) -> None:
        """Finish every running row now and refuse queued ones; returns at once."""
        self.stopping.set()
        with self.wake:
            self.wake.notify()

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.pending and not self.stopping.is_set():
                    self.wake.wait()
                if self.stopping.is_set():
                    for gen in self.pending:
                        gen.push("error", "The server is shutting down")
                    self.pending.clear()
                    return
                batch = self._take_batch()
            try:
                self._generate(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, never the thread
                with self.wake:
                    requeued = list(self.pending)
                for gen in batch:  # every row that ran gets its last event, also rows that had finished
                    if gen not in requeued:
                        gen.finish = gen.finish or "error"
                        gen.push("error", f"Generation failed: {type(e).__name__}: {e}")

    def _take_batch(self) -> list[Generation]:
        live = [g for g in self.pending if not g.cancelled.is_set()]
        for g in self.pending:
            if g.cancelled.is_set():
                _cancelled(g)
        first = live[0] if live else None
        if first is None:
            self.pending = []
            return []
        if first.greedy:
            batch = []
            for g in (g for g in live if g.greedy and g.base == first.base):
                rows = [*batch, g]  # left-padded to the longest prompt, stepped to the largest max_tokens
                if len(rows) > self.max_batch or (g.context is not None and max(len(r.prompt_ids) for r in rows)
                                                  + max(r.max_tokens for r in rows) > g.context):
                    continue  # it waits for a batch it fits in (alone it always fits: admission checked)
                batch = rows
        else:
            batch = [first]
        self.pending = [g for g in live if g not in batch]
        return batch

    def _generate(self, batch: list[Generation]) -> None:
        if not batch:
            return
        from .multi_lora import can_mix
        model, tok, failed = self.load(batch)  # every row's adapter is on the model before the batch starts
        for gen, error in failed.items():  # a broken adapter fails its own rows, not the batch
            gen.finish = "error"
            gen.push("error", error)
        batch = [g for g in batch if g not in failed]
        if not batch:
            return
        names = [g.adapter for g in batch]
        if len(set(names)) > 1 and not can_mix(model, names):  # run one adapter now, the others next time
            keep = [g for g in batch if g.adapter == batch[0].adapter]
            with self.wake:
                self.pending = [g for g in batch if g not in keep] + self.pending
            batch, names = keep, [g.adapter for g in keep]
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(g.prompt_ids) for g in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, g in enumerate(batch):  # left padding: every row's next token is at the same position
            ids[i, width - len(g.prompt_ids):] = torch.tensor(g.prompt_ids)
            mask[i, width - len(g.prompt_ids):] = 1
        start = time.monotonic()
        for g in batch:
            g.deadline = start + g.time_limit_s
        eos = _eos_ids(model, tok)
        kwargs = dict(max_new_tokens=max(g.max_tokens for g in batch), attention_mask=mask.to(device),
                      pad_token_id=pad, streamer=_RowStreamer(batch, lambda g, t: self._on_token(g, t, tok, eos)),
                      stopping_criteria=_stopping(batch, self.stopping), do_sample=not batch[0].greedy)
        if not batch[0].greedy:
            kwargs.update(temperature=batch[0].temperature, top_p=batch[0].top_p)
            if batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
        with torch.no_grad(), _adapters(model, names, can_mix):
            model.generate(ids.to(device), **kwargs)
        for g in batch:
            self._finish(g, tok, g.finish or ("length" if len(g.ids) >= g.max_tokens else "stop"))

    # -- per-row text -------------------------------------------------------------------------------
    def _on_token(self, g: Generation, token: int, tok, eos: set[int]) -> None:
        g.ids.append(token)
        if token in eos:
            g.finish = "stop"
            return
        if len(g.ids) >= g.max_tokens:  # before the wait for a whole character: a row never runs past its limit
            g.finish = "length"
        with self.token_lock:
            text = tok.decode(g.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        g.text = text
        cut = _stop_at(text, g.stop)
        if cut is not None:
            g.text, g.finish = cut, "stop"
            return
        hold = max((len(s) for s in g.stop if s), default=1) - 1  # text that may still become a stop string
        if len(text) - hold > g.emitted:
            g.push("text", text[g.emitted:len(text) - hold])
            g.emitted = len(text) - hold
        if len(g.ids) >= g.max_tokens:
            g.finish = "length"

    def _finish(self, g: Generation, tok, reason: str) -> None:
        if g.cancelled.is_set():
            _cancelled(g)
            return
        if len(g.text) > g.emitted:
            g.push("text", g.text[g.emitted:])
        completion = len(g.ids)  # the end-of-sequence token counts, as transformers returns it
        if reason == "stop" and g.stop:  # the text was cut at a stop string: count what was kept
            with self.token_lock:
                completion = len(tok(g.text, add_special_tokens=False)["input_ids"])
        prompt = len(g.prompt_ids)
        g.push("done", {"finish_reason": reason, "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                            "total_tokens": prompt + completion}})


def _cancelled(g: Generation) -> None:
    """End a cancelled generation; the server's log says how far it got (an operator sees the work stopped)."""
    g.push("error", "cancelled")
    print(f"tunesmith: a generation was cancelled after {len(g.ids)} of max {g.max_tokens} tokens (its client went "
          "away, or another choice of its request failed)", file=sys.stderr, flush=True)


def _eos_ids(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return eos


def _stopping(batch: list[Generation], stopping: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowsDone(StoppingCriteria):
        """Per row: finished (end of sequence, stop string, max_tokens), cancelled, out of time, or shutdown."""

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            now, halt = time.monotonic(), stopping.is_set()
            for g in batch:
                if g.finish is None and (halt or g.cancelled.is_set() or now > g.deadline):
                    g.finish = "length"  # out of time: the reply is cut, as by max_tokens
            return torch.tensor([g.finish is not None for g in batch], device=input_ids.device)

    return StoppingCriteriaList([RowsDone()])


def _adapters(model, names: list[str | None], can_mix):
    """Row i runs names[i]: per-row LoRA when the adapters allow it, else the one adapter (or the base) as usual."""
    from ..adapters import disable_adapters, set_active_adapters
    from .multi_lora import adapter_per_row
    if can_mix(model, names):
        return adapter_per_row(model, names)
    if names[0] is None:
        return disable_adapters(model)
    set_active_adapters(model, names[0])
    return _nothing()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _stop_at(text: str, stop: list[str]) -> str | None:
    hits = [text.index(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else None
