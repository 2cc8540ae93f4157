"""The Python examples in the README and docs/ run as written (each file's blocks in order, one namespace),
on the real packaged models, in a scratch folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if "```python" in p.read_text()]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_docs_have_python_examples():
    assert {p.name for p in DOCS} >= {"README.md", "adapters.md", "freezing-and-heads.md"}


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_run(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    for i, code in enumerate(python_blocks(doc), 1):
        exec(compile(code, f"{doc.relative_to(ROOT)} (python example {i})", "exec"), namespace)  # noqa: S102
    assert capsys.readouterr().out.strip(), "the examples print what they show"
