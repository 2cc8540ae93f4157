"""Sample generations during training (training.sample_prompts) and experiment trackers (output.report_to), each
run read back with the tracker's own reader: TensorBoard's EventAccumulator, MLflow's client on a local store,
trackio's local storage."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from conftest import chat_rows, class_rows, write_jsonl

os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="trackio-test-")  # trackio reads it once, when imported
os.environ["TRACKIO_PROJECT"] = "tunesmith-test"
PROMPTS = ["Tell me about cats.", "Tell me about tea."]


@pytest.fixture(scope="module")
def tracked_run(lm_dir, tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    from tunesmith.config import load_config
    from tunesmith.train import train
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(tmp)  # MLflow keeps artifacts in ./mlruns
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        data = write_jsonl(tmp / "chat.jsonl", chat_rows(24))
        cfg = load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                                 "data.max_length=64", "adapter.kind=lora", "training.max_steps=4", "training.log_every=1",
                                 "training.eval_every=2", "training.lr=0.01", f"training.sample_prompts={PROMPTS}",
                                 "training.sample_max_new_tokens=5", "output.report_to=[tensorboard,mlflow,trackio]",
                                 f"output.dir={tmp / 'run'}", "output.progress=false"])
        lines: list[str] = []
        summary = train(cfg, log=lines.append)
    finally:
        os.chdir(old[0])
        os.environ.pop("MLFLOW_TRACKING_URI") if old[1] is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old[1])
    run = tmp / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "uri": uri, "lines": lines, "summary": summary, "metrics": metrics}


@pytest.mark.slow  # one tiny training run with all three trackers (~20 s on 2 busy cores)
def test_samples_are_written_printed_and_are_the_models_greedy_replies(tracked_run):
    from tunesmith.generate import generate
    from tunesmith.train.artifacts import load_run
    rows = [json.loads(line) for line in (tracked_run["run"] / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4) for p in PROMPTS]
    assert all(isinstance(r["reply"], str) for r in rows)
    assert sum(line.startswith("sample at step 2: 'Tell me about cats.' -> ") for line in tracked_run["lines"]) == 1
    final = load_run(tracked_run["run"])  # the adapter unmerged: the same computation as during training
    for row in rows[2:]:
        assert generate(final.model, final.tokenizer, [{"role": "user", "content": row["prompt"]}], 5) == row["reply"]


@pytest.mark.slow  # one tiny training run with all three trackers (~20 s on 2 busy cores)
def test_tensorboard_event_files_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tracked_run["run"] / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/accuracy", "eval/loss", "eval/token_accuracy"} <= set(tags["scalars"])
    train = [r for r in tracked_run["metrics"] if r["event"] == "train"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert {"config/text_summary", "samples/text_summary"} <= set(tags["tensors"]) and tags["images"] == ["loss_plot"]
    samples = events.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [2, 4]
    table = samples[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | reply |") and "Tell me about tea." in table
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"max_steps": 4' in config
    image = events.Images("loss_plot")[0]
    assert image.width > 100 and image.height > 100


@pytest.mark.slow  # one tiny training run with all three trackers (~20 s on 2 busy cores)
def test_mlflow_run_read_back(tracked_run):
    from mlflow import MlflowClient
    client = MlflowClient(tracked_run["uri"])
    experiment = client.get_experiment_by_name("tunesmith")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "4" and run.data.params["adapter.kind"] == "lora"
    assert json.loads(run.data.params["training.sample_prompts"]) == PROMPTS
    history = client.get_metric_history(run.info.run_id, "train/loss")
    train = [r for r in tracked_run["metrics"] if r["event"] == "train"]
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "samples"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == \
        {"samples/step-000002.json", "samples/step-000004.json"}
    local = client.download_artifacts(run.info.run_id, "samples/step-000004.json", str(tracked_run["run"].parent))
    rows = json.loads(Path(local).read_text())
    assert [r["prompt"] for r in rows] == PROMPTS
    assert json.loads((tracked_run["run"] / "trackers.json").read_text()) == {"mlflow_run_id": run.info.run_id}


@pytest.mark.slow  # one tiny training run with all three trackers (~20 s on 2 busy cores)
def test_trackio_run_read_back(tracked_run):
    from trackio.sqlite_storage import SQLiteStorage
    assert "run" in SQLiteStorage.get_runs("tunesmith-test")
    logs = SQLiteStorage.get_logs("tunesmith-test", "run")
    losses = [(log["step"], log["train/loss"]) for log in logs if "train/loss" in log]
    train = [r for r in tracked_run["metrics"] if r["event"] == "train"]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert [log["step"] for log in logs if "eval/loss" in log] == [2, 4]
    assert any("samples" in log for log in logs) and any("loss_plot" in log for log in logs)
    config = SQLiteStorage.get_run_config("tunesmith-test", "run")
    assert config["training"]["max_steps"] == 4


def test_report_to_choices_and_samples_need_a_language_model(encoder_dir, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.train import train
    with pytest.raises(ConfigError, match="output.report_to: unknown tracker 'wandb'; use any of tensorboard, mlflow, "
                                          "trackio"):
        load_config(None, ["data.train=x.jsonl", "output.report_to=[tensorboard,wandb]"])
    assert load_config(None, ["data.train=x.jsonl", "output.report_to=tensorboard"]).output.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="training.sample_prompts: give a list of non-empty user messages"):
        load_config(None, ["data.train=x.jsonl", "training.sample_prompts=['']"])
    data = write_jsonl(tmp_path / "cls.jsonl", class_rows(16))
    cfg = load_config(None, [f"model.name={encoder_dir}", f"data.train={data}", "data.eval_fraction=0.25",
                             "training.max_steps=2", "training.eval_every=1", "training.sample_prompts=[hi]",
                             f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    lines: list[str] = []
    train(cfg, log=lines.append)
    assert lines.count("training.sample_prompts: skipped (a classification model does not generate text)") == 1
    assert not (tmp_path / "run" / "samples.jsonl").exists() and not (tmp_path / "run" / "tensorboard").exists()
