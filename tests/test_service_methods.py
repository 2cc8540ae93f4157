"""DPO and reinforcement fine-tuning jobs through the service, as OpenAI's API takes them, driven end to end with
the official `openai` client against a real server: files, the job, its metrics events, and a chat with the
fine-tuned model. Every answer is checked against the documented OpenAI objects (test_service.check_contract)."""
from __future__ import annotations

import json

import pytest

from conftest import free_port
from test_service import KEY, check_contract, start_server, upload, wait

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

TOPICS = ["cats", "tea", "rain", "maps", "jazz", "bread", "chess", "bees", "snow", "kites", "owls", "figs"]


def dpo_rows() -> list[dict]:
    """OpenAI's DPO layout: the preferred reply answers the question, the other one is off topic."""
    return [{"input": {"messages": [{"role": "user", "content": f"Tell me about {t}."}]},
             "preferred_output": [{"role": "assistant", "content": f"{t.capitalize()} are lovely."}],
             "non_preferred_output": [{"role": "assistant", "content": "I would rather not say."}]}
            for t in TOPICS]


def arithmetic_rows() -> list[dict]:
    """OpenAI's reinforcement layout: a prompt, and the fields the grader reads."""
    return [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}],
             "answer": str(a + b)} for a, b in zip(range(1, 13), range(3, 15))]


@pytest.fixture(scope="module")
def server(tmp_path_factory, lm_dir):
    data = tmp_path_factory.mktemp("methods")
    port = free_port()
    proc = start_server(data, lm_dir, port, "--allow-python-graders")
    yield {"url": f"http://127.0.0.1:{port}/v1", "data": data, "port": port}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0,
                         http_client=openai.DefaultHttpxClient(event_hooks={"response": [check_contract]}))


def test_a_dpo_job_runs_end_to_end(client, tmp_path):
    f = upload(client, tmp_path, [json.dumps(r) for r in dpo_rows()], "prefs.jsonl")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, validation_file=f.id, suffix="dpo", seed=1, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.method.dpo.hyperparameters.beta == 0.2 and done.hyperparameters.n_epochs == 1
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(metrics) == 3 and all(m.data["train_loss"] > 0 for m in metrics)  # 12 pairs, batch 4
    assert "train_reward_margin" in metrics[0].data and 0 <= metrics[0].data["train_mean_token_accuracy"] <= 1
    last = max(metrics, key=lambda m: m.data["step"]).data  # the validation file, evaluated at the epoch end
    assert last["valid_loss"] > 0 and 0 <= last["valid_accuracy"] <= 1 and "valid_reward_margin" in last
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Tell me about owls."}])
    assert reply.choices[0].message.content is not None


def test_a_reinforcement_job_with_a_grader_runs_end_to_end(client, tmp_path, server):
    f = upload(client, tmp_path, [json.dumps(r) for r in arithmetic_rows()], "sums.jsonl")
    grader = {"type": "multi", "calculate_output": "0.8 * exact + 0.2 * close", "graders": {
        "exact": {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "operation": "eq"},
        "close": {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}}}
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, validation_file=f.id, suffix="rl", method={
        "type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
            "batch_size": 4, "compute_multiplier": 0.5}}})
    done = wait(client, job.id, timeout=600)
    assert done.status == "succeeded", done.error
    assert done.method.reinforcement.hyperparameters.n_epochs == 1  # auto: one epoch of online RL
    saved = json.loads((server["data"] / "jobs" / job.id / "grader.json").read_text())
    assert saved == grader
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(metrics) == 3 and all(0 <= m.data["train_reward"] <= 1 for m in metrics)
    assert 0 <= max(metrics, key=lambda m: m.data["step"]).data["valid_reward"] <= 1  # the validation file's
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "What is 2 + 2?"}])
    assert reply.choices[0].message.content is not None


def test_a_python_grader_runs_only_while_the_server_allows_it(client, tmp_path, server):
    """Allowed at creation (this server has --allow-python-graders); a server restarted without the flag makes
    the job fail with a clear error instead of running the code."""
    from tunesmith.service.job import PYTHON_GRADERS
    f = upload(client, tmp_path, [json.dumps(r) for r in arithmetic_rows()], "sums.jsonl")
    grader = {"type": "python", "name": "len", "source": "def grade(sample, item):\n    return 1.0"}
    (server["data"] / PYTHON_GRADERS).unlink()  # what a restart without --allow-python-graders does
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={
        "type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 4}}})
    done = wait(client, job.id)
    assert done.status == "failed" and done.error.code == "python_graders_disabled", done.error


def test_a_grader_that_fails_mid_job_names_its_formula_and_keeps_the_traceback_for_the_operator(client, tmp_path,
                                                                                               server):
    f = upload(client, tmp_path, [json.dumps(r) for r in arithmetic_rows()], "sums.jsonl")
    never = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "no such reply",
             "operation": "eq"}  # scores 0 while a scores 1: the denominator is 0 only then (creation checks the
    formula = "a / (a + 2 * never - 1)"  # scores all at 1, all at 0 and all at 0.5, where it computes)
    grader = {"type": "multi", "calculate_output": formula, "graders": {"a": {**never, "operation": "ne"},
                                                                        "never": never}}
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={
        "type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 4}}})
    done = wait(client, job.id)
    assert done.status == "failed" and f"'{formula}' cannot be computed for the scores a=1, never=0" in \
        done.error.message, done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert not any("traceback" in json.dumps(e.data or {}).lower() for e in events)
    assert "Traceback" in (server["data"] / "jobs" / job.id / "error.log").read_text()
