"""GGUF export (tunesmith.export), read back with gguf's own GGUFReader: metadata, tensor names, shapes and values
(q8_0 dequantised with gguf's own dequantize), the rotary reordering checked by attention scores, and the GGUF
LoRA checked against the merged model with llama.cpp's formula W + alpha / r * B A. The run under real llama.cpp
is bench/gguf_llamacpp.py (its build takes minutes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import chat_rows, write_jsonl

gguf = pytest.importorskip("gguf")


class Fields:
    """A GGUF file's metadata, each value decoded when it is read (the token list holds 49,152 strings)."""

    def __init__(self, fields) -> None:
        self.fields = fields

    def __getitem__(self, key: str):
        return self.fields[key].contents()


def read(path):
    reader = gguf.GGUFReader(path)
    return Fields(reader.fields), {t.name: t for t in reader.tensors}


def values(t) -> np.ndarray:
    """A tensor read back as float32 in torch's (out, in) order."""
    data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 \
        else np.asarray(t.data, dtype=np.float32)
    return data.reshape(tuple(reversed([int(d) for d in t.shape])))


def rope(x: torch.Tensor, pos: int, interleaved: bool, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of one head vector: transformers rotates halves (i, i + d/2), llama.cpp pairs (2i, 2i+1)."""
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(theta), torch.sin(theta)
    x = x.double()
    a, b = (x[0::2], x[1::2]) if interleaved else (x[: d // 2], x[d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        return torch.stack([ra, rb], dim=-1).flatten()
    return torch.cat([ra, rb])


@pytest.fixture(scope="module")
def exported(lm_dir, tmp_path_factory):
    from tunesmith.export import export_gguf
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(str(lm_dir), out / f"tiny-{kind}.gguf", kind, log=lambda *_: None)
            for kind in ("f16", "q8_0")}


def test_metadata_and_tokenizer_read_back(exported, lm_dir):
    from transformers import AutoConfig

    from tunesmith.models import load_tokenizer
    tok, cfg = load_tokenizer(str(lm_dir)), AutoConfig.from_pretrained(lm_dir)
    meta, _ = read(exported["f16"])
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (2, 32, 64)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.rope.dimension_count"] == 8 and meta["llama.vocab_size"] == cfg.vocab_size == len(tok)
    assert meta["llama.context_length"] == 512 and meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tok) and tokens[tok.eos_token_id] == tok.eos_token
    assert tokens[tok.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    assert meta["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert len(meta["tokenizer.ggml.merges"]) == 48900 and meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert read(exported["q8_0"])[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_tensors_read_back_named_shaped_and_valued(exported, lm_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.export.gguf_model import permute_rows
    state = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    _, f16 = read(exported["f16"])
    _, q8 = read(exported["q8_0"])
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(f16) == set(q8) == expected  # tied embeddings: no output.weight, llama.cpp reuses token_embd
    hf = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"],
          "blk.1.attn_q.weight": permute_rows(state["model.layers.1.self_attn.q_proj.weight"], 4),
          "blk.1.attn_k.weight": permute_rows(state["model.layers.1.self_attn.k_proj.weight"], 2),
          "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],
          "blk.0.attn_norm.weight": state["model.layers.0.input_layernorm.weight"]}
    for name, want in hf.items():
        want = want.float().numpy()
        got16, got8 = values(f16[name]), values(q8[name])
        assert got16.shape == got8.shape == want.shape, name
        if want.ndim == 1:  # norms stay F32 in both
            assert f16[name].tensor_type == q8[name].tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(got16, want)
            np.testing.assert_array_equal(got8, want)
            continue
        assert f16[name].tensor_type == gguf.GGMLQuantizationType.F16
        assert q8[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        np.testing.assert_allclose(got16, want, rtol=1e-3, atol=1e-6)
        # Q8_0: 32 values share a scale d = max|w| / 127, stored as f16: error <= d / 2 + 127 |d - f16(d)| < 0.57 d
        d = np.abs(want.reshape(-1, 32)).max(axis=1) / 127
        bound = np.repeat(0.57 * d + 1e-8, 32).reshape(want.shape)
        assert (np.abs(got8 - want) <= bound).all(), name
        assert np.abs(got8 - want).max() > 0, "q8_0 really is quantised"


def test_permuted_q_and_k_give_llama_cpp_the_same_attention_scores(exported, lm_dir):
    """transformers' rotary (halves) on its q/k == llama.cpp's rotary (adjacent pairs) on the exported q/k."""
    from transformers import AutoModelForCausalLM
    state = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    _, f16 = read(exported["f16"])
    wq, wk = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    gq, gk = (torch.from_numpy(values(f16[f"blk.0.attn_{n}.weight"])).double() for n in ("q", "k"))
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for head in range(4):
        kv = head // 2  # grouped-query attention: 4 query heads share 2 key heads
        q_hf, k_hf = (wq.double() @ x[0])[head * 8:(head + 1) * 8], (wk.double() @ x[1])[kv * 8:(kv + 1) * 8]
        q_cpp, k_cpp = (gq @ x[0])[head * 8:(head + 1) * 8], (gk @ x[1])[kv * 8:(kv + 1) * 8]
        hf = rope(q_hf, 5, False) @ rope(k_hf, 2, False)
        cpp = rope(q_cpp, 5, True) @ rope(k_cpp, 2, True)
        assert float(cpp) == pytest.approx(float(hf), rel=2e-3, abs=1e-4)


@pytest.fixture(scope="module")
def lora_run(lm_dir, tmp_path_factory):
    from tunesmith.config import load_config
    from tunesmith.train import train
    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(8))
    cfg = load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0", "data.max_length=64",
                             "adapter.kind=lora", "adapter.r=4", "adapter.alpha=8", "training.lr=0.05",
                             "adapter.targets=[q_proj,k_proj,v_proj,o_proj]", "training.max_steps=2",
                             f"output.dir={tmp / 'run'}", "output.progress=false"])
    train(cfg, log=lambda *_: None)
    return tmp / "run"


@pytest.mark.slow  # trains a tiny LoRA run first
def test_lora_gguf_plus_base_equals_the_merged_model(lora_run, lm_dir, tmp_path):
    """llama.cpp's W + alpha / r * B A, from the GGUF LoRA and the base's GGUF, is the merged model's GGUF."""
    from tunesmith.export import export_gguf, export_lora_gguf
    quiet = dict(log=lambda *_: None)
    _, base = read(export_gguf(str(lm_dir), tmp_path / "base.gguf", "f32", **quiet))
    _, merged = read(export_gguf(str(lora_run), tmp_path / "merged.gguf", "f32", **quiet))
    meta, lora = read(export_lora_gguf(lora_run, tmp_path / "lora.gguf", "f32", **quiet))
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0 and meta["general.architecture"] == "llama"
    assert set(lora) == {f"blk.{i}.attn_{n}.weight.lora_{ab}" for i in range(2) for n in ("q", "k", "v", "output")
                         for ab in "ab"}
    a, b = values(lora["blk.0.attn_q.weight.lora_a"]), values(lora["blk.0.attn_q.weight.lora_b"])
    assert a.shape == (4, 32) and b.shape == (32, 4)  # (r, in) and (out, r), as convert_lora_to_gguf writes them
    for i in range(2):
        for n in ("q", "k", "v", "output"):
            name = f"blk.{i}.attn_{n}.weight"
            a, b = values(lora[name + ".lora_a"]), values(lora[name + ".lora_b"])
            delta = 8.0 / a.shape[0] * b @ a
            assert np.abs(delta).max() > 1e-4, "the adapter trained"
            np.testing.assert_allclose(values(base[name]) + delta, values(merged[name]), rtol=1e-4, atol=1e-6)


def test_rslora_and_alpha_pattern_scales_fold_into_b():
    from tunesmith.export.gguf_lora import module_scale
    assert module_scale("model.layers.0.self_attn.q_proj", {"lora_alpha": 16}, 4) == 4.0
    assert module_scale("model.layers.0.self_attn.q_proj", {"lora_alpha": 16, "use_rslora": True}, 4) == 8.0
    assert module_scale("model.layers.0.self_attn.v_proj", {"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}, 4) == 1.0


@pytest.mark.slow  # trains a tiny LoRA run first
def test_cli_export_and_its_errors(lora_run, tmp_path, capsys):
    from tunesmith.cli import main
    out = tmp_path / "m.gguf"
    assert main(["export", str(lora_run), "--gguf", str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out and read(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export", str(lora_run), "--gguf", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(lora_run)]) == 2
    assert "--gguf OUT.gguf" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--gguf", str(tmp_path), "--overwrite"]) == 2  # a folder
    assert "is a folder; give a file path" in capsys.readouterr().err
    config = (lora_run / "config.yaml").read_bytes()  # --overwrite never writes over a file that is not a GGUF
    assert main(["export", str(lora_run), "--gguf", str(lora_run / "config.yaml"), "--overwrite"]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err and (lora_run / "config.yaml").read_bytes() == config
    assert main(["export", str(lora_run), "--gguf", str(out), "--lora-gguf", str(out), "--overwrite"]) == 2
    assert "name the same file" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--gguf", str(tmp_path / "new") + "/"]) == 2  # a folder path, not a file
    assert "is a folder; give a file path" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["export", str(tmp_path / "no run"), "--lora-gguf", str(tmp_path / "a.gguf")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_a_failed_export_leaves_no_temporary_file_or_new_folder(tmp_path):
    from tunesmith.export.gguf_model import temp_beside
    out = tmp_path / "made" / "for it" / "m.gguf"
    with pytest.raises(RuntimeError), temp_beside(out) as tmp:
        assert tmp.exists()
        raise RuntimeError("e.g. a tokenizer GGUF cannot carry")
    assert not (tmp_path / "made").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("x")
    with pytest.raises(RuntimeError), temp_beside(tmp_path / "kept" / "m.gguf"):
        raise RuntimeError
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"]


def test_exports_to_one_path_never_share_a_temporary_file_and_kept_f16_matrices_are_said(tmp_path):
    """Two exports to one path at once each write their own temporary file (the last rename wins, whole);
    a q8_0 export of matrices whose rows do not split into blocks of 32 says which stay F16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tunesmith.export import export_gguf
    from tunesmith.export.gguf_model import temp_beside
    from tunesmith.models import load_tokenizer
    with temp_beside(tmp_path / "out.gguf") as a, temp_beside(tmp_path / "out.gguf") as b:
        assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".out.gguf.")
    assert not a.exists() and not b.exists()
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "odd")
    tok.save_pretrained(tmp_path / "odd")
    said = []
    export_gguf(str(tmp_path / "odd"), tmp_path / "odd.gguf", "q8_0", log=said.append)
    assert any("matrices stay F16 in this q8_0 file" in line for line in said), said


def test_non_llama_models_and_dora_are_refused_with_the_way_out(gpt2, tmp_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.export.gguf_lora import write_lora_gguf
    from tunesmith.export.gguf_model import llama_config
    with pytest.raises(TunesmithError, match="Llama-architecture.*'gpt2'.*convert_hf_to_gguf"):
        llama_config(gpt2.config)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true, "r": 4}')
    from conftest import tiny_llama
    with pytest.raises(TunesmithError, match="DoRA adapter.*--gguf"):
        write_lora_gguf(tmp_path, tiny_llama().config, tmp_path / "x.gguf")
