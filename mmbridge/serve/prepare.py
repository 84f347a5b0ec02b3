"""From a validated request to what a :class:`~mmbridge.serve.batching.Job` needs: checks, sampling, prompt, budget,
and what it asks of image answers.

The prompt is built as :func:`mmbridge.generate.chat` builds it (the processor's ``prompt_inputs`` plus the
bridge's text inputs), so a greedy answer through the server is the answer ``model.chat`` gives.
"""

from __future__ import annotations

from typing import Any

import jinja2
from PIL import Image

from mmbridge.serve.batching import Sampling
from mmbridge.serve.conversation import Conversation
from mmbridge.serve.errors import APIError, invalid
from mmbridge.serve.outputs import ImageOptions
from mmbridge.serve.protocol import ChatCompletionRequest, ImageRequest
from mmbridge.serve.settings import ServeSettings

DEFAULT_TEMPERATURE = 1.0  # OpenAI's: without a temperature a request samples
ANSWER_MODALITIES = ("text", "image")  # what a request's ``modalities`` may hold


def check_request(request: ChatCompletionRequest, settings: ServeSettings) -> None:
    """Refuse what this server does not do: another model (404), ``n`` > 1, penalties, logprobs, JSON mode."""
    if request.model != settings.served_model_name:
        raise APIError(404, f"The model `{request.model}` does not exist; this server serves "
                            f"`{settings.served_model_name}`.", param="model", code="model_not_found")
    if request.n not in (None, 1):
        raise invalid("n", f"only n=1 is supported, got n={request.n}", code="unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) not in (None, 0):
            raise invalid(name, f"{name} is not supported (only 0)", code="unsupported_value")
    if request.logprobs:
        raise invalid("logprobs", "logprobs are not supported", code="unsupported_value")
    if request.response_format not in (None, {"type": "text"}):
        raise invalid("response_format", "only response_format {'type': 'text'} is supported",
                      code="unsupported_value")
    requested, field = request.requested_max_tokens()
    if requested is not None and requested > settings.max_tokens_cap:
        raise invalid(field, f"{field} is {requested}; this server allows at most {settings.max_tokens_cap} "
                             f"(--max-tokens-cap)", code="max_tokens_too_large")


def image_options_of(request: ChatCompletionRequest, settings: ServeSettings,
                     output_modalities: tuple[str, ...]) -> ImageOptions:
    """Check what the request asks of image answers (``modalities``, ``image.steps``, ``image.size``) against the
    server's limits and the model (``output_modalities``); the options handed to the ``answer_images`` hook."""
    modalities = request.modalities or ["text"]
    unknown = [modality for modality in modalities if modality not in ANSWER_MODALITIES]
    if unknown:
        raise invalid("modalities", f"modality {unknown[0]!r} is not supported; this server answers with "
                                    f"{list(ANSWER_MODALITIES)}", code="unsupported_modality")
    asked = request.image or ImageRequest()
    _check_limit("image.steps", asked.steps, settings.max_image_steps, "diffusion steps", "--max-image-steps")
    _check_limit("image.size", asked.size, settings.max_image_size, "pixels on the largest side", "--max-image-size")
    requested = "image" in modalities
    if (requested or request.image is not None) and "image" not in output_modalities:
        field, sent = ("modalities", '"modalities" asks for "image"') if requested else ("image", '"image" was sent')
        raise invalid(field, f"{sent}, but the model `{settings.served_model_name}` cannot answer with images (it "
                             f"has no image generator; it answers with text only): leave \"image\" out of the "
                             f"request", code="unsupported_modality")
    return ImageOptions(requested=requested, steps=asked.steps, size=asked.size, max_steps=settings.max_image_steps,
                        max_size=settings.max_image_size)


def _check_limit(field: str, value: int | None, limit: int, unit: str, flag: str) -> None:
    """A 400 naming ``field`` and the server's ``limit`` when ``value`` exceeds it."""
    if value is not None and value > limit:
        raise invalid(field, f"{field} is {value}; this server allows at most {limit} {unit} ({flag})",
                      code=f"{field.replace('.', '_')}_too_large")


def check_image_count(conversation: Conversation, settings: ServeSettings) -> None:
    """At most ``max_images`` images per request; the error names the first image over the limit."""
    if len(conversation.images) > settings.max_images:
        extra = conversation.images[settings.max_images]
        raise invalid(extra.param, f"the request holds {len(conversation.images)} images; this server takes at "
                                   f"most {settings.max_images} per request (--max-images)", code="too_many_images")


def sampling_of(request: ChatCompletionRequest) -> Sampling:
    """Greedy at temperature 0 (seed and top_p then play no part), else sampling."""
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    if temperature == 0:
        return Sampling(temperature=0.0)
    return Sampling(temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
                    seed=request.seed)


def encode_prompt(processor: Any, conversation: Conversation, images: list[Image.Image]) -> dict[str, Any]:
    """``{"input_ids": [L], "pixel_values", "image_sizes", "bridge_inputs"}`` for the conversation (as ``chat``
    builds them; absent where the model needs none)."""
    try:
        encoded = processor.prompt_inputs(conversation.text, images, conversation.history)
    except (ValueError, jinja2.TemplateError) as error:  # the chat template or the placeholders refused the conversation
        raise invalid("messages", f"the conversation cannot be rendered for this model: {error}") from error
    return {key: value for key, value in encoded.items() if value is not None}


def completion_budget(request: ChatCompletionRequest, prompt_tokens: int, settings: ServeSettings,
                      max_prompt_tokens: int, context_length: int | None) -> int:
    """The row's ``max_tokens``: the request's (checked against the context) or the default (cut to fit)."""
    if prompt_tokens > max_prompt_tokens:
        raise invalid("messages", f"the prompt is {prompt_tokens} tokens (images included); this server takes at "
                                  f"most {max_prompt_tokens} (--max-prompt-tokens)", code="context_length_exceeded")
    room = None if context_length is None else context_length - prompt_tokens
    if room is not None and room < 1:
        raise invalid("messages", f"the prompt is {prompt_tokens} tokens, which fills the model's context of "
                                  f"{context_length}", code="context_length_exceeded")
    requested, field = request.requested_max_tokens()
    if requested is None:
        default = min(settings.default_max_tokens, settings.max_tokens_cap)
        return default if room is None else min(default, room)
    if room is not None and requested > room:
        raise invalid(field, f"the prompt ({prompt_tokens} tokens) plus {field} ({requested}) exceeds the model's "
                             f"context of {context_length} tokens", code="context_length_exceeded")
    return requested
