"""The OpenAI-compatible service: a real uvicorn server over HTTP, a real SQLite file, the official client."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import chat_rows, free_port, start_serve

openai = pytest.importorskip("openai")
KEY = "test-key"


def start_server(data_dir, lm_dir, port, *extra):
    return start_serve("--data", str(data_dir), "--api-key", KEY, "--model", f"tiny={lm_dir}", *extra, port=port)


@pytest.fixture(scope="module")
def server(tmp_path_factory, lm_dir):
    data = tmp_path_factory.mktemp("service")
    port = free_port()
    proc = start_server(data, lm_dir, port)
    yield {"url": f"http://127.0.0.1:{port}/v1", "data": data, "port": port, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


CONTRACT = [  # (method, path pattern, the documented answer in tunesmith.service.responses)
    ("POST", r"/v1/files", "FileObject"), ("GET", r"/v1/files", "Page[FileObject]"),
    ("GET", r"/v1/files/[^/]+", "FileObject"), ("DELETE", r"/v1/files/[^/]+", "Deleted"),
    ("POST", r"/v1/fine_tuning/jobs", "FineTuningJob"), ("GET", r"/v1/fine_tuning/jobs", "Page[FineTuningJob]"),
    ("GET", r"/v1/fine_tuning/jobs/[^/]+", "FineTuningJob"),
    ("POST", r"/v1/fine_tuning/jobs/[^/]+/(cancel|pause|resume)", "FineTuningJob"),
    ("GET", r"/v1/fine_tuning/jobs/[^/]+/events", "Page[JobEvent]"),
    ("GET", r"/v1/fine_tuning/jobs/[^/]+/checkpoints", "Page[JobCheckpoint]"),
    ("GET", r"/v1/models", "Page[ModelObject]"), ("GET", r"/v1/models/.+", "ModelObject"),
    ("DELETE", r"/v1/models/.+", "Deleted"), ("POST", r"/v1/chat/completions", "ChatCompletion"),
]
CHECKED: list[str] = []  # the answers the contract check has seen (a test asserts it saw each kind)


def check_contract(response) -> None:
    """Every JSON answer the official client gets must be exactly the documented OpenAI object."""
    import re

    from tunesmith.service import responses
    if "json" not in response.headers.get("content-type", ""):
        return  # file contents, server-sent events
    response.read()
    path = response.request.url.path
    if response.status_code >= 400:
        name = "ErrorResponse"
    else:
        name = next(n for m, pattern, n in CONTRACT if m == response.request.method and re.fullmatch(pattern, path))
    model = responses.Page[getattr(responses, name[5:-1])] if name.startswith("Page[") else getattr(responses, name)
    model.model_validate(response.json())
    CHECKED.append(name)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0,
                         http_client=openai.DefaultHttpxClient(event_hooks={"response": [check_contract]}))


def upload(client, tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def wait(client, job_id, states=("succeeded", "failed", "cancelled"), timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stuck in {job.status}")


def job_with_a_checkpoint(client, tmp_path, epochs: int):
    """A 20-example job at batch size 1, returned once its first checkpoint exists (mid-run)."""
    f = upload(client, tmp_path, chat_rows(20))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": epochs, "batch_size": 1}}})
    deadline = time.time() + 120
    while not list(client.fine_tuning.jobs.checkpoints.list(job.id)):
        assert time.time() < deadline
        time.sleep(0.1)
    return job


def test_full_flow_with_the_official_client(client, tmp_path):
    f = upload(client, tmp_path, chat_rows(12))
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes > 0 and f.filename == "train.jsonl"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read().decode().count("\n") == 12
    val = upload(client, tmp_path, chat_rows(10), "valid.jsonl")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, validation_file=val.id, suffix="demo", seed=3,
                                         metadata={"team": "a"},
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 5}}})
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:user:demo:{job.id[-8:]}"
    assert done.hyperparameters.n_epochs == 2 and done.trained_tokens > 0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    order = ["Created fine-tuning job", "Validating training file", "Files validated", "Fine-tuning job started",
             "Step 1/12", "New fine-tuned model created", "Fine tuning job successfully completed"]
    positions = [next(i for i, m in enumerate(reversed(messages)) if m.startswith(o)) for o in order]
    assert positions == sorted(positions), messages
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(metrics) == 12 and "train_loss" in metrics[0].data
    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    # every 5 steps and at each epoch end (6, 12: as OpenAI keeps one per epoch), newest first
    assert [c.step_number for c in ckpts] == [12, 10, 6, 5] and ckpts[0].metrics.train_loss > 0
    assert 0 <= ckpts[0].metrics.train_mean_token_accuracy <= 1 and ckpts[0].metrics.step == 12
    result = client.files.content(done.result_files[0]).read().decode().splitlines()
    assert result[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(result) == 13
    assert all(0 <= float(line.split(",")[2]) <= 1 for line in result[1:])
    with_valid = [int(line.split(",")[0]) for line in result[1:] if line.split(",")[3]]
    assert with_valid == [6, 12], "the validation file is evaluated at each epoch end"
    assert metrics[0].data["step"] == 12 and metrics[0].data["valid_loss"] > 0
    listed = client.fine_tuning.jobs.list(metadata={"team": "a"})
    assert [j.id for j in listed.data] == [job.id]

    ids = [m.id for m in client.models.list()]
    assert "tiny" in ids and done.fine_tuned_model in ids
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Tell me about cats"}],
                                           max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=done.fine_tuned_model, stream=True, max_tokens=5, temperature=0,
                                                 messages=[{"role": "user", "content": "Tell me about cats"}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: same text, streamed
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    early = client.chat.completions.create(model=ckpts[-1].fine_tuned_model_checkpoint, max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "Tell me about cats"}])
    assert early.model == ckpts[-1].fine_tuned_model_checkpoint and early.choices[0].message.content is not None
    assert ckpts[-1].fine_tuned_model_checkpoint in ids
    base = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me about cats"}],
                                          max_tokens=5, temperature=0)
    assert base.choices[0].message.content is not None
    assert client.models.delete(done.fine_tuned_model).deleted
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert {"FileObject", "FineTuningJob", "Page[FineTuningJob]", "Page[JobEvent]", "Page[JobCheckpoint]",
            "Page[ModelObject]", "ChatCompletion", "Deleted", "ErrorResponse"} <= set(CHECKED)


def test_data_problems_fail_the_job_not_the_request(client, tmp_path):
    seven = upload(client, tmp_path, chat_rows(7), "seven.jsonl")
    job = wait(client, client.fine_tuning.jobs.create(model="tiny", training_file=seven.id).id)
    assert job.status == "failed" and job.error.code == "invalid_n_examples" and job.error.param == "training_file"
    assert "has 7 example(s), but must have at least 10" in job.error.message
    bad = upload(client, tmp_path, ['{"messages": [{"role": "user", "content": "hi"}]}'] * 12, "bad.jsonl")
    job = wait(client, client.fine_tuning.jobs.create(model="tiny", training_file=bad.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "Line 1, messages: no assistant message" in job.error.message


def test_bad_requests_are_synchronous_400s(client, tmp_path):
    f = upload(client, tmp_path, chat_rows(12))
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning"):
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=f.id)
    with pytest.raises(openai.BadRequestError, match="no such file"):
        client.fine_tuning.jobs.create(model="tiny", training_file="file-nope")
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                       method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}})
    with pytest.raises(openai.BadRequestError, match=r"beta") as e:  # OpenAI's range: (0, 2]
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})
    assert e.value.body["param"] == "method.dpo.hyperparameters.beta"
    with pytest.raises(openai.BadRequestError, match="method.supervised is given but method.type is 'dpo'"):
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "dpo", "supervised": {}})
    with pytest.raises(openai.BadRequestError, match="method.dpo.hyperparameters") as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "dpo"},
                                       hyperparameters={"n_epochs": 2})
    with pytest.raises(openai.BadRequestError, match="reinforcement.grader") as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "reinforcement"})
    grader = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
              "operation": "equal"}
    with pytest.raises(openai.BadRequestError, match="eq, ne, like, ilike") as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                       method={"type": "reinforcement", "reinforcement": {"grader": grader}})
    assert e.value.body["param"] == "method.reinforcement.grader.operation"
    with pytest.raises(openai.BadRequestError, match="--allow-python-graders") as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "def grade(s, i): 1"}}})
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
        client.files.create(file=txt.open("rb"), purpose="fine-tune")


def test_wrong_key_is_401_and_ids_never_become_paths(server, client):
    bad = openai.OpenAI(base_url=server["url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.files.list()
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.files.content("../tunesmith.sqlite")
    import urllib.request
    req = urllib.request.Request(server["url"] + "/files/..%2F..%2Fetc%2Fpasswd/content", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 404


def test_cancel_a_running_job(client, tmp_path):
    f = upload(client, tmp_path, chat_rows(40))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 50, "batch_size": 1}}})
    wait(client, job.id, states=("running",))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    done = wait(client, job.id)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
        client.fine_tuning.jobs.cancel(job.id)


def test_fifty_parallel_uploads_and_polls(client, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(10)))

    def one(i):
        with path.open("rb") as fh:
            fid = client.files.create(file=fh, purpose="fine-tune").id
        return client.files.retrieve(fid).id == fid and client.fine_tuning.jobs.list(limit=5).object == "list"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(50)))
    page = client.files.list(limit=20)
    assert len(page.data) == 20 and page.has_more


def test_server_restart_resumes_the_running_job(tmp_path, lm_dir):
    data, port = tmp_path / "data", free_port()
    proc = start_server(data, lm_dir, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    job = job_with_a_checkpoint(client, tmp_path, epochs=3)
    proc.kill()  # no goodbye: the store must carry the job across the restart
    proc.wait()
    time.sleep(1.0)  # the orphaned training process notices at its next step and exits
    proc = start_server(data, lm_dir, port)
    try:
        done = wait(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any("server restarted" in m for m in messages)
        assert any(m.startswith("Fine-tuning job resumed from its last checkpoint") for m in messages)
        assert any(m.startswith("Step 60/60") for m in messages)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_web_page_in_headless_chromium(server, tmp_path):
    """The page at / lists jobs for a key typed into it (rendered by a real headless Chromium)."""
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    client = openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0)
    assert client.fine_tuning.jobs.list().data, "earlier tests created jobs"
    url = f"http://127.0.0.1:{server['port']}/#key={KEY}"
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "<h1>tunesmith</h1>" in dom and "Fine-tuning jobs" in dom
    assert "<td>ftjob-" in dom and 'class="succeeded"' in dom and "<li>tiny</li>" in dom


def test_pause_and_resume(client, tmp_path):
    job = job_with_a_checkpoint(client, tmp_path, epochs=2)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait(client, job.id, states=("paused", "succeeded"))
    assert paused.status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert any("paused" in m for m in messages) and any(m.startswith("Fine-tuning job resumed") for m in messages)


def test_stop_sequences_and_upload_limit(client, tmp_path, lm_dir):
    msgs = [{"role": "user", "content": "Tell me about tea"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0).choices[0].message.content
    assert len(full) >= 4
    stop = full[2:4]
    cut = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    # a second server with a 1 KB upload limit refuses a bigger file with OpenAI's error shape
    port = free_port()
    proc = start_serve("--data", str(tmp_path / "small"), "--api-key", KEY, "--max-upload-mb", "0.001", "--no-worker",
                       port=port, output=subprocess.DEVNULL)
    try:
        small = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            upload(small, tmp_path, chat_rows(30), "big.jsonl")
        assert e.value.status_code == 413 and "limit" in e.value.message
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_two_workers_share_one_store(tmp_path, lm_dir):
    """`serve --no-worker` plus two `tunesmith worker` processes: jobs run in parallel, each exactly once."""
    data, port = tmp_path / "data", free_port()
    job_config = tmp_path / "jobs.yaml"  # the server's training settings reach the separate workers too
    job_config.write_text("adapter: {r: 4, targets: [q_proj, v_proj]}\ntraining: {save_every: 7}\n")
    server = start_server(data, lm_dir, port, "--no-worker", "--job-config", str(job_config))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    workers = [subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "worker", "--data", str(data)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for _ in range(2)]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    try:
        f = upload(client, tmp_path, chat_rows(24))
        jobs = [client.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": 2, "batch_size": 1}}}) for _ in range(2)]
        both_running, deadline = False, time.time() + 180
        while time.time() < deadline:
            states = [client.fine_tuning.jobs.retrieve(j.id).status for j in jobs]
            both_running |= states == ["running", "running"]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(0.2)
        assert states == ["succeeded", "succeeded"], [client.fine_tuning.jobs.retrieve(j.id).error for j in jobs]
        assert both_running, "the two workers never ran the jobs at the same time"
        for j in jobs:
            messages = [e.message for e in client.fine_tuning.jobs.list_events(j.id, limit=1000)]
            assert sum(m.startswith("Fine-tuning job started") for m in messages) == 1, "a job was claimed twice"
            assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(j.id)] == [48, 42, 35, 28, 24, 21, 14, 7]  # every 7 steps and each epoch end
            adapter = json.loads((data / "jobs" / j.id / "adapter" / "adapter_config.json").read_text())
            assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    finally:
        for p in [*workers, server]:
            p.terminate()
            p.wait(timeout=30)


def test_chat_parameters_are_validated_and_n_gives_choices(client):
    msgs = [{"role": "user", "content": "Tell me about jazz"}]
    for bad, param in (({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
                       ({"max_tokens": "ten"}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, **bad)
        assert e.value.body["param"] == param, (bad, e.value.body)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=msgs)
    two = client.chat.completions.create(model="tiny", messages=msgs, n=2, max_tokens=6, temperature=1.0, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model="tiny", messages=msgs, n=2, max_tokens=6, temperature=1.0, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices], "seeded: reproducible"
    one = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=1.0, seed=5)
    assert one.choices[0].message.content == two.choices[0].message.content
    assert two.usage.prompt_tokens == one.usage.prompt_tokens, "the prompt is counted once"
    assert two.usage.completion_tokens >= one.usage.completion_tokens
    assert two.usage.total_tokens == two.usage.prompt_tokens + two.usage.completion_tokens
    parts = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Tell me about jazz"}]}])
    assert parts.choices[0].message.content is not None


def test_job_config_is_checked_before_the_server_starts(tmp_path):
    from tunesmith.config import ConfigError
    from tunesmith.service.job import check_job_config
    cases = {"adapter: {rank: 4}\n": "adapter.rank", "training: {epochs: 3}\n": "set by each job",
             "adapter: null\n": "serves fine-tuned models as adapters", "training: {lr: fast}\n": "training.lr"}
    for text, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            check_job_config(path)
    path.write_text("adapter: {kind: ia3, targets: [k_proj, v_proj, down_proj]}\ntraining: {bf16: true}\n")
    assert "ia3" in check_job_config(path)


def test_the_client_example_runs_end_to_end(server, tmp_path):
    """examples/openai_client.py, exactly as the docs run it, against the test server."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(12)))
    done = subprocess.run([sys.executable, "examples/openai_client.py", "--url", server["url"], "--key", KEY,
                           "--train", str(train), "--model", "tiny", "--epochs", "3"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Fine tuning job successfully completed" in done.stdout and "checkpoint ft:tiny:" in done.stdout
    assert "fine-tuned model: ft:tiny:user:chatterbot:" in done.stdout


def test_the_openapi_schema_documents_openais_objects(server):
    """/openapi.json names the real answers: the job object's fields and OpenAI's error object."""
    import urllib.request
    schema = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/openapi.json", timeout=30).read())
    job = schema["components"]["schemas"]["FineTuningJob"]
    assert {"id", "status", "fine_tuned_model", "hyperparameters", "method", "error"} <= set(job["properties"])
    create = schema["paths"]["/v1/fine_tuning/jobs"]["post"]["responses"]
    assert create["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FineTuningJob")
    assert create["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
