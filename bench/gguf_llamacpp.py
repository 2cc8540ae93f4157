"""The GGUF export under real llama.cpp (llama-cpp-python): the SmolLM2 fine-tune, LoRA merged, generates
greedily the same tokens as transformers; and the GGUF LoRA applied by llama.cpp to the base's GGUF does too.

    python bench/gguf_llamacpp.py [--steps 20] [--tokens 32] [--out bench/results/gguf_llamacpp.json]

llama-cpp-python is pip-installed when missing: it builds llama.cpp from source (about 5 minutes on 2 idle
cores, over an hour on 2 shared busy ones; pip caches the wheel afterwards), which is why this is a bench
and not a CI test (tests/test_gguf.py reads the files back with gguf's reader in seconds). It is built for
AVX2 without -march=native (CMAKE_ARGS below): a native build uses AMX tile instructions where the CPU has
them, and a VM whose kernel does not grant AMX state kills the process with SIGILL (`tilezero`, seen here).
A trained run already in --work is reused.

Steps: a LoRA fine-tune of the real packaged SmolLM2-135M-Instruct on the real ChatterBot corpus
(examples/chatterbot_to_jsonl.py), then `tunesmith export RUN --gguf` at f16 and q8_0 and `--lora-gguf`,
and the base model exported as f16. Each prompt is rendered with the run's chat template by transformers and
the same token ids are fed to llama.cpp (so tokenizers cannot differ there); both decode greedily for
--tokens tokens or until the end of the turn. Reported per variant: prompts whose whole reply matches token
for token, and the first position where any differs. llama.cpp's own tokenizer is also compared on the
prompt texts (it tokenizes digits one by one, as SmolLM2's original tokenizer; transformers' GGUF-converted
one does not, so prompts with numbers may tokenize differently: reported, not failed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"  # no AMX (see above)
PROMPTS = ["Hello, how are you?", "What is your favourite book?", "Tell me a joke.", "Do you like music?",
           "What is the capital of France?", "Can you help me with my homework?"]


def ensure_llama_cpp() -> float:
    """Install llama-cpp-python when missing (a source build). Returns the seconds it took (0 if present)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return 0.0
    print("installing llama-cpp-python==0.3.36 (builds llama.cpp from source, ~5 min on 2 cores) ...", flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("CMAKE_ARGS", CMAKE_ARGS)
    subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python==0.3.36"], check=True, env=env)
    return time.perf_counter() - start


def fine_tune(work: Path, steps: int) -> Path:
    from tunesmith.config import load_config
    from tunesmith.train import train
    data = work / "chatterbot"
    if not (data / "train.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "chatterbot_to_jsonl.py"), "--out", str(data)], check=True)
    run = work / "run"
    if (run / "summary.json").exists() and json.loads((run / "summary.json").read_text())["steps"] == steps:
        print(f"reusing the trained run in {run}")
        return run
    cfg = load_config(None, ["model.name=smollm2-135m-instruct", f"data.train={data / 'train.jsonl'}",
                             "data.eval_fraction=0", "data.max_length=128", "adapter.kind=lora", "adapter.r=16",
                             "adapter.alpha=32", "adapter.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                             f"training.max_steps={steps}", "training.batch_size=8", "training.lr=5e-4",
                             f"output.dir={run}", "output.progress=false"])
    train(cfg, overwrite=True, log=lambda *_: None)
    return run


def greedy_transformers(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop),
                             pad_token_id=min(stop))
    return out[0, len(ids):].tolist()


def greedy_llama_cpp(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token in stop or len(out) >= n:
            break
    return out


def compare(name: str, llm, refs: dict, prompts_ids: dict, n: int, stop: set[int]) -> dict:
    rows, first_diffs = [], []
    for prompt, ids in prompts_ids.items():
        got, want = greedy_llama_cpp(llm, ids, n, stop), refs[prompt]
        diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                    None if len(got) == len(want) else min(len(got), len(want)))
        rows.append({"prompt": prompt, "same": diff is None, "first_difference": diff, "tokens": len(want)})
        if diff is not None:
            first_diffs.append(diff)
    same = sum(r["same"] for r in rows)
    print(f"{name:>28}: {same}/{len(rows)} replies identical to transformers' greedy tokens"
          + (f" (first differences at {sorted(first_diffs)})" if first_diffs else ""))
    return {"identical": same, "prompts": len(rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="LoRA fine-tuning steps (default 20)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per reply (default 32)")
    ap.add_argument("--work", default="runs/bench-gguf", help="scratch folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_llamacpp.json"))
    args = ap.parse_args()
    build_s = ensure_llama_cpp()
    import llama_cpp

    from tunesmith.export import export_gguf, export_lora_gguf
    from tunesmith.generate import chat_prompt_ids
    from tunesmith.train.artifacts import load_run
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = fine_tune(work, args.steps)
    train_s = time.perf_counter() - start
    files = {"f16": export_gguf(str(run), work / "tuned-f16.gguf", "f16"),
             "q8_0": export_gguf(str(run), work / "tuned-q8_0.gguf", "q8_0"),
             "base": export_gguf("smollm2-135m-instruct", work / "base-f16.gguf", "f16"),
             "lora": export_lora_gguf(run, work / "lora-f16.gguf", "f16")}
    loaded = load_run(run, merge=True)
    model, tok = loaded.model.eval(), loaded.tokenizer
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    prompts_ids = {p: chat_prompt_ids(tok, [{"role": "user", "content": p}])[0].tolist() for p in PROMPTS}
    refs = {p: greedy_transformers(model, ids, args.tokens, stop) for p, ids in prompts_ids.items()}
    result = {"llama_cpp_python": llama_cpp.__version__, "install_seconds": round(build_s, 1),
              "train_seconds": round(train_s, 1), "steps": args.steps, "tokens": args.tokens,
              "sizes_mib": {k: round(Path(v).stat().st_size / 2**20, 1) for k, v in files.items()}}
    for name, kwargs in (("merged f16", {"model_path": str(files["f16"])}),
                         ("merged q8_0", {"model_path": str(files["q8_0"])}),
                         ("base f16 + GGUF LoRA", {"model_path": str(files["base"]), "lora_path": str(files["lora"])})):
        llm = llama_cpp.Llama(n_ctx=512, n_threads=2, seed=0, verbose=False, **kwargs)
        result[name] = compare(name, llm, refs, prompts_ids, args.tokens, stop)
        if name == "merged f16":
            chat_text = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in PROMPTS]
            same = [llm.tokenize(t.encode(), add_bos=False, special=True) == prompts_ids[p]
                    for t, p in zip(chat_text, PROMPTS)]
            result["llama_cpp_tokenizer_matches"] = f"{sum(same)}/{len(same)}"
            print(f"{'llama.cpp tokenizer':>28}: {sum(same)}/{len(same)} prompts tokenized as transformers does")
            result["template_in_gguf"] = llm.metadata.get("tokenizer.chat_template") == tok.chat_template
        del llm
    reply = tok.decode(refs[PROMPTS[0]], skip_special_tokens=True)
    print(f"sample ({PROMPTS[0]!r}): {reply!r}")
    result["sample"] = {"prompt": PROMPTS[0], "reply": reply}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
