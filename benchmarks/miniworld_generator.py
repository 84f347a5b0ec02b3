"""Does the MiniWorld generator draw what its caption asks? A pixel check of the requested colour.

Prompts are the MiniWorld ``caption`` task's own captions of ``test``-split scenes that hold exactly one object
("A red star.", "There is a green square on a plain beige background."), so the requested colour is that
object's. Each generated image is scored by its pixels: every pixel is matched to the nearest colour of MiniWorld's
palette (the 9 object colours, the 7 backgrounds, the 3 text colours) and kept when it lies within
``MAX_DISTANCE`` of it; the image's drawn colour is the object colour with the most pixels (at least
``MIN_PIXELS``), else none. Reported with Wilson 95% intervals, beside three references:

* ``uniform chance`` — 1/9;
* ``unconditional`` — images drawn from the empty prompt, scored against the same requested colours: what the
  generator's colour prior alone scores;
* ``real renders`` — the scenes' own renders at the generator's size: how often the check itself reads the true
  colour (its ceiling).

    python benchmarks/miniworld_generator.py runs/miniworld_generator/final --n 180 --guidance 3 --steps 50 \\
        [--png sample.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from PIL import Image

from mmbridge.worlds.miniworld import make_sample
from mmbridge.worlds.miniworld.vocabulary import BACKGROUNDS, COLOURS, DARK_TEXT_COLOURS

MAX_DISTANCE = 60.0  # RGB distance within which a pixel counts as a palette colour (object colours are >= 80 apart)
MIN_PIXELS = 3  # an object colour needs this many pixels to count as drawn
SAMPLE_PROMPTS = [f"An image of a {colour} {shape}." for colour, shape in
                  (("red", "circle"), ("orange", "square"), ("yellow", "star"), ("green", "square"),
                   ("cyan", "circle"), ("blue", "cross"), ("purple", "hexagon"), ("pink", "diamond"),
                   ("brown", "triangle"))]


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    rate = successes / total
    centre = (rate + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def one_object_prompts(count: int) -> list[tuple[str, str, Image.Image]]:
    """``count`` (caption, colour, render) of test-split caption samples that hold exactly one object."""
    chosen, index = [], 0
    while len(chosen) < count:
        record, images = make_sample("caption", "test", index)
        index += 1
        objects = record["scene"]["objects"]
        if len(objects) == 1:
            chosen.append((record["conversations"][1]["value"], objects[0]["colour"], images[0]))
    return chosen


_NAMES = list(COLOURS) + [f"background:{name}" for name in BACKGROUNDS] + [f"text:{name}" for name in DARK_TEXT_COLOURS]
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()) + list(DARK_TEXT_COLOURS.values()),
                    dtype=np.float32)  # [K, 3]


def drawn_colour(image: Image.Image) -> str | None:
    """The object colour with the most pixels of ``image`` (within ``MAX_DISTANCE`` of the palette), or None."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)  # [P, 1, 3]
    distances = np.linalg.norm(pixels - _PALETTE[None], axis=-1)  # [P, K]
    nearest = distances.argmin(axis=1)
    close = distances[np.arange(len(nearest)), nearest] <= MAX_DISTANCE
    counts = np.bincount(nearest[close], minlength=len(_NAMES))[:len(COLOURS)]
    return list(COLOURS)[int(counts.argmax())] if counts.max() >= MIN_PIXELS else None


def generate(pipeline, prompts: list[str], guidance: float, steps: int, seed: int, batch: int) -> list[Image.Image]:
    """One image per prompt, in batches, each batch under its own seeded generator."""
    images = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + start)
        output = pipeline(prompt=prompts[start:start + batch], guidance_scale=guidance, num_inference_steps=steps,
                          generator=generator, output_type="pil")
        images.extend(output.images)
    return images


def score(images: list[Image.Image], colours: list[str]) -> dict:
    right = sum(drawn_colour(image) == colour for image, colour in zip(images, colours))
    low, high = wilson(right, len(colours))
    return {"right": right, "n": len(colours), "accuracy": right / len(colours), "wilson95": [low, high]}


def sample_sheet(pipeline, guidance: float, steps: int, seed: int, path: str, scale: int = 3) -> None:
    """One image per palette colour (:data:`SAMPLE_PROMPTS`), side by side, enlarged ``scale`` times."""
    images = generate(pipeline, SAMPLE_PROMPTS, guidance, steps, seed, len(SAMPLE_PROMPTS))
    width, height = images[0].size
    sheet = Image.new("RGB", (len(images) * (width * scale + 2), height * scale), (255, 255, 255))
    for position, image in enumerate(images):
        sheet.paste(image.resize((width * scale, height * scale), Image.Resampling.NEAREST),
                    (position * (width * scale + 2), 0))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", help="a StableDiffusionPipeline directory (a denoising run's final/)")
    parser.add_argument("--n", type=int, default=180)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--png", help="write a sample sheet (one image per colour) here")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    prompts = one_object_prompts(args.n)
    captions, colours = [caption for caption, _, _ in prompts], [colour for _, colour, _ in prompts]
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    began = time.perf_counter()
    generated = generate(pipeline, captions, args.guidance, args.steps, args.seed, args.batch)
    seconds = time.perf_counter() - began
    unconditional = generate(pipeline, [""] * len(captions), 1.0, args.steps, args.seed, args.batch)
    renders = [render.resize((size, size), Image.Resampling.BOX) for _, _, render in prompts]
    figures = {"pipeline": args.pipeline, "guidance": args.guidance, "steps": args.steps, "seed": args.seed,
               "size": size, "generated": score(generated, colours), "unconditional": score(unconditional, colours),
               "real_renders": score(renders, colours), "uniform_chance": 1 / len(COLOURS),
               "seconds_per_image": seconds / len(captions), "threads": torch.get_num_threads()}
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    if args.png:
        sample_sheet(pipeline, args.guidance, args.steps, args.seed, args.png)


if __name__ == "__main__":
    main()
