"""Regression tests for review findings that have no closer home (the divergence message of the loop)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest


def test_divergence_message_claims_a_checkpoint_only_when_one_exists(tmp_path):
    """The message said "the last checkpoint in .../checkpoints is intact" also before any was saved."""
    from tunesmith.train.loop import TrainingDiverged, apply_step
    run = SimpleNamespace(cfg=SimpleNamespace(training=SimpleNamespace(lr=1e-3)), state=SimpleNamespace(step=3),
                          run_dir=tmp_path)
    with pytest.raises(TrainingDiverged) as e:
        apply_step(run, float("nan"), 4, None, 4, {}, 0.0)
    assert "at step 4: training diverged" in str(e.value)
    assert str(e.value).endswith("no checkpoint was saved yet, so there is nothing to resume from")
    for step in (2, 10):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step}" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-12").mkdir()  # half written (no state.json): not a checkpoint
    with pytest.raises(TrainingDiverged) as e:
        apply_step(run, float("inf"), 4, None, 4, {}, 0.0)
    assert str(e.value).endswith(f"the last checkpoint, {tmp_path / 'checkpoints' / 'step-10'}, is intact")
