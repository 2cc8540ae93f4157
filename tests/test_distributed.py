"""Training on 2 processes (gloo, CPU) against one process, on a tiny random Llama with LoRA: the same losses step
by step, checkpoints that resume in one process to the same final loss, and files written by rank 0 only.

Tolerance: 1e-5 relative on every loss, 1e-5 absolute on the adapter weights. The global batches are the same
examples as in one process; what differs is float rounding (half batches padded to their own length, sums added
in another order). Measured: 3e-8 relative on the losses, 1.3e-7 on the weights.

The ranks are started with torch.multiprocessing and the environment torchrun gives them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), so that rank 1 can record, with an audit hook, every file it opens for writing;
one test launches the real `tunesmith train --nproc 2` (torchrun)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import chat_rows, free_port, write_jsonl

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def run_config(lm_dir, data: Path, out: Path, strategy: str = "ddp") -> dict:
    """21 training rows in batches of 5 (the fifth holds 1 example: rank 1 gets none and runs with weight 0),
    2 micro-batches a step, 5 steps, a checkpoint at step 3; float32 (bf16 autocast would round half batches
    differently from whole ones, far above these tolerances)."""
    return {"model": {"name": str(lm_dir)}, "adapter": {"kind": "lora", "r": 4, "targets": "all-linear"},
            "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": 64},
            "training": {"batch_size": 5, "grad_accum": 2, "epochs": 2, "lr": 1e-2, "log_every": 1, "save_every": 3,
                         "keep_checkpoints": 5, "seed": 3, "eval_every": 2, "bf16": False},  # float32: exact
            "distributed": {"strategy": strategy}, "output": {"dir": str(out), "progress": False}}


def train_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    return [(r["event"], r["step"], r["loss"] if r["event"] == "train" else r["eval_loss"])
            for r in train_records(run_dir)]


def assert_same_losses(got: Path, want: Path) -> None:
    g, w = losses(got), losses(want)
    assert [x[:2] for x in g] == [x[:2] for x in w]
    for (event, step, a), (_, _, b) in zip(g, w):
        assert a == pytest.approx(b, rel=LOSS_RTOL), (event, step, a, b)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# -- the ranks ------------------------------------------------------------------------------------
WRITE_EVENTS = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.rmdir", "shutil.rmtree",
                "os.truncate", "shutil.copyfile", "os.symlink", "os.link"}


def _record_writes_under(root: str, into: list) -> None:
    """An audit hook: every open-for-writing, rename, removal or new folder under `root`."""
    import os as _os

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, _os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT))
            paths = [args[0]] if writing else []
        elif event in WRITE_EVENTS:
            paths = [a for a in args if isinstance(a, (str, bytes, _os.PathLike))]
        else:
            return
        for p in paths:
            p = _os.fsdecode(p)
            if _os.path.abspath(p).startswith(root):
                into.append(f"{event} {p}")
    sys.addaudithook(hook)


def _rank_main(rank: int, world: int, port: int, cfg: dict, report: str, resume: bool = False) -> None:
    """One rank, as torchrun starts it, recording what it writes under the run folder."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    writes: list[str] = []
    _record_writes_under(os.path.abspath(cfg["output"]["dir"]), writes)
    from tunesmith.config import config_from_dict
    from tunesmith.train import train
    config = config_from_dict(cfg)
    summary = train(config, resume=resume, log=lambda *a: None)
    Path(report, f"rank{rank}.json").write_text(json.dumps({
        "writes": writes, "summary": summary, "settled": [config.training.gradient_checkpointing, config.data.packing]}))


def run_ranks(cfg: dict, report: Path, world: int = 2, resume: bool = False) -> list[dict]:
    import torch.multiprocessing as mp
    report.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, free_port(), cfg, str(report), resume), nprocs=world, join=True)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(world)]


# -- fixtures: one process, and 2 ranks of each strategy --------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist-data")
    rows = chat_rows(24)
    write_jsonl(folder / "train.jsonl", rows[:21])
    write_jsonl(folder / "eval.jsonl", rows[21:])
    return folder


@pytest.fixture(scope="module")
def one_process(lm_dir, data, tmp_path_factory):
    from tunesmith.config import config_from_dict
    from tunesmith.train import train
    out = tmp_path_factory.mktemp("one") / "run"
    summary = train(config_from_dict(run_config(lm_dir, data, out)), log=lambda *a: None)
    return out, summary


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_ranks(request, lm_dir, data, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reports = run_ranks(run_config(lm_dir, data, root / "run", request.param), root / "report")
    return request.param, root / "run", reports


# -- the tests ------------------------------------------------------------------------------------
def test_two_ranks_reach_the_losses_and_weights_of_one_process(one_process, two_ranks):
    ref, ref_summary = one_process
    strategy, run_dir, reports = two_ranks
    assert [e for e, _, _ in losses(run_dir)].count("train") == 5
    assert_same_losses(run_dir, ref)
    got, want = adapter_weights(run_dir), adapter_weights(ref)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=WEIGHT_ATOL)
    for report in reports:  # every rank returns rank 0's summary
        assert report["summary"]["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=LOSS_RTOL)
        assert report["summary"]["steps"] == 5


def test_only_rank_0_writes_files(two_ranks):
    """Rank 0 writes everything, but that under FSDP each rank writes its own checkpoint shards
    (torch.distributed.checkpoint) into the folder rank 0 renames into place."""
    import re
    strategy, run_dir, reports = two_ranks
    others = [w for w in reports[1]["writes"]
              if not (strategy == "fsdp" and re.search(r"/checkpoints/\.step-3\.[^/]+\.tmp(/__1_0\.distcp)?$", w))]
    assert others == [], f"{strategy}: rank 1 wrote {others[:5]}"
    if strategy == "fsdp":
        assert any("__1_0.distcp" in w for w in reports[1]["writes"]), "rank 1 wrote its own shards"
    seen = " ".join(reports[0]["writes"])  # the hook sees what rank 0 writes
    sharded = ("state.json", ".metadata", "__0_0.distcp", "rng.safetensors") if strategy == "fsdp" else ("state.safetensors",)
    for name in ("config.yaml", "metrics.jsonl", *sharded, "adapter_config.json", "summary.json"):
        assert name in seen, (name, reports[0]["writes"][:20])
    step = run_dir / "checkpoints" / "step-3"
    assert (step / ".metadata").exists() == (strategy == "fsdp") and (step / "state.safetensors").exists() == (strategy == "ddp")
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "loss.png", "adapter"):
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3"]
    from tunesmith.train.artifacts import load_run
    assert load_run(run_dir).model is not None  # the adapter, in the normal format, loads onto its base


def test_a_two_rank_checkpoint_resumes_in_one_process_to_the_same_final_loss(one_process, two_ranks, tmp_path):
    """The run is cut back to its step-3 checkpoint (as if killed after it) and resumed by one process."""
    from tunesmith.config import load_config
    from tunesmith.train import train
    ref, ref_summary = one_process
    strategy, run_dir, _ = two_ranks
    cut = tmp_path / "run"
    shutil.copytree(run_dir, cut)
    (cut / "summary.json").unlink()
    cfg = load_config(cut / "config.yaml", [f"output.dir={cut}"])
    said = []
    summary = train(cfg, resume=True, log=said.append)
    assert any("resumed from" in s and "step-3" in s for s in said), said
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=LOSS_RTOL)
    assert_same_losses(cut, ref)


def test_two_ranks_resuming_an_old_run_settle_its_config_alike(lm_dir, data, one_process, tmp_path):
    """A run saved before training.gradient_checkpointing existed resumes with it off. Rank 0 reads the saved
    config; every rank must take what it settled, not its own auto default."""
    import yaml
    ref, ref_summary = one_process
    cut = tmp_path / "run"
    shutil.copytree(ref, cut)
    (cut / "summary.json").unlink()
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    del saved["training"]["gradient_checkpointing"]
    (cut / "config.yaml").write_text(yaml.safe_dump(saved))
    reports = run_ranks(run_config(lm_dir, data, cut), tmp_path / "report", resume=True)
    assert [r["settled"] for r in reports] == [[False, True], [False, True]]
    assert reports[1]["summary"]["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=LOSS_RTOL)


def test_tunesmith_train_nproc_runs_torchrun(lm_dir, data, one_process, tmp_path):
    """The CLI shortcut execs `torchrun --standalone --nproc-per-node 2 -m tunesmith train ...`."""
    import yaml
    ref, _ = one_process
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(lm_dir, data, tmp_path / "run")))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(config), "--nproc", "2", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("final_loss") == 1, "rank 0 alone reports"
    assert_same_losses(tmp_path / "run", ref)


def test_bad_distributed_settings_are_refused_before_the_process_group(monkeypatch):
    from tunesmith.config import ConfigError, load_config
    from tunesmith.train.distributed import start_distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="training.device=cuda:1: under torchrun each process uses the GPU"):
        start_distributed(load_config(None, ["data.train=x.jsonl", "training.device=cuda:1"]))
    with pytest.raises(ConfigError, match="linear_probe_epochs: the linear probe runs in one process"):
        start_distributed(load_config(None, ["data.train=x.jsonl", "training.linear_probe_epochs=1"]))
    with pytest.raises(ConfigError, match="distributed.strategy: must be one of ddp, fsdp"):
        load_config(None, ["data.train=x.jsonl", "distributed.strategy=zero3"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert start_distributed(load_config(None, ["data.train=x.jsonl"])) is None  # one process: untouched


def test_train_flags_with_nproc_anywhere():
    from tunesmith.cli import _flags_first, build_parser
    argv = _flags_first(["train", "cfg.yaml", "--nproc", "2", "training.lr=1e-3", "--resume"])
    args = build_parser().parse_args(argv)
    assert (args.config, args.overrides, args.nproc, args.resume) == ("cfg.yaml", ["training.lr=1e-3"], 2, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--nproc", "0", "cfg.yaml"])


def test_fsdp_full_fine_tuning_saves_the_normal_model_and_its_sharded_checkpoint_resumes_in_one_process(
        lm_dir, data, tmp_path):
    """No adapter: FSDP shards every weight. The result is a plain transformers folder equal to one process's; the
    step-3 checkpoint (each rank's shards of every weight and of AdamW's state) resumes in one process to the
    same final loss and weights."""
    from safetensors.torch import load_file

    from tunesmith.config import config_from_dict
    from tunesmith.train import train

    def full(out: Path, strategy: str = "ddp") -> dict:
        cfg = run_config(lm_dir, data, out, strategy)
        cfg["adapter"] = None
        cfg["training"]["lr"] = 1e-3
        return cfg

    ref = tmp_path / "one"
    ref_summary = train(config_from_dict(full(ref)), log=lambda *a: None)
    run_ranks(full(tmp_path / "fsdp", "fsdp"), tmp_path / "report")
    assert (tmp_path / "fsdp" / "checkpoints" / "step-3" / ".metadata").exists()
    assert_same_losses(tmp_path / "fsdp", ref)

    def weights(run: Path) -> dict:
        return load_file(str(run / "model" / "model.safetensors"))

    want, got = weights(ref), weights(tmp_path / "fsdp")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=WEIGHT_ATOL)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    (cut / "summary.json").unlink()
    shutil.rmtree(cut / "model")
    said: list[str] = []
    from tunesmith.config import load_config
    summary = train(load_config(cut / "config.yaml", [f"output.dir={cut}"]), resume=True, log=said.append)
    assert any("resumed from" in s and "step-3" in s for s in said), said
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=LOSS_RTOL)
    assert_same_losses(cut, ref)
    for k, v in weights(cut).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=WEIGHT_ATOL)


def test_a_one_process_checkpoint_resumes_under_fsdp(lm_dir, data, one_process, tmp_path):
    """The reverse of the sharded case: whole tensors from one process, each FSDP rank keeping its shard."""
    import yaml
    ref, ref_summary = one_process
    cut = tmp_path / "run"
    shutil.copytree(ref, cut)
    (cut / "summary.json").unlink()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-3"]
    assert (cut / "checkpoints" / "step-3" / "state.safetensors").exists()
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    saved["distributed"]["strategy"] = "fsdp"
    (cut / "config.yaml").write_text(yaml.safe_dump(saved))
    reports = run_ranks(run_config(lm_dir, data, cut, "fsdp"), tmp_path / "report", resume=True)
    assert not any("step-3" in w for w in reports[0]["writes"]), "it resumed after step 3, not from the start"
    assert reports[0]["summary"]["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=LOSS_RTOL)
    assert_same_losses(cut, ref)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["tied", "tied_head_trained"])
def test_the_saved_skeleton_keeps_tied_weights_tied(modules_to_save):
    """FSDP's result is the weightless copy filled with the gathered state (assign=True splits shared tensors):
    tied embeddings are shared again, also where an adapter wraps the tied head (its .weight passes through)."""
    from conftest import tiny_llama
    from tunesmith.adapters import LoraConfig, add_adapter
    from tunesmith.train.distributed import fill_skeleton, weightless_copy
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    extra = {"modules_to_save": modules_to_save} if modules_to_save else {}
    add_adapter(model, LoraConfig(targets=["q_proj"], r=2, **extra))
    filled = fill_skeleton(weightless_copy(model), {k: v.clone() for k, v in model.state_dict().items()})
    head = filled.lm_head.original_module if modules_to_save else filled.lm_head
    assert head.weight is filled.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(filled(ids).logits, model.eval()(ids).logits)
