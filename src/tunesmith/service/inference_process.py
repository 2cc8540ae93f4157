"""Chat generation in its own process, apart from the HTTP server.

The server admits a request (inference.py: tokenizes it, checks the context) and sends it here as plain data
with a request id; the inference process runs the Scheduler (scheduler.py) over its own copy of the models and
sends each row's events back. So a generation can slow, crash or exhaust the memory of only this process:
the server keeps answering, the requests in flight get an error, and the next request starts a new process.

    server  --("submit", id, spec) / ("cancel", id) / ("stop",)-->  inference process
            <--(id, kind, value)------------------------------------ (one per text piece, then done / error)

Only the inference process holds models. It keeps up to `max_adapters` fine-tuned adapters per base model,
dropping the least recently used one (a deleted or rarely used fine-tune does not hold memory forever).
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .scheduler import AsyncEvents, Generation, Scheduler

MAX_ADAPTERS = int(os.environ.get("TUNESMITH_MAX_ADAPTERS", "32"))  # per base model, in the inference process
START_TIMEOUT_S = 120.0


# -- the inference process --------------------------------------------------------------------------
class Models:
    """The inference process's models: one per base, with up to `max_adapters` LoRA adapters on it."""

    def __init__(self, bases: dict[str, str], device: str, max_adapters: int) -> None:
        self.bases, self.device, self.max_adapters = bases, device, max_adapters
        self.models: dict[str, Any] = {}
        self.tokenizers: dict[str, Any] = {}
        self.recent: dict[str, OrderedDict] = {}  # base -> adapter names, least recently used first

    def load(self, batch: list[Generation]) -> tuple[Any, Any, dict[Generation, str]]:
        """The batch's base model with each row's adapter loaded; {row: error} for rows whose adapter failed."""
        from ..adapters import delete_adapter, load_adapter
        from ..models import load_model, load_tokenizer
        base = batch[0].base
        if base not in self.models:
            self.tokenizers[base] = load_tokenizer(self.bases[base])
            self.models[base] = load_model(self.bases[base], "causal_lm").eval().to(self.device)
        model, recent = self.models[base], self.recent.setdefault(base, OrderedDict())
        wanted = {g.adapter: g.adapter_path for g in batch if g.adapter is not None}
        for name in wanted:
            if name in recent:
                recent.move_to_end(name)
        missing = [n for n in wanted if n not in recent]
        for old in [n for n in recent if n not in wanted][:max(0, len(recent) + len(missing) - self.max_adapters)]:
            delete_adapter(model, old)
            del recent[old]
        failed: dict[Generation, str] = {}
        for name in missing:
            try:
                load_adapter(model, Path(wanted[name]), name=name, activate=False)
                recent[name] = True
            except Exception as e:  # noqa: BLE001 - a broken or deleted fine-tune fails only its own requests
                failed.update({g: f"The fine-tuned model's adapter could not be loaded: {type(e).__name__}: {e}"
                               for g in batch if g.adapter == name})
        if missing:
            model.to(self.device)  # the new adapters' weights
        return model, self.tokenizers[base], failed


def serve(commands, events, bases: dict[str, str], device: str, max_batch: int, max_adapters: int) -> None:
    """The inference process's main: run the scheduler until told to stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the server stops us
    server = os.getppid()
    models = Models(bases, device, max_adapters)
    scheduler = Scheduler(models.load, threading.Lock(), max_batch)
    rows: dict[int, Generation] = {}

    def emitter(rid: int):
        def emit(kind: str, value: Any) -> None:
            if kind != "text":
                rows.pop(rid, None)
            events.put((rid, kind, value))
        return emit

    events.put((None, "ready", os.getpid()))
    while True:
        try:
            message = commands.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != server:  # the server died without telling us: nobody will read the replies
                message = ("stop",)
            else:
                continue
        if message[0] == "submit":
            gen = Generation(**message[2], emit=emitter(message[1]))
            rows[message[1]] = gen
            scheduler.submit(gen)
        elif message[0] == "cancel" and message[1] in rows:
            rows[message[1]].cancel()
        elif message[0] == "stop":
            scheduler.stop()
            scheduler.thread.join(timeout=10)
            events.put((None, "stopped", None))
            return


# -- the server's side --------------------------------------------------------------------------------
class Reply(AsyncEvents):
    """The server's view of one generation: its events, and cancel() (the client went away)."""

    def __init__(self, loop, rid: int, owner: "InferenceProcess", epoch: int) -> None:
        super().__init__(loop)
        self.rid, self.owner, self.epoch, self.done = rid, owner, epoch, False

    def cancel(self) -> None:
        if not self.done:
            self.owner.cancel(self)


class InferenceProcess:
    """Starts the inference process (again, after it died) and routes its events to the waiting requests."""

    def __init__(self, bases: dict[str, str], device: str, max_batch: int = 16, max_adapters: int = MAX_ADAPTERS) -> None:
        self.args = (bases, device, max_batch, max_adapters)
        self.lock = threading.Lock()
        self.replies: dict[int, Reply] = {}
        self.ids = itertools.count()
        self.proc = None
        self.commands = None
        self.epoch = 0  # which process a reply went to: only its own process's death fails it
        self.closed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.is_alive() else None

    def start(self) -> None:
        """Start the process unless it runs. Spawned, not forked: the server's threads and locks stay behind."""
        with self.lock:
            if self.closed:
                raise RuntimeError("The server is shutting down")
            if self.proc is not None and self.proc.is_alive():
                return
            ctx = mp.get_context("spawn")
            self.commands, events = ctx.Queue(), ctx.Queue()
            self.proc = ctx.Process(target=serve, args=(self.commands, events, *self.args), name="tunesmith-inference",
                                    daemon=True)
            self.proc.start()
            self.epoch += 1
            threading.Thread(target=self._route, args=(self.proc, events, self.epoch), name="tunesmith-inference-events",
                             daemon=True).start()

    def submit(self, spec: dict, loop) -> Reply:
        self.start()
        with self.lock:
            reply = Reply(loop, next(self.ids), self, self.epoch)
            self.replies[reply.rid] = reply
            self.commands.put(("submit", reply.rid, spec))
        return reply

    def cancel(self, reply: Reply) -> None:
        with self.lock:
            if reply.rid in self.replies and reply.epoch == self.epoch:
                self.commands.put(("cancel", reply.rid))

    def stop(self) -> None:
        """Ask the process to cut running generations short and exit; returns at once (safe in a signal handler)."""
        self.closed = True
        if self.commands is not None:
            try:
                self.commands.put_nowait(("stop",))
            except (ValueError, OSError):  # the queue is closed already
                pass

    def close(self, timeout: float = 15.0) -> None:
        """stop(), wait for the process, and kill it if it does not go."""
        self.stop()
        if self.proc is not None:
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)

    def _route(self, proc, events, epoch: int) -> None:
        """Deliver one process's events; when it dies, fail the replies it still owed."""
        while True:
            try:
                rid, kind, value = events.get(timeout=0.5)
            except queue.Empty:
                if proc.is_alive():
                    continue
                break
            except (EOFError, OSError):
                break
            if rid is None:
                if kind == "stopped":
                    break
                continue
            with self.lock:
                reply = self.replies.get(rid)
                if reply is not None and kind != "text":
                    reply.done = True
                    del self.replies[rid]
            if reply is not None:
                reply(kind, value)
        proc.join(5)
        with self.lock:
            orphans = [r for r in self.replies.values() if r.epoch == epoch]
            for r in orphans:
                r.done = True
                del self.replies[r.rid]
        why = "the server is shutting down" if self.closed else f"it exited with code {proc.exitcode}"
        for r in orphans:
            r("error", f"The inference process stopped ({why}); please retry the request")
