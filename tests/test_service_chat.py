"""Chat generation under faults: cut-off streams, prompts over the context, runaway generations, SIGTERM, and
many fine-tuned models of one base batched together. Real uvicorn servers over HTTP; every greedy reply is
checked against a single-request greedy reference computed here with transformers."""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import signal
import threading
import time

import pytest
import torch
from conftest import free_port, perturb_adapters, start_serve

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
PROMPTS = ["Tell me about cats", "Write a haiku about rain and the long evening sky", "Why?"]


def start_server(data_dir, base_dir, port, env: dict | None = None):
    return start_serve("--data", str(data_dir), "--api-key", KEY, "--model", f"tiny={base_dir}", port=port, env=env)


def post(port: int, body: dict, timeout: float = 120) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), HEADERS)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def chat_body(model: str, prompt: str, max_tokens: int | None = 24, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def first_chunk_then_close(port: int, body: dict) -> str:
    """Open a stream, read up to the first content chunk, then drop the connection (a client going away)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=True)), HEADERS)
    resp = conn.getresponse()
    assert resp.status == 200
    while True:
        line = resp.fp.readline().decode()
        assert line, "the stream ended before any content"
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            conn.sock.shutdown(2)
            conn.close()
            return line


def make_base(path, context: int, hidden: int = 32, layers: int = 2):
    """A tiny random Llama with the real SmolLM2 tokenizer and a given context length, saved at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_fine_tuned(store, base_dir, folder, model_id: str, seed: int) -> None:
    """A LoRA 'fine-tune' (random, clearly non-zero factors) registered as the service's job would register it."""
    from tunesmith.adapters import apply_lora, save_adapter
    from tunesmith.models import load_model
    model = load_model(str(base_dir), "causal_lm")
    apply_lora(model, r=4, alpha=8)
    perturb_adapters(model, std=1.0, seed=seed)
    save_adapter(model, folder / "adapter")
    store.add_model(model_id, "ftjob-test", "tiny", str(folder), "user")


def greedy_reference(base_dir, adapter_dir, prompt: str, max_tokens: int) -> str:
    """One request alone, straight through transformers: what the server must answer for this greedy request."""
    from tunesmith.adapters import load_adapter
    from tunesmith.generate import chat_prompt_ids
    from tunesmith.models import load_model, load_tokenizer
    model, tok = load_model(str(base_dir), "causal_lm").eval(), load_tokenizer(str(base_dir))
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    ids = chat_prompt_ids(tok, [{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, lm_dir):
    """A server on the 512-token tiny base with two fine-tuned models, and each model's greedy references."""
    from tunesmith.service.store import Store
    data = tmp_path_factory.mktemp("chat-service")
    store = Store(data)
    adapters = {"tiny": None}
    for i in range(2):
        folder = tmp_path_factory.mktemp(f"ft{i}")
        make_fine_tuned(store, lm_dir, folder, f"ft:tiny:user:t{i}:abc", seed=i)
        adapters[f"ft:tiny:user:t{i}:abc"] = folder / "adapter"
    refs = {(m, p): greedy_reference(lm_dir, a, p, 24) for m, a in adapters.items() for p in PROMPTS}
    assert len({refs[(m, PROMPTS[0])] for m in adapters}) == 3, "each model must answer differently"
    port = free_port()
    proc = start_server(data, lm_dir, port)
    yield {"port": port, "refs": refs, "models": list(adapters), "adapters": adapters, "base": lm_dir, "store": store}
    proc.terminate()
    proc.wait(timeout=30)


# -- item 2: a cut-off stream ------------------------------------------------------------------------
def test_a_cut_off_stream_changes_no_other_reply(fleet):
    """The stream cut off is to the base model (its generation ran with the adapters disabled) or to a fine-tune;
    straight after, the same fine-tune and the base answer exactly as they do alone."""
    port, refs, ft = fleet["port"], fleet["refs"], fleet["models"][1]
    for cut in ["tiny", ft, "tiny"]:
        first_chunk_then_close(port, chat_body(cut, PROMPTS[1], max_tokens=400))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # straight after: the same fine-tune, and the base
            same = pool.submit(post, port, chat_body(ft, PROMPTS[0]))
            base = pool.submit(post, port, chat_body("tiny", PROMPTS[0]))
            (s1, r1), (s2, r2) = same.result(), base.result()
        assert s1 == s2 == 200, (r1, r2)
        assert r1["choices"][0]["message"]["content"] == refs[(ft, PROMPTS[0])], "the fine-tune answered wrongly"
        assert r2["choices"][0]["message"]["content"] == refs[("tiny", PROMPTS[0])], "the base answered wrongly"


def test_a_client_that_goes_away_stops_its_generation(tmp_path, lm_dir):
    """Over HTTP: a stream dropped after its first piece stops generating (the server's log says after how many
    tokens), well before the 400 it asked for."""
    import re
    log = tmp_path / "server.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = start_serve("--data", str(tmp_path / "data"), "--api-key", KEY, "--model", f"tiny={lm_dir}",
                           port=port, output=out)
    try:
        first_chunk_then_close(port, chat_body("tiny", PROMPTS[1], max_tokens=400) | {"temperature": 1.0})
        deadline = time.time() + 60
        while time.time() < deadline and "was cancelled after" not in log.read_text():
            time.sleep(0.2)
        found = re.search(r"cancelled after (\d+) of max 400 tokens", log.read_text())
        assert found and int(found[1]) < 200, log.read_text()[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cancel_stops_the_generation(fleet):
    """In process: a cancelled generation stops within a token or two, and the scheduler goes on serving."""
    from tunesmith.service.inference import Engine
    engine = Engine(fleet["store"], {"tiny": str(fleet["base"])}, "cpu")
    ft = fleet["models"][1]

    async def run() -> tuple:
        loop = asyncio.get_running_loop()
        gen, = await asyncio.to_thread(engine.submit, ft, [{"role": "user", "content": PROMPTS[1]}], 400, 0.0, 1.0,
                                       [], [None], loop)
        events = [e async for e in _cancel_after_first(gen)]  # cancelled after the first text piece
        after, = await asyncio.to_thread(engine.submit, ft, [{"role": "user", "content": PROMPTS[0]}], 24, 0.0, 1.0,
                                         [], [None], loop)
        text = "".join(v for k, v in [e async for e in after.events()] if k == "text")
        return gen, events, text

    try:
        gen, events, text = asyncio.run(run())
    finally:
        engine.stop()
    pieces = [v for k, v in events if k == "text"]
    assert events[-1] == ("error", "cancelled") and len(pieces) < 50, events
    assert text == fleet["refs"][(ft, PROMPTS[0])]


async def _cancel_after_first(gen):
    async for kind, value in gen.events():
        yield kind, value
        if kind == "text":
            gen.cancel()


# -- item 4: bounded work -----------------------------------------------------------------------------
def test_a_prompt_over_the_context_is_openais_400(fleet):
    status, body = post(fleet["port"], chat_body("tiny", "cats and dogs " * 300))
    assert status == 400, body
    err = body["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert err["type"] == "invalid_request_error"
    assert "maximum context length is 512 tokens" in err["message"] and "messages resulted in" in err["message"]
    status, body = post(fleet["port"], chat_body("tiny", "cats and dogs " * 300, stream=True))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"  # before the stream starts


def test_max_tokens_beyond_the_context_is_a_400_and_the_default_fits(fleet):
    port = fleet["port"]
    status, body = post(port, chat_body("tiny", PROMPTS[0], max_tokens=500))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "in the messages, 500 in the completion" in body["error"]["message"]
    long = "cats " * 440  # near the end of the context; no max_tokens: the reply fills what is left, no more
    status, body = post(port, chat_body("tiny", long, max_tokens=None))
    assert status == 200, body
    usage = body["usage"]
    assert usage["total_tokens"] <= 512 and body["choices"][0]["finish_reason"] == "length", usage


@pytest.fixture(scope="module")
def long_base(tmp_path_factory):
    """A base with an 8k context, big enough that 8,000 tokens take far longer than any test waits."""
    return make_base(tmp_path_factory.mktemp("long-lm"), 8192, hidden=64, layers=4)


def test_one_request_cannot_hold_the_server(tmp_path, long_base):
    port = free_port()
    proc = start_server(tmp_path / "data", long_base, port, {"TUNESMITH_MAX_GENERATION_S": "2"})
    try:
        t0 = time.time()
        status, body = post(port, chat_body("tiny", PROMPTS[0], max_tokens=8000), timeout=60)
        took = time.time() - t0
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] < 8000
        assert took < 20, f"the 2 s generation limit let a request run {took:.0f} s"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_stops_the_server_during_a_generation(tmp_path, long_base):
    port = free_port()
    proc = start_server(tmp_path / "data", long_base, port, {"TUNESMITH_MAX_GENERATION_S": "600"})
    try:
        started = threading.Event()

        def stream_forever() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions",
                         json.dumps(chat_body("tiny", PROMPTS[0], max_tokens=8000, stream=True)), HEADERS)
            resp = conn.getresponse()
            try:
                while resp.fp.readline():
                    started.set()
            except OSError:
                pass

        threading.Thread(target=stream_forever, daemon=True).start()
        assert started.wait(60)
        time.sleep(0.5)  # well inside the generation
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.time() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- design: many fine-tunes of one base in one batch -------------------------------------------------
def test_concurrent_requests_to_many_fine_tunes_each_get_their_own_adapter(fleet):
    """Nine greedy requests at once (three models x three prompts of different lengths: left padding), batched
    together, each row with its own adapter: every reply equals the request's single-request reference."""
    jobs = [(m, p) for m in fleet["models"] for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda mp: post(fleet["port"], chat_body(*mp)), jobs))
    for (m, p), (status, body) in zip(jobs, replies):
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == fleet["refs"][(m, p)], (m, p)


def test_mixed_batches_equal_one_adapter_at_a_time(lm_dir, tmp_path):
    """multi_lora in process: rows with different adapters (and the base) in one forward == each alone."""
    from tunesmith.adapters import apply_lora, disable_adapters, set_active_adapters
    from tunesmith.models import load_model
    from tunesmith.service.multi_lora import adapter_per_row, can_mix
    model = load_model(str(lm_dir), "causal_lm").eval()
    for name in ["a", "b"]:
        apply_lora(model, r=4, alpha=8, name=name)
    perturb_adapters(model, std=1.0)
    ids = torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    names = ["b", None, "a"]
    assert can_mix(model, names)
    with torch.no_grad(), adapter_per_row(model, names):
        mixed = model(ids).logits
    alone = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                with disable_adapters(model):
                    alone.append(model(ids[i:i + 1]).logits)
            else:
                set_active_adapters(model, name)
                alone.append(model(ids[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)


# ---- found in review: a batch's failure or width must not leave a request waiting forever ------------------

def _scheduler_events(load, rows: list[tuple[int, int]], context: int | None = None, timeout: float = 20.0) -> list:
    """Run `rows` (prompt length, max_tokens) through a Scheduler in one go; each row's last event (a row that
    never gets one times out)."""
    import asyncio
    import threading
    from tunesmith.service.scheduler import AsyncEvents, Generation, Scheduler

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(lambda batch: (*load(batch), {}), threading.Lock())
        sinks = [AsyncEvents(loop) for _ in rows]
        gens = [Generation(base="b", adapter=None, adapter_path=None, prompt_ids=[3] * n, max_tokens=k, temperature=0,
                           top_p=1, stop=[], seed=None, time_limit_s=60, emit=sink, context=context)
                for (n, k), sink in zip(rows, sinks)]
        with s.wake:
            s.pending += gens
            s.wake.notify()

        async def last(sink):
            return [e async for e in sink.events()][-1][0]
        out = [await asyncio.wait_for(last(sink), timeout) for sink in sinks]
        s.stop()
        return out
    return asyncio.run(main())


class _Tok:
    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def test_a_failed_batch_answers_every_row_even_those_that_had_finished():
    import torch
    from torch import nn

    class Failing(nn.Module):  # row 0 ends (EOS) first, then the batch fails (say, out of GPU memory)
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(1, 1)
            self.generation_config = type("G", (), {"eos_token_id": 2})()

        def generate(self, ids, streamer, stopping_criteria, **kw):
            streamer.put(ids)
            streamer.put(torch.tensor([2, 5]))
            raise RuntimeError("out of memory (simulated)")

    model, tok = Failing(), _Tok()
    tok.eos_token_id = 2
    assert _scheduler_events(lambda g: (model, tok), [(2, 10), (2, 10)], timeout=5) == ["error", "error"]


def test_a_batch_never_outgrows_the_context():
    """Two requests that each fit a 32-token context overflowed it together (prompt width + largest max_tokens)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=50)).eval()
    model.generation_config.eos_token_id = None
    assert _scheduler_events(lambda g: (model, _Tok()), [(28, 4), (2, 20)], context=32) == ["done", "done"]
