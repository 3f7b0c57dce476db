"""The recipe driver: stages in order on top of each other, evaluation of every variant, report and plot,
and a rerun that picks up finished work. Runs ``--quick`` on a tiny random Llama that uses SmolLM2's real
tokenizer (the stages need real text), so that every step is the real code path but fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mteb")
pytest.importorskip("matplotlib")

from llm2vec_fast import cli  # noqa: E402
from llm2vec_fast import mteb as l2v_mteb  # noqa: E402
from llm2vec_fast import recipe as recipe_module  # noqa: E402
from llm2vec_fast.recipe import (  # noqa: E402
    RESULTS_BEGIN,
    RESULTS_END,
    adapter_fingerprint,
    find_recipe,
    load_recipe,
    stage_inputs,
    stage_order,
    variants,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "training" / "recipes" / "smollm2_135m" / "recipe.json"


def available_stages() -> list[str]:
    """The stages whose trainer and SmolLM2 config exist in this checkout."""
    import importlib.util

    recipe = load_recipe(RECIPE)
    found = []
    for stage, spec in recipe["stages"].items():
        config = (RECIPE.parent / spec["config"]).resolve()
        if config.is_file() and importlib.util.find_spec(f"llm2vec_fast.training.{stage}") is not None:
            found.append(stage)
    return found


def run_cli(model: str, output: Path, report: Path, data: Path, stages: list[str], *extra: str) -> int:
    return cli.run(["recipe", str(RECIPE), "--quick", "--output", str(output), "--report-dir", str(report),
                     "--data-dir", str(data), "--stages", ",".join(stages), "--set", f"model={model}", *extra])


def test_recipe_file_and_overrides():
    assert find_recipe("smollm2-135m", RECIPE.parent.parent).resolve() == RECIPE.resolve()
    recipe = load_recipe(RECIPE, quick=True, overrides={"stages.mntp.set.max_steps": 7, "eval.batch_size": 4})
    assert recipe["stages"]["mntp"]["set"]["max_steps"] == 7
    assert recipe["stages"]["mntp"]["set"]["block_size"] == 32  # from the quick section
    assert recipe["eval"]["batch_size"] == 4 and recipe["quick"] is True
    assert load_recipe(RECIPE)["stages"]["mntp"]["set"]["block_size"] == 128
    assert [v["name"] for v in variants(recipe)] == ["causal", "bidirectional", *recipe["stages"]]
    assert variants(recipe)[0]["bidirectional"] is False
    if "supervised" in recipe["stages"]:
        assert stage_inputs(recipe, "supervised") == ["mntp"]  # the paper's order: supervised on MNTP only
        assert variants(recipe)[-1]["label"] == "+ MNTP + supervised"
    bad = load_recipe(RECIPE)
    bad["stages"]["mntp"]["on_top_of"] = ["supervised"]
    with pytest.raises(ValueError, match="cannot build on"):
        stage_inputs(bad, "mntp")
    with pytest.raises(FileNotFoundError, match="no recipe"):
        find_recipe("no-such-recipe")


@pytest.mark.slow  # runs the recipe's stages as processes
def test_quick_recipe_end_to_end_and_resume(tiny_smol, shared_data, tmp_path, monkeypatch):
    stages = available_stages()
    if "mntp" not in stages:
        pytest.skip("the MNTP stage is not in this checkout")
    output, report = tmp_path / "run", tmp_path / "report"

    # A crash in the first training stage: the baselines are evaluated and reported, the stage is not marked.
    # Only the recipe's own stage launcher is replaced: subprocess.run stays real for everything else in this
    # process (matplotlib's first import runs fc-list through it on a machine without a font cache).
    real_run = recipe_module.run_stage_process

    def crash(command):
        return 3

    monkeypatch.setattr(recipe_module, "run_stage_process", crash)
    with pytest.raises(RuntimeError, match="stage mntp failed"):
        run_cli(tiny_smol, output, report, shared_data, stages)
    partial = (report / "RESULTS.md").read_text()
    assert "causal base" in partial and "+ MNTP" not in partial
    assert not (output / "mntp" / "recipe_stage.json").exists()

    # The rerun trains the stages for real (in order, each on top of the earlier ones) and reuses the baselines.
    launched = []

    def record(command):
        launched.append(command)
        return real_run(command)

    monkeypatch.setattr(recipe_module, "run_stage_process", record)
    evaluated = []
    real_load = l2v_mteb.load_encoder

    def load(model, **kwargs):
        evaluated.append(kwargs)
        return real_load(model, **kwargs)

    monkeypatch.setattr(l2v_mteb, "load_encoder", load)
    assert run_cli(tiny_smol, output, report, shared_data, stages) == 0
    assert [c[c.index("train") + 1] for c in launched] == stages
    assert len(evaluated) == len(stages)  # the two baselines were not evaluated again
    assert evaluated[0]["adapters"] == [str(output / "mntp")]
    quick_recipe = load_recipe(RECIPE, quick=True)
    for stage in stages:
        marker = json.loads((output / stage / "recipe_stage.json").read_text())
        on_top_of = [s for s in stage_inputs(quick_recipe, stage) if s in stages]
        assert marker["settings"]["merge_adapters"] == [str(output / s) for s in on_top_of]
        assert (output / stage / "adapter_config.json").is_file()

    text = (report / "RESULTS.md").read_text()
    assert "SMOKE TEST" in text and text.count(RESULTS_BEGIN) == 1 and text.count(RESULTS_END) == 1
    rows = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line]
    stored = {v["name"]: json.loads((output / "eval" / f"{v['name']}.json").read_text())["results"]
              for v in variants(load_recipe(RECIPE, quick=True)) if v["name"] in ["causal", "bidirectional", *stages]}
    causal_row = next(r for r in rows if r.startswith("| causal base"))
    expected = f"{100 * stored['causal']['STSBenchmark']['main_score']:.1f}"
    assert causal_row.split("|")[2].strip() == expected
    assert (report / "recipe_smollm2_135m_quick.png").stat().st_size > 1000
    assert (output / "eval" / "causal" / "STSBenchmark__dev.json").is_file()

    # A third run does nothing but rewrite the report; the text outside the markers is kept.
    (report / "RESULTS.md").write_text("# Results\n\nnotes kept\n\n" + text[text.index(RESULTS_BEGIN):] + "\nmore\n")
    monkeypatch.setattr(recipe_module, "run_stage_process", crash)
    monkeypatch.setattr(l2v_mteb, "load_encoder", lambda *a, **k: pytest.fail("nothing should be re-evaluated"))
    assert run_cli(tiny_smol, output, report, shared_data, stages) == 0
    again = (report / "RESULTS.md").read_text()
    assert again.startswith("# Results\n\nnotes kept") and again.rstrip().endswith("more")
    assert again.count(RESULTS_BEGIN) == 1

    # Changed stage settings on the same output folder are refused instead of silently mixed.
    with pytest.raises(RuntimeError, match="other settings"):
        run_cli(tiny_smol, output, report, shared_data, stages, "--set", "stages.mntp.set.max_steps=3")

    # A retrained earlier stage (here: mntp's adapter rewritten) is noticed by content, not by path: its
    # evaluation is redone, and the stage trained on top of the old adapter is refused as stale.
    config_file = output / "mntp" / "adapter_config.json"
    config_file.write_text(config_file.read_text() + "\n")
    redone = []
    monkeypatch.setattr(l2v_mteb, "load_encoder", lambda model, **kwargs: redone.append(kwargs) or real_load(
        model, **kwargs))
    if len(stages) > 1:
        with pytest.raises(RuntimeError, match="made_from"):
            run_cli(tiny_smol, output, report, shared_data, stages)
    else:
        assert run_cli(tiny_smol, output, report, shared_data, stages) == 0
    assert [kwargs["adapters"] for kwargs in redone] == [[str(output / "mntp")]]


def test_committed_adapters_are_those_of_the_recipe_as_it_stands(tmp_path):
    """The adapters in training/recipes/smollm2_135m/adapters (docs/RESULTS.md's run) were trained with the
    settings this recipe and these config files give (compared as settings, so that a reformatted or
    converted config file still matches, an edited value does not), each on top of the committed adapters of
    its inputs: editing either without rerunning the recipe fails here. They were trained in float32 and are
    stored cast to float16 (scripts/cast_adapters_fp16.py): each marker's ``stored_as`` holds the digest of the
    file as trained and as stored, so the chain runs from the committed files back to the digests training
    recorded."""
    from llm2vec_fast.recipe import stage_command
    from llm2vec_fast.training.arguments import resolved_settings

    from safetensors import safe_open

    adapters = RECIPE.parent / "adapters"
    recipe = load_recipe(RECIPE)
    markers = {s: json.loads((adapters / s / "recipe_stage.json").read_text()) for s in stage_order(recipe)}

    def as_trained(stage: str) -> str:
        stored = markers[stage].get("stored_as")
        current = adapter_fingerprint(adapters / stage)
        if stored is None:
            return current
        assert current == stored["sha256"], f"{stage}: the committed adapter is not the one its marker records"
        with safe_open(str(adapters / stage / "adapter_model.safetensors"), "pt") as weights:
            assert {str(weights.get_slice(k).get_dtype()) for k in weights.keys()} == {"F16"}, stage
        return stored["trained_sha256"]

    for stage in stage_order(recipe):
        made_from = markers[stage]["settings"]
        assert made_from["made_from"]["merged_adapters"] == {s: as_trained(s) for s in stage_inputs(recipe, stage)}
        as_trained(stage)
        # What the recipe runs now, and what the adapter's own record says it was trained with.
        _, runs = stage_command(recipe, stage, tmp_path, {"data_dir": "/data", "output": str(tmp_path),
                                                          "recipe_dir": str(RECIPE.parent)})
        now = {key: value for key, value in runs["made_from"]["settings"].items()
               if key not in ("output_dir", "merge_adapters", "train_files")}  # paths of the training machine
        trained = json.loads((adapters / stage / f"{stage}_settings.json").read_text())
        assert now["seed"] == recipe["seed"] and len(now) > 15
        assert {key: value for key, value in resolved_settings(stage, trained).items() if key in now} == now, stage


@pytest.mark.slow
def test_committed_supervised_adapters_encode_meaningfully(smollm2_path):
    from llm2vec_fast import LLM2Vec

    adapters = RECIPE.parent / "adapters"
    model = LLM2Vec.from_pretrained(smollm2_path, [str(adapters / "mntp"), str(adapters / "supervised")],
                                    merge_peft=True, pooling_mode="mean", max_length=128, attention_impl="torch")
    instruction = "Retrieve semantically similar text"
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    embeddings = model.encode([[instruction, t] for t in texts], convert_to_tensor=True, convert_to_numpy=False,
                              normalize_embeddings=True)
    similar, unrelated = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    assert similar > unrelated + 0.2, (similar, unrelated)


def test_the_recipe_needs_no_source_checkout(tmp_path, monkeypatch):
    """From an installed package (here: a working directory without training/), a recipe is a path or a name
    under --recipes-dir / $LLM2VEC_FAST_RECIPES, and the report goes under the output folder, never into docs/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(recipe_module.RECIPES_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--recipes-dir"):
        find_recipe("smollm2-135m")
    assert find_recipe("smollm2-135m", RECIPE.parent.parent) == RECIPE
    monkeypatch.setenv(recipe_module.RECIPES_DIR_ENV, str(RECIPE.parent.parent))
    assert find_recipe("smollm2-135m") == RECIPE

    called = {}
    monkeypatch.setattr(recipe_module, "run_recipe",
                        lambda recipe, output, data_dir, report_dir, **kw: called.update(report_dir=report_dir))
    assert cli.run(["recipe", "smollm2-135m", "--output", "run", "--data-dir", str(tmp_path)]) == 0
    assert called["report_dir"] == Path("run") / "report"


def _fake_training(command):
    """A stage 'trained' instantly: the adapter files the recipe checks for."""
    out = Path(command[command.index("--output_dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    return 0


def test_a_truncated_or_interrupted_stage_marker_means_not_done(tmp_path, monkeypatch):
    import llm2vec_fast.files as files

    recipe = load_recipe(RECIPE)
    stage = stage_order(recipe)[0]
    context = {"data_dir": str(tmp_path), "output": str(tmp_path), "recipe_dir": str(RECIPE.parent)}
    launched = []
    monkeypatch.setattr(recipe_module, "run_stage_process", lambda c: launched.append(c) or _fake_training(c))

    # A marker cut short (as the old non-atomic write could leave it): the stage is trained again, not a crash.
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "recipe_stage.json").write_text('{"stage": "mn')
    marker = recipe_module.run_stage(recipe, stage, tmp_path, context)
    assert len(launched) == 1 and json.loads((tmp_path / stage / "recipe_stage.json").read_text()) == marker
    assert not list((tmp_path / stage).glob("*.tmp"))
    recipe_module.run_stage(recipe, stage, tmp_path, context)
    assert len(launched) == 1  # now done

    # A crash between writing the marker and renaming it into place leaves no marker at all, never half of one.
    other = tmp_path / "other"

    def crash(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="killed before the rename"):
        recipe_module.run_stage(recipe, stage, other, {**context, "output": str(other)})
    assert not (other / stage / "recipe_stage.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(recipe_module, "run_stage_process", lambda c: launched.append(c) or _fake_training(c))
    recipe_module.run_stage(recipe, stage, other, {**context, "output": str(other)})
    assert len(launched) == 3 and (other / stage / "recipe_stage.json").is_file()
