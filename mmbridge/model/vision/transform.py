"""Image preprocessing written with PIL, numpy and torch (no torchvision).

:class:`ImageTransform` reproduces the HF image processors used by vision towers
(CLIP: shortest-edge resize + center crop; SigLIP/ViT: exact resize), plus LLaVA-1.5's
pad-to-square with the mean colour. Settings come from an encoder's own
``preprocessor_config.json`` (:meth:`ImageTransform.from_hf`) so a tower is always fed
the way it was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# PIL's integer codes, as HF preprocessor configs store them
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}


@dataclass
class ImageTransform:
    """PIL image → normalised ``[3, H, W]`` float tensor.

    ``resize``: ``"shortest_edge"`` scales the short side to ``size[0]`` keeping the aspect
    ratio; ``"exact"`` resizes to ``size`` = (height, width); ``"none"`` keeps the image.
    ``crop``: optional (height, width) center crop after the resize.
    ``pad_to_square``: pad with the mean colour (LLaVA-1.5 ``image_aspect_ratio: pad``)
    before resizing.
    """

    size: tuple[int, int] = (224, 224)
    resize: str = "exact"
    crop: tuple[int, int] | None = None
    resample: str = "bicubic"
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad_to_square: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.size = tuple(self.size)  # type: ignore[assignment]
        self.crop = tuple(self.crop) if self.crop else None  # type: ignore[assignment]
        self.mean = tuple(self.mean)  # type: ignore[assignment]
        self.std = tuple(self.std)  # type: ignore[assignment]
        if self.resize not in ("shortest_edge", "exact", "none"):
            raise ValueError(f"ImageTransform.resize must be 'shortest_edge', 'exact' or 'none', got {self.resize!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"ImageTransform.resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this transform produces."""
        if self.crop:
            return self.crop  # type: ignore[return-value]
        if self.resize == "exact":
            return self.size  # type: ignore[return-value]
        return (self.size[0], self.size[0])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageTransform":
        return cls(**data)

    @classmethod
    def from_hf(cls, settings: dict[str, Any], pad_to_square: bool = False) -> "ImageTransform":
        """Read an HF ``preprocessor_config.json`` dict (CLIP, SigLIP, ViT image processors)."""
        size = settings.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size:
            resize, hw = "shortest_edge", (size["shortest_edge"], size["shortest_edge"])
        else:
            resize, hw = "exact", (size["height"], size["width"])
        if settings.get("do_resize") is False:
            resize = "none"
        crop = None
        if settings.get("do_center_crop"):
            crop_size = settings.get("crop_size", size)
            if isinstance(crop_size, int):
                crop_size = {"height": crop_size, "width": crop_size}
            crop = (crop_size["height"], crop_size["width"])
        resample = settings.get("resample", 3)
        resample = _RESAMPLE_BY_CODE.get(resample, resample) if isinstance(resample, int) else str(resample).lower()
        rescale = settings.get("rescale_factor", 1 / 255) if settings.get("do_rescale", True) else 1.0
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if settings.get("do_normalize", True):
            mean = _per_channel(settings.get("image_mean", 0.5))
            std = _per_channel(settings.get("image_std", 0.5))
        return cls(size=hw, resize=resize, crop=crop, resample=resample, rescale=rescale,
                   mean=mean, std=std, pad_to_square=pad_to_square)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Transform one image; returns ``[3, H, W]`` float32."""
        image = _to_rgb(image)
        if self.pad_to_square:
            image = _pad_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.resize == "shortest_edge":
            image = image.resize(_shortest_edge_size(image.size, self.size[0]), _RESAMPLE[self.resample])
        elif self.resize == "exact":
            height, width = self.size
            image = image.resize((width, height), _RESAMPLE[self.resample])
        array = np.asarray(image, dtype=np.float32)  # [H, W, 3]
        if self.crop:
            array = _center_crop(array, self.crop)
        return self._normalised(array)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """``image`` at its own size, rescaled and normalised (no resize, crop or padding): ``[3, H, W]`` float32.
        High-resolution strategies cut their crops first and finish each with this."""
        return self._normalised(np.asarray(_to_rgb(image), dtype=np.float32))

    def _normalised(self, array: np.ndarray) -> torch.Tensor:
        """``[H, W, 3]`` pixels → rescaled, normalised ``[3, H, W]`` float32."""
        array = array * self.rescale
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """Transform a list of images into ``[N, 3, H, W]`` (``[0, 3, H, W]`` for none)."""
        if not images:
            return torch.zeros(0, 3, *self.output_size)
        return torch.stack([self(image) for image in images])


def resample_filter(name: str) -> Image.Resampling:
    """PIL's filter for a resample name (``"bicubic"``…)."""
    return _RESAMPLE[name]


def _per_channel(value: float | list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """An RGB triple from a per-channel list or one value for all channels (HF configs allow both)."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparency is composited onto white, as HF's ``convert_to_rgb`` does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # greyscale, 1-bit, palette and CMYK expand to three channels


def _shortest_edge_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short``, as HF's ``get_resize_output_image_size``."""
    width, height = size
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _center_crop(array: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Center-crop ``[H, W, C]`` to ``crop`` = (height, width), zero-padding if the image is smaller.

    Offsets follow HF's ``center_crop``: the crop starts at ``(size - crop) // 2`` and a too-small
    image is placed ``ceil((crop - size) / 2)`` from the top-left of the zero canvas.
    """
    crop_h, crop_w = crop
    height, width = array.shape[:2]
    if height < crop_h or width < crop_w:
        padded = np.zeros((max(height, crop_h), max(width, crop_w), array.shape[2]), array.dtype)
        top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)  # ceil
        padded[top:top + height, left:left + width] = array
        array, (height, width) = padded, padded.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return array[top:top + crop_h, left:left + crop_w]


def _pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """Pad the shorter side symmetrically with ``colour`` so the image is square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
