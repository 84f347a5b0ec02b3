"""Scene recipes shared by several tasks: a questioned "focus" object among fillers, optional text."""

from __future__ import annotations

from mmbridge.worlds.miniworld.scene import (CANVAS, STANDARD_SCALE, Scene, SizeScale, distractor_text,
                                             filler_pairs, layout_scene, object_specs)
from mmbridge.worlds.miniworld.splits import World

TEXT_CHANCE = 0.2


def focus_scene(world: World, low: int, high: int, text_chance: float = TEXT_CHANCE, width: int = CANVAS,
                height: int = CANVAS, scale: SizeScale = STANDARD_SCALE) -> Scene:
    """``low``–``high`` objects; ``objects[0]`` is the focus (a held-out pair in the compositional split).

    Fillers never repeat the focus pair, so "colour shape" always names the focus.
    """
    count = world.integer(low, high)
    focus = world.focus_pair()
    pairs = [focus] + filler_pairs(world, count - 1, exclude=[focus])
    texts = [distractor_text(world)] if world.chance(text_chance) else []
    return layout_scene(world, object_specs(world, pairs), texts, width, height, scale)
