"""The demo's report: headline table and target lines computed from a results document."""

from __future__ import annotations

import pytest

from mmbridge.demo import headline_table, target_lines


def _results(attribute: float, attribute_blind: float, existence: float, existence_blind: float) -> dict:
    return {"tasks": {"attribute": {"accuracy": attribute, "n": 10},
                      "existence": {"accuracy": existence, "f1": 0.5, "yes_ratio": 0.4, "n": 10}},
            "blind_tasks": {"attribute": {"accuracy": attribute_blind, "n": 10},
                            "existence": {"accuracy": existence_blind, "f1": 0.0, "yes_ratio": 1.0, "n": 10}}}


def test_headline_table_shows_image_blind_and_gain():
    table = headline_table(_results(0.85, 0.1, 0.9, 0.5))
    assert "| attribute | accuracy | 85.0% | 10.0% | +75.0 |" in table
    assert "| existence | yes_ratio | 40.0% | 100.0% | -60.0 |" in table


def test_target_lines_report_met_and_missed_targets():
    met = target_lines(_results(0.85, 0.1, 0.9, 0.5))
    assert met[0].endswith("met") and "NOT" not in " ".join(met)
    missed = target_lines(_results(0.6, 0.4, 0.7, 0.5))
    assert "NOT met" in missed[0] and "+20.0 points" in missed[1] and "NOT met" in missed[2]


def test_main_exits_0_after_a_finished_run(monkeypatch, tmp_path):
    """`make demo` is `python -m mmbridge.demo`: a run that finishes must exit 0 (main once returned the summary
    dict, which sys.exit reports as failure)."""
    import mmbridge.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_miniworld", lambda out, recipe, n, overrides: calls.append((out, n)) or {})
    assert demo.main(["--out", str(tmp_path), "--n", "5", "--size", "full"]) == 0
    assert calls == [(str(tmp_path), 5)]


@pytest.mark.parametrize("native, size", [(True, "full"), (False, "fp32")])
def test_the_demo_sizes_itself_by_whether_bf16_is_native(monkeypatch, tmp_path, capsys, native, size):
    import mmbridge.demo as demo
    import mmbridge.train.precision as precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device: native)
    calls = []
    monkeypatch.setattr(demo, "run_miniworld", lambda out, recipe, n, overrides: calls.append(overrides) or {})
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert calls == [demo.SIZES[size]]
    said = capsys.readouterr().out
    assert ("align 1,000 → 800 samples, instruct 640 → 448 samples" in said) == (size == "fp32"), said


def test_sizes_change_only_sample_counts_of_the_shipped_recipe():
    from mmbridge.config import load_run_config
    from mmbridge.demo import RECIPE, SIZES, size_changes

    full, small = load_run_config(RECIPE), load_run_config(RECIPE, list(SIZES["fp32"]))
    assert [stage["name"] for stage in full.stages] == [stage["name"] for stage in small.stages]
    assert size_changes(RECIPE, SIZES["fp32"]) == "align 1,000 → 800 samples, instruct 640 → 448 samples"
    assert size_changes(RECIPE, SIZES["full"]) == ""


def test_size_is_refused_with_another_recipe(tmp_path, capsys):
    from mmbridge.demo import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: []\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--recipe", str(recipe), "--size", "fp32"])
    assert stopped.value.code == 2 and "--size sizes the default recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["--recipe", str(tmp_path / "missing.yaml")])
    assert stopped.value.code == 2 and f"recipe {tmp_path / 'missing.yaml'} not found" in capsys.readouterr().err


def test_stage_summary_reads_the_last_ten_steps_word_accuracy():
    from mmbridge.demo import stage_summaries

    history = [{"stage": "ground", "loss": 2.0, "samples_per_s": 50.0, "tokens_per_s": 0.0, "seconds": 0.2,
                "word_accuracy": {"colour": step / 20, "shape": 0.5}} for step in range(20)]
    history += [{"stage": "instruct", "loss": 1.0, "samples_per_s": 4.0, "tokens_per_s": 800.0, "seconds": 2.0}]
    summary = stage_summaries(history)
    assert summary["ground"]["word_accuracy"] == {"colour": sum(range(10, 20)) / 10 / 20, "shape": 0.5}
    assert "word_accuracy" not in summary["instruct"] and summary["ground"]["steps"] == 20
