"""What an answer holds besides its text: the images a model draws, handed to the server through one hook.

The server does not know how a model draws. :class:`~mmbridge.serve.engine.Engine` takes ``answer_images``, an
:data:`AnswerImages` callable (the hook for models that answer with images, issue 24), and calls it once per
finished row — in the generation thread, right after the row's last token, while the batch's other rows wait —
with a :class:`FinishedRow`: the row's prompt, its generated token ids, its text, why it ended, and what the
request asked of image answers (:class:`ImageOptions`). The hook returns that row's PIL images (``[]`` for none).

:func:`image_content_parts` turns them into OpenAI image content parts (PNG ``data:`` URLs), placed after the text:

* a plain answer's ``message.content`` is then a list, ``[{"type": "text", "text"}, {"type": "image_url",
  "image_url": {"url": "data:image/png;base64,..."}}, ...]`` (still a plain string when the row has no image);
* a streamed answer sends, after its last text delta and before the chunk with the finish reason, one chunk per
  image whose ``delta.content`` is a one-part list ``[{"type": "image_url", ...}]``.

:func:`drawing_hook` is that hook for a :class:`~mmbridge.model.multimodal.MultimodalModel` with an output side
(``model.output_modalities``): each complete run of signal tokens in a row's answer is drawn by the model's
generator (:meth:`~mmbridge.model.multimodal.MultimodalModel.render_media`) with the request's steps and size.
Without a hook (a text-only model) no row has images and answers are exactly what they were.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from mmbridge.data.collate import image_inputs
from mmbridge.generate import PromptImages
from mmbridge.model.output.render import ImageSettings
from mmbridge.serve.settings import ServeSettings

PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")  # saved as they are; others go through RGB(A)


@dataclass(frozen=True)
class ImageOptions:
    """What one request asks of image answers, checked against the server's limits.

    ``requested``: its ``modalities`` hold ``"image"``. ``steps`` (diffusion steps) and ``size`` (largest side in
    pixels) are the request's ``image.steps`` and ``image.size``, at most ``max_steps`` and ``max_size`` (the
    server's ``--max-image-steps`` and ``--max-image-size``), or ``None`` where the request named none: then the
    generator's own default applies, capped at the limit (:meth:`steps_or`, :meth:`size_or`).
    """

    requested: bool = False
    steps: int | None = None
    size: int | None = None
    max_steps: int = ServeSettings.max_image_steps
    max_size: int = ServeSettings.max_image_size

    def steps_or(self, default: int) -> int:
        """The steps to run: the request's, else ``default`` capped at ``max_steps``."""
        return self.steps if self.steps is not None else min(default, self.max_steps)

    def size_or(self, default: int) -> int:
        """The largest side to draw: the request's, else ``default`` capped at ``max_size``."""
        return self.size if self.size is not None else min(default, self.max_size)

    @property
    def largest_side(self) -> int:
        """The largest side an answer image may have once sent (larger ones are scaled down to it)."""
        return self.size if self.size is not None else self.max_size


@dataclass(frozen=True)
class FinishedRow:
    """One row of a batch whose answer has ended, as the ``answer_images`` hook sees it.

    ``example`` is the row's processed prompt (``input_ids`` ``[L]``, and ``pixel_values``, ``image_sizes``,
    ``bridge_inputs`` where the model needs them); ``token_ids`` every token the row generated, its EOS
    included when it ended at one; ``text`` the answer text the client got; ``finish_reason`` ``"stop"`` or
    ``"length"``.
    """

    example: dict[str, Any]
    token_ids: list[int]
    text: str
    finish_reason: str
    options: ImageOptions


AnswerImages = Callable[[FinishedRow], Sequence[Image.Image]]


def image_content_parts(images: Sequence[Image.Image], max_side: int) -> list[dict[str, Any]]:
    """OpenAI image content parts, one per image in order, each a PNG ``data:`` URL; an image whose largest side
    exceeds ``max_side`` pixels is scaled down to it (aspect ratio kept)."""
    parts = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"answer image {index} is a {type(image).__name__}, not a PIL image")
        parts.append({"type": "image_url", "image_url": {"url": png_data_url(_fit(image, max_side))}})
    return parts


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` of ``image``."""
    if image.mode not in PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def message_content(text: str, image_parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The assistant message's ``content``: the text alone, or its text part (if any) followed by the images."""
    if not image_parts:
        return text
    return ([{"type": "text", "text": text}] if text else []) + image_parts


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def drawing_hook(model: Any, default_steps: int = 30) -> AnswerImages | None:
    """The :data:`AnswerImages` of ``model``: the images its answer's signal tokens ask for (every complete run is
    drawn, whether or not the request named ``modalities``: the model chose to answer with an image), ``default_steps``
    diffusion steps unless the request names others (capped at ``--max-image-steps``), square ``image.size`` when the
    request gives one; None for a model that answers only with text."""
    if not model.output_modalities:
        return None

    def draw(row: FinishedRow) -> Sequence[Image.Image]:
        device = next(model.parameters()).device
        prompt = row.example["input_ids"].to(device)[None]  # [1, L]
        answer = torch.tensor([row.token_ids], dtype=torch.long, device=device)  # [1, T]
        images = PromptImages(**image_inputs(row.example, device))
        side = row.options.size
        settings = ImageSettings(steps=row.options.steps_or(default_steps), height=side, width=side)
        with torch.inference_mode():
            return model.render_media(prompt, torch.ones_like(prompt), answer, images, settings)[0]

    return draw
