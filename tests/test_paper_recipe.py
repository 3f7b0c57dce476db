"""The GPU recipe with the paper's budgets (training/recipes/smollm2_135m_paper): its budgets, the wall-clock
guard that stops a stage cleanly, and a CPU dry run of the whole recipe on a tiny model (``--quick``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2vec_fast.recipe import load_recipe
from llm2vec_fast.training.arguments import parse_stage_arguments
from llm2vec_fast.training.trainer import WallClockGuard

PAPER = Path(__file__).resolve().parent.parent / "training" / "recipes" / "smollm2_135m_paper" / "recipe.json"


def test_the_paper_recipe_keeps_the_papers_steps_and_batches_within_the_wall_clock():
    stages = load_recipe(PAPER)["stages"]
    mntp, simcse, supervised = (stages[s]["set"] for s in ("mntp", "simcse", "supervised"))
    assert (mntp["max_steps"], mntp["per_device_train_batch_size"], mntp["block_size"], mntp["learning_rate"]) == \
        (1000, 32, 512, 5e-5)
    assert (simcse["max_steps"], simcse["per_device_train_batch_size"], simcse["learning_rate"],
            simcse["attention_dropout"]) == (1000, 128, 3e-5, 0.3)
    assert (supervised["max_steps"], supervised["per_device_train_batch_size"], supervised["chunk_size"],
            supervised["learning_rate"], supervised["warmup_steps"]) == (1000, 512, 64, 2e-4, 300)
    assert all(s["dtype"] == "bfloat16" and s["attention_impl"] == "auto" for s in (mntp, simcse, supervised))
    # The guards leave at least 1.5 of the ~8 minutes for loading, merging and the evaluation.
    assert sum(s["max_wall_seconds"] for s in (mntp, simcse, supervised)) <= 420
    assert stages["supervised"]["on_top_of"] == ["mntp"]


class _State:
    def __init__(self, step, max_steps):
        self.global_step, self.max_steps = step, max_steps


def test_wall_clock_guard_stops_after_the_step_that_passes_the_limit(monkeypatch):
    from transformers import TrainerControl

    from llm2vec_fast.training import trainer as trainer_module

    now = [100.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: now[0])
    guard = WallClockGuard(10)
    guard.on_train_begin(None, _State(0, 5), TrainerControl())
    control = TrainerControl()
    now[0] = 109.9
    guard.on_step_end(None, _State(1, 5), control)
    assert not control.should_training_stop and guard.stopped_at is None
    now[0] = 110.0
    guard.on_step_end(None, _State(2, 5), control)
    assert control.should_training_stop and guard.stopped_at == 2
    done = TrainerControl()  # the last step is not "stopped early" whatever the clock says
    guard.stopped_at = None
    guard.on_step_end(None, _State(5, 5), done)
    assert not done.should_training_stop and guard.stopped_at is None


@pytest.mark.parametrize("stage", ["mntp", "supervised"])
@pytest.mark.parametrize("seconds", [0, -5])
def test_a_non_positive_wall_clock_is_refused(stage, seconds, tmp_path):
    with pytest.raises(ValueError, match="max_wall_seconds must be a positive number"):
        parse_stage_arguments(stage, {"model_name_or_path": "smollm2-135m", "output_dir": str(tmp_path),
                                      "train_files": ["x.txt"], "max_wall_seconds": seconds})


@pytest.mark.slow
def test_paper_recipe_dry_run_on_the_cpu(tiny_smol, shared_data, tmp_path):
    """All three stages and the evaluation, tiny budgets (the recipe's ``quick`` section) on a tiny model in fp32
    on the PyTorch paths; MNTP's guard is set to stop it after its first of 3 steps, and the marker and the
    report say so. The other stages finish their steps."""
    pytest.importorskip("mteb")
    pytest.importorskip("matplotlib")
    from llm2vec_fast import cli

    output, report = tmp_path / "run", tmp_path / "report"
    code = cli.run(["recipe", str(PAPER), "--quick", "--output", str(output), "--report-dir", str(report),
                    "--data-dir", str(shared_data), "--threads", "1", "--set", f"model={tiny_smol}"])
    assert code == 0
    progress = {stage: json.loads((output / stage / "recipe_stage.json").read_text())["progress"]
                for stage in ("mntp", "simcse", "supervised")}
    assert progress["mntp"]["steps_done"] == 1 and progress["mntp"]["steps_planned"] == 3
    assert progress["mntp"]["stopped_by_wall_clock"] is True
    for stage in ("simcse", "supervised"):
        assert (progress[stage]["steps_done"], progress[stage]["steps_planned"]) == (2, 2)
        assert progress[stage]["stopped_by_wall_clock"] is False and progress[stage]["max_wall_seconds"] > 0
    assert all((output / stage / "adapter_config.json").is_file() for stage in progress)
    text = (report / "RESULTS.md").read_text()
    assert "| mntp | base |" in text and "1 of 3 (stopped by max_wall_seconds)" in text
    assert "+ MNTP + supervised" in text and "SMOKE TEST" in text
