"""Processor: a :class:`Sample` → ``input_ids``, ``labels`` and ``pixel_values`` for the model.

Steps, in order: check the conversation (not empty, no ``<image>`` in answers, as many
placeholders as images) → render it with the tokenizer's chat template → find the
character span of every assistant reply by rendering prefixes of the conversation →
tokenize with offsets and label exactly the tokens inside those spans (the reply and
the template's end-of-turn token; system prompt, BOS, user turns, role headers and
images stay ``IGNORE_INDEX``) → expand each ``<image>`` token to ``tokens_per_image``
copies of the image token id → truncate from the right, never through an image →
load and transform the images. With a high-resolution strategy (``highres``) the expansion
depends on each image's size: the strategy's layout gives the ids (visual slots and separators),
the pixels are the image's crops, and the example carries ``bridge_image_sizes`` ``[n, 2]``.

With an encoder–decoder LLM (``encoder_decoder=True``, BLIP-2 FlanT5) the split is different:
``input_ids`` are the encoder's — every turn before the last assistant reply, rendered as a
generation prompt (the chat template's, or the turns' texts joined by newlines with the
tokenizer's own special tokens when it has no template, as T5's) with images expanded —
and ``labels`` are the decoder's targets: that reply's tokens and EOS. Earlier replies stay
in the prompt as context; each side is truncated to ``max_length`` (never through an image).
With ``prefix_lm`` (BLIP-2 §3.3's prefix language modelling for encoder–decoder LLMs) the
reply is split between two words, at a point drawn from the sample id (so a sample always
splits the same way): the prefix joins the encoder's input after the prompt, the suffix and
EOS are the targets. One-word replies are not split.

Grounding boxes: before anything else, every box in the turns (and document texts) is rewritten into
``box_format`` (:func:`mmbridge.boxes.rewrite_boxes`: ``plain`` ``[x0, y0, x1, y1]`` in 000–999, or Qwen-VL's
``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``), so a run trains on one format whatever its sources wrote; boxes
already in that format are left exactly as written (plain data is unchanged under the default).

Every failure is a :class:`SampleError` (a ``ValueError``) naming the sample id, with a
short ``reason`` that datasets use to count skipped samples.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import jinja2
import torch
from PIL import Image

from mmbridge.boxes import check_box_format, rewrite_boxes
from mmbridge.data.formats.llava import Sample
from mmbridge.data.collate import IGNORE_INDEX, pad_stack
from mmbridge.data.sample_errors import ImageLoadError, SampleError

Span = tuple[int, int]  # [start, end) character offsets in the rendered text
TEMPLATES = ("chat", "plain")  # the LLM's chat template, or LLaVA's plain image + reply (alignment pretraining)
BRIDGE_TEXT_MAX_LENGTH = 128  # instruction tokens per image for a bridge tokenizer (InstructBLIP's max_txt_len)


class Processor:
    """Turns conversations with images into model inputs for one tokenizer, transform and token count."""

    def __init__(self, tokenizer: Any, transform: Any, tokens_per_image: int, image_token: str = "<image>",
                 image_token_id: int | None = None, max_length: int = 2048,
                 system_prompt: str | None = None, bridge_tokenizer: Any = None,
                 encoder_decoder: bool = False, prefix_lm: bool = False, template: str = "chat",
                 text: bool = True, label_all: bool = False, chunk_token: str | None = None,
                 video_as_media: bool = False, max_video_frames: int | None = None, video_stride: int = 1,
                 highres: Any = None, box_format: str = "plain") -> None:
        if tokens_per_image < 1:
            raise ValueError(f"tokens_per_image must be at least 1, got {tokens_per_image}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.tokenizer = tokenizer
        self.transform = transform
        self.tokens_per_image = int(tokens_per_image)
        self.image_token = image_token
        self.placeholder_id = _single_token_id(tokenizer, image_token)
        self.image_token_id = self.placeholder_id if image_token_id is None else int(image_token_id)
        self.max_length = int(max_length)
        self.system_prompt = system_prompt
        self.bridge_tokenizer = bridge_tokenizer  # set: examples carry bridge_text_ids/bridge_text_mask per image
        self.encoder_decoder = bool(encoder_decoder)  # the LLM's, not a saved setting
        if prefix_lm and not encoder_decoder:
            raise ValueError("prefix_lm (BLIP-2's prefix language modelling) needs an encoder-decoder LLM")
        self.prefix_lm = bool(prefix_lm)  # a training stage's data setting, not saved
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if template == "plain" and encoder_decoder:
            raise ValueError("template 'plain' is for decoder-only LLMs (an encoder-decoder LLM takes its prompt "
                             "in the encoder)")
        self.template = template  # a training stage's data setting, not saved
        self.text = bool(text)  # False: examples carry images (and regions) only, for losses that read no text
        self.label_all = bool(label_all)  # a stage's data setting: every text token is a target, not only replies
        self.chunk_token = chunk_token  # the model's end-of-chunk token for interleaved documents (Flamingo), or None
        # a model whose bridge takes video reads a video sample's frames as one media behind one placeholder:
        # every video_stride-th frame, at most max_video_frames of them (spread evenly); examples then carry
        # bridge_media_frames [n_media, 1], the frames of each media
        if video_stride < 1:
            raise ValueError(f"video_stride must be >= 1, got {video_stride}")
        self.video_as_media, self.max_video_frames, self.video_stride = bool(video_as_media), max_video_frames, video_stride
        self.highres = highres  # a HighResStrategy: per-image layouts and crops, or None
        self.box_format = check_box_format(box_format)  # the form every grounding box of a sample is rewritten to
        self._probed_suffix: str | None = None

    @property
    def pad_token_id(self) -> int:
        """The id to pad batches with (the tokenizer's pad token, else its eos token)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def settings(self) -> dict:
        """JSON-able settings that :class:`MultimodalModel` saves and passes back as keyword arguments."""
        return {"max_length": self.max_length, "system_prompt": self.system_prompt}

    # -- training examples ---------------------------------------------------------------------
    def __call__(self, sample: Sample, images: list[Image.Image] | None = None, pixels: bool = True) -> dict:
        """Process one sample; ``images`` (PIL) replace loading ``sample.images`` from disk.

        Returns ``{"id", "input_ids": [L], "labels": [L], "pixel_values": [n_images, 3, H, W]}`` (labels
        ``[T]``, the decoder's targets, with an encoder–decoder LLM), plus
        ``bridge_text_ids``/``bridge_text_mask`` ``[n_images, T]`` with a ``bridge_tokenizer``.
        ``pixels=False`` neither loads nor transforms the images and leaves ``pixel_values`` out
        (a feature cache supplies the encoder outputs instead).
        """
        image_count = len(sample.images) if images is None else len(images)
        sample = self.in_box_format(sample)
        if sample.document is not None:
            return self._document_example(sample, images, image_count, pixels)
        frames = self.video_frames(image_count) if self.video_as_media and sample.video and image_count else None
        if frames is not None:  # one media: one placeholder, the chosen frames
            sample = dataclasses.replace(sample, conversation=_one_placeholder(sample.conversation, self.image_token))
            image_count = 1
        self._check_conversation(sample, image_count)
        loaded = images if images is not None or not pixels else self.load_images(sample)
        sizes = self._sizes(sample, loaded)
        messages = self._with_system_prompt(sample.conversation)
        if not self.text:
            input_ids, labels = [], []
        elif self.encoder_decoder:
            input_ids, labels = self._encoder_decoder_ids(messages, image_count, sample.id)
        elif self.template == "plain":
            input_ids, labels = self._plain_ids(sample, image_count, sizes)
        else:
            text, spans = self._render_with_reply_spans(messages, sample.id)
            context = sample.context_turns + len(messages) - len(sample.conversation)  # + a system prompt added
            spans = spans[sum(1 for message in messages[:context] if message["role"] == "assistant"):]
            input_ids, labels = self._tokenize(text, spans)
            if self.label_all:  # Flamingo's objective: every text token (the model never predicts image tokens)
                labels = list(input_ids)
            input_ids, labels = self._expand_images(input_ids, labels, image_count, sample.id, sizes)
            input_ids, labels = self._truncate(input_ids, labels, sample.id)
        example = {"id": sample.id, "input_ids": torch.tensor(input_ids, dtype=torch.long),
                   "labels": torch.tensor(labels, dtype=torch.long), **self.bridge_text_inputs(messages),
                   **self._size_inputs(sizes)}
        if sample.regions is not None:
            example["regions"] = sample.regions
        if self.video_as_media and image_count:
            example["bridge_media_frames"] = self.media_frames(image_count, frames)
        if pixels:
            example["pixel_values"] = self.pixel_values([loaded[i] for i in frames] if frames else loaded)
        return example

    def in_box_format(self, sample: Sample) -> Sample:
        """``sample`` with every grounding box of its turns and document texts in :attr:`box_format`."""
        def rewrite(text: str) -> str:
            return rewrite_boxes(text, self.box_format)

        conversation = [{**turn, "content": rewrite(turn["content"])} for turn in sample.conversation]
        document = None if sample.document is None else [{**chunk, "text": rewrite(chunk["text"])}
                                                          for chunk in sample.document]
        if conversation == sample.conversation and document == sample.document:
            return sample
        return dataclasses.replace(sample, conversation=conversation, document=document)

    def _sizes(self, sample: Sample, loaded: list[Image.Image] | None) -> list[tuple[int, int]] | None:
        """Each image's (height, width) when a high-resolution strategy needs them (read from the file headers
        when the images are not loaded), else None."""
        if self.highres is None:
            return None
        if loaded is None:
            loaded = [_image_header(path, sample.id) for path in sample.images] if sample.image_loader is None \
                else self.load_images(sample)
        return [(image.height, image.width) for image in loaded]

    @staticmethod
    def _size_inputs(sizes: list[tuple[int, int]] | None) -> dict[str, torch.Tensor]:
        """``{"bridge_image_sizes": [n, 2]}`` for a high-resolution model's images (none without images)."""
        return {"bridge_image_sizes": torch.tensor(sizes, dtype=torch.long)} if sizes else {}

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """The encoder input of ``images``: ``[n, 3, H, W]``, or with a high-resolution strategy every image's crops
        ``[n_crops, 3, H, W]`` (zero-padded to the largest crop)."""
        if self.highres is None or not images:
            return self.transform.batch(images)
        return pad_stack([crop for image in images for crop in self.highres.pixel_values(image)])

    def video_frames(self, count: int) -> list[int]:
        """Which of a video's ``count`` frames a media keeps: every ``video_stride``-th, then at most
        ``max_video_frames`` of those, spread evenly from the first to the last."""
        kept = list(range(0, count, self.video_stride))
        most = self.max_video_frames
        if most and len(kept) > most:
            kept = [kept[round(step * (len(kept) - 1) / max(most - 1, 1))] for step in range(most)]
        return kept

    @staticmethod
    def media_frames(image_count: int, frames: list[int] | None) -> torch.Tensor:
        """``[n_media, 1]``: the frames behind each placeholder (one video, or one per image)."""
        return torch.tensor([[len(frames)]] if frames else [[1]] * image_count, dtype=torch.long)

    def prompt_inputs(self, text: str, images: list, history: list[dict] | None = None,
                      video: bool = False) -> dict[str, torch.Tensor | None]:
        """A generation prompt's ``input_ids`` ``[L]``, ``pixel_values`` and, for a model that takes video,
        ``bridge_media_frames``; ``video``: ``images`` are one clip's frames (placeholders in ``text`` or
        ``history`` stand for frames and become one)."""
        frames = self.video_frames(len(images)) if self.video_as_media and video and images else None
        if frames is not None:
            messages = _one_placeholder([*(history or []), {"role": "user", "content": text}], self.image_token)
            history, text = messages[:-1], messages[-1]["content"]
            images = [images[index] for index in frames]
        count = 1 if frames else len(images)
        images = [_as_image(image) for image in images]
        sizes = [(image.height, image.width) for image in images] if self.highres is not None else None
        inputs = {"input_ids": self.prompt(text, num_images=count, history=history, image_sizes=sizes),
                  "pixel_values": self.encode_images(images) if images else None, **self._size_inputs(sizes)}
        if self.video_as_media and images:
            inputs["bridge_media_frames"] = self.media_frames(count, frames)
        return inputs

    def _document_example(self, sample: Sample, images: list[Image.Image] | None, image_count: int,
                          pixels: bool) -> dict:
        """An interleaved document: ``<image>`` + text per chunk (and the chunk token where the model has one),
        led by the tokens the LLM saw first, ended by EOS; every text token is labelled."""
        placed = sum(1 for chunk in sample.document if chunk["image"])
        if placed != image_count:
            raise SampleError(f"document {sample.id!r} places {placed} image(s) but {image_count} were given",
                              sample.id, "placeholders")
        input_ids = [] if not self.text else self._leading_ids()
        if self.text:
            for chunk in sample.document:
                end = self.chunk_token if chunk["image"] and self.chunk_token else "\n"
                text = (self.image_token if chunk["image"] else "") + chunk["text"] + end
                input_ids += list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self.tokenizer.eos_token_id is not None:
                input_ids.append(int(self.tokenizer.eos_token_id))
        labels = [IGNORE_INDEX if token == self.placeholder_id else token for token in input_ids]
        loaded = images if images is not None or not pixels else self.load_images(sample)
        sizes = self._sizes(sample, loaded)
        if self.text:
            input_ids, labels = self._expand_images(input_ids, labels, image_count, sample.id, sizes)
            input_ids, labels = self._truncate(input_ids, labels, sample.id)
        example = {"id": sample.id, "input_ids": torch.tensor(input_ids, dtype=torch.long),
                   "labels": torch.tensor(labels, dtype=torch.long), **self._size_inputs(sizes)}
        if pixels:
            example["pixel_values"] = self.pixel_values(loaded)
        return example

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

    def estimate_lengths(self, samples: list[Sample]) -> list[int]:
        """Approximate token counts without rendering templates or opening images (for length grouping).

        Counts the tokens of every turn's text plus ``tokens_per_image - 1`` per placeholder (a high-resolution
        strategy's count for an image of twice the encoder's side).
        """
        texts = ["\n".join(turn["content"] for turn in sample.conversation) if sample.document is None
                 else "\n".join((self.image_token if chunk["image"] else "") + chunk["text"] for chunk in sample.document)
                 for sample in samples]
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        extra = (self.highres.typical_tokens() if self.highres is not None else self.tokens_per_image) - 1
        return [len(ids) + extra * text.count(self.image_token) for ids, text in zip(encoded, texts)]

    # -- generation prompts --------------------------------------------------------------------
    def prompt(self, text: str, num_images: int = 0, history: list[dict] | None = None,
               image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Token ids ``[L]`` of a generation prompt ending with the assistant header.

        ``num_images`` counts all images of the prompt (history included); placeholders
        missing from ``text`` are prepended to it, each followed by a newline. A high-resolution
        model needs every image's ``image_sizes`` (height, width).
        """
        input_ids = self._prompt_ids(self._prompt_messages(text, num_images, history))
        input_ids, _ = self._expand_images(input_ids, [IGNORE_INDEX] * len(input_ids), num_images, "prompt",
                                           image_sizes)
        return torch.tensor(input_ids, dtype=torch.long)

    def prompt_bridge_inputs(self, text: str, num_images: int = 0,
                             history: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """The ``bridge_text_ids``/``bridge_text_mask`` of the prompt :meth:`prompt` builds (empty without them)."""
        return self.bridge_text_inputs(self._prompt_messages(text, num_images, history))

    def _prompt_messages(self, text: str, num_images: int, history: list[dict] | None) -> list[dict]:
        """History plus the user turn, with missing placeholders prepended to ``text``."""
        history = list(history or [])
        present = sum(turn["content"].count(self.image_token) for turn in history) + text.count(self.image_token)
        if present > num_images:
            raise ValueError(f"prompt holds {present} {self.image_token} placeholders but {num_images} "
                             f"image(s) were given")
        text = f"{self.image_token}\n" * (num_images - present) + text
        return self._with_system_prompt(history + [{"role": "user", "content": text}])

    def bridge_text_inputs(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        """Per image, the turn holding it without placeholders, tokenized by the bridge tokenizer.

        Returns ``{"bridge_text_ids", "bridge_text_mask"}`` ``[n_images, T]`` (format instructions
        kept, at most :data:`BRIDGE_TEXT_MAX_LENGTH` tokens), or ``{}`` without a bridge tokenizer
        or images.
        """
        texts = [turn["content"].replace(self.image_token, "").strip()
                 for turn in messages for _ in range(turn["content"].count(self.image_token))]
        if self.bridge_tokenizer is None or not texts:
            return {}
        encoded = self.bridge_tokenizer(texts, padding=True, truncation=True, max_length=BRIDGE_TEXT_MAX_LENGTH,
                                        return_tensors="pt")
        return {"bridge_text_ids": encoded["input_ids"].long(), "bridge_text_mask": encoded["attention_mask"].long()}

    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images or file paths → ``[n, 3, H, W]`` (a high-resolution model's crops: ``[n_crops, 3, H, W]``)."""
        return self.pixel_values([_as_image(image) for image in images])

    # -- steps ---------------------------------------------------------------------------------
    def _check_conversation(self, sample: Sample, image_count: int) -> None:
        """Reject empty conversations, placeholders in answers, and placeholder/image count mismatches."""
        if not sample.conversation:
            raise SampleError(f"sample {sample.id!r}: the conversation is empty", sample.id, "empty")
        placeholders = 0
        for number, turn in enumerate(sample.conversation):
            found = turn["content"].count(self.image_token)
            if found and turn["role"] == "assistant":
                raise SampleError(f"sample {sample.id!r}: assistant turn {number} contains {self.image_token}; "
                                  f"images may only appear in user or system turns", sample.id, "placeholders")
            placeholders += found
        if placeholders != image_count:
            raise SampleError(f"sample {sample.id!r}: the conversation has {placeholders} {self.image_token} "
                              f"placeholder(s) but {image_count} image(s) were given", sample.id, "placeholders")

    def _with_system_prompt(self, conversation: list[dict]) -> list[dict]:
        """``[{"role", "content"}]`` messages, led by the configured system prompt unless one is present."""
        messages = [{"role": turn["role"], "content": turn["content"]} for turn in conversation]
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _prompt_ids(self, messages: list[dict], reply_start: str = "") -> list[int]:
        """Token ids of ``messages`` as a generation prompt (placeholders not yet expanded), followed by
        ``reply_start`` (the start of the answer, for the prefix LM).

        The chat template renders it; an encoder–decoder LLM whose tokenizer has no template
        (T5) gets the turns' texts joined by newlines, with the tokenizer's own special tokens.
        """
        if self.encoder_decoder and not getattr(self.tokenizer, "chat_template", None):
            texts = [turn["content"] for turn in messages] + ([reply_start] if reply_start else [])
            return list(self.tokenizer("\n".join(texts))["input_ids"])
        rendered = self._render(messages, add_generation_prompt=True) + reply_start
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def _encoder_decoder_ids(self, messages: list[dict], image_count: int,
                             sample_id: str) -> tuple[list[int], list[int]]:
        """Encoder ids (the turns before the last reply, images expanded) and decoder targets (reply + EOS)."""
        last = max((index for index, turn in enumerate(messages) if turn["role"] == "assistant"), default=None)
        if last is None:
            raise SampleError(f"sample {sample_id!r}: the conversation has no assistant turn to train on",
                              sample_id, "no_labels")
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("an encoder-decoder LLM's tokenizer needs an eos_token to end its targets")
        prefix, reply = _prefix_split(messages[last]["content"], sample_id) if self.prefix_lm \
            else ("", messages[last]["content"])
        input_ids = self._prompt_ids(messages[:last], prefix)
        input_ids, _ = self._expand_images(input_ids, [IGNORE_INDEX] * len(input_ids), image_count, sample_id)
        labels = list(self.tokenizer(reply, add_special_tokens=False)["input_ids"]) + [int(eos)]
        return self._truncate_prompt(input_ids, sample_id), labels[:self.max_length]

    def _plain_ids(self, sample: Sample, image_count: int,
                   sizes: list[tuple[int, int]] | None = None) -> tuple[list[int], list[int]]:
        """LLaVA's ``plain`` pretraining format: the image's tokens, then the reply and a newline, nothing else
        (no system prompt, no chat markup, no user text); only the reply and the newline are labelled."""
        turns = [turn["role"] for turn in sample.conversation]
        if turns != ["user", "assistant"] or image_count != 1:
            raise SampleError(f"sample {sample.id!r}: template 'plain' takes one user turn with one image and "
                              f"one reply, got turns {turns} and {image_count} image(s)", sample.id, "template")
        leading = self._leading_ids()
        reply = list(self.tokenizer(sample.conversation[1]["content"].strip() + "\n",
                                    add_special_tokens=False)["input_ids"])
        input_ids = leading + [self.placeholder_id] + reply
        labels = [IGNORE_INDEX] * (len(leading) + 1) + reply
        input_ids, labels = self._expand_images(input_ids, labels, image_count, sample.id, sizes)
        return self._truncate(input_ids, labels, sample.id)

    def _leading_ids(self) -> list[int]:
        """What the LLM saw first in training: the tokens the tokenizer adds itself (Llama's BOS), or the BOS the
        chat template renders first (templates that write ``{{ bos_token }}``); none for ChatML models."""
        added = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        bos = self.tokenizer.bos_token
        if added or not bos or self.tokenizer.bos_token_id is None:
            return added
        try:
            rendered = self._render([{"role": "user", "content": "x"}], add_generation_prompt=False)
        except jinja2.TemplateError:
            return []
        return [int(self.tokenizer.bos_token_id)] if rendered.startswith(bos) else []

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _render_with_reply_spans(self, messages: list[dict], sample_id: str) -> tuple[str, list[Span]]:
        """The rendered conversation and the character span of each assistant reply (+ end-of-turn token)."""
        full = self._render(messages, add_generation_prompt=False)
        spans, cursor = [], 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self._prefix_span(messages, index, full)
            if start is None or start < cursor:
                start, end = self._search_span(full, message["content"], cursor, index, sample_id)
            while end > start and full[end - 1].isspace():
                end -= 1  # the newline a template writes after its end-of-turn token is not trained
            spans.append((start, end))
            cursor = end
        return full, spans

    def _prefix_span(self, messages: list[dict], index: int, full: str) -> Span | tuple[None, None]:
        """Reply ``index`` located by rendering the conversation up to it, when the template is prefix-stable."""
        try:
            before = self._render(messages[:index], add_generation_prompt=True)
            through = self._render(messages[:index + 1], add_generation_prompt=False)
        except jinja2.TemplateError:
            return None, None
        if not (full.startswith(before) and full.startswith(through) and len(before) < len(through)):
            return None, None
        return len(before), len(through)

    def _search_span(self, full: str, content: str, cursor: int, index: int, sample_id: str) -> Span:
        """Fallback for templates whose prefixes differ: find the reply text, then take its end-of-turn marker."""
        reply = content.strip()
        start = full.find(reply, cursor)
        if not reply or start < 0:
            raise SampleError(f"sample {sample_id!r}: the chat template does not render assistant turn {index} "
                              f"verbatim, so its labels cannot be placed", sample_id, "template")
        end = start + len(reply)
        closing = self._closing_marker(full[end:])
        eos = self.tokenizer.eos_token
        if not closing and eos and full.startswith(eos, end):
            closing = eos
        return start, end + len(closing)

    def _closing_marker(self, following: str) -> str:
        """The whole tokens of the template's end-of-turn suffix that ``following`` starts with (no trailing space)."""
        suffix = self._reply_suffix()
        shared = len(_common_prefix(suffix, following))
        offsets = self.tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        whole = max((last for _, last in offsets if last <= shared), default=0)
        return suffix[:whole].rstrip()

    def _reply_suffix(self) -> str:
        """The text the template writes right after an assistant reply (its end-of-turn marker), by probing."""
        if self._probed_suffix is None:
            probe = "mmbridge-probe-reply"
            messages = self._with_system_prompt([{"role": "user", "content": "mmbridge-probe-question"},
                                                 {"role": "assistant", "content": probe}])
            try:
                rendered = self._render(messages, add_generation_prompt=False)
            except jinja2.TemplateError:
                rendered = ""
            self._probed_suffix = rendered.split(probe, 1)[1] if probe in rendered else ""
        return self._probed_suffix

    def _tokenize(self, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and labels: the id where a token overlaps a reply span, else IGNORE_INDEX."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        labels = []
        for token_id, (first, last) in zip(input_ids, encoded["offset_mapping"]):
            inside = any(first < end and max(last, first + 1) > start for start, end in spans)
            labels.append(token_id if inside else IGNORE_INDEX)
        return input_ids, labels

    def _expand_images(self, input_ids: list[int], labels: list[int], image_count: int, sample_id: str,
                       sizes: list[tuple[int, int]] | None = None) -> tuple[list[int], list[int]]:
        """Replace each placeholder token with ``tokens_per_image`` image token ids, or the high-resolution layout's
        ids for that image's size (labels IGNORE_INDEX)."""
        found = input_ids.count(self.placeholder_id)
        if found != image_count:
            raise SampleError(f"sample {sample_id!r}: the rendered text holds {found} {self.image_token} token(s) "
                              f"but {image_count} image(s) were given (does the system prompt or template "
                              f"contain {self.image_token}?)", sample_id, "placeholders")
        if self.highres is not None and (sizes is None or len(sizes) != image_count):
            raise ValueError(f"sample {sample_id!r}: a high-resolution model needs the size of each of its "
                             f"{image_count} image(s), got {None if sizes is None else len(sizes)}")
        spans = iter([self.highres.token_ids(size, self.image_token_id) for size in sizes] if self.highres is not None
                     else [])
        expanded_ids, expanded_labels = [], []
        for token_id, label in zip(input_ids, labels):
            if token_id == self.placeholder_id:
                span = next(spans) if self.highres is not None else [self.image_token_id] * self.tokens_per_image
                expanded_ids += span
                expanded_labels += [IGNORE_INDEX] * len(span)
            else:
                expanded_ids.append(token_id)
                expanded_labels.append(label)
        return expanded_ids, expanded_labels

    def _truncate(self, input_ids: list[int], labels: list[int], sample_id: str) -> tuple[list[int], list[int]]:
        """Cut to ``max_length`` from the right; an image cut or dropped, or no label left, is an error."""
        input_ids = self._truncate_prompt(input_ids, sample_id)
        labels = labels[:len(input_ids)]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(f"sample {sample_id!r}: no labelled token (an assistant reply, or any text of a "
                              f"document) is left to train on within max_length {self.max_length} (the sample has "
                              f"none or it was truncated away)", sample_id, "no_labels")
        return input_ids, labels

    def _truncate_prompt(self, input_ids: list[int], sample_id: str) -> list[int]:
        """``input_ids`` cut to ``max_length`` from the right; cutting or dropping an image is an error."""
        if len(input_ids) <= self.max_length:
            return input_ids
        kept = input_ids[:self.max_length].count(self.image_token_id)
        total = input_ids.count(self.image_token_id)
        if kept != total:
            raise SampleError(f"sample {sample_id!r} needs {len(input_ids)} tokens ({total} of them image "
                              f"tokens) but max_length is {self.max_length}; truncation would cut an image",
                              sample_id, "too_long")
        return input_ids[:self.max_length]


def _one_placeholder(turns: list[dict], placeholder: str) -> list[dict]:
    """``turns`` with only the first ``placeholder`` kept (a video's frames become one media); if none is
    present the processor adds one as for any image."""
    result, seen = [], False
    for turn in turns:
        parts = turn["content"].split(placeholder)
        if len(parts) > 1:
            content = parts[0] + ("" if seen else placeholder) + "".join(parts[1:])
            seen = True
        else:
            content = turn["content"]
        result.append({**turn, "content": content})
    return result


def _prefix_split(reply: str, sample_id: str) -> tuple[str, str]:
    """``reply`` cut between two of its words at a point drawn from ``sample_id``: (prefix, suffix)."""
    words = reply.split(" ")
    if len(words) < 2:
        return "", reply
    cut = random.Random(f"prefix-lm:{sample_id}").randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _single_token_id(tokenizer: Any, token: str) -> int:
    """The id ``token`` encodes to, which must be exactly one token."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {token!r} into {len(ids)} tokens {ids}; add it as one special "
                         f"token first (tokenizer.add_tokens([{token!r}], special_tokens=True))")
    return int(ids[0])


def _common_prefix(first: str, second: str) -> str:
    """The longest string both ``first`` and ``second`` start with."""
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    return first[:length]


def _as_image(image: Any) -> Image.Image:
    """A PIL image, or a file path opened as one."""
    return image if isinstance(image, Image.Image) else _open_image(os.fspath(image), "prompt")


def _image_header(path: str, sample_id: str) -> Image.Image:
    """The image at ``path`` opened lazily (its size is read from the header, its pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        cause = "file not found" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise ImageLoadError(path, sample_id, cause) from error


def _open_image(path: str, sample_id: str) -> Image.Image:
    """Open and decode one image file; the returned image no longer holds the file open."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        cause = "file not found" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise ImageLoadError(path, sample_id, cause) from error
