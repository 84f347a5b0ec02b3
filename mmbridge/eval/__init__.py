"""Evaluation: response-format prompts, metrics, task specs and suites, the harness, result tables.

Metrics and tasks are plain Python and import eagerly; the harness (which imports the
model, data and generation code) loads on first use, so data code that imports
:mod:`mmbridge.eval.prompts` never closes an import cycle through it.
"""

from __future__ import annotations

from typing import Any

from mmbridge.eval.metrics import (accepted_answer_match, bleu, box_iou, cider_d, circular_accuracy,
                                   grounding_metrics, normalize_answer, parse_box, parse_choice_letter, parse_yes_no,
                                   pope_metrics, rotate_choices, vqa_accuracy)
from mmbridge.eval.tasks import FORMAT_SETTINGS, SUITES, Suite, TaskSpec, get_suite

_HARNESS_NAMES = ("evaluate", "run_suite", "load_samples", "save_results", "load_results", "results_table",
                  "compare_table", "generate_answers", "continuation_log_likelihoods")


def __getattr__(name: str) -> Any:
    """Harness functions, imported on first access."""
    if name in _HARNESS_NAMES:
        from mmbridge.eval import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'mmbridge.eval' has no attribute {name!r}")


__all__ = ["normalize_answer", "vqa_accuracy", "accepted_answer_match", "parse_yes_no", "pope_metrics",
           "parse_choice_letter", "rotate_choices", "circular_accuracy", "parse_box", "box_iou", "grounding_metrics",
           "cider_d", "bleu", "FORMAT_SETTINGS", "SUITES", "Suite", "TaskSpec", "get_suite", *_HARNESS_NAMES]
