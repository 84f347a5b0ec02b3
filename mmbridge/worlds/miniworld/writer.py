"""Writing a task split to disk: ``DIR/<task>-<split>.json`` (a LLaVA-format list) and PNGs under ``DIR/images/``."""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from mmbridge.boxes import check_box_format
from mmbridge.utils import atomic_path
from mmbridge.worlds.miniworld.sample import IMAGE_DIRECTORY, iter_samples
from mmbridge.worlds.miniworld.splits import check_split
from mmbridge.worlds.miniworld.tasks import get_task

PNG_COMPRESS_LEVEL = 1  # fast to write; synthetic images stay small anyway


def write_task(task: str, split: str, n: int, out_dir: str, seed: int = 0, progress: bool = True,
               box_format: str = "plain") -> str:
    """Generate ``n`` samples and write them; returns the JSON path. ``box_format``: how grounding text writes
    boxes (``plain`` ``[x0, y0, x1, y1]`` or ``qwen`` ``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``).

    Image paths in the JSON are relative to ``out_dir`` (the JSON's directory), so
    ``load_llava_json`` resolves them without an image root.
    """
    get_task(task)
    check_split(split)
    check_box_format(box_format)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    os.makedirs(os.path.join(out_dir, IMAGE_DIRECTORY), exist_ok=True)
    records = []
    samples = iter_samples(task, split, n, seed, box_format)
    for record, images in tqdm(samples, total=n, desc=f"miniworld {task}/{split}", disable=not progress):
        names = [record["image"]] if isinstance(record["image"], str) else record["image"]
        for name, image in zip(names, images):
            image.save(os.path.join(out_dir, name), compress_level=PNG_COMPRESS_LEVEL)
        records.append(record)
    path = os.path.join(out_dir, f"{task}-{split}.json")
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    return path
