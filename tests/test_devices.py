"""Device choice, and training/inference on a GPU (the GPU tests skip where PyTorch sees no CUDA device).

The CPU is the reference: the same seeded run on the GPU must reach the same weights (fp32, no TF32),
resume exactly there too, and bf16 autocast must train.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, class_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.devices import resolve_device, to_device
from tunesmith.errors import ConfigError
from tunesmith.train import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
quiet = dict(log=lambda *_: None)


def test_device_choice_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == "cuda" if torch.cuda.is_available() else resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="training.device"):
        load_config(None, ["data.train=x.jsonl", "training.device=gpu"])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert to_device(batch, torch.device("cpu")) is batch


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def own_tokenizer(tmp_path_factory):
    """A byte-level BPE trained here on the test texts: the GPU checks need no packaged model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in chat_rows(64) for m in r["messages"]] + [r["text"] for r in class_rows(64)]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return tok, path


@pytest.fixture(scope="module")
def lm_dir(own_tokenizer, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok, _ = own_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(own_tokenizer, tmp_path_factory):
    from transformers import BertConfig, BertModel
    tok, _ = own_tokenizer
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("enc")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_own_tokenizer_renders_chat(lm_dir):
    """The fixture the GPU checks use is itself a working chat model folder (runs on the CPU too)."""
    from tunesmith.data.tokenize import encode_chat
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(lm_dir))
    ids, labels = encode_chat(tok, chat_rows(1)[0]["messages"])
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert learned.startswith("Cats are great, fact 0.") and "Tell me" not in learned


def lm_config(lm_dir, data, out, *extra):
    return load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.max_length=64", "data.eval_fraction=0",
                              "adapter.kind=lora", "adapter.targets=[q_proj,v_proj]", "adapter.r=4", "adapter.dropout=0",
                              "training.lr=5e-3", "training.batch_size=4", "training.log_every=1", "training.save_every=0",
                              "training.max_steps=6", f"output.dir={out}", "output.progress=false", *extra])


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 on the GPU must be real fp32 for the CPU comparison."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@cuda
def test_gpu_training_matches_cpu(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    cpu = train(lm_config(lm_dir, data, tmp_path / "cpu", "training.device=cpu"), **quiet)
    gpu = train(lm_config(lm_dir, data, tmp_path / "gpu", "training.device=cuda"), **quiet)
    assert gpu["final_loss"] == pytest.approx(cpu["final_loss"], rel=1e-4)
    a, b = adapter(tmp_path / "cpu"), adapter(tmp_path / "gpu")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].device.type == "cpu"
        assert torch.allclose(a[k], b[k], atol=1e-4), k


@cuda
def test_gpu_resume_matches_uninterrupted(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    common = ["training.device=cuda", "training.max_steps=9", "training.save_every=3", "adapter.dropout=0.1"]
    full = train(lm_config(lm_dir, data, tmp_path / "full", *common), **quiet)

    def crash(event):
        if event.step == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(lm_config(lm_dir, data, tmp_path / "crash", *common), on_step=crash, **quiet)
    resumed = train(lm_config(lm_dir, data, tmp_path / "crash", *common), resume=True, **quiet)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-5)


@cuda
def test_gpu_bf16_classifier_trains_and_evaluates(tmp_path, encoder_dir):
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(64))
    cfg = load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                             "adapter.kind=lora", "adapter.targets=[query,value]", "adapter.r=4", "training.device=cuda",
                             "training.bf16=true", "training.lr=5e-3", "training.epochs=4", "training.batch_size=8",
                             "training.save_every=0", "training.eval_at_start=true", "training.log_every=1",
                             "training.linear_probe_epochs=1", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    result = train(cfg, **quiet)
    assert result["final_loss"] < result["first_loss"]
    assert result["eval_loss"] < result["before"]["eval_loss"]
    weights = adapter(tmp_path / "run")
    assert all(v.dtype == torch.float32 for v in weights.values()), "autocast keeps fp32 master weights"


@cuda
def test_gpu_vision_freeze_keeps_frozen_weights(tmp_path):
    cfg = load_config(None, ["model.name=mobilenet-v2-imagenet", "data.train=mnist:train", "data.eval_fraction=0",
                             "data.max_examples=128", "data.image_size=32", "freeze.first_blocks=10",
                             "training.max_steps=3", "training.batch_size=32", "training.lr=1e-2", "training.device=cuda",
                             "training.save_every=0", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    from tunesmith.vision.mobilenet import load_mobilenet_v2
    train(cfg, **quiet)
    before = load_mobilenet_v2().state_dict()
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(tuple(f"features.{i}." for i in range(10)))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["features.15.conv.0.0.weight"], before["features.15.conv.0.0.weight"])


@cuda
def test_gpu_generation_from_a_run(tmp_path, lm_dir):
    from tunesmith.generate import generate, load_generator
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    train(lm_config(lm_dir, data, tmp_path / "run", "training.device=cuda"), **quiet)
    model, tok, _ = load_generator(str(tmp_path / "run"), "cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert isinstance(generate(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=8), str)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        on_gpu = model(ids.cuda()).logits.cpu()
        on_cpu = model.to("cpu")(ids).logits
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4)
