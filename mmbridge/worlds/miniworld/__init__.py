"""MiniWorld: a procedural visual world for training and evaluating bridges offline.

Scenes of 1–8 shapes (7 shapes × 9 colours × 2 sizes) on varied light backgrounds, with
optional words and numbers in several fonts; bar charts; sets of 2–4 images; short
videos of moving objects. Every sample keeps its full symbolic ``scene`` and every
answer is computed from it. Samples are deterministic in ``(task, split, index, seed)``.

    from mmbridge.worlds.miniworld import TASKS, make_sample, write_task
    record, images = make_sample("attribute", "test", 12)
    write_task("caption", "train", 10_000, "data/miniworld")

Generation requests (``text_to_image``, ``image_edit``) answer with an image: their records' ``outputs`` hold the
scene to draw and its caption, and :func:`score_image` checks a generated image's pixels against the scene
(:mod:`.scoring`).

Splits: ``train``, ``val``, ``test`` use only :data:`SEEN_PAIRS`; ``compositional``
asks about :data:`HELD_OUT_PAIRS` (colour–shape pairs never seen in training).

Importing this package registers MiniWorld as the data source type ``miniworld`` (:mod:`.stream`) and its
evaluation suites ``miniworld`` and ``highres`` (:mod:`.suites`); importing ``mmbridge`` imports it.
"""

from mmbridge.worlds.miniworld.generation import draw_output, output_images
from mmbridge.worlds.miniworld.render import render_image
from mmbridge.worlds.miniworld.sample import iter_samples, make_episode, make_record, make_sample, render_images
from mmbridge.worlds.miniworld.scoring import attribute_accuracy, score_image, score_requests
from mmbridge.worlds.miniworld.splits import SPLITS
from mmbridge.worlds.miniworld.stream import load_samples  # importing stream registers the source type
from mmbridge.worlds.miniworld.suites import HIGHRES, MINIWORLD  # importing suites registers them
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks import TASKS, get_task
from mmbridge.worlds.miniworld.vocabulary import COLOURS, HELD_OUT_PAIRS, SEEN_PAIRS, SHAPES, SIZES
from mmbridge.worlds.miniworld.writer import write_task

__all__ = ["TASKS", "Task", "Episode", "SPLITS", "COLOURS", "SHAPES", "SIZES", "HELD_OUT_PAIRS", "SEEN_PAIRS",
           "get_task", "make_sample", "make_record", "make_episode", "render_images", "render_image", "iter_samples",
           "write_task", "load_samples", "MINIWORLD", "HIGHRES", "score_image", "score_requests", "attribute_accuracy",
           "draw_output", "output_images"]
