"""Drawing scenes with PIL: background, filled shapes (no anti-aliasing, so colours stay exact), text.

:func:`render_image` draws anything a task puts in an episode (a :class:`Scene` or a
:class:`~mmbridge.worlds.miniworld.chart.BarChart`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from mmbridge.worlds.miniworld.fonts import load_font
from mmbridge.worlds.miniworld.scene import Background, Scene, SceneObject
from mmbridge.worlds.miniworld.vocabulary import BACKGROUNDS, RGB

PATTERN_DARKENING = 16  # faint dots and stripes are the background colour minus this


def render_image(drawable: object) -> Image.Image:
    """The RGB image of a :class:`Scene` or a bar chart."""
    from mmbridge.worlds.miniworld.chart import BarChart, render_chart

    if isinstance(drawable, Scene):
        return render_scene(drawable)
    if isinstance(drawable, BarChart):
        return render_chart(drawable)
    raise TypeError(f"cannot render a {type(drawable).__name__}")


def render_scene(scene: Scene) -> Image.Image:
    """Background, then every object, then every text."""
    image = draw_background(scene.background, scene.width, scene.height)
    draw = ImageDraw.Draw(image)
    for item in scene.objects:
        draw_object(draw, item)
    for text in scene.texts:
        spec = text.spec
        draw.text((text.x, text.y), spec.text, font=load_font(spec.font, spec.font_size), fill=spec.rgb)
    return image


def draw_object(draw: ImageDraw.ImageDraw, item: SceneObject) -> None:
    """Fill ``item``'s outline with its colour."""
    outline = item.outline
    if item.shape == "circle":
        draw.ellipse([outline[0], outline[1]], fill=item.rgb)
    elif item.shape == "square":
        draw.rectangle([outline[0], outline[1]], fill=item.rgb)
    else:
        draw.polygon(outline, fill=item.rgb)


def draw_background(background: Background, width: int, height: int) -> Image.Image:
    """A new RGB canvas painted with ``background``."""
    colour = BACKGROUNDS[background.colour]
    if background.kind == "gradient":
        return _gradient(colour, BACKGROUNDS[background.second_colour], background.direction, width, height)
    image = Image.new("RGB", (width, height), colour)
    faint = _darker(colour)
    if background.kind == "dots":
        _draw_dots(ImageDraw.Draw(image), background, faint, width, height)
    elif background.kind == "stripes":
        _draw_stripes(ImageDraw.Draw(image), background, faint, width, height)
    return image


def _darker(colour: RGB) -> RGB:
    """The faint pattern colour on a background ``colour``."""
    red, green, blue = colour
    return (red - PATTERN_DARKENING, green - PATTERN_DARKENING, blue - PATTERN_DARKENING)


def _gradient(start: RGB, end: RGB, direction: str | None, width: int, height: int) -> Image.Image:
    """A linear blend from ``start`` to ``end``, top to bottom (vertical) or left to right."""
    steps = height if direction == "vertical" else width
    ramp = np.linspace(0.0, 1.0, steps)[:, None]  # [steps, 1]
    line = (np.array(start)[None] * (1 - ramp) + np.array(end)[None] * ramp).round().astype(np.uint8)  # [steps, 3]
    pixels = np.broadcast_to(line[:, None], (height, width, 3)) if direction == "vertical" \
        else np.broadcast_to(line[None], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def _draw_dots(draw: ImageDraw.ImageDraw, background: Background, colour: RGB, width: int, height: int) -> None:
    """Small faint dots at positions fixed by ``background.pattern_seed``."""
    spacing = background.spacing or 20
    count = max(1, width * height // (spacing * spacing))
    rng = np.random.default_rng(background.pattern_seed)
    xs, ys = rng.integers(0, width, count), rng.integers(0, height, count)
    for x, y in zip(xs.tolist(), ys.tolist()):
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=colour)


def _draw_stripes(draw: ImageDraw.ImageDraw, background: Background, colour: RGB, width: int, height: int) -> None:
    """Thin faint lines every ``background.spacing`` pixels."""
    spacing = background.spacing or 16
    if background.direction == "vertical":
        for x in range(spacing // 2, width, spacing):
            draw.line([(x, 0), (x, height - 1)], fill=colour, width=2)
    else:
        for y in range(spacing // 2, height, spacing):
            draw.line([(0, y), (width - 1, y)], fill=colour, width=2)
