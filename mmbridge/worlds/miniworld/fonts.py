"""Fonts for rendered text: PIL's built-in faces, plus the DejaVu TrueType faces when the machine has them.

The set is fixed per machine (the faces found, in a fixed order), so a given seed draws
the same font on the same machine. ``"default"`` is ``ImageFont.load_default(size=…)``
(Pillow's built-in face, scalable when FreeType is present); ``"bitmap"`` is Pillow's
fixed-size bitmap font, used for scene text only (charts need anchors it lacks).
"""

from __future__ import annotations

import functools
import os

from PIL import ImageFont

from mmbridge.worlds.miniworld.splits import World

DEFAULT_FONT = "default"
BITMAP_FONT = "bitmap"
BITMAP_SIZE = 11  # the bitmap font's only size, in pixels
FONT_FILES: tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
FONT_DIRECTORIES: tuple[str, ...] = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu",
                                     "/usr/share/fonts/TTF", "/usr/local/share/fonts")

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """Names of the usable fonts: ``"default"`` then each DejaVu face found (file stem)."""
    names = [DEFAULT_FONT]
    for file_name in FONT_FILES:
        if _font_path(file_name) is not None:
            names.append(os.path.splitext(file_name)[0])
    return tuple(names)


def text_fonts() -> tuple[str, ...]:
    """Fonts for words and numbers in scenes: the scalable ones and the bitmap font."""
    return available_fonts() + (BITMAP_FONT,)


def random_text_font(world: World, size: int) -> tuple[str, int]:
    """A random scene-text font and its pixel size (the bitmap font has only :data:`BITMAP_SIZE`)."""
    name = world.choice(text_fonts())
    return name, BITMAP_SIZE if name == BITMAP_FONT else size


def _font_path(file_name: str) -> str | None:
    """The first directory holding ``file_name``, or ``None``."""
    for directory in FONT_DIRECTORIES:
        path = os.path.join(directory, file_name)
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=256)
def load_font(name: str, size: int) -> Font:
    """The font ``name`` (from :func:`available_fonts`) at ``size`` pixels."""
    if name == BITMAP_FONT:
        return ImageFont.load_default_imagefont()
    if name == DEFAULT_FONT:
        try:
            return ImageFont.load_default(size=size)
        except (ImportError, OSError):  # Pillow without FreeType: the fixed-size bitmap font
            return ImageFont.load_default()
    path = _font_path(name + ".ttf")
    if path is None:
        raise ValueError(f"font {name!r} is not on this machine; available: {', '.join(available_fonts())}")
    return ImageFont.truetype(path, size)


def text_box(text: str, font_name: str, size: int, x: int, y: int) -> list[int]:
    """The pixel box ``[x0, y0, x1, y1]`` (ends included) of ``text`` drawn with its top-left anchor at ``(x, y)``."""
    left, top, right, bottom = load_font(font_name, size).getbbox(text)
    return [x + int(left), y + int(top), x + int(right) - 1, y + int(bottom) - 1]
