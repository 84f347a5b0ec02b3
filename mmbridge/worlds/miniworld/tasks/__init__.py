"""Every MiniWorld task, by name: captions, VQA, POPE existence, multiple choice, grounding, reading,
small objects, multi-image, video, charts, conversations, interleaved documents, and generation requests
(text to image, image edits)."""

from __future__ import annotations

from mmbridge.worlds.miniworld.task import Task
from mmbridge.worlds.miniworld.tasks import (captions, charts, choice, conversation, documents, existence,
                                             generation, grounding, multi_image, reading, small_objects, video, vqa)

_MODULES = (captions, vqa, existence, choice, grounding, reading, small_objects, multi_image, video, charts,
            conversation, documents, generation)
TASKS: dict[str, Task] = {task.name: task for module in _MODULES for task in module.TASKS}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown MiniWorld task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
