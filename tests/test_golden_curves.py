"""The seeded loss curves of the BBC LoRA demo and the SmolLM2 chat SFT, step by step, equal the values
recorded from main before the objective interface (tests/golden_curves.py; tests/data/golden_curves.json).

Tolerance: 1e-5 relative. On the machine that recorded them they are bitwise equal; the margin only
absorbs float reduction order on other CPUs (a change of data order, masking or normalisation moves these
numbers by 1e-2 or more)."""
from __future__ import annotations

import json

import pytest

from golden_curves import GOLDEN, curve, runs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["bbc_lora", "smollm2_chat"])
def test_loss_curve_matches_recording(name, tmp_path):
    want = json.loads(GOLDEN.read_text())[name]
    args = runs(tmp_path)[name]
    got = curve(args[0], args[1:])
    assert [(r["event"], r["step"]) for r in got] == [(r["event"], r["step"]) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g, w)
        for k, v in w.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (name, w["event"], w["step"], k, g[k], v)
