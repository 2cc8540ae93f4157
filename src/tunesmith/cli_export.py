"""`tunesmith export RUN --gguf out.gguf --type f16|q8_0`: a fine-tuned model (or its LoRA) for llama.cpp."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    x = sub.add_parser("export", help="export a run to GGUF for llama.cpp / Ollama / LM Studio",
                       description="Write a run's model, adapter merged, as a GGUF file (tokenizer and chat template "
                                   "included) and/or its LoRA adapter as a GGUF LoRA that llama.cpp applies to the "
                                   "base model's GGUF. Llama-architecture models (Llama, Mistral, SmolLM2).")
    x.add_argument("run", help="run folder (or a model spec: packaged name, HF folder, .gguf)")
    x.add_argument("--gguf", metavar="OUT.gguf", help="write the merged model here")
    x.add_argument("--type", choices=["f16", "q8_0", "f32"], default="f16",
                   help="weight type of the matrices (norms stay f32): f16 (default), q8_0 (half the size) or f32")
    x.add_argument("--lora-gguf", metavar="OUT.gguf", help="write the LoRA adapter alone here (f16; f32 with --type f32)")
    x.add_argument("--overwrite", action="store_true", help="replace existing output files")
    x.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .errors import TunesmithError
    from .export import export_gguf, export_lora_gguf
    from .train.artifacts import run_base_paths
    if not args.gguf and not args.lora_gguf:
        raise TunesmithError("give --gguf OUT.gguf (the merged model) and/or --lora-gguf OUT.gguf (the adapter)")
    if args.gguf and args.lora_gguf and Path(args.gguf).resolve() == Path(args.lora_gguf).resolve():
        raise TunesmithError("--gguf and --lora-gguf name the same file; give each its own")
    for out in (args.gguf, args.lora_gguf):
        if not out:
            continue
        if Path(out).is_dir() or out.endswith(("/", "\\")):
            raise TunesmithError(f"{out} is a folder; give a file path, e.g. {Path(out) / 'model.gguf'}")
        if any(Path(out).resolve() == Path(b).expanduser().resolve() for b in (args.run, *run_base_paths(args.run))):
            raise TunesmithError(f"{out} is what the export reads (the run's base model, or the model given); "
                                 "choose another path")
        if Path(out).exists() and not args.overwrite:
            raise TunesmithError(f"{out} exists; pass --overwrite to replace it")
        if Path(out).exists() and not _is_gguf(Path(out)):  # a run's config.yaml, metrics, a user's file
            raise TunesmithError(f"{out} exists and is not a GGUF file; --overwrite replaces only GGUF files. "
                                 "Choose another path")
    if args.gguf:
        export_gguf(args.run, args.gguf, args.type)
    if args.lora_gguf:
        export_lora_gguf(args.run, args.lora_gguf, "f32" if args.type == "f32" else "f16")
    return 0


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
