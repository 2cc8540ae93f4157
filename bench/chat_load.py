"""Chat under load: 16 concurrent greedy requests to 4 fine-tuned models (LoRA adapters) of one base, against the
same 16 requests one at a time, on a real server over loopback HTTP.

Prints aggregate generated tokens/s both ways and their ratio (issue 12's target: >= 3x on a 2-core machine), and
checks every reply, both runs, against a single-request greedy reference computed here with transformers.

    python bench/chat_load.py [--requests 16] [--adapters 4] [--max-tokens 32] [--hidden 128] [--layers 4]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KEY = "bench-key"
TOPICS = ["cats", "tea", "rain", "maps", "jazz", "bread", "chess", "bees"]


def build(root: Path, n_adapters: int, hidden: int, layers: int) -> tuple[Path, dict[str, Path]]:
    """A random Llama base (the real SmolLM2 tokenizer) and n LoRA fine-tunes registered in a service store."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.adapters import adapter_layers, apply_lora, save_adapter
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.service.store import Store
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    store, adapters = Store(root / "data"), {}
    for i in range(n_adapters):
        model = load_model(str(base), "causal_lm")
        apply_lora(model, targets="all-linear", r=8, alpha=16)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # a clearly different fine-tune per adapter
            for _, layer in adapter_layers(model):
                for p in layer.adapter_parameters("default"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        folder = root / f"ft{i}"
        save_adapter(model, folder / "adapter")
        model_id = f"ft:bench:user:a{i}:000000{i}"
        store.add_model(model_id, "ftjob-bench", "bench", str(folder), "user")
        adapters[model_id] = folder / "adapter"
    return base, adapters


def references(base: Path, adapters: dict[str, Path], requests: list[tuple[str, str]], max_tokens: int) -> dict:
    from tunesmith.adapters import load_adapter, set_active_adapters
    from tunesmith.generate import chat_prompt_ids
    from tunesmith.models import load_model, load_tokenizer
    model, tok = load_model(str(base), "causal_lm").eval(), load_tokenizer(str(base))
    for name, path in adapters.items():
        load_adapter(model, path, name=name.replace(":", "_"), activate=False)
    out = {}
    for model_id, prompt in requests:
        set_active_adapters(model, model_id.replace(":", "_"))
        ids = chat_prompt_ids(tok, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out[(model_id, prompt)] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def post(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, data
    return data


def run(port: int, requests: list[tuple[str, str]], max_tokens: int, at_once: bool) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda r: post(port, *r, max_tokens), requests))
    else:
        replies = [post(port, *r, max_tokens) for r in requests]
    return time.perf_counter() - t0, replies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapters = build(root, args.adapters, args.hidden, args.layers)
        models = list(adapters)
        requests = [(models[i % len(models)], f"Tell me about {TOPICS[i % len(TOPICS)]}, #{i}.")
                    for i in range(args.requests)]
        refs = references(base, adapters, requests, args.max_tokens)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", "--data", str(root / "data"),
                                   "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
                                   "--model", f"bench={base}", "--device", "cpu"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.2)
            run(port, requests[: len(models)], args.max_tokens, at_once=False)  # warm-up: load base + adapters
            results = {}
            for name, at_once in (("one at a time", False), (f"{args.requests} concurrent", True)):
                secs, replies = run(port, requests, args.max_tokens, at_once)
                tokens = sum(r["usage"]["completion_tokens"] for r in replies)
                wrong = [req for req, r in zip(requests, replies) if r["choices"][0]["message"]["content"] != refs[req]]
                results[name] = tokens / secs
                print(f"{name:>15}: {tokens} tokens in {secs:6.2f} s = {tokens / secs:7.1f} tokens/s; "
                      f"replies matching single-request greedy: {len(requests) - len(wrong)}/{len(requests)}")
                if wrong:
                    print(f"   WRONG replies for: {wrong}")
            seq, conc = results.values()
            print(f"aggregate speed-up: {conc / seq:.2f}x (target >= 3x); "
                  f"{args.adapters} adapters, base hidden={args.hidden} layers={args.layers}, "
                  f"max_tokens={args.max_tokens}, torch threads={torch.get_num_threads()}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
