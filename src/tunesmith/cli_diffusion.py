"""Command line for diffusion runs: `tunesmith import-lora` (Kohya files -> an adapter folder, with a report of
every key), and the image side of `tunesmith generate` (a prompt grid PNG, with and without the adapter)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    """Register `tunesmith import-lora`."""
    k = sub.add_parser("import-lora", help="import a Kohya-format LoRA file for a diffusers pipeline",
                       description="Map a community Kohya LoRA file (lora_unet_* / lora_te_* keys, lora_down / lora_up "
                                   "/ alpha) onto a local diffusers pipeline folder and write an adapter folder: "
                                   "tunesmith's PEFT-format files plus diffusers' pytorch_lora_weights.safetensors "
                                   "(pipe.load_lora_weights(OUT)). Every key is reported as mapped or not mapped, with "
                                   "the reason; the report is also written to OUT/import_report.json.")
    k.add_argument("file", help="the Kohya LoRA .safetensors file")
    k.add_argument("--base", required=True, help="the local diffusers pipeline folder the LoRA was made for")
    k.add_argument("--out", required=True, help="the adapter folder to write (must be new or empty)")
    k.add_argument("--strict", action="store_true", help="fail, writing nothing, if any key cannot be mapped")
    k.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (not a run folder)")
    k.add_argument("--quiet", action="store_true", help="print the summary and the keys not mapped, not every mapped key")
    k.set_defaults(func=cmd_import_lora)


def cmd_import_lora(args) -> int:
    from .diffusion.kohya import REPORT, import_kohya
    report = import_kohya(args.file, args.base, args.out, strict=args.strict, overwrite=args.overwrite)
    text = str(report)
    if args.quiet:
        lines = text.splitlines()
        text = "\n".join([lines[0], *[ln for ln in lines[1:] if not ln.startswith("  ") or "->" not in ln]])
    print(text)
    print(f"adapter written to {args.out} (report: {Path(args.out) / REPORT})")
    if report.unmapped:
        print(f"warning: {len(report.unmapped)} keys were NOT mapped (listed above); pass --strict to refuse such files",
              file=sys.stderr)
    return 0


def add_generate_options(g) -> None:
    """The options `tunesmith generate` takes for a diffusion run (an image grid instead of text)."""
    g.add_argument("--out", help="diffusion runs: the grid PNG to write (default RUN/samples.png)")
    g.add_argument("--steps", type=int, default=30, help="diffusion runs: denoising steps (default 30)")
    g.add_argument("--guidance-scale", type=float, default=5.0,
                   help="diffusion runs: classifier-free guidance scale; 1 turns it off (default 5)")
    g.add_argument("--num-images", type=int, default=4, help="diffusion runs: images per prompt (default 4)")
    g.add_argument("--pixel-scale", type=int, default=1, help="diffusion runs: enlarge each image this many times "
                                                              "in the grid (tiny models; default 1)")


def is_diffusion_run(path: str) -> bool:
    """A run folder whose run.json says it trained a diffusion model."""
    file = Path(path) / "run.json"
    try:
        return file.is_file() and json.loads(file.read_text()).get("task") == "diffusion"
    except (OSError, ValueError):
        return False


def generate_images(args) -> int:
    """`tunesmith generate RUN --prompt ...` for a diffusion run: one grid PNG, the base pipeline beside the
    fine-tuned one, rows = prompts, the same starting noise in both."""
    from .adapters import adapter_configs, disable_adapters
    from .devices import resolve_device
    from .diffusion.pipeline import load_scheduler, load_tokenizers, load_vae
    from .diffusion.sample import sample_images, write_grid
    from .errors import TunesmithError
    from .train.artifacts import load_run
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise TunesmithError("no prompts: pass --prompt TEXT (repeatable) or one prompt per stdin line")
    if args.steps < 1 or args.num_images < 1 or args.pixel_scale < 1:
        raise TunesmithError("--steps, --num-images and --pixel-scale must be at least 1")
    from .io import check_output_file, is_tunesmith_plot
    # a grid drawn again replaces the last one; any other file (a run's own files, an input) is refused
    out = check_output_file(args.out or Path(args.model) / "samples.png", "sample grid PNG", overwrite=None,
                            replaceable=(lambda p: True) if args.out is None else is_tunesmith_plot)  # the run's own
    run = load_run(args.model)
    device = resolve_device(args.device)
    base = run.info.model["name"]  # the base pipeline: tokenizers, VAE and scheduler (frozen, never trained)
    tokenizers = load_tokenizers(base)
    vae = load_vae(base)
    vae = vae.to(device) if vae is not None else None
    scheduler = load_scheduler(base, run.objective.prediction_type)
    expanded = [p for p in prompts for _ in range(args.num_images)]
    seed = args.seed or 0

    def sample(model):
        return sample_images(model.to(device).eval(), tokenizers, scheduler, vae, expanded, steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=seed)

    if adapter_configs(run.model):
        with disable_adapters(run.model):
            panels = [("base", sample(run.model))]
        panels.append(("with adapter", sample(run.model)))
    else:  # a full fine-tune: the base pipeline is a second model
        from .models import load_model
        panels = [("base", sample(load_model(base, "diffusion"))), ("fine-tuned", sample(run.model))]
    write_grid(out, panels, prompts, args.num_images, args.pixel_scale)
    print(f"wrote {out}: {len(prompts)} prompts x {args.num_images} images, {panels[0][0]} | {panels[1][0]} "
          f"({args.steps} steps, guidance {args.guidance_scale:g}, seed {seed})")
    return 0

