"""Fine-tuned models to other runtimes: GGUF for llama.cpp (and so Ollama, LM Studio), written with the gguf package.

  export_gguf(RUN, out, "f16" | "q8_0" | "f32")   the model, adapters merged, with its tokenizer and chat template
  export_lora_gguf(RUN, out)                      the LoRA adapter alone, applied by llama.cpp to the base's GGUF
"""
from __future__ import annotations

from pathlib import Path

from ..errors import TunesmithError


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a base model spec came from (the packaged SmolLM2, or a .gguf path), else None."""
    from ..models.loading import PACKAGED
    path = PACKAGED[spec]() if spec in PACKAGED else Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _load(spec: str):
    """(model with adapters merged, tokenizer with the run's chat template, base spec, run folder or None)."""
    from ..io import is_run_folder
    if is_run_folder(spec):
        from ..train.artifacts import load_run
        run = load_run(spec, merge=True)
        if run.info.task != "causal_lm":
            raise TunesmithError(f"{spec}: a {run.info.task} run; GGUF export is for language models")
        return run.model, run.tokenizer, (run.info.model or {}).get("name", run.cfg.model.name), Path(spec)
    from ..models import load_model, load_tokenizer
    return load_model(spec, "causal_lm").eval(), load_tokenizer(spec), spec, None


def export_gguf(spec: str, out: str | Path, kind: str = "f16", log=print) -> Path:
    """A run folder (adapter merged) or a model spec as one GGUF file llama.cpp runs."""
    from .gguf_model import write_llama_gguf
    model, tok, base, run_dir = _load(spec)
    name = Path(spec).name if run_dir is not None else base
    return write_llama_gguf(model, tok, Path(out), kind, name=name, source_gguf=source_gguf(base), log=log)


def export_lora_gguf(run_dir: str | Path, out: str | Path, kind: str = "f16", log=print) -> Path:
    """A run's LoRA adapter as a GGUF LoRA (llama.cpp: --lora FILE on the base model's GGUF)."""
    from transformers import AutoConfig

    from ..config import load_config
    from ..models.loading import resolve_model
    from ..runinfo import read_run_info
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TunesmithError(f"{run_dir}: " + ("a file, not a run folder" if run_dir.exists() else "no such run folder")
                             + "; --lora-gguf exports the adapter of a LoRA run folder")
    if not (run_dir / "adapter").is_dir():
        raise TunesmithError(f"{run_dir}: no adapter/ folder; --lora-gguf exports a LoRA run's adapter (a full "
                             "fine-tune exports with --gguf)")
    info = read_run_info(run_dir, load_config(run_dir / "config.yaml"))
    base = (info.model or {}).get("name")
    from .gguf_lora import write_lora_gguf
    config = AutoConfig.from_pretrained(resolve_model(base), local_files_only=True)
    return write_lora_gguf(run_dir / "adapter", config, Path(out), kind, name=run_dir.name, log=log)
