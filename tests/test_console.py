"""The service's web page as a console, end to end in headless Chromium (Debian's) driven by Playwright: upload a
file, start jobs, watch loss and events live, compare two runs' curves, chat with a fine-tuned model and with a
checkpoint. Every text from the server stays text (an uploaded file named like markup is shown, never run).

TUNESMITH_SCREENSHOTS=DIR also saves the page's screenshots there (docs/results/console*.png were made so)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import chat_rows, free_port, start_serve

playwright_api = pytest.importorskip("playwright.sync_api")
KEY = "console-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MARKUP_NAME = "<img src=x onerror=document.title=1>.jsonl"


@pytest.fixture(scope="module")
def page(lm_dir, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    data = tmp_path_factory.mktemp("console")
    port = free_port()
    proc = start_serve("--data", str(data), "--api-key", KEY, "--model", f"tiny={lm_dir}", port=port)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/#key={KEY}")
        page.errors = errors
        try:
            yield page
        finally:
            browser.close()
            proc.terminate()
            proc.wait(timeout=30)


def shot(page, name: str) -> None:
    folder = os.environ.get("TUNESMITH_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


# Records every trusted pointer event and click on the jobs table (its row, target and checkbox state, in the
# capture phase and after the page's handlers ran) and every row the table gains or loses.
WATCH_INPUT = """() => {
    const log = window.__log = [], t0 = performance.now();
    const row = (n) => { const r = n && n.closest && n.closest('tr'); return r ? (r.dataset.job || 'head') : '-'; };
    const note = (phase) => (e) => log.push([Math.round(performance.now() - t0), phase, e.type, e.target.tagName,
        row(e.target), e.target.checked, e.isTrusted, e.defaultPrevented, [...state.compare].join(',')]);
    for (const type of ['pointerdown', 'mousedown', 'mouseup', 'click', 'change'])
        { window.addEventListener(type, note('capture'), true); window.addEventListener(type, note('bubble')); }
    new MutationObserver((ms) => ms.forEach(m => log.push([Math.round(performance.now() - t0), 'rows',
        [...m.addedNodes].map(row).join(','), [...m.removedNodes].map(row).join(',')])))
        .observe(document.querySelector('#jobs tbody'), {childList: true});
}"""


def wait_for(predicate, timeout: float = 240, what: str = "", page=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    seen = ""
    if page is not None:  # what the page showed, for a failure that only a loaded CI machine reproduces
        seen = page.evaluate("""() => JSON.stringify({msg: document.getElementById('msg').textContent,
            legend: document.getElementById('legend').textContent, title: document.title,
            compare: [...state.compare], selected: state.selected, curves: Object.keys(curves),
            checked: [...document.querySelectorAll('#jobs tr')].map(r => [r.dataset.job,
                      (r.querySelector('input[type=checkbox]') || {}).checked]), log: window.__log || []})""") \
            + f" errors={page.errors}"
    raise AssertionError(f"timed out waiting for {what} {seen}")


def status_of(page, job_id: str) -> str:
    row = page.locator(f'#jobs tr[data-job="{job_id}"] td:nth-child(3)')
    return row.inner_text() if row.count() else ""


def start_job(page, epochs: str, lr: str, suffix: str) -> str:
    page.fill("#job-epochs", epochs)
    page.fill("#job-batch", "4")
    page.fill("#job-lr", lr)
    page.fill("#job-suffix", suffix)
    before = page.inner_text("#job-msg")  # the last job's "created ..." until the page clears it
    page.click("#start")
    wait_for(lambda: page.inner_text("#job-msg").startswith("created ftjob-")
             and page.inner_text("#job-msg") != before, 120, "the job to be created")
    return page.inner_text("#job-msg").removeprefix("created ")


@pytest.mark.slow
def test_console_upload_train_watch_compare_and_chat(page):
    rows = "".join(json.dumps(r) + "\n" for r in chat_rows(24)).encode()
    page.set_input_files("#file", files=[{"name": MARKUP_NAME, "mimeType": "application/octet-stream", "buffer": rows}])
    page.click("#upload")
    wait_for(lambda: page.inner_text("#upload-msg").startswith("uploaded"), 120, "the upload")
    assert page.locator("#job-train option").first.inner_text().startswith(MARKUP_NAME)  # the name, as text
    assert {"tiny", "smollm2-135m-instruct"} <= set(page.locator("#job-model option").all_inner_texts())
    page.select_option("#job-model", "tiny")

    first = start_job(page, "2", "2", "console-a")
    second = start_job(page, "1", "1", "console-b")
    assert first != second, "the second job's message replaced the first's"
    # watched live: the second job (queued behind the first) is selected now, and its events panel fills in
    # place as the page polls, with no reload, until it completes
    wait_for(lambda: status_of(page, second) != "", 60, "the second job's row")
    page.click(f'#jobs tr[data-job="{second}"] td:first-child')
    seen: list[tuple[str, str]] = []

    def both_done() -> bool:
        seen.append((status_of(page, second), page.inner_text("#events")))
        return status_of(page, first) == "succeeded" and status_of(page, second) == "succeeded"

    wait_for(both_done, 300, "both jobs to succeed")
    wait_for(lambda: "successfully completed" in page.inner_text("#events"), 60, "the second job's last event")
    before_done = {text for status, text in seen if status != "succeeded" and text.strip()
                   and "successfully completed" not in text}
    assert before_done, f"no events were shown while the job was {sorted({s for s, _ in seen})}"
    assert len({text for _, text in seen} | {page.inner_text("#events")}) >= 3, "the events panel updated in place"
    page.click(f'#jobs tr[data-job="{first}"] td:first-child')  # watch the first job
    wait_for(lambda: "successfully completed" in page.inner_text("#events"), 120, "the first job's events")
    events = page.inner_text("#events")
    assert "Step 1/" in events and "training loss" in events.lower()
    painted = page.evaluate("""() => { const c = document.getElementById('loss');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert painted > 200, "the loss curve is drawn"
    page.evaluate(WATCH_INPUT)  # what each click and re-render did, shown if the legend never gets both runs
    for job in (first, second):  # compare the two runs
        page.check(f'#jobs tr[data-job="{job}"] input[type=checkbox]')
    wait_for(lambda: page.locator("#legend span").count() == 2, 60, "two curves in the legend", page)
    assert {page.locator("#legend span").nth(i).inner_text()[2:] for i in range(2)} == {first, second}
    shot(page, "console-jobs.png")

    models = [o for o in page.locator("#chat-model option").all_inner_texts()]
    tuned = next(m for m in models if m.startswith("ft:tiny:") and "console-a" in m and ":ckpt-step-" not in m)
    checkpoint = next(m for m in models if "console-a" in m and ":ckpt-step-" in m)
    for model, prompt in ((tuned, "Tell me about cats."), (checkpoint, "And about tea?")):
        page.select_option("#chat-model", model)
        page.fill("#prompt", prompt)
        page.click("#send")
        replies = 1 if model == tuned else 2
        wait_for(lambda n=replies: page.locator("#log div.assistant[data-done='1']").count() >= n, 240,
                 f"a reply from {model}")
    turns = page.locator("#log div")
    assert turns.count() == 4 and page.locator("#log div.error").count() == 0
    assert turns.nth(0).inner_text() == "user: Tell me about cats."
    assert turns.nth(1).inner_text().startswith("assistant: ")
    shot(page, "console-chat.png")

    assert page.locator("img").count() == 0 and page.title() == "tunesmith", "the file name ran as markup"

    # the method selector: a DPO job from an uploaded preference file (OpenAI's DPO rows), trained to the end
    pairs = [{"input": {"messages": [{"role": "user", "content": f"{a} + {a}?"}]},
              "preferred_output": [{"role": "assistant", "content": str(2 * a)}],
              "non_preferred_output": [{"role": "assistant", "content": f"maybe {a}"}]} for a in range(12)]
    page.set_input_files("#file", files=[{"name": "pairs.jsonl", "mimeType": "application/octet-stream",
                                          "buffer": "".join(json.dumps(r) + "\n" for r in pairs).encode()}])
    page.click("#upload")
    wait_for(lambda: page.inner_text("#upload-msg").startswith("uploaded pairs.jsonl"), 120, "the pairs upload")
    page.select_option("#job-train", label=next(o for o in page.locator("#job-train option").all_inner_texts()
                                                if o.startswith("pairs.jsonl")))
    page.select_option("#job-method", "dpo")
    dpo = start_job(page, "1", "1", "console-dpo")
    wait_for(lambda: status_of(page, dpo) == "succeeded", 300, "the DPO job to succeed", page)
    method = page.evaluate(f"async () => (await api('/v1/fine_tuning/jobs/{dpo}')).method.type")
    assert method == "dpo"
    assert page.errors == []
