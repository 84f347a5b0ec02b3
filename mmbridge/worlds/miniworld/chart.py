"""Bar charts: labelled bars with integer values, their layout and their drawing.

A :class:`BarChart` is the symbolic description of a chart image (labels, values,
colours, axis, whether values are printed above the bars); its bar boxes are computed
from it, so the drawn chart and the stored answers agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

from mmbridge.worlds.miniworld.fonts import available_fonts, load_font
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.vocabulary import BACKGROUNDS, CHART_LABELS, COLOURS

AXIS_MAX = 10
TICK_STEP = 2
AXIS_COLOUR = (30, 30, 30)
GRID_COLOUR = (200, 200, 200)
MARGINS = {"left": 28, "right": 8, "top": 16, "bottom": 22}


@dataclass
class BarChart:
    """A vertical bar chart on a ``width`` × ``height`` canvas."""

    width: int
    height: int
    background: str
    labels: list[str]
    values: list[int]
    colours: list[str]
    show_values: bool
    font: str
    font_size: int

    @property
    def plot_box(self) -> tuple[int, int, int, int]:
        """Pixel box of the plotting area (the axes' corner is its bottom left)."""
        return (MARGINS["left"], MARGINS["top"], self.width - MARGINS["right"], self.height - MARGINS["bottom"])

    def value_y(self, value: float) -> int:
        """The pixel row of ``value`` on the vertical axis."""
        left, top, right, bottom = self.plot_box
        return round(bottom - value / AXIS_MAX * (bottom - top))

    def bar_boxes(self) -> list[list[int]]:
        """Pixel box of every bar, in label order."""
        left, top, right, bottom = self.plot_box
        slot = (right - left) / len(self.labels)
        boxes = []
        for position, value in enumerate(self.values):
            centre = left + slot * (position + 0.5)
            half = slot * 0.3
            boxes.append([round(centre - half), self.value_y(value), round(centre + half), bottom - 1])
        return boxes

    def to_dict(self) -> dict:
        return {"kind": "bar_chart", "width": self.width, "height": self.height, "background": self.background,
                "labels": self.labels, "values": self.values, "colours": self.colours,
                "show_values": self.show_values, "font": self.font, "font_size": self.font_size,
                "axis_max": AXIS_MAX, "tick_step": TICK_STEP, "bar_boxes": self.bar_boxes()}


def sample_chart(world: World, width: int = 224, height: int = 224) -> BarChart:
    """3–5 bars with distinct labels and values in 1–9; the tallest and the shortest bars are unique."""
    count = world.integer(3, 5)
    values = [world.integer(1, 9) for _ in range(count)]
    while values.count(max(values)) > 1 or values.count(min(values)) > 1:
        values = [world.integer(1, 9) for _ in range(count)]
    colours = world.sample(list(COLOURS), count) if world.chance(0.5) else [world.choice(list(COLOURS))] * count
    return BarChart(width, height, world.choice(["white", "cream", "light gray"]), world.sample(CHART_LABELS, count),
                    values, colours, world.chance(0.5), world.choice(available_fonts()), world.integer(10, 12))


def render_chart(chart: BarChart) -> Image.Image:
    """Grid, bars, axes, tick numbers, labels under the bars and (optionally) values above them."""
    image = Image.new("RGB", (chart.width, chart.height), BACKGROUNDS[chart.background])
    draw = ImageDraw.Draw(image)
    font = load_font(chart.font, chart.font_size)
    left, top, right, bottom = chart.plot_box
    for tick in range(0, AXIS_MAX + 1, TICK_STEP):
        row = chart.value_y(tick)
        if tick:
            draw.line([(left, row), (right, row)], fill=GRID_COLOUR)
        draw.text((left - 4, row), str(tick), font=font, fill=AXIS_COLOUR, anchor="rm")
    for box, label, value, colour in zip(chart.bar_boxes(), chart.labels, chart.values, chart.colours):
        draw.rectangle(box, fill=COLOURS[colour])
        centre = (box[0] + box[2]) / 2
        draw.text((centre, bottom + 4), label, font=font, fill=AXIS_COLOUR, anchor="mt")
        if chart.show_values:
            draw.text((centre, box[1] - 2), str(value), font=font, fill=AXIS_COLOUR, anchor="mb")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS_COLOUR, width=1)
    return image
