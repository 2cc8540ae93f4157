"""The config dataclasses are the one source of truth: docs/config.md is generated from their field
docstrings, every section (the adapter included) is built and coerced the same way, and bad values name
`section.key`."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from tunesmith import config_docs
from tunesmith.adapters.config import KINDS, AdapterTargets
from tunesmith.config import RunConfig, TrainingConfig, config_from_dict, dump_config, load_config
from tunesmith.errors import ConfigError

SECTION_CLASSES = [f.default_factory for f in dataclasses.fields(RunConfig) if f.name != "adapter"]
CONFIG_CLASSES = [*SECTION_CLASSES, AdapterTargets, *KINDS.values()]


def test_docs_config_md_is_generated_from_the_dataclasses():
    assert config_docs.DOC_PATH.read_text(encoding="utf-8") == config_docs.render(), (
        f"docs/config.md is out of date with the config dataclasses; run `{config_docs.COMMAND}`")


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = config_docs.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__}: give these fields a docstring (a string on the line after): {missing}"
    assert (cls.__doc__ or "").strip() and not cls.__doc__.startswith(cls.__name__ + "(")


def test_choices_are_read_from_the_registries(monkeypatch):
    import tunesmith.objectives as objectives
    monkeypatch.setattr(objectives, "objective_names", lambda: ("causal_lm", "my_new_objective"))
    assert "`my_new_objective`" in config_docs.render()
    cfg = load_config(None, ["data.train=a", "objective.type=my_new_objective"])
    assert cfg.objective.type == "my_new_objective"
    with pytest.raises(ConfigError, match=r"objective\.type: must be auto or one of causal_lm, my_new_objective; got 'sft'"):
        load_config(None, ["data.train=a", "objective.type=sft"])


def test_string_values_are_coerced_in_every_section_alike():
    cfg = load_config(None, ["data.train=a", "adapter.kind=lora", "adapter.r='16'", "adapter.dropout='0.1'",
                             "adapter.alpha=32", "training.batch_size='16'", "training.lr='2e-4'"])
    assert cfg.adapter.r == 16 and type(cfg.adapter.r) is int
    assert cfg.adapter.dropout == 0.1 and type(cfg.adapter.dropout) is float
    assert cfg.adapter.alpha == 32.0 and type(cfg.adapter.alpha) is float
    assert cfg.training.batch_size == 16 and type(cfg.training.batch_size) is int
    assert cfg.training.lr == 2e-4
    raw = config_from_dict({"data": {"train": "a"}, "adapter": {"kind": "bottleneck", "size": "4", "scale": "0.5",
                                                                "layers_to_transform": "1"}})
    assert (raw.adapter.size, raw.adapter.scale, raw.adapter.layers_to_transform) == (4, 0.5, [1])
    lora = config_from_dict({"data": {"train": "a"}, "adapter": {"rank_pattern": {"q_proj": "4"}}})
    assert lora.adapter.rank_pattern == {"q_proj": 4}


@pytest.mark.parametrize("override, message", [
    ("model.dtype=float8", r"model\.dtype: must be one of float32, bfloat16; got 'float8'"),
    ("adapter.r=many", r"adapter\.r: expected an integer, got 'many'"),
    ("adapter.r=0", r"adapter\.r: the LoRA rank must be a positive integer"),
    ("adapter.dropout=lots", r"adapter\.dropout: expected a number, got 'lots'"),
    ("adapter.kind=prefix", r"adapter\.kind: unknown adapter kind 'prefix'"),
    ("freeze.first_blocks=-1", r"freeze\.first_blocks: must be >= 0"),
    ("freeze.train_norms=maybe", r"freeze\.train_norms: expected true or false, got 'maybe'"),
    ("head.pooling=sum", r"head\.pooling: must be one of cls, mean, last, max; got 'sum'"),
    ("data.max_length=4", r"data\.max_length: must be at least 8 tokens"),
    ("data.format=xml", r"data\.format: must be one of auto, chat, .*; got 'xml'"),
    ("objective.type=x", r"objective\.type: must be auto or one of .*; got 'x'"),
    ("objective.label_smoothing=some", r"objective\.label_smoothing: expected a number"),
    ("training.lr=fast", r"training\.lr: expected a number, got 'fast'"),
    ("training.lr=-1", r"training\.lr: must be positive"),
    ("training.device=tpu", r"training\.device: must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    ("output.progress=perhaps", r"output\.progress: expected true or false"),
])
def test_a_bad_value_names_its_section_and_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=a", override])


def test_sections_check_themselves_when_built_in_python():
    with pytest.raises(ConfigError, match=r"training\.batch_size: must be at least 1"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"training\.epochs or training\.max_steps must be positive"):
        TrainingConfig(epochs=0)
    assert TrainingConfig(epochs=0, max_steps=5).max_steps == 5
    with pytest.raises(ConfigError, match=r"data\.train: give a training file"):
        config_from_dict({})


def test_an_adapter_that_is_not_a_mapping_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"adapter: expected null or a mapping like \{kind: lora, r: 8\}"):
        load_config(None, ["data.train=a", "adapter=lora"])


def test_saved_config_reloads_to_the_same_content():
    data = {"data": {"train": "a"}, "adapter": {"kind": "lora", "r": 4, "alpha": 8, "targets": ["q_proj"],
                                                "layers_to_transform": 1}, "training": {"lr": "1e-3", "epochs": 2}}
    cfg = config_from_dict(data)
    saved = yaml.safe_load(dump_config(cfg))
    assert saved["adapter"]["alpha"] == 8 and saved["adapter"]["kind"] == "lora"
    assert saved["training"]["lr"] == 1e-3 and saved["adapter"]["layers_to_transform"] == [1]
    assert dump_config(config_from_dict(saved)) == dump_config(cfg)
