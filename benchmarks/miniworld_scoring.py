"""How far MiniWorld's pixel scoring of generated images can be trusted: renders, wrong scenes, degraded images.

    python benchmarks/miniworld_scoring.py [--n 200] [--seed 1]

Targets are the ``outputs`` of ``n`` test samples of each generation task (``text_to_image``, ``image_edit``).
Table 1 scores the target's render under views a small generator's output resembles — pixel noise, Gaussian
blur, downscaled to 64/48/32/24 px (bicubic; the scorer upscales), and 32 px with noise added at 32 px — per
check, with 95% Wilson intervals. Table 2 scores a render with one attribute wrong (an ``image_edit`` edit of
the target: recolour, reshape, resize, one more object, a move) and gives, per check, the share that passes: the
changed attribute (and ``all``) should be near 0%, the others near 100%. Deterministic: numpy and PIL only.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageFilter

from mmbridge.eval.metrics import wilson_interval
from mmbridge.worlds.miniworld import draw_output, make_record, score_image
from mmbridge.worlds.miniworld.edits import edit_scene
from mmbridge.worlds.miniworld.generation import ATTRIBUTES
from mmbridge.worlds.miniworld.render import render_image
from mmbridge.worlds.miniworld.scene import Scene
from mmbridge.worlds.miniworld.shape_probe import fit_probe
from mmbridge.worlds.miniworld.splits import World

CHECKS = ATTRIBUTES + ("all",)
WRONG = (("colour", "colour"), ("shape", "shape"), ("size", "size"), ("count", "add"), ("position", "move"))


def noised(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    """``image`` plus Gaussian noise of ``sigma`` per channel."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8))


def small(side: int) -> Callable[[Image.Image, int], Image.Image]:
    return lambda image, seed: image.resize((side, side), Image.BICUBIC)


VIEWS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "sharp": lambda image, seed: image,
    "noise σ12": lambda image, seed: noised(image, 12, seed),
    "noise σ25": lambda image, seed: noised(image, 25, seed),
    "blur r2": lambda image, seed: image.filter(ImageFilter.GaussianBlur(2)),
    "blur r4": lambda image, seed: image.filter(ImageFilter.GaussianBlur(4)),
    "64 px": small(64), "48 px": small(48), "32 px": small(32), "24 px": small(24),
    "32 px + noise σ12": lambda image, seed: noised(small(32)(image, seed), 12, seed),
}


def targets(n: int, seed: int) -> Iterator[dict]:
    for task in ("text_to_image", "image_edit"):
        for index in range(n):
            yield make_record(task, "test", index, seed)["outputs"][0]


def row(name: str, scores: list[dict]) -> str:
    """A markdown row: per check, the pass rate and its 95% Wilson interval."""
    cells = []
    for check in CHECKS:
        values = [score[check] for score in scores]
        low, high = wilson_interval(sum(values), len(values))
        cells.append(f"{100 * np.mean(values):.1f} ({100 * low:.0f}–{100 * high:.0f})")
    return f"| {name} | {len(scores)} | " + " | ".join(cells) + " |"


def header(first: str) -> str:
    return f"| {first} | n | " + " | ".join(CHECKS) + " |\n|---|---|" + "---|" * len(CHECKS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="samples per generation task")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.process_time()
    fit_probe()
    print(f"shape probe fitted in {time.process_time() - started:.2f} s of CPU time")
    outputs = list(targets(args.n, args.seed))
    started = time.time()
    print("\nTable 1: renders of the target under each view, % passing (95% Wilson interval)\n")
    print(header("view"))
    for name, view in VIEWS.items():
        scores = [score_image(view(draw_output(output), index), output["scene"])
                  for index, output in enumerate(outputs)]
        print(row(name, scores))
    print("\nTable 2: renders with one attribute wrong, % passing each check (the changed one should fail)\n")
    print(header("changed"))
    for attribute, kind in WRONG:
        scores = []
        for index, output in enumerate(outputs):
            target = Scene.from_dict(output["scene"])
            for attempt in range(5):
                changed = edit_scene(World(np.random.default_rng([7, index, attempt]), "test", index), target, kind)
                if changed is not None:
                    scores.append(score_image(render_image(changed[1]), target))
                    break
        print(row(f"{attribute} ({kind})", scores))
    print(f"\n{time.time() - started:.0f} s for {len(outputs)} targets")


if __name__ == "__main__":
    main()
