"""Writing a task split to disk: ``DIR/<task>-<split>.json`` (a LLaVA-format list) and PNGs under ``DIR/images/``,
or WebDataset tar shards ``DIR/<task>-<split>-00000.tar``… (:func:`write_webdataset`)."""

from __future__ import annotations

import io
import json
import os
import tarfile

from tqdm import tqdm

from mmbridge.boxes import check_box_format
from mmbridge.utils import atomic_path
from mmbridge.worlds.miniworld.generation import draw_output
from mmbridge.worlds.miniworld.sample import IMAGE_DIRECTORY, iter_samples
from mmbridge.worlds.miniworld.splits import check_split
from mmbridge.worlds.miniworld.tasks import get_task

PNG_COMPRESS_LEVEL = 1  # fast to write; synthetic images stay small anyway
JPEG_QUALITY = 95  # what img2dataset writes by default
IMAGE_FORMATS = ("png", "jpeg")  # write_task's image files
JPEG_FILE_QUALITY = 90  # write_task's JPEG files (--image-format jpeg)


def write_task(task: str, split: str, n: int, out_dir: str, seed: int = 0, progress: bool = True,
               box_format: str = "plain", image_format: str = "png") -> str:
    """Generate ``n`` samples and write them; returns the JSON path. ``box_format``: how grounding text writes
    boxes (``plain`` ``[x0, y0, x1, y1]`` or ``qwen`` ``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``).
    ``image_format``: ``png`` (lossless, the default) or ``jpeg`` (quality 90, files named ``….jpg``: what
    real image–text data sets hold, and slower to decode).

    Image paths in the JSON are relative to ``out_dir`` (the JSON's directory), so
    ``load_llava_json`` resolves them without an image root. A generation task also writes the target image of
    each of its ``outputs`` (drawn from the output's scene).
    """
    get_task(task)
    check_split(split)
    check_box_format(box_format)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    os.makedirs(os.path.join(out_dir, IMAGE_DIRECTORY), exist_ok=True)
    records = []
    samples = iter_samples(task, split, n, seed, box_format)
    for record, images in tqdm(samples, total=n, desc=f"miniworld {task}/{split}", disable=not progress):
        if image_format == "jpeg":
            record = _as_jpeg_names(record)
        names = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        outputs = record.get("outputs", [])
        names += [output["image"] for output in outputs]
        images = images + [draw_output(output) for output in outputs]
        for name, image in zip(names, images):
            if image_format == "jpeg":
                image.convert("RGB").save(os.path.join(out_dir, name), format="JPEG", quality=JPEG_FILE_QUALITY)
            else:
                image.save(os.path.join(out_dir, name), compress_level=PNG_COMPRESS_LEVEL)
        records.append(record)
    path = os.path.join(out_dir, f"{task}-{split}.json")
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    return path


def _as_jpeg_names(record: dict) -> dict:
    """The record with its image paths (``image``, a document's ``images``, the ``outputs``' ``image``) ending
    ``.jpg`` instead of ``.png``."""
    def renamed(names: str | list[str]) -> str | list[str]:
        if isinstance(names, str):
            return names[:-len(".png")] + ".jpg" if names.endswith(".png") else names
        return [renamed(name) for name in names]

    changed = {key: renamed(record[key]) for key in ("image", "images") if key in record}
    if "outputs" in record:
        changed["outputs"] = [{**output, "image": renamed(output["image"])} for output in record["outputs"]]
    return {**record, **changed}


def write_webdataset(task: str, split: str, n: int, out_dir: str, seed: int = 0, shard_size: int = 1000,
                     progress: bool = True, box_format: str = "plain") -> list[str]:
    """Generate ``n`` samples as WebDataset shards of ``shard_size`` samples; returns the shard paths.

    Shard ``k`` is ``DIR/<task>-<split>-{k:05d}.tar``, members ``KEY.jpg`` (the image) and ``KEY.json`` (the
    record: id, conversations and the evaluation fields); a ``caption`` task writes its caption as
    ``KEY.txt`` and the json without conversations, as img2dataset does. Each shard is written to a
    temporary file and renamed when complete, so a killed run leaves no partial shard under a shard's name.
    Tasks with several images per sample (multi-image, video, documents) do not fit one image per key.
    ``box_format``: how grounding text writes boxes, as for :func:`write_task`.
    """
    get_task(task)
    check_split(split)
    check_box_format(box_format)
    if n < 0 or shard_size < 1:
        raise ValueError(f"n must be >= 0 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    samples = iter(tqdm(iter_samples(task, split, n, seed, box_format), total=n, desc=f"miniworld {task}/{split}",
                        disable=not progress))
    paths = []
    for start in range(0, n, shard_size):
        path = os.path.join(out_dir, f"{task}-{split}-{start // shard_size:05d}.tar")
        with atomic_path(path) as temporary:
            with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
                for _ in range(min(shard_size, n - start)):
                    record, images = next(samples)
                    for name, data in _members(task, record, images):
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = len(data), 0o644
                        archive.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _members(task: str, record: dict, images: list) -> list[tuple[str, bytes]]:
    """One sample's tar members: ``KEY.jpg`` and ``KEY.json`` (plus ``KEY.txt`` for captions)."""
    key = record["id"]  # "caption-train-000012": no dot, so webdataset readers take it whole as the key
    if len(images) != 1 or "conversations" not in record or record.get("outputs"):
        raise ValueError(f"task {task!r} has {len(images)} image(s) per sample, no conversation or output images; "
                         f"--format webdataset holds one image and one conversation per key (use the JSON format)")
    image = io.BytesIO()
    images[0].convert("RGB").save(image, format="JPEG", quality=JPEG_QUALITY)
    fields = {name: value for name, value in record.items() if name != "image"}
    members = [(f"{key}.jpg", image.getvalue())]
    if record.get("format") == "caption":
        members.append((f"{key}.txt", record["answer"].encode("utf-8")))
        fields.pop("conversations")
    members.append((f"{key}.json", json.dumps(fields).encode("utf-8")))
    return members
