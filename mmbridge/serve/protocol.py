"""OpenAI chat-completions shapes: the request (validated, errors naming the field) and the responses.

``messages`` are checked field by field in :mod:`mmbridge.serve.conversation`, so an error names the exact
part (``messages[2].content[1].image_url``); everything else is validated here by pydantic. Unknown request
fields are refused as OpenAI refuses them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmbridge.serve.errors import APIError, invalid

MAX_STOP_STRINGS = 4  # as OpenAI


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with usage and no choices."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ImageRequest(BaseModel):
    """``image``: what a request asks of image answers (an OpenAI client sends it as ``extra_body={"image": {...}}``).

    ``steps``: diffusion steps (at most ``--max-image-steps``); ``size``: the largest side in pixels (at most
    ``--max-image-size``). Either left out: the generator's default, capped at the limit.
    """

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(default=None, ge=1)
    size: int | None = Field(default=None, ge=1)


class ChatCompletionRequest(BaseModel):
    """The fields of ``POST /v1/chat/completions`` this server reads (the rest are refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Any = Field(default=None, validate_default=True)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused, as the OpenAI client may send it
    frequency_penalty: float | None = None  # only 0: there is no penalty
    presence_penalty: float | None = None
    logprobs: bool | None = None  # only false
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    modalities: list[str] | None = Field(default=None, min_length=1)  # OpenAI's: ["text"], or ["text", "image"]
    image: ImageRequest | None = None  # only for a model that answers with images

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        """``stop`` as a list of up to four non-empty strings."""
        if value is None:
            return []
        strings = [value] if isinstance(value, str) else value
        if not isinstance(strings, list) or not all(isinstance(item, str) and item for item in strings):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"takes at most {MAX_STOP_STRINGS} strings, got {len(strings)}")
        return strings

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for and the field that asked (``max_completion_tokens`` wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Validate a request body; any problem is a 400 naming the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(None, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    if not isinstance(data, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise _first_error(error) from error


def _first_error(error: ValidationError) -> APIError:
    """The first pydantic error as a 400, in OpenAI's words where it has them."""
    detail = error.errors()[0]
    param = param_path(detail["loc"])
    if detail["type"] == "extra_forbidden":
        return invalid(param, f"Unrecognized request argument supplied: {param}", code="unknown_parameter")
    if detail["type"] == "missing":
        return invalid(param, f"Missing required parameter: '{param}'.", code="missing_required_parameter")
    message = detail["msg"].removeprefix("Value error, ")
    return invalid(param, f"Invalid value for '{param}': {message}", code="invalid_value")


def param_path(location: tuple[str | int, ...] | list[str | int]) -> str:
    """``("messages", 0, "content")`` → ``"messages[0].content"``."""
    path = ""
    for item in location:
        path += f"[{item}]" if isinstance(item, int) else (f".{item}" if path else str(item))
    return path


# -- responses ------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    """Token counts of one answer; prompt tokens include every image's visual tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The answer's message: its text, or (when the model drew images) a text part followed by image parts."""

    role: Literal["assistant"] = "assistant"
    content: str | list[dict[str, Any]]


class Choice(BaseModel):
    """The one answer of a ``chat.completion`` (``n`` is always 1)."""

    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    """The body of a non-streamed answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What one streamed chunk adds: the role (first chunk), text, or one image content part (in a one-part list)."""

    role: Literal["assistant"] | None = None
    content: str | list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    """The one choice of a streamed chunk; ``finish_reason`` on the last."""

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmbridge"


class ModelList(BaseModel):
    """The body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    """A fresh ``chatcmpl-…`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, as ``created`` holds them."""
    return int(time.time())
