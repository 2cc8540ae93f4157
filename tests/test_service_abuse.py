"""The job-creation API under abuse, against a real server without a worker (nothing trains): graders nested
too deep or with unknown fields, python graders checked but never run in the server, formulas that cannot be
computed, hyperparameters given twice, integrations, foreign pagination cursors, lone surrogates in chat."""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import free_port
from test_service import KEY, start_server, upload
from test_service_methods import arithmetic_rows

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, lm_dir):
    data = tmp_path_factory.mktemp("abuse")
    port = free_port()
    proc = start_server(data, lm_dir, port, "--allow-python-graders", "--no-worker")
    yield {"url": f"http://127.0.0.1:{port}/v1", "data": data, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def rl_file(server, tmp_path_factory):
    client = openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0)
    return upload(client, tmp_path_factory.mktemp("rl"), [json.dumps(r) for r in arithmetic_rows()], "sums.jsonl").id


CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}


def create(http, rl_file, grader=None, **body):
    method = {"type": "reinforcement", "reinforcement": {"grader": grader or CHECK}}
    return http.post("/fine_tuning/jobs", json={"model": "tiny", "training_file": rl_file, "method": method, **body})


def refused(response, param: str, text: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


def jobs(http) -> int:
    return len(http.get("/fine_tuning/jobs", params={"limit": 100}).json()["data"])


def test_graders_nested_too_deep_or_with_unknown_fields_are_refused_and_store_nothing(http, rl_file):
    before = jobs(http)
    deep: dict = {"a": 1}
    for _ in range(260):
        deep = {"a": deep}
    refused(create(http, rl_file, {**CHECK, "extra": deep}), "method.reinforcement.grader.extra", "unknown field")
    multi = CHECK
    for _ in range(450):
        multi = {"type": "multi", "graders": {"g": multi}, "calculate_output": "g"}
    refused(create(http, rl_file, multi), "method.reinforcement.grader" + ".graders.g" * 8, "nest more than 8")
    refused(create(http, rl_file, {**CHECK, "type": "text_similarity", "operation": None,
                                   "evaluation_metric": ["bleu"]}), "method.reinforcement.grader.operation",
            "unknown field")
    sim = {k: v for k, v in CHECK.items() if k != "operation"}
    refused(create(http, rl_file, {**sim, "type": "text_similarity", "evaluation_metric": {"a": 1}}),
            "method.reinforcement.grader.evaluation_metric", "must be one of")
    assert jobs(http) == before  # nothing half-created: every read still works
    assert http.get("/fine_tuning/jobs").status_code == 200


@pytest.mark.parametrize("formula, message", [
    ("+".join(["a"] * 100000), "characters; at most 1000"),
    ("-" * 200000 + "a", "characters; at most 1000"),
    ("(" * 60 + "a" + ")" * 60 + "+a" * 60, "nests more than 50"),
    ("a / 0", "cannot be computed"),
    ("10 ** 10 ** 10", "cannot be computed"),
    ("log(a - 1)", "cannot be computed"),
    ("a / a", "cannot be computed for the scores a=0"),  # a wrong answer scores 0: refused now, not mid-job
    ("log(a)", "cannot be computed for the scores a=0"),
])
def test_formulas_that_cannot_be_computed_are_refused_at_creation(http, rl_file, formula, message):
    grader = {"type": "multi", "graders": {"a": CHECK}, "calculate_output": formula}
    refused(create(http, rl_file, grader), "method.reinforcement.grader.calculate_output", message)


def test_a_python_grader_is_checked_but_never_run_in_the_server(http, rl_file, server, tmp_path):
    marker = tmp_path / "ran"
    source = (f"open({str(marker)!r}, 'w').write('ran')\nimport os\nos._exit(3)\n"
              "def grade(sample, item):\n    return 1.0\n")
    r = create(http, rl_file, {"type": "python", "name": "p", "source": source})
    assert r.status_code == 200, r.text
    assert not marker.exists() and server["proc"].poll() is None  # the server lives on, nothing ran
    refused(create(http, rl_file, {"type": "python", "source": "def other(s, i):\n    return 1.0\n"}),
            "method.reinforcement.grader.source", "must define grade")
    refused(create(http, rl_file, {"type": "python", "source": "def grade(:"}),
            "method.reinforcement.grader.source", "does not compile")


def test_hyperparameters_twice_and_integrations_are_refused(http, tmp_path, server):
    client = openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0)
    sft = upload(client, tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]})]).id
    body = {"model": "tiny", "training_file": sft}
    refused(http.post("/fine_tuning/jobs", json={**body, "hyperparameters": {"n_epochs": 7}, "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}}}), "hyperparameters", "twice")
    refused(http.post("/fine_tuning/jobs", json={**body, "integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}),
            "integrations", "not supported")
    assert http.post("/fine_tuning/jobs", json={**body, "integrations": []}).status_code == 200


def test_another_jobs_event_is_not_a_cursor(http, rl_file):
    a, b = create(http, rl_file).json()["id"], create(http, rl_file).json()["id"]
    b_event = http.get(f"/fine_tuning/jobs/{b}/events").json()["data"][0]["id"]
    r = http.get(f"/fine_tuning/jobs/{a}/events", params={"after": b_event})
    assert r.status_code == 404 and r.json()["error"]["param"] == "after", r.text


def test_a_lone_surrogate_in_a_chat_message_is_a_400(http):
    r = http.post("/chat/completions", content=b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", '
                                               b'"content": "a\\ud800b"}]}', headers={"Content-Type": "application/json"})
    refused(r, "messages[0].content", "lone surrogate")


def test_bad_upload_limits_are_a_command_line_error(capsys):
    from tunesmith.cli import main
    for value in ("nan", "-1", "0"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--data", "x", "--max-upload-mb", value])
        assert e.value.code == 2 and "--max-upload-mb" in capsys.readouterr().err


def test_a_lone_surrogate_inside_a_grader_is_a_400(http, rl_file):
    before = jobs(http)
    body = json.dumps({"model": "tiny", "training_file": rl_file, "method": {"type": "reinforcement", "reinforcement": {
        "grader": {**CHECK, "reference": "@"}}}}).replace('"@"', '"\\ud800"')
    r = http.post("/fine_tuning/jobs", content=body.encode(), headers={"Content-Type": "application/json"})
    refused(r, "method.reinforcement.grader.reference", "lone surrogate")
    assert jobs(http) == before and http.get("/fine_tuning/jobs").status_code == 200
