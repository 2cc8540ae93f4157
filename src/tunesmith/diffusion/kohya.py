"""Import community Kohya-format LoRA files (kohya-ss sd-scripts; most LoRAs shared online) into an adapter
folder, with a report of every key: mapped (to which module, at which rank and alpha) or not mapped (and why).
Nothing is dropped silently, which is the top complaint about LoRA loaders.

A Kohya key is `<prefix><module path, '.' written as '_'>.<suffix>`:
  prefix   lora_unet_ (the UNet), lora_te_ (the text encoder of SD 1.x / 2.x), lora_te1_ / lora_te2_ (SDXL's two)
  suffix   lora_down.weight  A, (r, in) or (r, in, kh, kw)       lora_up.weight  B, (out, r) or (out, r, 1, 1)
           alpha             a scalar: the module's scale is alpha / r (alpha = r when the key is missing or 0)
Module names are matched against names built from the base pipeline's own modules (diffusers naming, and the
text encoders with or without `text_model.`), so the mapping holds for any UNet2DConditionModel layout. A
key is reported as not mapped when its module is not in the base (with the closest names), when its shapes
do not fit, when half of a pair is missing, or when it belongs to a network type other than LoRA (LoHa, LoKr,
DoRA scales, Tucker mid weights, full diffs), or when two keys name one module. SGM-named UNet keys (kohya-ss
trains SDXL on the original UNet: `input_blocks` / `middle_block` / `output_blocks`) are renamed to diffusers'
names from the base UNet's layers_per_block, as diffusers' own loader does — but one at a time, reported, and
never silently dropped when a file mixes both namings.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import LoraConfig, add_adapter, save_adapter
from ..adapters.layer import layout_of
from ..adapters.merge import CONV, LINEAR
from ..errors import AdapterLoadError, TunesmithError, closest
from ..io import atomic_write_text, check_output_folder

PREFIXES = {"lora_unet_": ("unet",), "lora_te_": ("text_encoder",), "lora_te1_": ("text_encoder",),
            "lora_te2_": ("text_encoder_2",)}
PAIR = ("lora_down.weight", "lora_up.weight")
OTHER_TYPES = {"hada_": "LoHa (Hadamard product) weights", "lokr_": "LoKr (Kronecker product) weights",
               "dora_scale": "a DoRA magnitude: the LoRA factors alone would not reproduce the module",
               "lora_mid": "a Tucker-decomposed conv (lora_mid)", "diff": "a full weight difference",
               "on_input": "an IA3 weight"}
REPORT = "import_report.json"


@dataclass
class ImportReport:
    """What an import did, key by key."""
    source: str
    base: str
    mapped: list[dict] = field(default_factory=list)  # {key, to, rank, alpha}
    unmapped: list[dict] = field(default_factory=list)  # {key, reason}
    modules: dict[str, int] = field(default_factory=dict)  # component -> modules with a LoRA

    def as_dict(self) -> dict:
        return {"source": self.source, "base": self.base, "keys": len(self.mapped) + len(self.unmapped),
                "mapped_keys": len(self.mapped), "unmapped_keys": len(self.unmapped), "modules": self.modules,
                "mapped": self.mapped, "unmapped": self.unmapped}

    def __str__(self) -> str:
        total = len(self.mapped) + len(self.unmapped)
        parts = ", ".join(f"{n} in {c}" for c, n in self.modules.items()) or "none"
        lines = [f"{self.source}: mapped {len(self.mapped)} of {total} keys onto {sum(self.modules.values())} "
                 f"modules ({parts})"]
        lines += [f"  {m['key']} -> {m['to']}  (r={m['rank']}, alpha={m['alpha']:g})" for m in self.mapped]
        if self.unmapped:
            lines.append(f"NOT MAPPED: {len(self.unmapped)} keys")
            lines += [f"  {u['key']}: {u['reason']}" for u in self.unmapped]
        return "\n".join(lines)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; other formats are refused (tunesmith never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path}: not found")
    if path.suffix != ".safetensors":
        raise AdapterLoadError(f"{path}: only .safetensors files are read (a .ckpt/.pt/.bin file is a pickle, which "
                               "tunesmith never unpickles); convert it with a tool you trust")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(f"{path}: not a valid safetensors file ({e})") from None


def kohya_names(model: nn.Module) -> tuple[dict[str, str], dict[str, list[str]]]:
    """{Kohya module stem: module name in `model`} for every Linear / Conv a LoRA can wrap; and the stems that
    two modules would share ({stem: names}), which are refused as ambiguous."""
    table: dict[str, str] = {}
    clashes: dict[str, list[str]] = {}
    for prefix, components in PREFIXES.items():
        for component in components:
            part = getattr(model, component, None)
            if part is None:
                continue
            flat = component.startswith("text_encoder") and not hasattr(part, "text_model")
            for name, module in part.named_modules():
                if layout_of(module) not in (LINEAR, CONV):
                    continue
                stems = [name] + ([f"text_model.{name}"] if flat else [])  # transformers 5 flattened CLIPTextModel
                for stem in stems:
                    key = prefix + stem.replace(".", "_")
                    full = f"{component}.{name}"
                    if key in table and table[key] != full:
                        clashes.setdefault(key, [table[key]]).append(full)
                    table[key] = full
    return table, clashes


SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
              "skip_connection": "conv_shortcut"}
SGM_OUTSIDE = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
               "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
               "label_emb_0_2": "add_embedding_linear_2"}
SGM_NAME = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")
SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|middle_block_(\d+)_(.+)")


def sgm_stem(stem: str, layers_per_block: int) -> str | None:
    """The diffusers-named Kohya stem of an SGM-named UNet stem (kohya-ss trains SDXL on the original UNet:
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), or None when it does not place. Input
    block i > 0 is level (i - 1) // (L + 1) at position (i - 1) % (L + 1), the last position holding the
    downsampler (`op`); output block i is level i // (L + 1) at position i % (L + 1); within one, part 0 is the
    ResNet, then the attention, then the upsampler (`conv`); the middle block is ResNet, attention, ResNet."""
    body = stem[len("lora_unet_"):]
    if body in SGM_OUTSIDE:
        return "lora_unet_" + SGM_OUTSIDE[body]
    m = SGM_BLOCK.fullmatch(body)
    if m is None:
        return None
    if m.group(5) is not None:  # the middle block
        where, rest = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(
            int(m.group(5))), m.group(6)
    else:
        slots = layers_per_block + 1
        kind, i, part, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        level, pos = ((i - 1) // slots, (i - 1) % slots) if kind == "input_blocks" else (i // slots, i % slots)
        side = "down_blocks" if kind == "input_blocks" else "up_blocks"
        if kind == "input_blocks" and pos == layers_per_block:
            return f"lora_unet_down_blocks_{level}_downsamplers_0_conv" if (part, rest) == (0, "op") else None
        if kind == "output_blocks" and part > 0 and rest == "conv":  # an upsampler ends its level
            return f"lora_unet_up_blocks_{level}_upsamplers_0_conv" if pos == layers_per_block else None
        if part > 1 or rest in ("op", "conv"):  # ResNet (0) and attention (1) are the only other parts
            return None
        where = f"{side}_{level}_{'resnets' if part == 0 else 'attentions'}_{pos}"
    if where is None:
        return None
    if "_resnets_" in where:
        rest = SGM_RESNET.get(rest)
        if rest is None:
            return None
    return f"lora_unet_{where}_{rest}"


def _other_type(suffix: str) -> str | None:
    for marker, what in OTHER_TYPES.items():
        if suffix.startswith(marker):
            return what
    return None


def plan_import(tensors: dict[str, torch.Tensor], model: nn.Module, report: ImportReport) -> dict[str, dict]:
    """{module name: {A, B, r, alpha, keys}} for every module whose Kohya keys fit; everything else goes to
    `report.unmapped` with its reason."""
    table, clashes = kohya_names(model)
    unet = getattr(model, "unet", None)
    layers = getattr(getattr(unet, "config", None), "layers_per_block", None)
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        stem, _, suffix = key.partition(".")
        groups.setdefault(stem, {})[suffix] = key
    plan: dict[str, dict] = {}

    def refuse(keys, reason: str) -> None:
        report.unmapped.extend({"key": k, "reason": reason} for k in sorted(keys))

    sgm: dict[str, str] = {}  # SGM-named UNet stems (SDXL files of kohya-ss) -> the diffusers stems they name
    for stem in [s for s in groups if s not in table and SGM_NAME.match(s)]:
        name = sgm_stem(stem, layers) if isinstance(layers, int) else None
        if name is None:
            refuse(groups.pop(stem).values(), "an SGM UNet name (input_blocks / middle_block / output_blocks) that "
                                              f"does not place in this UNet (layers_per_block={layers})")
        elif name in groups or name in sgm.values():
            other = name if name in groups else next(k for k, v in sgm.items() if v == name)
            refuse(groups.pop(stem).values(), f"names the same module as {other}: one file, two LoRAs for one "
                                              "module; keep one of them")
        else:
            sgm[stem] = name
    for stem, name in sgm.items():
        groups[name] = groups.pop(stem)
    read_as = {name: f"an SGM UNet name, read as {name}: " for name in sgm.values()}

    for stem, keys in sorted(groups.items()):
        if not stem.startswith(tuple(PREFIXES)):
            refuse(keys.values(), "not a Kohya LoRA key (expected lora_unet_, lora_te_, lora_te1_ or lora_te2_)")
            continue
        if stem in clashes:
            refuse(keys.values(), f"ambiguous: {', '.join(clashes[stem])} share this name")
            continue
        module_name = table.get(stem)
        if module_name is None:
            near = closest(stem, table, n=3)
            refuse(keys.values(), read_as.get(stem, "") + "no module of this name in the base pipeline"
                   + (f" (closest: {', '.join(near)})" if near else ""))
            continue
        others = sorted(s for s in keys if s not in (*PAIR, "alpha"))
        if others:  # the module is another network type (or LoRA plus something): its factors alone would be wrong
            what = "; ".join(sorted({_other_type(s) or f"an unknown suffix '{s}'" for s in others}))
            refuse(keys.values(), f"{what}: tunesmith imports plain LoRA (lora_down, lora_up, alpha) only")
            continue
        if not all(s in keys for s in PAIR):
            missing = [s for s in PAIR if s not in keys]
            refuse([keys[s] for s in (*PAIR, "alpha") if s in keys], f"{' and '.join(missing)} missing for this module")
            continue
        module = model.get_submodule(module_name)
        A, B = tensors[keys[PAIR[0]]], tensors[keys[PAIR[1]]]
        bad = next((keys[s] for s, t in zip(PAIR, (A, B)) if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:  # a NaN / inf factor would turn every image it touches into NaN
            raise TunesmithError(f"{report.source}: {bad}: holds NaN or infinite values; the file is damaged: "
                                 "re-export or re-download it")
        fitted = _fit(module, A, B)
        if isinstance(fitted, str):
            refuse([keys[s] for s in (*PAIR, "alpha") if s in keys], f"{read_as.get(stem, '')}{module_name}: {fitted}")
            continue
        r = fitted[0].shape[0]
        alpha = _alpha(tensors[keys["alpha"]], keys["alpha"], report.source, r) if "alpha" in keys else float(r)
        plan[module_name] = {"A": fitted[0], "B": fitted[1], "r": r, "alpha": alpha, "keys": keys}
    return plan


def _alpha(t: torch.Tensor, key: str, source: str, r: int) -> float:
    """A module's alpha: one finite number >= 0. 0 means alpha = r (scale 1), as kohya-ss sd-scripts reads it
    (networks/lora.py, LoRAModule: "if alpha == 0 or None, alpha is rank"); diffusers' loader would scale by 0."""
    value = float(t.float().reshape(-1)[0]) if t.numel() == 1 else None
    if value == 0.0:
        return float(r)
    if value is None or not math.isfinite(value) or value < 0:
        got = f"shape {tuple(t.shape)}" if value is None else f"{value:g}"
        raise TunesmithError(f"{source}: {key}: the alpha must be one finite number >= 0 (the module's scale is "
                             f"alpha / r, r={r}; 0 or no key means alpha = r), got {got}; the file is damaged: "
                             "re-export it, or set this key to the alpha it was trained with")
    return value


def _fit(module: nn.Module, A: torch.Tensor, B: torch.Tensor):
    """(A, B) shaped for tunesmith's LoRA on `module`, or the reason they do not fit."""
    w = module.weight
    if layout_of(module) == LINEAR and A.dim() == 4 and A.shape[2:] == (1, 1) and B.shape[2:] == (1, 1):
        A, B = A.flatten(1), B.flatten(1)  # saved as 1x1 convs (a proj_in that is Linear in this UNet)
    expect_a = (A.shape[0], *w.shape[1:]) if layout_of(module) == CONV else (A.shape[0], w.shape[1])
    expect_b = (w.shape[0], A.shape[0], *([1] * (w.dim() - 2)))
    if tuple(A.shape) != tuple(expect_a) or tuple(B.shape) != tuple(expect_b):
        return (f"shapes do not fit {type(module).__name__}{tuple(w.shape)}: lora_down {tuple(A.shape)} (expected "
                f"{tuple(expect_a)}), lora_up {tuple(B.shape)} (expected {tuple(expect_b)})")
    return A, B


def apply_plan(model: nn.Module, plan: dict[str, dict], report: ImportReport, name: str = "default") -> None:
    """Add a LoRA adapter on the planned modules (each with its own rank and alpha) and copy the factors in."""
    ranks = Counter(p["r"] for p in plan.values())
    alphas = Counter(p["alpha"] for p in plan.values())
    config = LoraConfig(targets=list(plan), r=ranks.most_common(1)[0][0], alpha=alphas.most_common(1)[0][0])
    add_adapter(model, config, name, names=list(plan),
                options={m: {"r": p["r"], "alpha": p["alpha"]} for m, p in plan.items()})
    with torch.no_grad():
        for module_name, p in plan.items():
            layer = model.get_submodule(module_name)
            layer.lora_A[name].weight.copy_(p["A"].to(layer.lora_A[name].weight.dtype))
            layer.lora_B[name].weight.copy_(p["B"].to(layer.lora_B[name].weight.dtype))
            for suffix, key in sorted(p["keys"].items()):
                if suffix in (*PAIR, "alpha"):
                    to = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, "alpha")
                    report.mapped.append({"key": key, "to": f"{module_name}.{to}", "rank": p["r"], "alpha": p["alpha"]})
            component = module_name.split(".")[0]
            report.modules[component] = report.modules.get(component, 0) + 1


def _listing(unmapped: list[dict], first: int = 50) -> str:
    lines = [f"  {u['key']}: {u['reason']}" for u in unmapped[:first]]
    if len(unmapped) > first:
        lines.append(f"  ... and {len(unmapped) - first} more keys not mapped (the same check without --strict "
                     "lists every key in the printed report and import_report.json)")
    return "\n".join(lines)


def import_kohya(source: str | Path, base: str | Path, out: str | Path, *, strict: bool = False,
                 overwrite: bool = False) -> ImportReport:
    """Import Kohya LoRA file `source` for pipeline folder `base` into adapter folder `out` (tunesmith / PEFT
    format plus diffusers' LoRA files and import_report.json). With `strict`, any key not mapped is an error
    and nothing is written."""
    from .pipeline import load_diffusion_model
    check_output_folder(out, overwrite, "imported adapter", reads=(str(source), str(base)))
    tensors = read_safetensors(source)
    model = load_diffusion_model(base)
    report = ImportReport(str(source), str(base))
    plan = plan_import(tensors, model, report)
    if not tensors:
        raise TunesmithError(f"{source}: the file holds no tensors")
    if strict and report.unmapped:
        raise TunesmithError(f"--strict: {len(report.unmapped)} of {len(tensors)} keys cannot be mapped, nothing "
                             "written:\n" + _listing(report.unmapped))
    if not plan:
        raise TunesmithError(f"{source}: none of its {len(tensors)} keys maps onto {base}:\n" + _listing(report.unmapped))
    apply_plan(model, plan, report)
    saved = save_adapter(model, out, metadata={"task": "diffusion", "imported_from": Path(source).name})
    model.write_adapter_files(saved)
    atomic_write_text(Path(out) / REPORT, json.dumps(report.as_dict(), indent=1) + "\n")
    return report
