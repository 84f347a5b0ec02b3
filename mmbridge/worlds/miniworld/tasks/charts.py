"""Bar-chart questions: the tallest or shortest bar, the value of a label, the number of bars, comparisons."""

from __future__ import annotations

from mmbridge.worlds.miniworld.chart import BarChart, sample_chart
from mmbridge.worlds.miniworld.language import count_answers
from mmbridge.worlds.miniworld.questions import Question
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task

KINDS = ("tallest", "shortest", "value", "value", "bars", "compare")


def build_chart(world: World) -> Episode:
    """A 3–5 bar chart and one question about it."""
    chart = sample_chart(world)
    return Episode([chart], [chart_question(world, chart, world.choice(KINDS))])


def chart_question(world: World, chart: BarChart, kind: str) -> Question:
    """The question of ``kind``, answered from the chart's labels and values."""
    labels, values = chart.labels, chart.values
    if kind in ("tallest", "shortest"):
        position = values.index(max(values) if kind == "tallest" else min(values))
        text = world.choice((f"Which label has the {kind} bar?", f"Which category has the {kind} bar?"))
        return Question(text, "short", labels[position], [labels[position]])
    if kind == "value":
        position = world.integer(0, len(labels) - 1)
        label = labels[position]
        text = world.choice((f"What is the value of {label}?", f"How high is the bar for {label}?"))
        return Question(text, "short", str(values[position]), count_answers(values[position]))
    if kind == "bars":
        return Question("How many bars are in the chart?", "short", str(len(labels)), count_answers(len(labels)))
    first, second = world.sample(range(len(labels)), 2)
    answer = "yes" if values[first] > values[second] else "no"
    return Question(f"Is the bar for {labels[first]} taller than the bar for {labels[second]}?", "yesno",
                    answer, [answer])


TASKS = [Task("chart", "bar charts: tallest/shortest bar, value of a label, number of bars, comparisons",
              build_chart, compositional=False)]
