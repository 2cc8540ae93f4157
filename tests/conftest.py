"""Tiny, seeded models built in the test: fast, offline, numerical."""
from __future__ import annotations

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A suite started in the background by a non-interactive shell (`nohup make test &`) inherits SIGINT ignored, and
# so would every process it starts; the Ctrl-C tests need Ctrl-C delivered (children then get the default).
signal.signal(signal.SIGINT, signal.default_int_handler)

from pg_support import postgres_store_pass  # noqa: E402,F401 - the service suite's PostgreSQL pass (.ci/run)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def token_batch(batch: int = 2, length: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def perturb_adapters(model, std: float = 0.2, seed: int = 3) -> None:
    """Give every adapter parameter random values so tests see a real (non-zero) adapter."""
    from tunesmith.adapters import adapter_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.add_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_peft(model, seed=4, std=0.2):
    """Random values on every trainable PEFT parameter (PEFT marks adapters and modules_to_save trainable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def peft_reference(model, peft_config, folder, ids):
    """A perturbed PEFT model of `model`, saved to `folder`; returns its logits on `ids`."""
    import peft
    reference = peft.get_peft_model(model, peft_config)
    perturb_peft(reference)
    reference.eval()
    expected = logits(reference, ids)
    reference.save_pretrained(folder)
    return expected


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (and its chat template), saved as a local folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT with the real MiniLM tokenizer, saved as a local folder."""
    from transformers import BertConfig, BertModel
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer("all-minilm-l6-v2")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-encoder")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(*args: str, port: int, env: dict | None = None, output=None):
    """A real `tunesmith serve ARGS --port PORT` process, returned once it accepts connections (its output goes
    to a pipe unless `output` says otherwise; a server that exits while starting fails with that output)."""
    import socket
    import subprocess
    import sys
    import time
    if os.environ.get("TUNESMITH_TEST_DB"):  # the PostgreSQL pass (.ci/run): each data folder its own database
        from pg_support import database_for
        args = (*args, "--db", database_for(args[args.index("--data") + 1]))
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", *args, "--port", str(port)],
                            env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
                            stdout=subprocess.PIPE if output is None else output, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else proc.returncode
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def write_jsonl(path, rows) -> str:
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int = 24):
    topics = ["cats", "tea", "rain", "maps", "jazz", "bread", "chess", "bees"]
    return [{"messages": [{"role": "user", "content": f"Tell me about {topics[i % 8]} #{i}."},
                          {"role": "assistant", "content": f"{topics[i % 8].capitalize()} are great, fact {i}."}]}
            for i in range(n)]


def class_rows(n: int = 40):
    words = {"sport": "match goal team win", "tech": "chip phone software data"}
    return [{"text": f"{words[lbl]} {i}", "label": lbl} for i in range(n) for lbl in (["sport", "tech"][i % 2],)]
