"""Object existence, POPE-style: balanced yes/no, with random, popular and adversarial negatives.

Sample ``index`` fixes the answer (even: yes, odd: no) and the POPE setting (cycling
random, popular, adversarial every two samples), so any ``n`` that is a multiple of 6
is exactly balanced in answers and settings.

* random: any absent pair;
* popular: among the three most frequent pairs of the world (:data:`POPULARITY`) absent from the image;
* adversarial: an absent pair sharing its colour or its shape with an object in the image.
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import existence_question
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene
from mmbridge.worlds.miniworld.vocabulary import POPULARITY, Pair

POPE_SETTINGS = ("random", "popular", "adversarial")
POPULAR_TOP = 3


def pope_setting(index: int) -> tuple[bool, str]:
    """``(answer is yes, POPE setting)`` of sample ``index``."""
    return index % 2 == 0, POPE_SETTINGS[(index // 2) % len(POPE_SETTINGS)]


def negative_pair(world: World, present: set[Pair], setting: str) -> Pair | None:
    """An askable pair absent from the image, chosen as POPE's ``setting`` does; ``None`` if there is none."""
    absent = [pair for pair in world.focus_pairs if pair not in present]
    if setting == "popular":
        absent = sorted(absent, key=lambda pair: POPULARITY[pair], reverse=True)[:POPULAR_TOP]
    elif setting == "adversarial":
        colours, shapes = {colour for colour, _ in present}, {shape for _, shape in present}
        absent = [pair for pair in absent if pair[0] in colours or pair[1] in shapes]
    return world.choice(absent) if absent else None


def build_existence(world: World) -> Episode | None:
    """2–5 objects; "Is there a red circle in the image?" about the focus (yes) or an absent pair (no)."""
    is_yes, setting = pope_setting(world.index)
    scene = focus_scene(world, 2, 5, text_chance=0.1)
    if is_yes:
        pair = scene.objects[0].pair if world.compositional else world.choice(scene.objects).pair
    else:
        pair = negative_pair(world, {item.pair for item in scene.objects}, setting)
        if pair is None:
            return None
    return Episode([scene], [existence_question(scene, pair, pope=setting)])


TASKS = [Task("existence", "POPE-style yes/no object existence (random, popular, adversarial negatives)",
              build_existence)]
