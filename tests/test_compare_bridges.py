"""benchmarks/compare_bridges.py end to end on tiny random backbones: every bridge, one table, resume."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

from mmbridge.testing import tiny_model_config, tiny_tokenizer

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compare_bridges.py")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_bridges", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tokenizer = tiny_tokenizer(str(root / "tokenizer"))
    model = tiny_model_config(str(root / "tokenizer"), len(tokenizer) + 1)
    recipe = {"model": model, "processor": {"max_length": 512}, "stages": [], "seed": 0}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return root, str(path)


def test_every_bridge_trains_at_the_same_budget_and_lands_in_one_table(compare, tiny_recipe, monkeypatch):
    root, recipe = tiny_recipe
    results = root / "RESULTS.md"
    results.write_text("# Results\n\nearlier text stays\n")
    out = root / "runs"
    argv = ["--recipe", recipe, "--align-n", "8", "--instruct-n", "8", "--batch-size", "4", "--eval-n", "4",
            "--tasks", "attribute", "existence", "--out", str(out), "--results", str(results), "--no-progress"]
    assert compare.main(argv) == 0

    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in compare.BRIDGES}
    tokens = {name: summary["visual_tokens"] for name, summary in summaries.items()}
    # tiny CLIP: 16x16 image, 4x4 patches → 16 tokens; pool 2x2 → 4; the query bridges → QUERIES
    assert tokens == {"mlp": 16, "pooled_mlp": 4, "perceiver": compare.QUERIES, "qformer": compare.QUERIES,
                      "qwen_resampler": compare.QUERIES, "visual_expert": 16, "mma": 16, "moe": 16,
                      "gated_xattn": 1}  # one <image> token; its latents are read by cross-attention
    for name, summary in summaries.items():
        assert summary["steps"] == 4, name  # 8 + 8 samples at batch 4: the same steps for every bridge
        assert summary["trainable_parameters"] > 0
        assert set(summary["accuracy"]) == {"attribute", "attribute:compositional", "existence"}
        assert summary["samples_per_s"]["align"] > 0 and summary["samples_per_s"]["instruct"] > 0
        assert summary["lr"] == {"align": compare.BRIDGES[name][1], "instruct": compare.BRIDGES[name][2]}
    assert summaries["qformer"]["trainable_parameters"] > summaries["mlp"]["trainable_parameters"]
    # the frozen LLM answers text as before through an input-token bridge, and through a visual expert by
    # construction (text positions never reach an expert); MoE's active count leaves out idle experts
    assert summaries["mlp"]["text_kept"] == summaries["visual_expert"]["text_kept"] == len(compare.TEXT_QUESTIONS)
    for name, summary in summaries.items():
        idle = summary["total_parameters"] - summary["active_parameters"]
        assert (idle > 0) == (name in ("visual_expert", "moe")), name

    text = results.read_text()
    assert "earlier text stays" in text
    section = text[text.index(compare.MARK_BEGIN):text.index(compare.MARK_END)]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == [*compare.BRIDGES, "*blind (no image)*"]
    assert "--instruct-n 8" in section and "bridge only" in section

    # a second run reads every finished bridge back instead of training again, and replaces the section
    def no_training(*args, **kwargs):
        raise AssertionError("a finished bridge was trained again")

    monkeypatch.setattr("mmbridge.train.train", no_training)
    assert compare.main(argv) == 0
    again = results.read_text()
    assert again.count(compare.MARK_BEGIN) == 1 and again.count(compare.MARK_END) == 1
    assert again.replace(again[again.index("Machine:"):again.index("Budget:")], "") == \
        text.replace(text[text.index("Machine:"):text.index("Budget:")], "")

    # another budget in the same --out is refused, naming the file, instead of reusing stale rows
    with pytest.raises(SystemExit, match="mlp/summary.json was written with other settings"):
        compare.main([*argv[:2], "--align-n", "16", *argv[4:]])


def test_the_llm_stays_frozen_and_stages_match_across_bridges(compare, tiny_recipe):
    root, recipe = tiny_recipe
    from mmbridge.config import load_run_config
    from mmbridge.train.recipe import stage_from_dict

    base = load_run_config(recipe)
    runs = [compare.comparison_run(base, name, str(root / "x"), 96, 160, 8) for name in compare.BRIDGES]
    for run in runs:
        stages = [stage_from_dict(stage) for stage in run.stages]
        assert [stage.name for stage in stages] == ["align", "instruct"]
        assert all(stage.spec("llm").mode == "frozen" and stage.spec("vision").mode == "frozen" for stage in stages)
        assert all(stage.spec("bridge").mode == "full" for stage in stages)
        assert run.model["vision"] == base.model["vision"] and run.model["llm"] == base.model["llm"]
    budgets = {json.dumps([{key: stage[key] for key in ("data", "batch_size", "epochs", "precision")}
                           for stage in run.stages]) for run in runs}
    assert len(budgets) == 1  # the same data, batch, epochs and precision for every bridge


def test_attribute_breakdown_splits_by_kind_and_object_count(make_model, monkeypatch):
    spec = importlib.util.spec_from_file_location("attribute_breakdown", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "attribute_breakdown.py"))
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    assert breakdown.question_kind("How big is the star: small or large?", "large") == "size"
    assert breakdown.question_kind("What is the colour of the large object?", "red") == "colour"
    assert breakdown.question_kind("Which shape is the small object?", "star") == "shape"

    from mmbridge.worlds.miniworld import make_record

    records = [make_record("attribute", "test", index) for index in range(12)]
    golds = [record["conversations"][1]["value"] for record in records]
    answers = [gold if index % 3 else "wrong" for index, gold in enumerate(golds)]  # 8 of 12 right
    monkeypatch.setattr(breakdown, "generate_answers", lambda model, prompts, max_new_tokens: answers)
    counts = breakdown.breakdown(make_model(), 12)
    assert sum(asked for _, asked in counts.values()) == 12 and sum(right for right, _ in counts.values()) == 8
    for index, record in enumerate(records):
        key = (breakdown.question_kind(record["conversations"][0]["value"], golds[index]),
               len(record["scene"]["objects"]))
        assert key in counts


def test_instruct_tasks_shots_and_a_named_section(compare, tiny_recipe):
    root, recipe = tiny_recipe
    results = root / "RESULTS-flamingo.md"
    out = root / "flamingo"
    argv = ["--recipe", recipe, "--bridges", "mlp", "gated_xattn", "--align-n", "4", "--instruct-n", "4",
            "--batch-size", "2", "--eval-n", "2", "--tasks", "attribute", "video", "--instruct-tasks",
            "attribute_drill", "video", "--shots", "1", "--max-length", "600", "--section", "flamingo",
            "--out", str(out), "--results", str(results), "--no-progress"]
    assert compare.main(argv) == 0
    summary = json.loads((out / "gated_xattn" / "summary.json").read_text())
    stages = summary["settings"]["run"]["stages"]
    assert [source["miniworld"]["task"] for source in stages[1]["data"]["sources"]] == ["attribute_drill", "video"]
    assert [source["miniworld"]["n"] for source in stages[1]["data"]["sources"]] == [2, 2]
    assert summary["settings"]["run"]["processor"]["max_length"] == 600
    assert set(summary["accuracy"]) == {"attribute", "attribute:compositional", "video", "attribute (1-shot)",
                                        "attribute:compositional (1-shot)"}
    text = results.read_text()
    begin, end = compare.markers("flamingo")
    section = text[text.index(begin):text.index(end)]
    header = [line for line in section.splitlines() if line.startswith("| bridge")][0]
    assert "attribute (1-shot)" in header and "video" in header
    assert "| *blind (no image)* |" in section and "attribute_drill + video" in section
