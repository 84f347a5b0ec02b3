"""Processor: a :class:`Sample` → ``input_ids``, ``labels`` and ``pixel_values`` for the model.

The processor composes two rooms and keeps the order of their steps:

- :mod:`mmbridge.data.conversation` (:class:`ConversationTokenizer`): conversation templates and labels — the chat
  template, reply spans, the ``plain`` template, encoder–decoder prompts and targets (and the prefix LM),
  interleaved documents' text, placeholder expansion and truncation, a bridge tokenizer's instruction text;
- :mod:`mmbridge.data.images` (:class:`ImageInputs`): images and layouts — loading files with clear errors, image
  sizes read from headers, the image transform, a high-resolution strategy's crops, video frames.

A sample goes: boxes rewritten into ``box_format`` → conversation checked → images loaded (unless given, or
``pixels=False``) → their sizes when a high-resolution strategy (``highres``) lays them out → text tokenized with
labels and each ``<image>`` expanded (to ``tokens_per_image`` ids, or the ids of that image's layout) → pixels.

The constructor takes the model's tokenizer and image transform, then its settings grouped by what they configure:
:class:`ImageTokens` (what an ``<image>`` becomes), :class:`TextSettings` (what the text holds and which tokens
are targets: the saved ``max_length``/``system_prompt``/``box_format`` and a stage's ``template``, ``label_all``,
``prefix_lm``, ``text``), :class:`ModelText` (the LLM's kind, the chunk token, a bridge tokenizer),
:class:`VideoSettings` (frames of a video as one media), and the ``highres`` strategy object. The flat attribute
names of earlier versions (``processor.max_length``, ``processor.image_token_id``, …) read those settings.

Every failure is a :class:`SampleError` (a ``ValueError``) naming the sample id, with a short ``reason`` that
datasets use to count skipped samples.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from PIL import Image

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.data.conversation import (BRIDGE_TEXT_MAX_LENGTH, TEMPLATES, ConversationTokenizer, ImageTokens,
                                        ModelText, TextSettings, one_placeholder)
from mmbridge.data.formats.llava import Sample
from mmbridge.data.images import ImageInputs, VideoSettings, as_image, media_frames, size_inputs
from mmbridge.data.sample_errors import ImageLoadError, SampleError

__all__ = ["Processor", "SampleError", "ImageLoadError", "ImageTokens", "TextSettings", "ModelText", "VideoSettings",
           "TEMPLATES", "BRIDGE_TEXT_MAX_LENGTH"]


def _reads(path: str) -> property:
    """A read-only attribute that reads ``path`` (dotted) from the processor: the flat names it has always had."""
    return property(operator.attrgetter(path), doc=f"``{path}``")


class Processor:
    """Turns conversations with images into model inputs for one tokenizer, transform and token count."""

    tokenizer = _reads("conversation.tokenizer")
    transform = _reads("image_inputs.transform")
    highres = _reads("image_inputs.highres")  # a HighResStrategy: per-image layouts and crops, or None
    tokens_per_image = _reads("conversation.image_tokens.per_image")
    image_token = _reads("conversation.image_tokens.placeholder")
    placeholder_id = _reads("conversation.placeholder_id")
    image_token_id = _reads("conversation.image_token_id")
    max_length = _reads("conversation.settings.max_length")
    system_prompt = _reads("conversation.settings.system_prompt")
    template = _reads("conversation.settings.template")
    label_all = _reads("conversation.settings.label_all")
    prefix_lm = _reads("conversation.settings.prefix_lm")
    text = _reads("conversation.settings.text")
    box_format = _reads("conversation.settings.box_format")
    encoder_decoder = _reads("conversation.model_text.encoder_decoder")
    chunk_token = _reads("conversation.model_text.chunk_token")
    bridge_tokenizer = _reads("conversation.model_text.bridge_tokenizer")
    video_as_media = _reads("image_inputs.video.as_media")
    max_video_frames = _reads("image_inputs.video.max_frames")
    video_stride = _reads("image_inputs.video.stride")

    def __init__(self, tokenizer: Any, transform: Any, image_tokens: ImageTokens, *,
                 text_settings: TextSettings = TextSettings(), model_text: ModelText = ModelText(),
                 video_settings: VideoSettings = VideoSettings(), highres: Any = None) -> None:
        self.conversation = ConversationTokenizer(tokenizer, image_tokens, text_settings, model_text, highres)
        self.image_inputs = ImageInputs(transform, highres, video_settings)

    @property
    def pad_token_id(self) -> int:
        """The id to pad batches with (the tokenizer's pad token, else its eos token)."""
        return self.conversation.pad_token_id

    def settings(self) -> dict:
        """JSON-able settings that :class:`MultimodalModel` saves and passes back as keyword arguments."""
        return {"max_length": self.max_length, "system_prompt": self.system_prompt}

    # -- training examples ---------------------------------------------------------------------
    def __call__(self, sample: Sample, images: list[Image.Image] | None = None, pixels: bool = True) -> dict:
        """Process one sample; ``images`` (PIL) replace loading ``sample.images`` from disk.

        Returns ``{"id", "input_ids": [L], "labels": [L], "pixel_values": [n_images, 3, H, W]}`` (labels
        ``[T]``, the decoder's targets, with an encoder–decoder LLM), plus ``image_sizes`` ``[n_images, 2]``
        (high resolution) and ``bridge_inputs`` (:class:`~mmbridge.data.bridge_inputs.BridgeInputs`: the
        instruction per image with a ``bridge_tokenizer``, the frames per media for a model that takes video).
        ``pixels=False`` neither loads nor transforms the images and leaves ``pixel_values`` out
        (a feature cache supplies the encoder outputs instead).
        """
        image_count = len(sample.images) if images is None else len(images)
        sample = self.in_box_format(sample)
        if sample.document is not None:
            return self._document_example(sample, images, image_count, pixels)
        frames = self.video_frames(image_count) if self.video_as_media and sample.video and image_count else None
        if frames is not None:  # one media: one placeholder, the chosen frames
            sample = dataclasses.replace(sample, conversation=one_placeholder(sample.conversation, self.image_token))
            image_count = 1
        self.conversation.check_conversation(sample, image_count)
        loaded = images if images is not None or not pixels else self.load_images(sample)
        sizes = self.image_inputs.sizes(sample, loaded)
        messages = self.conversation.with_system_prompt(sample.conversation)
        input_ids, labels = self.conversation.conversation_ids(
            sample, self.conversation.with_signal_tokens(messages, sample.id), image_count, sizes)
        example = {"id": sample.id, "input_ids": torch.tensor(input_ids, dtype=torch.long),
                   "labels": torch.tensor(labels, dtype=torch.long), **size_inputs(sizes),
                   **self._bridge_inputs(messages, image_count, frames), **self._output_captions(sample, input_ids)}
        if sample.regions is not None:
            example["regions"] = sample.regions
        if pixels:
            example["pixel_values"] = self.pixel_values([loaded[i] for i in frames] if frames else loaded)
        return example

    def _output_captions(self, sample: Sample, input_ids: list[int]) -> dict[str, dict[str, list[str]]]:
        """``{"output_captions": {modality: [caption, ...]}}``: the captions of the sample's outputs in order (the
        alignment targets of a model that answers with images); a run truncation cut is a :class:`SampleError`."""
        outputs = [output for output in sample.outputs or []
                   if output["modality"] in self.conversation.model_text.signal_texts]
        if not outputs:
            return {}
        runs = self.conversation.signal_runs(input_ids)
        if runs != len(outputs):
            raise SampleError(f"sample {sample.id!r} answers with {len(outputs)} output(s) but {runs} complete "
                              f"run(s) of signal tokens are left within max_length {self.max_length}", sample.id,
                              "too_long")
        captions: dict[str, list[str]] = {}
        for output in outputs:
            captions.setdefault(output["modality"], []).append(output["caption"])
        return {"output_captions": captions}

    def _document_example(self, sample: Sample, images: list[Image.Image] | None, image_count: int,
                          pixels: bool) -> dict:
        """An interleaved document: its text (:meth:`ConversationTokenizer.document_ids`, every text token
        labelled), its images loaded and laid out, and its pixels."""
        input_ids, labels = self.conversation.document_ids(sample, image_count)
        loaded = images if images is not None or not pixels else self.load_images(sample)
        sizes = self.image_inputs.sizes(sample, loaded)
        if self.text:
            input_ids, labels = self.conversation.expand_and_truncate(input_ids, labels, image_count, sample.id,
                                                                      sizes)
        example = {"id": sample.id, "input_ids": torch.tensor(input_ids, dtype=torch.long),
                   "labels": torch.tensor(labels, dtype=torch.long), **size_inputs(sizes)}
        if pixels:
            example["pixel_values"] = self.pixel_values(loaded)
        return example

    def in_box_format(self, sample: Sample) -> Sample:
        """``sample`` with every grounding box of its turns and document texts in :attr:`box_format`."""
        return self.conversation.in_box_format(sample)

    def load_images(self, sample: Sample) -> list[Image.Image]:
        """Open and fully decode every image of ``sample``; a missing or corrupt file is an :class:`ImageLoadError`.

        A sample with an ``image_loader`` (streamed data) gets its images from it instead.
        """
        return self.image_inputs.load_images(sample)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """The encoder input of ``images``: ``[n, 3, H, W]``, or with a high-resolution strategy every image's crops
        ``[n_crops, 3, H, W]`` (zero-padded to the largest crop)."""
        return self.image_inputs.pixel_values(images)

    def video_frames(self, count: int) -> list[int]:
        """Which of a video's ``count`` frames a media keeps: every ``video_stride``-th, then at most
        ``max_video_frames`` of those, spread evenly from the first to the last."""
        return self.image_inputs.video_frames(count)

    @staticmethod
    def media_frames(image_count: int, frames: list[int] | None) -> torch.Tensor:
        """``[n_media, 1]``: the frames behind each placeholder (one video, or one per image)."""
        return media_frames(image_count, frames)

    def estimate_lengths(self, samples: list[Sample]) -> list[int]:
        """Approximate token counts without rendering templates or opening images (for length grouping).

        Counts the tokens of every turn's text plus ``tokens_per_image - 1`` per placeholder (a high-resolution
        strategy's count for an image of twice the encoder's side).
        """
        return self.conversation.estimate_lengths(samples)

    # -- generation prompts --------------------------------------------------------------------
    def prompt_inputs(self, text: str, images: list, history: list[dict] | None = None,
                      video: bool = False) -> dict[str, torch.Tensor | None]:
        """A generation prompt's ``input_ids`` ``[L]``, ``pixel_values``, ``image_sizes`` (high resolution) and
        ``bridge_inputs`` (the instruction per image, the frames per media); ``video``: ``images`` are one clip's
        frames (placeholders in ``text`` or ``history`` stand for frames and become one)."""
        frames = self.video_frames(len(images)) if self.video_as_media and video and images else None
        if frames is not None:
            messages = one_placeholder([*(history or []), {"role": "user", "content": text}], self.image_token)
            history, text = messages[:-1], messages[-1]["content"]
            images = [images[index] for index in frames]
        count = 1 if frames else len(images)
        images = [as_image(image) for image in images]
        sizes = self.image_inputs.sizes_of(images)
        messages = self.conversation.prompt_messages(text, count, history)
        return {"input_ids": self.prompt(text, num_images=count, history=history, image_sizes=sizes),
                "pixel_values": self.encode_images(images) if images else None, **size_inputs(sizes),
                **self._bridge_inputs(messages, count if images else 0, frames)}

    def _bridge_inputs(self, messages: list[dict], media_count: int,
                       frames: list[int] | None) -> dict[str, BridgeInputs]:
        """``{"bridge_inputs": ...}``: each image's instruction (with a bridge tokenizer) and, for a model that
        takes video, the frames of each of ``media_count`` media; empty when there is neither."""
        text = self.conversation.bridge_text(messages)
        media = self.media_frames(media_count, frames) if self.video_as_media and media_count else None
        if text is None and media is None:
            return {}
        text_ids, text_mask = text if text is not None else (None, None)
        return {"bridge_inputs": BridgeInputs(text_ids, text_mask, media)}

    def prompt(self, text: str, num_images: int = 0, history: list[dict] | None = None,
               image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Token ids ``[L]`` of a generation prompt ending with the assistant header.

        ``num_images`` counts all images of the prompt (history included); placeholders
        missing from ``text`` are prepended to it, each followed by a newline. A high-resolution
        model needs every image's ``image_sizes`` (height, width).
        """
        return self.conversation.prompt(text, num_images, history, image_sizes)

    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images or file paths → ``[n, 3, H, W]`` (a high-resolution model's crops: ``[n_crops, 3, H, W]``)."""
        return self.pixel_values([as_image(image) for image in images])
