"""docs/config.md, generated from the config dataclasses: each field's docstring is its documentation.

    python -m tunesmith.config_docs            # print the reference
    python -m tunesmith.config_docs --write    # rewrite docs/config.md

A field's docstring is the string literal on the line(s) right after it (the litgpt / jsonargparse
convention), read from the class source with `ast`. Allowed values come from the annotation (`Literal`)
or, for registry-backed fields, from the registry itself (`field(metadata={"choices": fn})`), so a new
objective or data format shows up here without editing this file.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from .adapters.config import KINDS, AdapterTargets
from .config import RunConfig

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"
COMMAND = "python -m tunesmith.config_docs --write"

INTRO = f"""# Run config reference

<!-- Generated from the field docstrings in src/tunesmith/config.py and src/tunesmith/adapters/config.py
by `{COMMAND}`; edit those, not this file. -->

One YAML file, eight sections. Any field can be changed from the command line as `section.key=value`
(`training.lr=2e-4`, `adapter.targets=[q_proj,v_proj]`, `adapter=null`). Unknown keys are errors that
name the nearest valid key. The resolved config is saved as `config.yaml` in the run folder."""

ADAPTER_INTRO = """`null` for full fine-tuning, or `kind: lora | ia3 | bottleneck` plus the fields below (the same
options as the library's config classes, see [adapters.md](adapters.md)). The targeting fields are shared
by every kind; each kind adds its own. For classification the new `head` is always trained and saved with
the adapter."""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for a dataclass and the dataclasses it inherits from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_choices(f: dataclasses.Field, hint: Any) -> tuple[str, ...] | None:
    """The allowed values: from a registry named in the field's metadata, or from a Literal annotation."""
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"]())
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value == "":  # an empty text default means "must be given" (RunConfig.validate checks it)
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(cls: type, names: list[str], extra_rows: list[str] = ()) -> list[str]:
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| key | default | meaning |", "|---|---|---|", *extra_rows]
    for name in names:
        meaning = docs.get(name, "")
        choices = field_choices(fields[name], hints[name])
        if choices:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        rows.append(f"| {name} | {_cell(_default(fields[name]))} | {_cell(meaning)} |")
    return rows


def _section(title: str, cls: type, names: list[str] | None = None, extra_rows: list[str] = ()) -> list[str]:
    names = names if names is not None else [f.name for f in dataclasses.fields(cls)]
    return [title, "", inspect.cleandoc(cls.__doc__ or ""), "", *_table(cls, names, extra_rows), ""]


def _adapter_section() -> list[str]:
    shared = [f.name for f in dataclasses.fields(AdapterTargets)]
    kinds = ", ".join(f"`{k}`" for k in KINDS)
    kind_row = f"| kind | {next(iter(KINDS))} | Which adapter (`none` or `adapter: null`: no adapter). One of: {kinds}. |"
    out = ["## adapter", "", ADAPTER_INTRO, "", "### targeting (every kind)", "",
           *_table(AdapterTargets, shared, [kind_row]), ""]
    for kind, cls in KINDS.items():
        own = [f.name for f in dataclasses.fields(cls) if f.name not in shared]
        out += _section(f"### kind: {kind}", cls, own)
    return out


def render() -> str:
    """docs/config.md as it should read: the intro, then one table per section, rows from field docstrings."""
    lines = [INTRO, ""]
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        if section.name == "adapter":
            lines += _adapter_section()
        else:
            lines += _section(f"## {section.name}", hints[section.name])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {DOC_PATH} instead of printing")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
