"""Decoding for :class:`~mmbridge.model.multimodal.MultimodalModel`: KV cache, sampling, streaming, batching.

:func:`generate` takes LLaVA-style inputs (``input_ids`` with ``<image>`` placeholders
already expanded, LEFT-padded when batched, ``attention_mask``, ``pixel_values``) and
returns only the new tokens, ``[B, new]``. Position ids come from the model
(:meth:`MultimodalModel.position_ids`: the attention mask's running count, clamped at 0, or a
fusion bridge's own scheme such as CogVLM's one position per image), so a left-padded row
decodes exactly as the same prompt alone; decoding continues from the prompt's last position.
What the bridge keeps from the prompt and its images (:meth:`MultimodalModel.prompt_state`) is made
once and passed to the prefill and every step; when the run ends, ``bridge.release_caches()`` drops
what its modules kept for it. With the cache, the prompt and images go through the model once (prefill) and each step
feeds one token per row; without it, every step recomputes the whole
sequence from visual tokens encoded once, and greedy outputs are identical.

The cached loop does little per token: the KV cache of every full-attention layer is
allocated once for prompt + ``max_new_tokens`` and grows by writing in place (attention
reads a view of the filled part, so nothing is concatenated and no padded tail is attended),
the attention mask is a view of one preallocated buffer (and is left out entirely when no
row is padded), and the only host synchronisation is the one "all rows finished" check. For
Llama-family decoders (SmolLM2, TinyLlama, Vicuna…) with unmodified layers and SDPA
attention, a decode step also skips the model wrappers: it embeds the new token, computes
the rotary embedding once and calls the decoder layers directly with a view of a
precomputed boolean mask — the tensors the layers receive are the ones the full forward
would build, so greedy tokens are identical (``tests/test_speed_equivalence.py``).

With an encoder–decoder LLM (BLIP-2 FlanT5) the prompt is the encoder's input: it and the
images are encoded once, and the answer is decoded from the decoder's start token
(:class:`_EncoderDecoderRun`); the returned tokens are again only the new ones.

A model that answers with images (an output side, NExT-GPT) emits signal tokens: once a row emits the first of a
modality's run, the following steps write the rest of the run in order; ``return_media=True`` then draws each
complete run's image with the modality's generator (:mod:`mmbridge.model.output.render`) and returns them with the
tokens (:class:`GenerationOutput`).

:func:`chat` answers one user turn from text and images through the model's processor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.data.collate import image_inputs
from mmbridge.utils import eval_mode

Streamer = Callable[[torch.Tensor], None]
FAST_STEP_MODEL_TYPES = ("llama",)  # decoders whose forward is embed → rotary → layers → norm, nothing else


@dataclass
class GenerationConfig:
    """Decoding settings; ``eos_token_id`` and ``pad_token_id`` default to the tokenizer's (and model config's).

    ``top_k = 0`` and ``top_p = 1.0`` disable those filters; ``seed`` seeds a private
    ``torch.Generator`` so sampling is reproducible without touching the global RNG.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    seed: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` on settings that cannot decode."""
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) and min_new_tokens "
                             f"({self.min_new_tokens}) must be >= 0")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


# -- settings -------------------------------------------------------------------------------------
def _as_ids(value: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(item) for item in value]


def default_eos_ids(model: nn.Module) -> list[int]:
    """The tokenizer's EOS id plus any EOS ids of the LLM's config and generation config, deduplicated."""
    ids = _as_ids(getattr(model.tokenizer, "eos_token_id", None))
    hf_model = model.llm.model
    for source in (hf_model.config, getattr(hf_model, "generation_config", None)):
        ids += _as_ids(getattr(source, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def resolve_config(model: nn.Module, generation_config: GenerationConfig | None = None,
                   **settings: Any) -> GenerationConfig:
    """``generation_config`` (or defaults) updated by ``settings``, with EOS and pad ids filled in."""
    known = {field.name for field in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
    config = dataclasses.replace(generation_config or GenerationConfig(), **settings)
    if config.eos_token_id is None:
        config.eos_token_id = default_eos_ids(model)
    if config.pad_token_id is None:
        pad = getattr(model.tokenizer, "pad_token_id", None)
        eos_ids = _as_ids(config.eos_token_id)
        config.pad_token_id = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    config.validate()
    return config


# -- token choice ---------------------------------------------------------------------------------
def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row (ties with the k-th kept), ``-inf`` elsewhere; ``[B, V]``."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-likely set whose probability reaches ``top_p``; ``[B, V]``.

    The most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the better tokens, [B, V]
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(logits: torch.Tensor, config: GenerationConfig,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from ``[B, V]`` float logits: argmax, or a sample after temperature/top-k/top-p."""
    if not config.do_sample:
        return logits.argmax(-1)  # [B]
    logits = filter_top_p(filter_top_k(logits / config.temperature, config.top_k), config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # [B]


# -- decoding -------------------------------------------------------------------------------------
class PreallocatedLayer(DynamicLayer):
    """A full-attention KV layer whose buffers hold ``capacity`` positions from the first update.

    New keys/values are written in place; ``update`` returns views of the filled part, so the
    attention sees exactly the tensors a concatenating cache would build, without the copies.
    Outgrowing ``capacity`` doubles the buffers.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.key_buffer[:, :, self.length:end].copy_(key_states)  # [B, H, new, d]
        self.value_buffer[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        self.capacity = max(needed, 2 * self.capacity)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            grown = old.new_empty(*old.shape[:2], self.capacity, old.shape[-1])
            grown[:, :, :self.length].copy_(old[:, :, :self.length])
            setattr(self, name, grown)


def preallocated_cache(model: nn.Module, capacity: int) -> DynamicCache | None:
    """A ``DynamicCache`` whose full-attention layers are :class:`PreallocatedLayer` of ``capacity`` positions.

    ``None`` (the model then makes its own cache) when the LLM is not an HF model or the cache
    would hold any other kind of layer (sliding window, linear attention, shared KV).
    """
    config = getattr(getattr(model, "llm", None), "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def fast_step_decoder(model: nn.Module) -> nn.Module | None:
    """The LLM's decoder when decode steps may call its layers directly, else ``None``.

    Requires a Llama-family HF decoder (:data:`FAST_STEP_MODEL_TYPES`) with SDPA attention,
    the ``cache`` argument of transformers >= 5.24, none of its layers replaced, and no fusion bridge
    (its hooks read per-call context, which only the full forward sets).
    """
    if model.bridge.fuses_into_llm or model.output.modalities:  # hooks, or signal rows of the model's own
        return None
    llm = getattr(model, "llm", None)
    config = getattr(llm, "config", None)
    if (config is None or getattr(config, "model_type", None) not in FAST_STEP_MODEL_TYPES
            or getattr(config, "_attn_implementation", None) != "sdpa" or getattr(llm, "_cache_arg", None) != "cache"):
        return None
    decoder = llm.decoder
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return None
    native = type(decoder).__module__
    return decoder if all(type(layer).__module__ == native for layer in decoder.layers) else None


class _Decoder:
    """One generation run: holds the growing mask, the cache or full sequence, and the visual tokens."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 images: PromptImages, use_cache: bool, max_new_tokens: int) -> None:
        self.model = model
        self.use_cache = use_cache
        self.sequence = input_ids  # [B, L]; grows only without the cache
        self.prompt_mask = attention_mask  # [B, L]
        length = input_ids.shape[1]
        self.full_mask = torch.ones(input_ids.shape[0], length + max_new_tokens, dtype=attention_mask.dtype,
                                    device=attention_mask.device)  # [B, L + new]; a prefix is the current mask
        self.full_mask[:, :length] = attention_mask
        self.padded = not bool(attention_mask.all())  # without padding, decode steps need no mask at all
        self.length = length
        self.image_tokens = images.visual_tokens(model)  # [n, M, D]: encoded once, whatever the mode
        self.cache: Any = preallocated_cache(model, length + max_new_tokens) if use_cache else None
        self.prompt = model.prompt_state(input_ids, attention_mask, self.image_tokens,  # for every call
                                         images.image_attention_mask)
        self.prompt_positions = model.position_ids(input_ids, attention_mask)  # [B, L]
        self.next_position = self.prompt_positions[:, -1:] + 1  # [B, 1]
        self.fast = fast_step_decoder(model) if use_cache else None
        self.step_mask = self.full_mask.bool()[:, None, None, :] if self.padded else None  # [B, 1, 1, L + new]

    @property
    def attention_mask(self) -> torch.Tensor:
        """The mask over every position so far, ``[B, L + steps]`` (a view)."""
        return self.full_mask[:, :self.length]

    def prefill(self) -> torch.Tensor:
        """Run the prompt; returns the last position's logits ``[B, V]``."""
        if not self.use_cache:
            return self._full_sequence_logits()
        output = self.model(self.sequence, self.prompt_mask, image_tokens=self.image_tokens,
                            position_ids=self.prompt_positions, cache=self.cache, use_cache=True,
                            return_logits="last", prompt_state=self.prompt)
        self.cache = output.cache
        return output.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B]`` and return the next logits ``[B, V]``."""
        new_ids = tokens.unsqueeze(-1)  # [B, 1]
        self.length += 1  # at most max_new_tokens - 1 steps: the mask buffer always covers it
        if not self.use_cache:
            self.sequence = torch.cat([self.sequence, new_ids], dim=-1)
            return self._full_sequence_logits()
        if self.fast is not None:
            logits = self._fast_step(new_ids)
        else:
            output = self.model(new_ids, self.attention_mask if self.padded else None, position_ids=self.next_position,
                                cache=self.cache, use_cache=True, return_logits="last", prompt_state=self.prompt)
            self.cache, logits = output.cache, output.logits[:, -1]
        self.next_position = self.next_position + 1
        return logits

    def _fast_step(self, new_ids: torch.Tensor) -> torch.Tensor:
        """One token per row straight through the decoder layers (what the full forward runs); ``[B, V]``."""
        decoder = self.fast
        hidden = decoder.embed_tokens(new_ids)  # [B, 1, D]; generated ids are never the image token
        position_embeddings = decoder.rotary_emb(hidden, position_ids=self.next_position)
        mask = self.step_mask[..., :self.length] if self.step_mask is not None else None  # [B, 1, 1, L + steps]
        for layer in decoder.layers[:decoder.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=self.next_position, cache=self.cache, use_cache=True)
        return self.model.llm.logits(decoder.norm(hidden)[:, -1])

    def _full_sequence_logits(self) -> torch.Tensor:
        mask = self.attention_mask
        output = self.model(self.sequence, mask, position_ids=self.model.position_ids(self.sequence, mask),
                            image_tokens=self.image_tokens, use_cache=False, return_logits="last",
                            prompt_state=self.prompt)
        return output.logits[:, -1]


class _EncoderDecoderRun:
    """One generation run of an encoder–decoder LLM (BLIP-2 FlanT5): the prompt and its visual tokens go
    through the encoder once; the decoder starts from its start token and grows by one token per step, with
    its KV cache (self- and cross-attention) or, without it, by rerunning the decoder on the whole answer."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 images: PromptImages, use_cache: bool, max_new_tokens: int) -> None:
        if images.image_attention_mask is not None:
            raise ValueError("image_attention_mask is for gated cross-attention; an encoder-decoder LLM takes none")
        self.model, self.use_cache = model, use_cache
        self.input_ids, self.encoder_mask = input_ids, attention_mask  # [B, L], the encoder's
        self.image_tokens = images.visual_tokens(model)  # [n, M, D]
        self.sequence = input_ids.new_full((input_ids.shape[0], 1), model.llm.decoder_start_token_id)  # [B, T]
        self.encoder_hidden: torch.Tensor | None = None
        self.cache: Any = None

    def prefill(self) -> torch.Tensor:
        """Encode the prompt and run the start token; returns its logits ``[B, V]``."""
        output = self.model(self.input_ids, self.encoder_mask, image_tokens=self.image_tokens,
                            decoder_input_ids=self.sequence, use_cache=self.use_cache, return_logits="last")
        self.encoder_hidden, self.cache = output.encoder_hidden, output.cache
        return output.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B]`` to the answer and return the next logits ``[B, V]``."""
        new_ids = tokens.unsqueeze(-1)  # [B, 1]
        if not self.use_cache:
            self.sequence = torch.cat([self.sequence, new_ids], dim=-1)
        output = self.model(attention_mask=self.encoder_mask, encoder_hidden=self.encoder_hidden,
                            decoder_input_ids=new_ids if self.use_cache else self.sequence, cache=self.cache,
                            use_cache=self.use_cache, return_logits="last")
        self.cache = output.cache
        return output.logits[:, -1]


def _banned_ids(model: nn.Module, vocab_size: int) -> list[int]:
    """Ids that generated text must never hold: the ``<image>`` placeholder (it has no pixels behind it)."""
    image_id = getattr(model, "image_token_id", None)
    return [image_id] if image_id is not None and 0 <= image_id < vocab_size else []


@dataclass
class PromptImages:
    """A prompt batch's images as the model takes them: pixels (or crops), their sizes (high resolution), the
    bridge's per-image extras, IDEFICS' ``image_attention_mask``, or visual tokens computed elsewhere."""

    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    bridge_inputs: BridgeInputs | None = None
    image_attention_mask: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None

    def visual_tokens(self, model: nn.Module) -> torch.Tensor | None:
        """The images' visual tokens (None without images)."""
        if self.image_tokens is not None:
            return self.image_tokens
        return model.visual_tokens(self.pixel_values, image_sizes=self.image_sizes, bridge_inputs=self.bridge_inputs)


@dataclass
class GenerationOutput:
    """What ``generate(..., return_media=True)`` returns: the new tokens ``[B, new]`` and each row's images (one
    per complete signal-token run, in order; empty lists for a text-only answer)."""

    sequences: torch.Tensor
    images: list[list[Any]]


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
             bridge_inputs: BridgeInputs | None = None, image_attention_mask: torch.Tensor | None = None,
             image_tokens: torch.Tensor | None = None, streamer: Streamer | None = None,
             generation_config: GenerationConfig | None = None, return_media: bool = False,
             image_settings: Any = None, **settings: Any) -> torch.LongTensor | GenerationOutput:
    """Decode new tokens for LEFT-padded prompts ``[B, L]``; returns ``[B, new]``.

    ``image_sizes``, ``bridge_inputs``, ``image_attention_mask`` and ``image_tokens`` (visual tokens computed
    elsewhere, in place of ``pixel_values``) are taken as by the model's ``forward``.
    ``settings`` override fields of ``generation_config``. Rows that emitted EOS continue
    with ``pad_token_id``; decoding ends when every row has finished or after
    ``max_new_tokens``. ``streamer(tokens)`` receives each step's ``[B]`` ids. ``return_media``: also draw the
    images the answer's signal tokens ask for (``image_settings``: an
    :class:`~mmbridge.model.output.render.ImageSettings`) and return a :class:`GenerationOutput`.
    """
    images = PromptImages(pixel_values, image_sizes, bridge_inputs, image_attention_mask, image_tokens)
    config = resolve_config(model, generation_config, **settings)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids)
    with torch.inference_mode(), eval_mode(model):
        try:
            new_tokens = _decode(model, input_ids, attention_mask, images, streamer, config)
        finally:  # the run made the prompt state: what the bridge's modules kept for it ends here
            model.bridge.release_caches()
        if not return_media:
            return new_tokens
        return GenerationOutput(new_tokens, model.render_media(input_ids, attention_mask, new_tokens, images,
                                                               image_settings))


def _decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: PromptImages,
            streamer: Streamer | None, config: GenerationConfig) -> torch.LongTensor:
    """The decoding loop behind :func:`generate` (already under inference mode and eval mode)."""
    batch, device = input_ids.shape[0], input_ids.device
    if config.max_new_tokens == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    pad = torch.tensor(config.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]
    run_class = _EncoderDecoderRun if model.llm.is_encoder_decoder else _Decoder
    decoder = run_class(model, input_ids, attention_mask, images, config.use_cache, config.max_new_tokens)
    logits = decoder.prefill()  # [B, V]
    banned = _banned_ids(model, logits.shape[-1])
    eos_ids = _eos_tensor(config, logits.shape[-1], device)
    generated: list[torch.Tensor] = []
    forcing = bool(model.output.modalities)  # a started signal-token run is written to its end
    for step in range(config.max_new_tokens):
        logits = _mask_logits(logits, banned, eos_ids if step < config.min_new_tokens else None)
        tokens = choose_tokens(logits, config, generator)  # [B]
        if forcing and generated:
            forced = model.output.forced_next(generated[-1])
            tokens = torch.where(forced >= 0, forced, tokens)
        tokens = torch.where(finished, pad, tokens)
        generated.append(tokens)
        if streamer is not None:
            streamer(tokens)
        if eos_ids.numel():
            finished |= torch.isin(tokens, eos_ids)
            if bool(finished.all()):  # one host sync per step, not per row
                break
        if step + 1 < config.max_new_tokens:
            logits = decoder.step(tokens)
    return torch.stack(generated, dim=1)  # [B, new]


def _eos_tensor(config: GenerationConfig, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The EOS ids inside the vocabulary (a config may name others), as a ``[n]`` long tensor."""
    ids = [token for token in _as_ids(config.eos_token_id) if 0 <= token < vocab_size]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _mask_logits(logits: torch.Tensor, banned: list[int], suppressed_eos: torch.Tensor | None) -> torch.Tensor:
    """Float32 ``[B, V]`` logits with banned ids (and EOS, before ``min_new_tokens``) set to ``-inf``."""
    logits = logits.float()
    if banned:
        logits[:, banned] = float("-inf")
    if suppressed_eos is not None and suppressed_eos.numel():
        logits[:, suppressed_eos] = float("-inf")
    return logits


# -- chat -----------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass
class ChatAnswer:
    """``chat(..., return_media=True)``: the answer's text and the images its signal tokens asked for."""

    text: str
    images: list[Any]


def chat(model: nn.Module, prompt: str, images: list, history: list[dict] | None = None,
         return_media: bool = False, image_settings: Any = None, **settings: Any) -> str | ChatAnswer:
    """Answer one user turn (``<image>`` placeholders added by the processor if missing); returns the text.

    ``images`` are PIL images or paths — all images of the conversation, those placed by earlier
    turns first (their sizes are read from them); ``history`` holds the earlier ``{"role", "content"}`` turns.
    ``settings`` are :class:`GenerationConfig` fields, plus ``streamer`` (called with each step's ``[1]`` ids).
    ``return_media``: a :class:`ChatAnswer` with the images the answer's signal tokens asked for, drawn with
    ``image_settings``.
    """
    processor = model.processor()
    device = _model_device(model)
    encoded = processor.prompt_inputs(prompt, images, history)
    input_ids = encoded["input_ids"].to(device).unsqueeze(0)  # [1, L]
    streamer = settings.pop("streamer", None)
    config = resolve_config(model, settings.pop("generation_config", None), **settings)
    result = generate(model, input_ids, generation_config=config, streamer=streamer, return_media=return_media,
                      image_settings=image_settings, **image_inputs(encoded, device))
    new_tokens = (result.sequences if return_media else result)[0]  # [new]
    stops = torch.isin(new_tokens, torch.tensor(_as_ids(config.eos_token_id), dtype=torch.long, device=device))
    if bool(stops.any()):
        new_tokens = new_tokens[: int(stops.nonzero()[0, 0])]
    text = model.tokenizer.decode(new_tokens.tolist(), skip_special_tokens=True).strip()
    return ChatAnswer(text, result.images[0]) if return_media else text
