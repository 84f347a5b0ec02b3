"""What a task is: a named builder from a seeded :class:`World` to an :class:`Episode`.

An episode holds the drawables (scenes or charts) of one sample, in image order, the
question(s) about them with answers derived from them, and how the images are laid
out in the prompt (one image, several interleaved images, video frames, an interleaved
document: each image followed by its question's answer as plain text, or none: a text request).
A generation episode also holds its ``outputs`` (:class:`~mmbridge.worlds.miniworld.generation.Output`: the
scenes the assistant answers with) and, for an edit, its kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from mmbridge.worlds.miniworld.chart import BarChart
from mmbridge.worlds.miniworld.questions import Question
from mmbridge.worlds.miniworld.scene import LayoutError, Scene
from mmbridge.worlds.miniworld.splits import World

if TYPE_CHECKING:
    from mmbridge.worlds.miniworld.generation import Output

LAYOUTS = ("single", "multi", "video", "document", "text")
MAX_ATTEMPTS = 500


@dataclass
class Episode:
    """The images (as drawables) and question(s) of one sample.

    ``description`` is the stored ``scene`` field; by default the single image's
    description, ``{"images": [...]}`` for several images, or the first output's scene for a text request.
    """

    images: list[Scene | BarChart]
    questions: list[Question]
    layout: str = "single"
    description: dict | None = field(default=None)
    outputs: list[Output] = field(default_factory=list)
    edit: str | None = None

    @property
    def is_conversation(self) -> bool:
        return len(self.questions) > 1

    def scene(self) -> dict:
        """The full symbolic description of the sample (JSON-able)."""
        if self.description is not None:
            return self.description
        if len(self.images) == 1:
            return self.images[0].to_dict()
        if not self.images and self.outputs:
            return self.outputs[0].scene.to_dict()
        return {"images": [image.to_dict() for image in self.images]}


@dataclass(frozen=True)
class Task:
    """A named family of samples; ``compositional`` says whether it has a compositional split."""

    name: str
    description: str
    build: Callable[[World], Episode | None]
    compositional: bool = True

    def episode(self, world: World) -> Episode:
        """Build until the scene allows an unambiguous question (deterministic: the same world, the same tries)."""
        if world.compositional and not self.compositional:
            raise ValueError(f"MiniWorld task {self.name!r} has no compositional split (it asks about no "
                             f"colour–shape object); use train, val or test")
        for _ in range(MAX_ATTEMPTS):
            try:
                episode = self.build(world)
            except LayoutError:
                continue
            if episode is not None:
                return episode
        raise RuntimeError(f"MiniWorld task {self.name!r}: no valid sample after {MAX_ATTEMPTS} attempts")
