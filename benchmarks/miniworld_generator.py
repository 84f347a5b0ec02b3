"""Does the MiniWorld generator draw what it is asked? MiniWorld's own scorer on the ``text_to_image`` test split.

Each request's target caption ("A small purple star.", "A large red circle in the top left and ...") conditions the
generator: the upper bound of a model that answers with images through it (NExT-GPT) is this generator given the
true caption. The images are scored by :func:`mmbridge.worlds.miniworld.scoring.score_requests` (count, colour,
shape, size, position where the request asked them, and all at once; Wilson 95% intervals), beside two references:

* ``unconditional`` — images drawn from the empty prompt, scored against the same requests: the floor;
* ``real renders`` — the requests' targets resized to the generator's size: what the scorer reads at that size.

    python benchmarks/miniworld_generator.py runs/miniworld_generator/final --n 200 --guidance 3 --steps 25 \\
        [--png docs/miniworld_generator.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from mmbridge.worlds.miniworld.generation import output_images
from mmbridge.worlds.miniworld.scoring import score_requests
from mmbridge.worlds.miniworld.stream import load_samples

SHEET_COLUMNS = 8


def generate(pipeline, prompts: list[str], guidance: float, steps: int, seed: int, batch: int) -> list[Image.Image]:
    """One image per prompt, in batches, each batch under its own seeded generator."""
    images = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + start)
        output = pipeline(prompt=prompts[start:start + batch], guidance_scale=guidance, num_inference_steps=steps,
                          generator=generator, output_type="pil")
        images.extend(output.images)
    return images


def sample_sheet(rows: list[list[Image.Image]], path: str, scale: int = 2) -> None:
    """Rows of images side by side (enlarged ``scale`` times, nearest neighbour), written as a PNG."""
    width, height = rows[0][0].size
    cell_width, cell_height = width * scale + 2, height * scale + 2
    sheet = Image.new("RGB", (max(map(len, rows)) * cell_width, len(rows) * cell_height), (128, 128, 128))
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            sheet.paste(image.resize((width * scale, height * scale), Image.Resampling.NEAREST),
                        (column * cell_width, row * cell_height))
    sheet.save(path, optimize=True)


def table(figures: dict) -> str:
    """Per attribute: accuracy and interval of each image set, as a Markdown table."""
    columns = ("true_caption", "unconditional", "real_renders")
    lines = ["| attribute | n | " + " | ".join(name.replace("_", " ") for name in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, row in figures["true_caption"].items():
        cells = [f"{100 * figures[column][name]['accuracy']:.1f}% "
                 f"[{100 * figures[column][name]['interval'][0]:.1f}, {100 * figures[column][name]['interval'][1]:.1f}]"
                 for column in columns]
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", help="a StableDiffusionPipeline directory (a denoising run's final/)")
    parser.add_argument("--n", type=int, default=200, help="text_to_image test requests")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--png", help="write a sample sheet here: targets, true-caption images, unconditional images")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    samples = load_samples({"task": "text_to_image", "split": "test", "n": args.n})
    captions = [sample.outputs[0]["caption"] for sample in samples]
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    began = time.perf_counter()
    generated = generate(pipeline, captions, args.guidance, args.steps, args.seed, args.batch)
    seconds = time.perf_counter() - began
    unconditional = generate(pipeline, [""] * len(captions), 1.0, args.steps, args.seed, args.batch)
    renders = [image.resize((size, size), Image.Resampling.BOX) for sample in samples
               for image in output_images(sample.outputs)]
    figures = {name: score_requests([[image] for image in images], samples)["attributes"]
               for name, images in (("true_caption", generated), ("unconditional", unconditional),
                                    ("real_renders", renders))}
    figures.update({"pipeline": args.pipeline, "sampler": type(pipeline.scheduler).__name__, "n": args.n,
                    "guidance": args.guidance, "steps": args.steps, "seed": args.seed, "size": size,
                    "seconds_per_image": seconds / len(captions), "threads": torch.get_num_threads()})
    print(json.dumps(figures))
    print(table(figures))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    if args.png:
        sample_sheet([renders[:SHEET_COLUMNS], generated[:SHEET_COLUMNS], unconditional[:SHEET_COLUMNS]], args.png)


if __name__ == "__main__":
    main()
