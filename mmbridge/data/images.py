"""Images and layouts: the image side of the :class:`~mmbridge.data.processor.Processor`.

What it does with a sample's images, in the order the processor asks:

- **load**: open and fully decode every image file (or take them from a streamed sample's ``image_loader``);
  a missing or corrupt file is an :class:`ImageLoadError` naming the file and the sample id;
- **sizes**: with a high-resolution strategy (``highres``) each image's (height, width), which the conversation
  side needs to lay out its tokens; read from the file headers when the pixels are not wanted (nothing decoded),
  and carried by the example as ``image_sizes`` ``[n, 2]`` (transformers' name);
- **pixels**: the encoder's input — the image transform's ``[n, 3, H, W]``, or with ``highres`` every image's crops
  ``[n_crops, 3, H, W]`` (zero-padded to the largest crop);
- **video**: for a model whose bridge takes video (:class:`VideoSettings`), which frames of a clip one media keeps
  and ``media_frames`` ``[n_media, 1]`` (carried in the example's ``bridge_inputs``), the frames behind each
  placeholder.

It reads no text: placeholders, templates and labels are :mod:`mmbridge.data.conversation`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmbridge.data.collate import pad_stack
from mmbridge.data.formats.llava import Sample
from mmbridge.data.sample_errors import ImageLoadError, SampleError

ImageSize = tuple[int, int]  # (height, width) in pixels


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """How a video sample reaches the model: as one media behind one placeholder when the model's bridge takes
    video (``as_media``, ``max_frames``: the bridge's), keeping every ``stride``-th frame (a stage's data setting)."""

    as_media: bool = False  # True: a video's frames are one media (examples carry bridge_inputs.media_frames)
    max_frames: int | None = None  # at most this many of the kept frames, spread evenly; None: all of them
    stride: int = 1  # keep every stride-th frame (the recipe's ``data.video_stride``)

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"video_stride must be >= 1, got {self.stride}")
        object.__setattr__(self, "as_media", bool(self.as_media))


class ImageInputs:
    """A sample's images → decoded images, their sizes and the encoder's pixels, for one transform and strategy."""

    def __init__(self, transform: Any, highres: Any = None, video: VideoSettings = VideoSettings()) -> None:
        self.transform = transform
        self.highres = highres  # a HighResStrategy: per-image layouts and crops, or None
        self.video = video

    def load_images(self, sample: Sample) -> list[Image.Image]:
        """Open and fully decode every image of ``sample``; a missing or corrupt file is an :class:`ImageLoadError`.

        A sample with an ``image_loader`` (streamed data) gets its images from it instead.
        """
        if sample.image_loader is not None:
            images = list(sample.image_loader())
            if len(images) != len(sample.images):
                raise SampleError(f"sample {sample.id!r}: image_loader returned {len(images)} image(s) but the "
                                  f"sample names {len(sample.images)}", sample.id, "image_load")
            return images
        return [_open_image(path, sample.id) for path in sample.images]

    def sizes(self, sample: Sample, loaded: list[Image.Image] | None) -> list[ImageSize] | None:
        """Each image's (height, width) when a high-resolution strategy needs them (read from the file headers
        when the images are not loaded), else None."""
        if self.highres is None:
            return None
        if loaded is None:
            loaded = [_image_header(path, sample.id) for path in sample.images] if sample.image_loader is None \
                else self.load_images(sample)
        return self.sizes_of(loaded)

    def sizes_of(self, images: list[Image.Image]) -> list[ImageSize] | None:
        """The (height, width) of each of ``images`` when a high-resolution strategy lays them out, else None."""
        return [(image.height, image.width) for image in images] if self.highres is not None else None

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """The encoder input of ``images``: ``[n, 3, H, W]``, or with a high-resolution strategy every image's crops
        ``[n_crops, 3, H, W]`` (zero-padded to the largest crop)."""
        if self.highres is None or not images:
            return self.transform.batch(images)
        return pad_stack([crop for image in images for crop in self.highres.pixel_values(image)])

    def video_frames(self, count: int) -> list[int]:
        """Which of a video's ``count`` frames a media keeps: every ``stride``-th, then at most ``max_frames`` of
        those, spread evenly from the first to the last."""
        kept = list(range(0, count, self.video.stride))
        most = self.video.max_frames
        if most and len(kept) > most:
            kept = [kept[round(step * (len(kept) - 1) / max(most - 1, 1))] for step in range(most)]
        return kept


def size_inputs(sizes: list[ImageSize] | None) -> dict[str, torch.Tensor]:
    """``{"image_sizes": [n, 2]}`` for a high-resolution model's images (none without images)."""
    return {"image_sizes": torch.tensor(sizes, dtype=torch.long)} if sizes else {}


def media_frames(image_count: int, frames: list[int] | None) -> torch.Tensor:
    """``[n_media, 1]``: the frames behind each placeholder (one video, or one per image)."""
    return torch.tensor([[len(frames)]] if frames else [[1]] * image_count, dtype=torch.long)


def load_output_images(sample: Sample) -> list[Image.Image]:
    """The target image of each of ``sample.outputs`` (the images an answer's output markers stand for), from the
    sample's ``output_loader`` when it has one (streamed requests), else the files their ``image`` fields name; an
    output with neither is a :class:`SampleError`, a missing or corrupt file an :class:`ImageLoadError`."""
    outputs = sample.outputs or []
    if sample.output_loader is not None:
        images = list(sample.output_loader())
        if len(images) != len(outputs):
            raise SampleError(f"sample {sample.id!r}: output_loader returned {len(images)} image(s) for "
                              f"{len(outputs)} output(s)", sample.id, "image_load")
        return images
    for number, output in enumerate(outputs):
        if not output.get("image"):
            raise SampleError(f"sample {sample.id!r}: outputs[{number}] names no target image file (and the sample "
                              f"has no output_loader to draw it)", sample.id, "no_output_image")
    return [_open_image(output["image"], sample.id) for output in outputs]


def output_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` in [-1, 1]: target images as a generator's VAE reads them (RGB, box-resized)."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
              for image in images]  # [size, size, 3] each
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def as_image(image: Any) -> Image.Image:
    """A PIL image, or a file path opened as one."""
    return image if isinstance(image, Image.Image) else _open_image(os.fspath(image), "prompt")


def _image_header(path: str, sample_id: str) -> Image.Image:
    """The image at ``path`` opened lazily (its size is read from the header, its pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageLoadError(path, sample_id, _cause(error)) from error


def _open_image(path: str, sample_id: str) -> Image.Image:
    """Open and decode one image file; the returned image no longer holds the file open."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageLoadError(path, sample_id, _cause(error)) from error


def _cause(error: Exception) -> str:
    """What an :class:`ImageLoadError` says went wrong: a missing file in words, else the error's type and text."""
    return "file not found" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
