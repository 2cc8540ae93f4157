"""A transformers Llama-architecture model (Llama, Mistral, SmolLM2, TinyLlama) as one GGUF file for llama.cpp.

Written with the gguf package as llama.cpp's own convert_hf_to_gguf.py writes the architecture:
  - names through gguf's tensor map (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight);
  - q_proj / k_proj rows reordered for llama.cpp's rotary embedding (`permute_rows`): transformers rotates
    the two halves of each head, llama.cpp adjacent pairs;
  - 1-D tensors (norms) in F32, matrices in F16 or Q8_0 (a matrix whose rows do not split into blocks of 32
    stays F16); a tied lm_head is not written (llama.cpp reuses token_embd);
  - hyperparameters as llama.* keys, the tokenizer and chat template as tokenizer.* keys (gguf_tokenizer.py).
"""
from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import torch

from ..errors import TunesmithError

ARCHITECTURES = ("llama", "mistral")  # transformers model_type values llama.cpp runs as its "llama" architecture
TYPES = ("f16", "q8_0", "f32")


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder a q/k projection's output rows (or a LoRA B's) from transformers' rotary layout (each head's
    first half, then second half) to llama.cpp's (interleaved pairs). (out, in) -> (out, in)."""
    out = weight.shape[0]
    return (weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_config(config) -> dict:
    """The hyperparameters llama.cpp reads, from a transformers config (refused when it cannot run them)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TunesmithError(f"GGUF export supports Llama-architecture models ({', '.join(ARCHITECTURES)}); this one "
                             f"is {model_type!r}: merge it (`tunesmith merge`) and use llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise TunesmithError(f"GGUF export: rope scaling {rope_type!r} is not supported yet")
    theta = getattr(config, "rope_theta", None) or (rope.get("rope_theta") if isinstance(rope, dict) else None)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"blocks": config.num_hidden_layers, "context": config.max_position_embeddings,
            "embedding": config.hidden_size, "ffn": config.intermediate_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads, "head_dim": head_dim,
            "rope_theta": float(theta or 10000.0), "rms_eps": float(config.rms_norm_eps),
            "vocab": config.vocab_size, "tied": bool(getattr(config, "tie_word_embeddings", False))}


def gguf_tensors(state: dict[str, torch.Tensor], hp: dict) -> dict[str, torch.Tensor]:
    """transformers names -> GGUF names, q/k permuted, a tied lm_head dropped. Values float32 on the CPU."""
    import gguf
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["blocks"])
    out = {}
    for name, value in state.items():
        if name == "lm_head.weight" and hp["tied"]:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TunesmithError(f"GGUF export: no llama.cpp name for tensor {name!r}")
        value = value.detach().to(torch.float32).cpu()
        if name.endswith("q_proj.weight"):
            value = permute_rows(value, hp["heads"])
        elif name.endswith("k_proj.weight"):
            value = permute_rows(value, hp["kv_heads"])
        out[target] = value
    return out


def encode_tensor(value: np.ndarray, kind: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors in F32, matrices as `kind`."""
    import gguf
    if value.ndim == 1 or kind == "f32":
        return value.astype(np.float32), None
    if kind == "q8_0" and value.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return value.astype(np.float16), None


def write_llama_gguf(model, tok, out: Path, kind: str = "f16", name: str = "", source_gguf: Path | None = None,
                     log=print) -> Path:
    """Write `model` (a transformers Llama-architecture causal LM, adapters merged) and its tokenizer to `out`."""
    import gguf

    from .gguf_tokenizer import write_tokenizer
    if kind not in TYPES:
        raise TunesmithError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    hp = llama_config(model.config)
    tensors = gguf_tensors(model.state_dict(), hp)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "f32": gguf.LlamaFileType.ALL_F32}[kind]
    out = Path(out)
    with temp_beside(out) as tmp:  # a failure below leaves no temporary file or new folder behind
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        writer.add_block_count(hp["blocks"])
        writer.add_context_length(hp["context"])
        writer.add_embedding_length(hp["embedding"])
        writer.add_feed_forward_length(hp["ffn"])
        writer.add_head_count(hp["heads"])
        writer.add_head_count_kv(hp["kv_heads"])
        writer.add_rope_freq_base(hp["rope_theta"])
        writer.add_layer_norm_rms_eps(hp["rms_eps"])
        writer.add_vocab_size(hp["vocab"])
        writer.add_rope_dimension_count(hp["head_dim"])
        if hp["head_dim"] != hp["embedding"] // hp["heads"]:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        writer.add_file_type(file_type)
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        origin = write_tokenizer(writer, tok, hp["vocab"], source_gguf)
        kept = []
        for tensor_name, value in tensors.items():
            data, raw = encode_tensor(value.numpy(), kind)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
            if kind == "q8_0" and value.dim() > 1 and raw != gguf.GGMLQuantizationType.Q8_0:
                kept.append(tensor_name)
        finish_file(writer, tmp, out)
    log(f"wrote {out} ({kind}, {len(tensors)} tensors, {out.stat().st_size / 2**20:.1f} MiB; {origin})")
    if kept:
        matrices = sum(1 for v in tensors.values() if v.dim() > 1)
        log(f"note: {len(kept)} of {matrices} matrices stay F16 in this q8_0 file: their rows ({kept[0]}, ...) do not "
            "split into Q8_0's blocks of 32 (llama.cpp does the same)")
    return out


@contextlib.contextmanager
def temp_beside(out: Path):
    """A fresh temporary file in `out`'s folder (two exports to one path never share one), the folder made if
    missing; on any error the file, and the folders made for it, are gone again."""
    import os
    import tempfile
    made = [p for p in out.parents if not p.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..io import UMASK
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600: llama.cpp / Ollama under another user could not read it
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        tmp.unlink(missing_ok=True)


def finish_file(writer, tmp: Path, out: Path) -> None:
    """Write the file beside `out`, flush it to disk, then rename: readers see no file or the whole file."""
    import os
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
