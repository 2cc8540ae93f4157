"""tunesmith command line: train, eval, generate, chat, merge, interpolate, inspect. Every flag is explained in --help."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_types import temperature_arg, top_p_arg, unicode_text, positive_int, positive_number
from .errors import TunesmithError

EPILOG_TRAIN = """\
overrides: any config field as section.key=value, e.g.
  tunesmith train examples/bbc_lora.yaml training.lr=1e-3 training.epochs=2 adapter.r=16
sections: model, adapter, freeze, head, data, objective, training, distributed, output (see docs/config.md)
Text values are taken as written: data.train="/data/my set #2/x.jsonl" keeps the '#' (quote the whole argument
for your shell); numbers, true/false, null and [lists] are read as YAML.
The run folder (output.dir) gets config.yaml, run.json, metrics.jsonl, loss.png, checkpoints/, and adapter/ (an
adapter), head/ (only a new head trained) or model/ (full or partial fine-tuning). A folder that already holds
anything is refused: --resume continues it, --overwrite replaces it.
Ctrl-C saves a checkpoint; `--resume` continues from the latest one to the same result."""


DEVICE_HELP = "auto (a CUDA GPU if present, then MPS, else CPU; default), cpu, cuda, cuda:N or mps"


def _settle_run_folder(cfg, run_folder: Path, overrides: list[str]) -> None:
    """`train RUN_FOLDER`: the folder named is the run (its saved output.dir may be relative to wherever it
    started), and a relative model or data path saved in config.yaml is read from the folder the run started in
    (run.json's started_in), even where this folder has one of that name; from here only when it is gone there."""
    from .data.builtin import is_named_dataset
    from .errors import TunesmithError
    from .runinfo import read_run_info
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if "output.dir" not in given:
        cfg.output.dir = str(run_folder)
    try:
        started = read_run_info(run_folder).started_in
    except TunesmithError:
        started = None  # an unreadable run.json is reported by --resume's own checks
    for section, key in (("data", "train"), ("data", "eval"), ("model", "name")):
        part = getattr(cfg, section)
        value = getattr(part, key)
        if not value or f"{section}.{key}" in given or Path(value).is_absolute() or is_named_dataset(value):
            continue
        there = Path(started) / value if started else None
        if there is not None and there.exists():  # what the run read, even if this folder has one of that name
            if not (Path(value).exists() and Path(value).resolve() == there.resolve()):
                setattr(part, key, str(there))
                print(f"{section}.{key}: {value!r} read from {there} (the folder the run started in)")
        elif Path(value).exists():  # the project moved as a whole: the same relative path from here
            continue
        elif section == "data":
            raise SystemExit(f"{section}.{key}: {value!r} is relative, as saved in {run_folder / 'config.yaml'}, and "
                             f"is not there from this folder ({Path.cwd()})"
                             + (f" nor from the folder the run started in ({started})" if started else "")
                             + f"; pass {section}.{key}=/absolute/path/to/it")


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # no YAML file, overrides only
        config, overrides = None, [config] + overrides
    run_folder = None
    if config and Path(config).is_dir():  # a run folder: its saved config (what `--resume RUN` needs)
        if not (Path(config) / "config.yaml").exists():
            raise SystemExit(f"{config} is a folder without config.yaml: give a config YAML or a run folder")
        run_folder, config = Path(config), str(Path(config) / "config.yaml")
    cfg = load_config(config, overrides)
    if run_folder is not None:
        _settle_run_folder(cfg, run_folder, overrides)
    if args.quiet:
        cfg.output.progress = False
    from .train.distributed import exec_torchrun, is_main_process, launched_by_torchrun
    if args.nproc > 1 and not launched_by_torchrun():  # torchrun runs this command again in each process
        exec_torchrun(args.nproc, ["train", *([args.config] if args.config else []), *args.overrides,
                                   *(f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite),
                                                     ("--quiet", args.quiet)) if on)])
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        return 130
    if not is_main_process():
        return 0  # under torchrun rank 0 reports
    before = result.get("before") or {}
    keys = ["steps", "first_loss", "final_loss", *(k for k in result if k.startswith("eval_")), "seconds"]
    print("\n" + "\n".join(f"{k:>16}: {result[k]:.4f}" if isinstance(result.get(k), float) else f"{k:>16}: {result[k]}"
                           for k in keys if result.get(k) is not None))
    for k, v in before.items():
        if k in result:
            print(f"{k:>16}: {v:.4f} before training -> {result[k]:.4f} after")
    print(f"{'trainable':>16}: {result['trainable']:,} of {result['total_params']:,} parameters "
          f"({100 * result['trainable'] / result['total_params']:.2f}%)")
    print(f"saved {result['saved']}\nloss curve {result['plot']}")
    return 0


def cmd_eval(args) -> int:
    from .train import evaluate
    from .train.artifacts import encode_eval_set, load_run
    from .devices import resolve_device
    run = load_run(args.run)
    run.model.to(resolve_device(args.device))
    spec = args.data or run.cfg.data.eval
    if not spec:
        raise SystemExit("no evaluation data: pass --data FILE (the run had no data.eval)")
    examples = encode_eval_set(spec, run)
    result = evaluate(run.model, examples, run.objective, run.pad_id, args.batch_size,
                      bf16=bool(run.cfg.training.bf16))  # as the run evaluated itself
    print(json.dumps({"data": spec, "examples": len(examples), **result}, indent=2))
    return 0


def _messages(args, prompt: str) -> list[dict]:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": prompt}]


def cmd_generate(args) -> int:
    from .cli_diffusion import generate_images, is_diffusion_run
    if is_diffusion_run(args.model):  # an image run: a prompt grid PNG, with and without the adapter
        return generate_images(args)
    from .generate import generate, load_generator
    model, tok, template = load_generator(args.model, args.device, args.template)
    prompts = [unicode_text(p) for p in args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]]
    for p in prompts:
        if len(prompts) > 1:
            print(f">>> {p}")
        try:
            reply = generate(model, tok, _messages(args, p), args.max_new_tokens, args.temperature, args.top_p,
                             args.seed, stream=True, template=template)
        except KeyboardInterrupt:
            print("\n(stopped)")
            return 130
        if not reply:
            print("(empty reply)")
    return 0




def cmd_chat(args) -> int:
    from .generate import generate, load_generator
    model, tok, template = load_generator(args.model, args.device, args.template)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; /reset clears the history, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        try:
            history.append({"role": "user", "content": unicode_text(line)})
        except TunesmithError as e:
            print(f"error: {e}")
            continue
        print("bot> ", end="", flush=True)
        try:
            reply = generate(model, tok, history, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                             stream=True, template=template)
        except (KeyboardInterrupt, TunesmithError) as e:  # Ctrl-C, or a conversation past the context: the turn
            print(f"\nerror: {e}; /reset starts over" if str(e) else "\n(stopped)")  # is dropped, the session goes on
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_merge(args) -> int:
    from .train.artifacts import load_run, run_base_paths, write_model_folder
    from .io import check_output_folder
    check_output_folder(args.out, args.overwrite, "merged model", reads=run_base_paths(args.run))
    run = load_run(args.run, merge=True)
    write_model_folder(Path(args.out), run.model, run.tokenizer, run.info.labels, run.info.objective_params)
    head = (Path(args.out) / "head.safetensors").exists()
    from .models.loading import VISION_MARKER
    loader = getattr(run.model, "loads_with", "transformers' from_pretrained")  # diffusion: a pipeline folder
    if (Path(args.out) / VISION_MARKER).exists():  # the built-in MobileNetV2: no transformers class reads it
        loader = (f"tunesmith: model.name={args.out} in a run config, or tunesmith.models.load_vision_model; the "
                  "weights are plain safetensors")
    print(f"merged model written to {args.out} (loads with {loader}"
          f"{f'; the {run.info.task} head is head.safetensors, described in head.json' if head else ''}"
          f"{', labels in labels.json' if run.info.labels else ''})")
    return 0


def cmd_inspect(args) -> int:
    from .adapters.layer import layout_of
    from .freeze import find_blocks
    from .models import load_model
    from .naming import is_head_name
    task = "causal_lm" if args.task == "causal_lm" else "classification"
    try:
        model = load_model(args.model, task, num_labels=2)
    except Exception:
        model = load_model(args.model, "classification" if task == "causal_lm" else "causal_lm", num_labels=2)
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {total:,} parameters")
    leaves: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        layout = layout_of(module)
        if args.all and name:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            print(f"  {name:<60} {type(module).__name__:<22} {own:>12,}")
        if layout and not is_head_name(name):
            leaves.setdefault(_target_group(name, module), []).append(_signature(module))
    try:
        stack, blocks = find_blocks(model)
        print(f"block stack: {stack} ({len(blocks)} blocks) -> freeze.first_blocks: 0..{len(blocks)}")
    except Exception:
        pass
    print("LoRA targets (adapter.targets), by layer name:")
    for leaf, kinds in sorted(leaves.items()):
        print(f"  {leaf:<24} x{len(kinds):<4} {kinds[0]}")
    linear = sorted(k for k, v in leaves.items() if v[0].startswith(("Linear", "Conv1D")))
    attn = [k for k in linear if k in ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn")]
    if linear:
        print(f"suggested: targets: {attn or linear[:2]}  (attention)  or  targets: all-linear  (every linear layer)")
    elif leaves:  # a CNN: convolutions are named by position, so they are targeted by kind
        print("suggested: targets: all-conv  (every non-depthwise convolution; the new head trains in full), or no "
              "adapter and freeze.first_blocks: K  (train the later blocks in full)")
    if not args.all:
        print("(--all lists every module)")
    return 0


def _signature(module) -> str:
    """A layer as its constructor reads: Linear(in, out), Conv2d(in, out, kernel), Embedding(num, dim)."""
    kind = type(module).__name__
    if hasattr(module, "in_features"):
        return f"{kind}({module.in_features}, {module.out_features})"
    if hasattr(module, "in_channels"):
        k = "x".join(map(str, module.kernel_size))
        return f"{kind}({module.in_channels}, {module.out_channels}, {k})"
    if kind == "Conv1D" and hasattr(module, "nf"):  # GPT-2's Conv1D keeps its weight as (in, out)
        return f"{kind}({module.weight.shape[0]}, {module.nf})"
    return f"{kind}{tuple(module.weight.shape)}"


def _target_group(name: str, module) -> str:
    """How `inspect` groups adapter targets: by the layer's own name, or for unnamed (numbered) CNN layers by
    the convolution's kind, since that is what a user chooses between."""
    leaf = name.split(".")[-1]
    if not leaf.isdigit():
        return leaf
    from torch import nn
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return f"depthwise {module.kernel_size[0]}x{module.kernel_size[1]} conv"
        return f"{module.kernel_size[0]}x{module.kernel_size[1]} conv" + (" (pointwise)" if module.kernel_size == (1, 1) else "")
    return f"{type(module).__name__} (numbered)"


def cmd_interpolate(args) -> int:
    from .errors import TunesmithError
    from .interpolate import parse_alphas
    from .wise_ft import run_sweep
    evals = {}
    for item in args.eval or []:
        if "=" not in item:
            raise TunesmithError(f"--eval {item!r}: expected NAME=DATA, e.g. --eval ood=digits:all")
        name, spec = item.split("=", 1)
        if name in evals:  # the later one would silently replace the earlier
            raise TunesmithError(f"--eval name {name!r} is given twice; give each eval set its own name")
        evals[name] = spec
    result = run_sweep(args.finetuned, parse_alphas(args.alphas), evals, select=args.select, out=args.out,
                       save=args.save, overwrite=args.overwrite, missing=args.missing, batch_size=args.batch_size, base=args.base,
                       device=args.device)
    rows, names, metric = result["rows"], list(evals), result["metric"]
    print("\n  alpha  " + "  ".join(f"{n + ' ' + metric:>16}" for n in names))
    for r in rows:
        mark = "  <- chosen" if r["alpha"] == result["best_alpha"] else ""
        print(f"  {r['alpha']:5.2f}  " + "  ".join(f"{r[f'{n}_{metric}']:16.4f}" for n in names) + mark)
    print(f"\nchosen alpha {result['best_alpha']:g} (--select {args.select}); table {result['csv']}; plot {result['plot']}")
    if result.get("saved"):
        print(f"model at alpha {result['best_alpha']:g} saved to {result['saved']} (a run folder: tunesmith eval/merge read it)")
    return 0


def _bases(items: list[str] | None) -> dict[str, str]:
    from .models import PACKAGED
    bases = {name: name for name in PACKAGED if name != "all-minilm-l6-v2"}  # chat models
    for item in items or []:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--model {item!r}: expected NAME=PATH")
        bases[name] = path
    return bases


def cmd_serve(args) -> int:
    if args.no_worker and args.nproc > 1:
        raise SystemExit("--nproc sets how many processes this server's worker trains a job on; with --no-worker "
                         "there is none: pass --nproc to `tunesmith worker` instead")
    from .service.app import api_keys_from
    keys = api_keys_from(args.api_key, no_auth=args.no_auth, host=args.host)  # refuses empty keys before anything starts
    import uvicorn
    from .service.app import create_app
    app = create_app(args.data, keys, _bases(args.model), args.max_upload_mb,
                     start_worker=not args.no_worker, device=args.device, job_config=args.job_config,
                     allow_python_graders=args.allow_python_graders, db=_database(args), job_nproc=args.nproc)
    access = "WITHOUT authentication (--no-auth)" if keys is None else f"{len(keys)} API key(s)"
    print(f"tunesmith API on http://{args.host}:{args.port}/v1 (web page at /), {access}, data in {args.data}, "
          f"store {app.state.store.path}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _database(args) -> str | None:
    """--db, also for the job processes a worker starts (they open the store named by $TUNESMITH_DB)."""
    if args.db:
        import os
        os.environ["TUNESMITH_DB"] = args.db
    return args.db


DB_HELP = ("the store: sqlite (a file in --data) or postgresql://USER@HOST:PORT/DATABASE, shared by workers on several "
           "machines with --data on a shared path (default: $TUNESMITH_DB, else the database --data was first used "
           "with, else sqlite; docs/service.md)")


NPROC_HELP = ("train each job on N processes of this machine: torchrun with DDP, one per GPU (or N CPU processes "
              "with gloo); a pause or cancel then takes effect after the current step (default 1)")


def cmd_worker(args) -> int:
    import json as _json
    from .service.store import Store
    from .service.worker import work_forever
    store = Store(args.data, _database(args))
    from .service.job import JOB_CONFIG, check_job_config
    if args.nproc > 1 and (store.dir / JOB_CONFIG).exists():
        check_job_config(store.dir / JOB_CONFIG, args.nproc)  # the server's job config, run on N processes
    if not (store.dir / "bases.json").exists():
        (store.dir / "bases.json").write_text(_json.dumps(_bases(args.model)))
    each = f", each on {args.nproc} processes (torchrun, DDP)" if args.nproc > 1 else ""
    print(f"worker on {store.path}: running queued jobs one at a time{each} (Ctrl-C stops)")
    try:
        work_forever(store, nproc=args.nproc)
    except KeyboardInterrupt:
        return 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained PyTorch models: full, partial, "
                                "task heads, LoRA/DoRA/IA3 adapters (PEFT format).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML config", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a model as the YAML config says; overrides change single fields.")
    t.add_argument("config", nargs="?", help="run config YAML, or a run folder (its config.yaml); omit to configure "
                                             "with overrides only")
    t.add_argument("overrides", nargs="*", help="section.key=value changes, e.g. training.lr=2e-4")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output.dir (`tunesmith train RUN_FOLDER --resume` "
                        "reads the run's saved config.yaml)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in output.dir (without it, a folder that holds anything is refused)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="train with N processes on this machine (torchrun; distributed.strategy: ddp or fsdp; "
                        "several machines: docs/distributed.md)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run", description="Evaluate a run folder on its eval data or --data.")
    e.add_argument("run", help="run folder (output.dir of `tunesmith train`)")
    e.add_argument("--data", help="JSONL/CSV file or built-in dataset to evaluate on (default: the run's data.eval)")
    e.add_argument("--batch-size", type=positive_int, default=32, help="examples per forward pass (default 32)")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.set_defaults(func=cmd_eval)

    for name, func, desc in (("generate", cmd_generate, "Answer prompts with a fine-tuned LLM, streaming tokens."),
                             ("chat", cmd_chat, "Chat interactively with a fine-tuned LLM, streaming tokens.")):
        g = sub.add_parser(name, help=desc.split(",")[0][0].lower() + desc.split(",")[0][1:], description=desc)
        g.add_argument("model", help="run folder, packaged model name (smollm2-135m-instruct), HF folder or .gguf")
        if name == "generate":
            g.add_argument("--prompt", action="append", help="a user message (repeatable; default: one per stdin line)")
            from .cli_diffusion import add_generate_options; add_generate_options(g)  # noqa: E702 - diffusion runs
        g.add_argument("--system", help="system message to put first")
        g.add_argument("--max-new-tokens", type=positive_int, default=128, help="longest reply in tokens (default 128)")
        g.add_argument("--temperature", type=temperature_arg, default=0.0, help="0 = greedy (default); >0 samples")
        g.add_argument("--top-p", type=top_p_arg, default=1.0, help="nucleus sampling mass when sampling, in (0, 1] "
                                                                "(default 1.0)")
        g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
        g.add_argument("--device", default="auto", help=DEVICE_HELP)
        g.add_argument("--template", choices=["auto", "chat", "raw"], default="auto",
                       help="how prompts are written: auto (as the run trained: raw text for prompt/completion runs, "
                            "the chat template for chat runs and plain models), chat, or raw")
        g.set_defaults(func=func)

    m = sub.add_parser("merge", help="adapter + base -> plain model folder",
                       description="Merge a run's adapter into its base model and write a folder transformers loads.")
    m.add_argument("run", help="run folder with adapter/")
    m.add_argument("--out", required=True, help="folder to write; must be new or empty (a run folder is never replaced)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (not a run folder)")
    m.set_defaults(func=cmd_merge)

    w = sub.add_parser("interpolate", help="WiSE-FT: sweep fine-tuned <-> original weights",
                       description="Evaluate theta(alpha) = (1-alpha) theta_0 + alpha theta_1 for each alpha on each eval "
                                   "set; theta_0 is the pretrained base (with the run's linear-probe head), theta_1 the "
                                   "fine-tuned run. Writes interpolation.csv and interpolation.png.")
    w.add_argument("--finetuned", required=True, help="the fine-tuned run folder (full fine-tune or LoRA)")
    w.add_argument("--base", help="theta_0: a run folder (e.g. a head-only linear-probe run) or a model spec; default: "
                                  "the run's pretrained model with its probe_head.safetensors (LoRA: always the adapter's base)")
    w.add_argument("--alphas", default="0:1:0.1", help="start:stop:step or a comma list (default 0:1:0.1)")
    w.add_argument("--eval", action="append", metavar="NAME=DATA",
                   help="an evaluation set, repeatable: e.g. --eval id=mnist:test --eval ood=digits:all")
    w.add_argument("--select", default="mean",
                   help="which alpha to save: 'mean' (best average over the sets), an eval NAME, or a number")
    w.add_argument("--save", help="write the model at the chosen alpha to this folder (a loadable run folder); "
                                  "it must be new or empty")
    w.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder (an earlier --save result, never another run)")
    w.add_argument("--out", help="folder for CSV/PNG/JSON (default FINETUNED/interpolation)")
    w.add_argument("--missing", choices=["error", "finetuned"], default="error",
                   help="a new head without a probe head: error (default) or keep the fine-tuned head at every alpha")
    w.add_argument("--batch-size", type=positive_int, default=64, help="examples per forward pass (default 64)")
    w.add_argument("--device", default="auto", help=DEVICE_HELP)
    w.set_defaults(func=cmd_interpolate)

    s = sub.add_parser("serve", help="OpenAI-compatible fine-tuning API server",
                       description="Serve files, fine-tuning jobs, models and chat completions with OpenAI's HTTP API "
                                   "(point the openai client at http://HOST:PORT/v1). Jobs run in a worker, one at a time.")
    s.add_argument("--data", default="tunesmith-data", help="data folder: SQLite store, uploads, runs (default tunesmith-data)")
    s.add_argument("--db", help=DB_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", action="append", help="accepted bearer key (repeatable; also TUNESMITH_API_KEYS=a,b); "
                                                      "empty keys are refused")
    s.add_argument("--no-auth", action="store_true",
                   help="serve without any API key; only allowed when --host is a loopback address (127.0.0.1, ::1, localhost)")
    s.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="offer a local model folder as a base model (repeatable); packaged chat models are offered by default")
    s.add_argument("--max-upload-mb", type=positive_number, default=100, help="largest accepted upload in MB (default 100)")
    s.add_argument("--no-worker", action="store_true", help="do not run jobs in this process (use `tunesmith worker`)")
    s.add_argument("--job-config", metavar="YAML",
                   help="run-config fragment every job trains with, e.g. adapter: {r: 16, targets: [q_proj, v_proj]}, "
                        "training: {lr: 1e-4, bf16: true, save_every: 50}, data: {max_length: 1024}; training.lr is the "
                        "rate at learning_rate_multiplier=1 (default: LoRA r=8 on all linear layers, lr 2e-4, "
                        "max_length 512, a checkpoint every 5 steps)")
    s.add_argument("--allow-python-graders", action="store_true",
                   help="let reinforcement jobs use OpenAI's `python` grader: it runs the job's Python code in the "
                        "training process, so allow it only for users you trust (default: refused with a 400)")
    s.add_argument("--device", default="auto", help="where chat completions run: " + DEVICE_HELP +
                   " (training jobs use a GPU when there is one)")
    s.add_argument("--nproc", type=positive_int, default=1, metavar="N", help=NPROC_HELP)
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("worker", help="run queued fine-tuning jobs", description="Run jobs from a serve data folder, one at a time.")
    k.add_argument("--data", default="tunesmith-data", help="the data folder `tunesmith serve` uses")
    k.add_argument("--model", action="append", metavar="NAME=PATH", help="extra base models, as for serve")
    k.add_argument("--db", help=DB_HELP)
    k.add_argument("--nproc", type=positive_int, default=1, metavar="N", help=NPROC_HELP)
    k.set_defaults(func=cmd_worker)

    i = sub.add_parser("inspect", help="list modules and suggested LoRA targets",
                       description="Show a model's size, block stack, and the layer names adapters can target.")
    i.add_argument("model", help="packaged model name, HF folder, or .gguf file")
    i.add_argument("--task", choices=["causal_lm", "classification"], default="causal_lm",
                   help="load as a causal LM (default) or as an encoder with a classification head")
    i.add_argument("--all", action="store_true", help="print every module with its type and parameter count")
    i.set_defaults(func=cmd_inspect)
    from .cli_weak import add_parser as add_weak; add_weak(sub)  # noqa: E702 - `tunesmith weak analyze|label`
    from .cli_diffusion import add_parser as add_diffusion; add_diffusion(sub)  # noqa: E702 - `tunesmith import-lora`
    from .cli_score import add_parser as add_score; add_score(sub)  # noqa: E702 - `tunesmith score`
    from .cli_export import add_parser as add_export; add_export(sub)  # noqa: E702 - `tunesmith export --gguf`
    return p


def _flags_first(argv: list[str]) -> list[str]:
    """`train` takes its flags anywhere, also between overrides (`train cfg.yaml --resume training.x=1`): its
    flags (but --nproc N) take no values, so they move in front of the positional config and overrides."""
    if not argv or argv[0] != "train":
        return argv
    flags, rest, items = [], [], iter(argv[1:])
    for a in items:
        (flags if a.startswith("-") else rest).append(a)
        if a == "--nproc":
            flags.append(next(items, ""))
    return ["train", *flags, *rest]


def main(argv: list[str] | None = None) -> int:
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(_flags_first(sys.argv[1:] if argv is None else list(argv)))
    from .errors import TunesmithError
    try:
        return args.func(args) or 0
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is written atomically: what was there before is as it was
        print("\ninterrupted; nothing half-written was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
