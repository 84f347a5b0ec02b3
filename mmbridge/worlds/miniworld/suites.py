"""MiniWorld's evaluation suites, added to :data:`mmbridge.eval.tasks.SUITES` when this module is imported.

``miniworld`` is the default suite (one task per answer format, the compositional split, multi-image and
video); ``highres`` holds the small-object and small-text tasks on 896–1024 px canvases. Importing ``mmbridge``
imports this module (through :mod:`mmbridge.worlds.miniworld`), so ``mmbridge eval --suite miniworld`` and
``run_suite(model, "miniworld")`` find them; eval itself never imports the world.
"""

from __future__ import annotations

from mmbridge.eval.tasks import SUITES, Pair, Suite, TaskSpec
from mmbridge.worlds.miniworld.sample import make_sample
from mmbridge.worlds.miniworld.tasks import TASKS


def load_miniworld(task: str, split: str, n: int, seed: int, box_format: str = "plain") -> list[Pair]:
    """``n`` MiniWorld samples of ``task`` on ``split`` with their images (generated, not read from disk), boxes
    written in ``box_format``."""
    if task not in TASKS:
        raise ValueError(f"MiniWorld has no task {task!r}; known: {sorted(TASKS)}")
    return [make_sample(task, split, index, seed, box_format) for index in range(n)]


MINIWORLD = Suite("miniworld", (
    TaskSpec("attribute"),
    TaskSpec("attribute", split="compositional"),
    TaskSpec("counting"),
    TaskSpec("spatial"),
    TaskSpec("existence"),
    TaskSpec("multiple_choice", circular=True, likelihood=True),
    TaskSpec("grounding"),
    TaskSpec("text_reading"),
    TaskSpec("caption"),
    TaskSpec("multi_image"),
    TaskSpec("video"),
), load_miniworld)

# Small objects and small text on 896–1024 px canvases, for comparing high-resolution strategies (AnyRes, UHD,
# Monkey, Fuyu); a suite of its own because these large images would slow the default one.
HIGHRES = Suite("highres", (
    TaskSpec("small_objects"),
    TaskSpec("small_text"),
), load_miniworld)

for _suite in (MINIWORLD, HIGHRES):
    SUITES.add(_suite.name, _suite)
