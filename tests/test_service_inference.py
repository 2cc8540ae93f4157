"""Chat generation runs in its own process: a crash there fails only the requests in flight, the server keeps
answering and starts it again; a broken fine-tune fails only its own requests; the process keeps a bounded
number of adapters; a prompt/completion fine-tune is prompted as it was trained. Real uvicorn servers and
real processes; greedy replies are checked against single-request references."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_service_chat import HEADERS, PROMPTS, chat_body, greedy_reference, make_fine_tuned, post, start_server


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def inference_pid(server_pid: int, timeout: float = 60) -> int:
    """The server's spawned inference process (not the resource tracker, not a training job)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for c in children(server_pid):
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                return c
        time.sleep(0.2)
    raise AssertionError("no inference process")


def get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=HEADERS)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, lm_dir):
    """A server with one good fine-tune and one whose adapter file is corrupt."""
    from tunesmith.service.store import Store
    data = tmp_path_factory.mktemp("inference-service")
    store = Store(data)
    good, bad = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("bad")
    make_fine_tuned(store, lm_dir, good, "ft:tiny:user:good:abc", seed=3)
    make_fine_tuned(store, lm_dir, bad, "ft:tiny:user:bad:abc", seed=4)
    weights = next((bad / "adapter").glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 64)  # a truncated / overwritten file
    refs = {m: greedy_reference(lm_dir, a, PROMPTS[0], 24) for m, a in
            (("tiny", None), ("ft:tiny:user:good:abc", good / "adapter"))}
    port = free_port()
    proc = start_server(data, lm_dir, port)
    yield {"port": port, "proc": proc, "refs": refs}
    proc.terminate()
    proc.wait(timeout=30)


def test_generation_runs_outside_the_server_process(served):
    port, server = served["port"], served["proc"]
    pid = inference_pid(server.pid)
    assert pid != server.pid
    status, body = post(port, chat_body("tiny", PROMPTS[0]))
    assert status == 200 and body["choices"][0]["message"]["content"] == served["refs"]["tiny"]


def test_a_killed_inference_process_fails_only_the_requests_in_flight(served):
    """kill -9 of the inference process mid-reply: that request gets an error (not a hang), the server keeps
    answering, and the next chat request starts a new inference process and answers correctly."""
    port, server = served["port"], served["proc"]
    pid = inference_pid(server.pid)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body("tiny", PROMPTS[1], max_tokens=400, stream=True)),
                 HEADERS)
    resp = conn.getresponse()
    lines = []
    while not any('"content": "' in line and '"content": ""' not in line for line in lines):
        lines.append(resp.fp.readline().decode())  # up to the first piece of the reply
    os.kill(pid, signal.SIGKILL)
    rest = ""
    while True:  # the raw stream (chunk sizes between the events) up to its end
        line = resp.fp.readline().decode()
        rest += line
        if not line or "[DONE]" in line or '{"error"' in line:
            break
    conn.close()
    errors = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {\"error\"")]
    assert errors and "inference process stopped" in errors[0]["error"]["message"], rest[-500:]
    assert get(port, "/v1/models")[0] == 200  # the server itself never stopped
    status, body = post(port, chat_body("ft:tiny:user:good:abc", PROMPTS[0]))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == served["refs"]["ft:tiny:user:good:abc"]
    assert inference_pid(server.pid) != pid


def test_a_broken_adapter_fails_only_its_own_requests(served):
    """Requests to a fine-tune whose adapter cannot be loaded, sent together with good ones: the good ones are
    answered exactly; the broken one gets an error naming the adapter problem."""
    port = served["port"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {m: pool.submit(post, port, chat_body(m, PROMPTS[0]))
                   for m in ("ft:tiny:user:bad:abc", "ft:tiny:user:good:abc", "tiny")}
        results = {m: f.result() for m, f in futures.items()}
    status, body = results["ft:tiny:user:bad:abc"]
    assert status >= 500 and "adapter could not be loaded" in body["error"]["message"], body
    for m in ("ft:tiny:user:good:abc", "tiny"):
        status, body = results[m]
        assert status == 200 and body["choices"][0]["message"]["content"] == served["refs"][m], (m, body)


def test_the_adapter_cache_is_bounded_least_recently_used_first(lm_dir, tmp_path):
    """max_adapters=2: loading a third fine-tune drops the least recently used one; a dropped one is loaded
    again when asked for and answers as before."""
    from tunesmith.adapters import adapter_configs
    from tunesmith.service.inference_process import Models
    from tunesmith.service.scheduler import Generation
    from tunesmith.service.store import Store
    store = Store(tmp_path / "data")
    paths = {}
    for i in range(3):
        make_fine_tuned(store, lm_dir, tmp_path / f"ft{i}", f"m{i}", seed=10 + i)
        paths[f"a{i}"] = str(tmp_path / f"ft{i}" / "adapter")
    models = Models({"tiny": str(lm_dir)}, "cpu", max_adapters=2)

    def row(name):
        return Generation(base="tiny", adapter=name, adapter_path=paths[name], prompt_ids=[1, 2], max_tokens=1,
                          temperature=0, top_p=1, stop=[], seed=None, time_limit_s=10, emit=lambda *a: None)

    def loaded(model):
        return set(adapter_configs(model))

    model, _, failed = models.load([row("a0")])
    models.load([row("a1")])
    models.load([row("a0")])  # a0 is now the most recently used
    models.load([row("a2")])
    assert not failed and loaded(model) == {"a0", "a2"}
    models.load([row("a1"), row("a2")])  # both needed by one batch: a0 goes
    assert loaded(model) == {"a1", "a2"}


def test_a_prompt_completion_fine_tune_is_prompted_as_it_was_trained(lm_dir, tmp_path):
    """A fine-tune trained on prompt/completion data saw its prompts as raw text, not in the chat template:
    the service writes its prompts the same way (as `tunesmith generate` does)."""
    from tunesmith.generate import chat_prompt_ids
    from tunesmith.models import load_tokenizer
    from tunesmith.runinfo import RunInfo
    from tunesmith.service.inference import Engine
    from tunesmith.service.store import Store
    store = Store(tmp_path / "data")
    for name, fmt in (("pc", "prompt_completion"), ("chat", "chat")):
        make_fine_tuned(store, lm_dir, tmp_path / name, f"ft:tiny:user:{name}:x", seed=1)
        RunInfo(task="causal_lm", objective="sft", format=fmt).write(tmp_path / name)
    engine = Engine(store, {"tiny": str(lm_dir)}, "cpu")
    tok = load_tokenizer(str(lm_dir))
    messages = [{"role": "user", "content": "2 + 2 ="}]
    assert engine.prompt_ids("ft:tiny:user:pc:x", messages) == chat_prompt_ids(tok, messages, "raw")[0].tolist()
    assert engine.prompt_ids("ft:tiny:user:chat:x", messages) == chat_prompt_ids(tok, messages, "chat")[0].tolist()
    assert engine.prompt_ids("ft:tiny:user:pc:x", messages) != engine.prompt_ids("ft:tiny:user:chat:x", messages)
