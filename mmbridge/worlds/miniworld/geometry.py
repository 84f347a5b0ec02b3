"""Shape outlines, pixel boxes, 000–999 boxes and named regions of the canvas.

Outlines use integer vertices, so the pixels PIL fills lie inside the box computed here,
and a box in 000–999 coordinates always contains the object's pixels.
"""

from __future__ import annotations

import math

Point = tuple[int, int]
Box = list[int]  # [x0, y0, x1, y1], pixel coordinates, both ends included

STAR_INNER_RATIO = 0.45
CROSS_ARM_RATIO = 0.34
REGIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))


def shape_outline(shape: str, x: int, y: int, extent: int) -> list[Point]:
    """Integer polygon vertices of ``shape`` centred at ``(x, y)`` inside an ``extent``-pixel square.

    A circle is returned as its two box corners (draw it with ``ellipse``).
    """
    half = extent // 2
    left, top, right, bottom = x - half, y - half, x - half + extent - 1, y - half + extent - 1
    if shape in ("circle", "square"):
        return [(left, top), (right, bottom)]
    if shape == "triangle":
        return [(x, top), (right, bottom), (left, bottom)]
    if shape == "diamond":
        return [(x, top), (right, y), (x, bottom), (left, y)]
    if shape == "hexagon":
        return _regular_points(x, y, (right - left) / 2, 6, 0.0)
    if shape == "star":
        return _star_points(x, y, (right - left) / 2)
    if shape == "cross":
        return _cross_points(left, top, right, bottom, x, y)
    raise ValueError(f"unknown shape {shape!r}")


def _regular_points(x: int, y: int, radius: float, count: int, start_degrees: float) -> list[Point]:
    """Vertices of a regular polygon."""
    angles = [math.radians(start_degrees + 360.0 * step / count) for step in range(count)]
    return [(round(x + radius * math.cos(angle)), round(y + radius * math.sin(angle))) for angle in angles]


def _star_points(x: int, y: int, radius: float) -> list[Point]:
    """A five-pointed star, one point up."""
    points = []
    for step in range(10):
        angle = math.radians(-90.0 + 36.0 * step)
        reach = radius if step % 2 == 0 else radius * STAR_INNER_RATIO
        points.append((round(x + reach * math.cos(angle)), round(y + reach * math.sin(angle))))
    return points


def _cross_points(left: int, top: int, right: int, bottom: int, x: int, y: int) -> list[Point]:
    """A plus sign filling the square."""
    arm = max(1, round((right - left) * CROSS_ARM_RATIO / 2))
    return [(x - arm, top), (x + arm, top), (x + arm, y - arm), (right, y - arm), (right, y + arm),
            (x + arm, y + arm), (x + arm, bottom), (x - arm, bottom), (x - arm, y + arm), (left, y + arm),
            (left, y - arm), (x - arm, y - arm)]


def outline_box(points: list[Point]) -> Box:
    """The pixel box ``[x0, y0, x1, y1]`` (ends included) around outline vertices."""
    xs, ys = [point[0] for point in points], [point[1] for point in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def normalised_box(box: Box, width: int, height: int) -> list[int]:
    """A pixel box as integers in 000–999 that still contain every pixel of it (floor start, ceil end)."""
    x0 = math.floor(box[0] * 1000 / width)
    y0 = math.floor(box[1] * 1000 / height)
    x1 = math.ceil((box[2] + 1) * 1000 / width)
    y1 = math.ceil((box[3] + 1) * 1000 / height)
    return [max(0, min(999, value)) for value in (x0, y0, x1, y1)]


def pixel_box(box: list[int], width: int, height: int) -> list[float]:
    """A 000–999 box back in pixel coordinates (for checks and drawing)."""
    return [box[0] * width / 1000, box[1] * height / 1000, box[2] * width / 1000, box[3] * height / 1000]


def region_name(x: float, y: float, width: int, height: int) -> str:
    """Which ninth of the canvas a point lies in: "top left", "center", "bottom", …"""
    column = min(2, int(3 * x / width))
    row = min(2, int(3 * y / height))
    return REGIONS[row][column]


def boxes_apart(first: Box, second: Box, gap: int) -> bool:
    """Whether two pixel boxes are separated by at least ``gap`` pixels horizontally or vertically."""
    return (first[2] + gap < second[0] or second[2] + gap < first[0]
            or first[3] + gap < second[1] or second[3] + gap < first[1])
