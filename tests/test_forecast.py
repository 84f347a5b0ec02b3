"""The demo's forecast: measured speed after the first steps, when training and the job end, a warning if late."""

from __future__ import annotations

import torch

from mmbridge import forecast
from mmbridge.forecast import Forecast, StagePlan, describe_cpu, minutes


def _record(stage: str, step: int, steps: int, tokens_per_s: float) -> dict:
    return {"stage": stage, "step": step, "stage_steps": steps, "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / 100}


def test_forecast_measures_after_warmup_and_predicts_the_rest(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(forecast.time, "perf_counter", lambda: 130.0)
    plan = Forecast([StagePlan("align", 10_000), StagePlan("instruct", 20_000)], after_tokens=3_000, began=100.0,
                    budget_s=900, say=lines.append)
    speeds = [10, 10, 100, 100, 100, 100]  # two slow warm-up steps are not measured
    for step, speed in enumerate(speeds, start=1):
        plan(_record("align", step, 10, speed))
        assert bool(lines) == (step == len(speeds))
    # align has 4 of 10 steps left (4,000 tokens), instruct 20,000, then 3,000: 240 s + 30 s after 30 s elapsed
    assert plan.estimate_s == 300
    assert lines == ["speed: 1.0 samples/s, 100 tokens/s in stage 'align'; training ends in about 4 min 00 s, "
                     "the rest takes about 30 s: about 5 min 00 s in all"]
    plan(_record("align", 7, 10, 1))
    assert len(lines) == 1  # said once


def test_forecast_warns_when_the_cpu_is_too_slow_for_the_budget(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(forecast.time, "perf_counter", lambda: 0.0)
    plan = Forecast([StagePlan("instruct", 100_000)], after_tokens=0, began=0.0, budget_s=900, say=lines.append)
    for step in range(1, 7):
        plan(_record("instruct", step, 100, 50))
    assert len(lines) == 2 and lines[1].startswith("this CPU is slower than the 15 min 00 s this job is planned for")
    assert lines[1].endswith("expect about 31 min 20 s in all")  # 94,000 tokens left at 50 tokens/s


def test_describe_cpu_says_whether_bf16_is_native(monkeypatch):
    monkeypatch.setattr(forecast, "bf16_supported", lambda device: False)
    assert "bf16 not native: bf16 stages fall back to fp32" in describe_cpu()
    monkeypatch.setattr(forecast, "bf16_supported", lambda device: True)
    assert torch.backends.cpu.get_cpu_capability() in describe_cpu() and "bf16 native" in describe_cpu()


def test_minutes():
    assert minutes(59.6) == "1 min 00 s" and minutes(7) == "7 s" and minutes(-3) == "0 s" and minutes(754) == "12 min 34 s"


def test_each_llm_stage_gets_its_own_forecast(monkeypatch):
    """A LoRA stage runs fewer tokens/s than the bridge-only stage before it: its first steps re-forecast."""
    lines: list[str] = []
    clock = {"now": 130.0}
    monkeypatch.setattr(forecast.time, "perf_counter", lambda: clock["now"])
    plan = Forecast([StagePlan("ground", 0), StagePlan("align", 10_000), StagePlan("instruct", 20_000)],
                    after_tokens=3_000, began=100.0, budget_s=900, say=lines.append)
    plan({**_record("ground", 1, 5, 0.0)})  # runs no LLM layer: not measured
    for step in range(1, 7):
        plan(_record("align", step, 10, 100))
    assert plan.estimate_s == 300 and len(lines) == 1
    clock["now"] = 200.0
    for step in range(1, 7):
        plan(_record("instruct", step, 20, 50))  # 14 of 20 steps left: 14,000 tokens, then 3,000, at 50/s
    assert len(lines) == 2 and lines[1].startswith("speed: 0.5 samples/s, 50 tokens/s in stage 'instruct'")
    assert plan.estimate_s == 100 + 280 + 60
    plan(_record("instruct", 7, 20, 1))
    assert len(lines) == 2
