"""Conversation templates and labels: the text side of the :class:`~mmbridge.data.processor.Processor`.

A sample's text becomes ``input_ids`` and ``labels`` in these steps: check the conversation (not empty, no
``<image>`` in answers, as many placeholders as images) → render it with the tokenizer's chat template → find the
character span of every assistant reply by rendering prefixes of the conversation → tokenize with offsets and label
exactly the tokens inside those spans (the reply and the template's end-of-turn token; system prompt, BOS, user
turns, role headers and images stay ``IGNORE_INDEX``) → expand each ``<image>`` token to ``tokens_per_image`` copies
of the image token id (with a high-resolution strategy, ``highres``, the ids of that image's layout: visual slots
and separators, for the size the image side reads) → truncate from the right, never through an image.

Other shapes of text, each one method:

- the ``plain`` template (LLaVA's alignment pretraining): the image's tokens, the reply and a newline;
- an encoder–decoder LLM (BLIP-2 FlanT5): ``input_ids`` are the encoder's — every turn before the last assistant
  reply, rendered as a generation prompt (the chat template's, or the turns' texts joined by newlines with the
  tokenizer's own special tokens when it has no template, as T5's) with images expanded — and ``labels`` are the
  decoder's targets: that reply's tokens and EOS; each side is truncated to ``max_length`` (never through an
  image). With ``prefix_lm`` (BLIP-2 §3.3) the reply is split between two words at a point drawn from the sample
  id (a sample always splits the same way): the prefix joins the encoder's input, the suffix and EOS are the
  targets. One-word replies are not split;
- interleaved documents: ``<image>`` + text per chunk (and the model's chunk token), every text token labelled;
- generation prompts ending with the assistant header, and a bridge tokenizer's instruction text per image.

Grounding boxes: before anything else, every box in the turns (and document texts) is rewritten into
``box_format`` (:func:`mmbridge.boxes.rewrite_boxes`: ``plain`` ``[x0, y0, x1, y1]`` in 000–999, or Qwen-VL's
``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``), so a run trains on one format whatever its sources wrote; boxes
already in that format are left exactly as written (plain data is unchanged under the default).

Every failure of a sample is a :class:`SampleError` naming the sample id. It opens no image: images are
:mod:`mmbridge.data.images`'s.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import jinja2
import torch

from mmbridge.boxes import check_box_format, rewrite_boxes
from mmbridge.data.collate import IGNORE_INDEX
from mmbridge.data.formats.llava import OUTPUT_MARKERS, Sample
from mmbridge.data.sample_errors import SampleError

Span = tuple[int, int]  # [start, end) character offsets in the rendered text
ImageSize = tuple[int, int]  # (height, width) in pixels
TEMPLATES = ("chat", "plain")  # the LLM's chat template, or LLaVA's plain image + reply (alignment pretraining)
BRIDGE_TEXT_MAX_LENGTH = 128  # instruction tokens per image for a bridge tokenizer (InstructBLIP's max_txt_len)


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """How an ``<image>`` placeholder becomes tokens: the placeholder's text, the id of the visual slots it expands
    to and how many (without a high-resolution strategy, which lays each image out by its size)."""

    per_image: int  # visual tokens one placeholder expands to (the model's tokens_per_image)
    placeholder: str = "<image>"  # the text standing for an image; the tokenizer must keep it one token
    token_id: int | None = None  # the id of the visual slots; None: the placeholder's own id

    def __post_init__(self) -> None:
        if self.per_image < 1:
            raise ValueError(f"tokens_per_image must be at least 1, got {self.per_image}")
        object.__setattr__(self, "per_image", int(self.per_image))
        if self.token_id is not None:
            object.__setattr__(self, "token_id", int(self.token_id))


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """What an example's text holds and which tokens are targets: a run's saved settings (``max_length``,
    ``system_prompt``, ``box_format``: ``processor.json``) and a stage's data settings over them."""

    max_length: int = 2048  # tokens per example (each side of an encoder-decoder example)
    system_prompt: str | None = None  # leads every conversation that has no system turn of its own
    template: str = "chat"  # "chat": the tokenizer's chat template; "plain": LLaVA's image + reply
    label_all: bool = False  # every text token is a target (Flamingo), not only the replies
    prefix_lm: bool = False  # BLIP-2's prefix language modelling (encoder-decoder LLMs only)
    text: bool = True  # False: examples carry images (and regions) only, for losses that read no text
    box_format: str = "plain"  # the form every grounding box of a sample is rewritten to

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        check_box_format(self.box_format)
        object.__setattr__(self, "max_length", int(self.max_length))
        for flag in ("label_all", "prefix_lm", "text"):
            object.__setattr__(self, flag, bool(getattr(self, flag)))


@dataclasses.dataclass(frozen=True)
class ModelText:
    """What the model's LLM and bridge read as text (fixed by the model, never a saved setting)."""

    encoder_decoder: bool = False  # the LLM is an encoder-decoder (T5): prompt in the encoder, reply as targets
    chunk_token: str | None = None  # the model's end-of-chunk token for interleaved documents (Flamingo), or None
    bridge_tokenizer: Any = None  # set: examples carry each image's instruction in bridge_inputs (InstructBLIP)
    # output modality → the text of one run of its signal tokens ("[IMG0][IMG1][IMG2][IMG3]"): a model that answers
    # with images writes that run where an assistant turn holds the modality's marker (NExT-GPT)
    signal_texts: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_decoder", bool(self.encoder_decoder))


class ConversationTokenizer:
    """Conversations, documents and prompts → token ids and labels, for one tokenizer and its settings."""

    def __init__(self, tokenizer: Any, image_tokens: ImageTokens, settings: TextSettings = TextSettings(),
                 model_text: ModelText = ModelText(), highres: Any = None) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.placeholder_id = _single_token_id(tokenizer, image_tokens.placeholder)
        self.image_token_id = self.placeholder_id if image_tokens.token_id is None else image_tokens.token_id
        if settings.prefix_lm and not model_text.encoder_decoder:
            raise ValueError("prefix_lm (BLIP-2's prefix language modelling) needs an encoder-decoder LLM")
        if settings.template == "plain" and model_text.encoder_decoder:
            raise ValueError("template 'plain' is for decoder-only LLMs (an encoder-decoder LLM takes its prompt "
                             "in the encoder)")
        self.settings = settings
        self.model_text = model_text
        self.highres = highres  # a HighResStrategy: the token ids of each image's layout, or None
        self._probed_suffix: str | None = None

    @property
    def pad_token_id(self) -> int:
        """The id to pad batches with (the tokenizer's pad token, else its eos token)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    # -- samples -------------------------------------------------------------------------------
    def in_box_format(self, sample: Sample) -> Sample:
        """``sample`` with every grounding box of its turns and document texts in ``box_format``."""
        def rewrite(text: str) -> str:
            return rewrite_boxes(text, self.settings.box_format)

        conversation = [{**turn, "content": rewrite(turn["content"])} for turn in sample.conversation]
        document = None if sample.document is None else [{**chunk, "text": rewrite(chunk["text"])}
                                                          for chunk in sample.document]
        if conversation == sample.conversation and document == sample.document:
            return sample
        return dataclasses.replace(sample, conversation=conversation, document=document)

    def check_conversation(self, sample: Sample, image_count: int) -> None:
        """Reject empty conversations, placeholders in answers, and placeholder/image count mismatches."""
        if not sample.conversation:
            raise SampleError(f"sample {sample.id!r}: the conversation is empty", sample.id, "empty")
        placeholders = 0
        placeholder = self.image_tokens.placeholder
        for number, turn in enumerate(sample.conversation):
            found = turn["content"].count(placeholder)
            if found and turn["role"] == "assistant":
                raise SampleError(f"sample {sample.id!r}: assistant turn {number} contains {placeholder}; "
                                  f"images may only appear in user or system turns", sample.id, "placeholders")
            placeholders += found
        if placeholders != image_count:
            raise SampleError(f"sample {sample.id!r}: the conversation has {placeholders} {placeholder} "
                              f"placeholder(s) but {image_count} image(s) were given", sample.id, "placeholders")

    def with_signal_tokens(self, messages: list[dict], sample_id: str = "prompt") -> list[dict]:
        """``messages`` with each output marker (``<image_out>``) written as the model's run of signal tokens; a
        marker of a modality the model cannot answer with is a :class:`SampleError` naming both."""
        for modality, marker in OUTPUT_MARKERS.items():
            if not any(marker in turn["content"] for turn in messages):
                continue
            if modality not in self.model_text.signal_texts:
                raise SampleError(f"sample {sample_id!r} answers with {modality} ({marker}) but the model has no "
                                  f"{modality} output side (ModelConfig.output)", sample_id, "outputs")
            run = self.model_text.signal_texts[modality]
            messages = [{**turn, "content": turn["content"].replace(marker, run)} for turn in messages]
        return messages

    def signal_runs(self, input_ids: list[int]) -> int:
        """Complete runs of signal tokens in ``input_ids`` (a run truncation cut short does not count)."""
        count = 0
        for text in self.model_text.signal_texts.values():
            run = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            count += sum(input_ids[start:start + len(run)] == run for start in range(len(input_ids))
                         if input_ids[start] == run[0])
        return count

    def with_system_prompt(self, conversation: list[dict]) -> list[dict]:
        """``[{"role", "content"}]`` messages, led by the configured system prompt unless one is present."""
        messages = [{"role": turn["role"], "content": turn["content"]} for turn in conversation]
        system_prompt = self.settings.system_prompt
        if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages

    def conversation_ids(self, sample: Sample, messages: list[dict], image_count: int,
                         sizes: list[ImageSize] | None) -> tuple[list[int], list[int]]:
        """``input_ids`` and ``labels`` of a checked conversation (``messages``: its turns with the system prompt),
        images expanded for their ``sizes``; both empty when the examples carry no text."""
        if not self.settings.text:
            return [], []
        if self.model_text.encoder_decoder:
            return self._encoder_decoder_ids(messages, image_count, sample.id)
        if self.settings.template == "plain":
            return self._plain_ids(sample, image_count, sizes)
        return self._chat_ids(sample, messages, image_count, sizes)

    def document_ids(self, sample: Sample, image_count: int) -> tuple[list[int], list[int]]:
        """An interleaved document's ids and labels, placeholders not yet expanded: ``<image>`` + text per chunk
        (and the chunk token where the model has one), led by the tokens the LLM saw first, ended by EOS; every
        text token is labelled. Both empty when the examples carry no text."""
        placed = sum(1 for chunk in sample.document if chunk["image"])
        if placed != image_count:
            raise SampleError(f"document {sample.id!r} places {placed} image(s) but {image_count} were given",
                              sample.id, "placeholders")
        if not self.settings.text:
            return [], []
        input_ids = self._leading_ids()
        for chunk in sample.document:
            end = self.model_text.chunk_token if chunk["image"] and self.model_text.chunk_token else "\n"
            text = (self.image_tokens.placeholder if chunk["image"] else "") + chunk["text"] + end
            input_ids += list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            input_ids.append(int(self.tokenizer.eos_token_id))
        labels = [IGNORE_INDEX if token == self.placeholder_id else token for token in input_ids]
        return input_ids, labels

    def expand_and_truncate(self, input_ids: list[int], labels: list[int], image_count: int, sample_id: str,
                            sizes: list[ImageSize] | None = None) -> tuple[list[int], list[int]]:
        """Placeholders expanded to their images' tokens, then the example cut to ``max_length``."""
        input_ids, labels = self._expand_images(input_ids, labels, image_count, sample_id, sizes)
        return self._truncate(input_ids, labels, sample_id)

    def estimate_lengths(self, samples: list[Sample]) -> list[int]:
        """Approximate token counts without rendering templates or opening images (for length grouping).

        Counts the tokens of every turn's text plus ``tokens_per_image - 1`` per placeholder (a high-resolution
        strategy's count for an image of twice the encoder's side).
        """
        placeholder = self.image_tokens.placeholder
        texts = ["\n".join(turn["content"] for turn in sample.conversation) if sample.document is None
                 else "\n".join((placeholder if chunk["image"] else "") + chunk["text"] for chunk in sample.document)
                 for sample in samples]
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        extra = (self.highres.typical_tokens() if self.highres is not None else self.image_tokens.per_image) - 1
        return [len(ids) + extra * text.count(placeholder) for ids, text in zip(encoded, texts)]

    # -- generation prompts --------------------------------------------------------------------
    def prompt(self, text: str, num_images: int = 0, history: list[dict] | None = None,
               image_sizes: list[ImageSize] | None = None) -> torch.Tensor:
        """Token ids ``[L]`` of a generation prompt ending with the assistant header (see
        :meth:`mmbridge.data.processor.Processor.prompt`)."""
        input_ids = self._prompt_ids(self.prompt_messages(text, num_images, history))
        input_ids, _ = self._expand_images(input_ids, [IGNORE_INDEX] * len(input_ids), num_images, "prompt",
                                           image_sizes)
        return torch.tensor(input_ids, dtype=torch.long)

    def prompt_messages(self, text: str, num_images: int, history: list[dict] | None) -> list[dict]:
        """History plus the user turn, with missing placeholders prepended to ``text``."""
        history = list(history or [])
        placeholder = self.image_tokens.placeholder
        present = sum(turn["content"].count(placeholder) for turn in history) + text.count(placeholder)
        if present > num_images:
            raise ValueError(f"prompt holds {present} {placeholder} placeholders but {num_images} "
                             f"image(s) were given")
        text = f"{placeholder}\n" * (num_images - present) + text
        return self.with_signal_tokens(self.with_system_prompt(history + [{"role": "user", "content": text}]))

    def bridge_text(self, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per image, the turn holding it without placeholders, tokenized by the bridge tokenizer.

        Returns ``(text_ids, text_mask)`` ``[n_images, T]`` (format instructions kept, at most
        :data:`BRIDGE_TEXT_MAX_LENGTH` tokens), or None without a bridge tokenizer or images.
        """
        placeholder = self.image_tokens.placeholder
        texts = [turn["content"].replace(placeholder, "").strip()
                 for turn in messages for _ in range(turn["content"].count(placeholder))]
        bridge_tokenizer = self.model_text.bridge_tokenizer
        if bridge_tokenizer is None or not texts:
            return None
        encoded = bridge_tokenizer(texts, padding=True, truncation=True, max_length=BRIDGE_TEXT_MAX_LENGTH,
                                   return_tensors="pt")
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    # -- the shapes of text --------------------------------------------------------------------
    def _chat_ids(self, sample: Sample, messages: list[dict], image_count: int,
                  sizes: list[ImageSize] | None) -> tuple[list[int], list[int]]:
        """The chat template's rendering, labelled on the replies after the sample's context turns (on every text
        token with ``label_all``)."""
        text, spans = self._render_with_reply_spans(messages, sample.id)
        context = sample.context_turns + len(messages) - len(sample.conversation)  # + a system prompt added
        spans = spans[sum(1 for message in messages[:context] if message["role"] == "assistant"):]
        input_ids, labels = self._tokenize(text, spans)
        if self.settings.label_all:  # Flamingo's objective: every text token (the model never predicts image tokens)
            labels = list(input_ids)
        return self.expand_and_truncate(input_ids, labels, image_count, sample.id, sizes)

    def _prompt_ids(self, messages: list[dict], reply_start: str = "") -> list[int]:
        """Token ids of ``messages`` as a generation prompt (placeholders not yet expanded), followed by
        ``reply_start`` (the start of the answer, for the prefix LM).

        The chat template renders it; an encoder–decoder LLM whose tokenizer has no template
        (T5) gets the turns' texts joined by newlines, with the tokenizer's own special tokens.
        """
        if self.model_text.encoder_decoder and not getattr(self.tokenizer, "chat_template", None):
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
        prefix, reply = _prefix_split(messages[last]["content"], sample_id) if self.settings.prefix_lm \
            else ("", messages[last]["content"])
        input_ids = self._prompt_ids(messages[:last], prefix)
        input_ids, _ = self._expand_images(input_ids, [IGNORE_INDEX] * len(input_ids), image_count, sample_id)
        labels = list(self.tokenizer(reply, add_special_tokens=False)["input_ids"]) + [int(eos)]
        return self._truncate_prompt(input_ids, sample_id), labels[:self.settings.max_length]

    def _plain_ids(self, sample: Sample, image_count: int,
                   sizes: list[ImageSize] | None = None) -> tuple[list[int], list[int]]:
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
        return self.expand_and_truncate(input_ids, labels, image_count, sample.id, sizes)

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

    # -- reply spans and labels ----------------------------------------------------------------
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
            messages = self.with_system_prompt([{"role": "user", "content": "mmbridge-probe-question"},
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

    # -- placeholders and length ---------------------------------------------------------------
    def _expand_images(self, input_ids: list[int], labels: list[int], image_count: int, sample_id: str,
                       sizes: list[ImageSize] | None = None) -> tuple[list[int], list[int]]:
        """Replace each placeholder token with ``tokens_per_image`` image token ids, or the high-resolution layout's
        ids for that image's size (labels IGNORE_INDEX)."""
        found = input_ids.count(self.placeholder_id)
        placeholder = self.image_tokens.placeholder
        if found != image_count:
            raise SampleError(f"sample {sample_id!r}: the rendered text holds {found} {placeholder} token(s) "
                              f"but {image_count} image(s) were given (does the system prompt or template "
                              f"contain {placeholder}?)", sample_id, "placeholders")
        if self.highres is not None and (sizes is None or len(sizes) != image_count):
            raise ValueError(f"sample {sample_id!r}: a high-resolution model needs the size of each of its "
                             f"{image_count} image(s), got {None if sizes is None else len(sizes)}")
        spans = iter([self.highres.token_ids(size, self.image_token_id) for size in sizes] if self.highres is not None
                     else [])
        expanded_ids, expanded_labels = [], []
        for token_id, label in zip(input_ids, labels):
            if token_id == self.placeholder_id:
                span = next(spans) if self.highres is not None else [self.image_token_id] * self.image_tokens.per_image
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
                              f"document) is left to train on within max_length {self.settings.max_length} (the "
                              f"sample has none or it was truncated away)", sample_id, "no_labels")
        return input_ids, labels

    def _truncate_prompt(self, input_ids: list[int], sample_id: str) -> list[int]:
        """``input_ids`` cut to ``max_length`` from the right; cutting or dropping an image is an error."""
        max_length = self.settings.max_length
        if len(input_ids) <= max_length:
            return input_ids
        kept = input_ids[:max_length].count(self.image_token_id)
        total = input_ids.count(self.image_token_id)
        if kept != total:
            raise SampleError(f"sample {sample_id!r} needs {len(input_ids)} tokens ({total} of them image "
                              f"tokens) but max_length is {max_length}; truncation would cut an image",
                              sample_id, "too_long")
        return input_ids[:max_length]


def one_placeholder(turns: list[dict], placeholder: str) -> list[dict]:
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
