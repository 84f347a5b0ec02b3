"""The chat page's example images: MiniWorld renders with fixed seeds, each with the question MiniWorld asks of it.

A test helper and a script, kept outside the package so that ``mmbridge.serve`` never imports the world (only the
package face and its data commands do: ``tests/test_import_layers.py``). ``python tests/serve_examples.py``
(re)writes them into this checkout's ``mmbridge/serve/static/examples/`` (or ``--out DIR``): one PNG per example
and ``examples.json``, ``[{"file", "question", "alt"}]`` (``alt`` describes the picture for screen readers).
The server serves that folder at ``GET /examples/{name}``; the page shows the examples, and a click attaches the
image and fills in its question. Renders are deterministic in ``(task, split, index, seed)``, so the shipped files
are what this module draws (a test checks it, pixel by pixel).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from PIL import Image

from mmbridge.worlds.miniworld import make_episode, make_record, render_image
from mmbridge.worlds.miniworld.language import short_captions

MANIFEST = "examples.json"
MAX_EXAMPLE_BYTES = 10_000  # each PNG; the page loads them all at once


@dataclass(frozen=True)
class Example:
    """One MiniWorld sample shown on the page: ``file`` is its PNG's name under ``static/examples/``."""

    file: str
    task: str
    index: int
    split: str = "test"
    seed: int = 0

    def image(self) -> Image.Image:
        """The sample's one image (224 × 224)."""
        (scene,) = make_episode(self.task, self.split, self.index, self.seed).images
        return render_image(scene)

    def entry(self) -> dict[str, str]:
        """``{"file", "question", "alt"}``: the question MiniWorld asks of the image and a caption of it."""
        (scene,) = make_episode(self.task, self.split, self.index, self.seed).images
        question = make_record(self.task, self.split, self.index, self.seed)["question"]
        return {"file": self.file, "question": question, "alt": short_captions(scene)[1]}


EXAMPLES = (
    Example("colour.png", "attribute", 1),
    Example("count.png", "counting", 1),
    Example("nearest.png", "spatial", 0),
    Example("caption.png", "caption", 2),
)


def default_folder() -> str:
    """This checkout's ``mmbridge/serve/static/examples`` (beside ``tests/``, whichever mmbridge is installed)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmbridge", "serve", "static",
                        "examples")


def write_examples(folder: str) -> list[dict[str, str]]:
    """Write every example's PNG and ``examples.json`` into ``folder``; the manifest's entries."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for example in EXAMPLES:
        path = os.path.join(folder, example.file)
        example.image().save(path, format="PNG", optimize=True)
        size = os.path.getsize(path)
        if size > MAX_EXAMPLE_BYTES:
            raise ValueError(f"{path} is {size} bytes; an example image must stay under {MAX_EXAMPLE_BYTES}")
        entries.append(example.entry())
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=2)
        handle.write("\n")
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_folder(), help="folder to write (default: the package's)")
    folder = parser.parse_args(argv).out
    for entry in write_examples(folder):
        print(f"{os.path.join(folder, entry['file'])}: {entry['question']}")


if __name__ == "__main__":
    main()
