"""Evaluation: response-format prompts, metrics, the harness, result tables."""
