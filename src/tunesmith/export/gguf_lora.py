"""A LoRA adapter (PEFT folder) as a GGUF LoRA that llama.cpp applies to its base model's GGUF
(`llama-cli -m base.gguf --lora adapter.gguf`), following llama.cpp's convert_lora_to_gguf.py:

  general.type = adapter, adapter.type = lora, adapter.lora.alpha = the adapter's alpha
  blk.N.attn_q.weight.lora_a  (r, in)   the PEFT lora_A, as torch stores it
  blk.N.attn_q.weight.lora_b  (out, r)  the PEFT lora_B; for q/k its rows reordered as the base's are

llama.cpp scales each pair by alpha / r (r read from lora_a); where tunesmith scaled otherwise (rsLoRA's
alpha / sqrt(r), alpha_pattern / rank_pattern) the difference is folded into lora_b, so W + scale B A is
the same matrix. LoRA only: DoRA, IA3 and trained modules_to_save have no GGUF LoRA form (export the merged
model instead).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import TunesmithError
from .gguf_model import finish_file, llama_config, permute_rows, temp_beside

PEFT_PREFIX = "base_model.model."


def module_scale(module: str, cfg: dict, rank: int) -> float:
    """The scaling tunesmith (and PEFT) applies to module `module`'s B A: alpha / r, or alpha / sqrt(r)."""
    alpha = float(cfg.get("lora_alpha", cfg.get("r", rank)))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def lora_pairs(weights: dict[str, torch.Tensor], cfg: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name (transformers): (A (r, in), B (out, r), scale)} from PEFT adapter weights."""
    pairs: dict[str, dict] = {}
    for key, value in weights.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise TunesmithError(f"GGUF LoRA export: the adapter holds {key!r}, which is not a LoRA A/B matrix "
                                 "(DoRA magnitudes, embeddings or a trained head have no GGUF LoRA form); export "
                                 "the merged model with --gguf instead")
        module = m.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[m.group(2)] = value.detach().to(torch.float32).cpu()
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise TunesmithError(f"GGUF LoRA export: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        out[module] = (ab["A"], ab["B"], module_scale(module, cfg, ab["A"].shape[0]))
    return out


def lora_gguf_tensors(pairs: dict, hp: dict, alpha: float) -> dict[str, torch.Tensor]:
    """GGUF tensor names -> values: lora_a as is, lora_b permuted like its base matrix and carrying any scale
    llama.cpp's alpha / r would not apply."""
    import gguf
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["blocks"])
    out = {}
    for module, (a, b, scale) in pairs.items():
        base = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if base is None:
            raise TunesmithError(f"GGUF LoRA export: no llama.cpp tensor for the adapted module {module!r}")
        b = b * (scale * a.shape[0] / alpha)  # llama.cpp applies alpha / r; tunesmith trained with `scale`
        if module.endswith("q_proj"):
            b = permute_rows(b, hp["heads"])
        elif module.endswith("k_proj"):
            b = permute_rows(b, hp["kv_heads"])
        out[base + ".lora_a"], out[base + ".lora_b"] = a, b
    return out


def write_lora_gguf(adapter_dir: Path, base_config, out: Path, kind: str = "f16", name: str = "", log=print) -> Path:
    """The PEFT LoRA adapter in `adapter_dir` (trained on a base with transformers config `base_config`) as a
    GGUF LoRA at `out` (F16 or F32; llama.cpp applies quantised LoRAs too, but they are small anyway)."""
    import gguf
    import numpy as np

    from ..adapters.peft_format import read_adapter_config, read_adapter_weights
    if kind not in ("f16", "f32"):
        raise TunesmithError(f"--type {kind!r} for a GGUF LoRA: choose f16 or f32")
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise TunesmithError(f"GGUF LoRA export: {adapter_dir} is a {'DoRA' if cfg.get('use_dora') else cfg.get('peft_type')} "
                             "adapter; llama.cpp applies plain LoRA only: export the merged model with --gguf")
    if cfg.get("modules_to_save"):
        raise TunesmithError(f"GGUF LoRA export: the adapter also trained {cfg['modules_to_save']} in full, which a "
                             "GGUF LoRA cannot carry; export the merged model with --gguf")
    weights, _ = read_adapter_weights(adapter_dir)
    hp = llama_config(base_config)
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    tensors = lora_gguf_tensors(lora_pairs(weights, cfg), hp, alpha)
    out = Path(out)
    with temp_beside(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or out.stem)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.ALL_F32)
        for tensor_name, value in tensors.items():
            writer.add_tensor(tensor_name, value.numpy().astype(np.float16 if kind == "f16" else np.float32))
        finish_file(writer, tmp, out)
    log(f"wrote {out} (GGUF LoRA, {len(tensors) // 2} adapted matrices, alpha {alpha:g}, {kind}; apply it with "
        f"llama.cpp's --lora on the base model's GGUF)")
    return out
