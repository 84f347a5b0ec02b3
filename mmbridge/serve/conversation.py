"""OpenAI ``messages`` → the processor's conversation: earlier turns, the user turn to answer, its images.

Content may be a string or a list of parts (``{"type": "text", "text"}`` and, in user messages,
``{"type": "image_url", "image_url": {"url"}}``). Parts are joined with newlines and each image part
becomes the model's ``<image>`` placeholder where it stands, so ``[image, text]`` is the prompt that
``model.chat(text, [image])`` builds. ``developer`` messages are system messages. The last message must be
the user's: the server answers it. Every error names the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmbridge.serve.errors import invalid

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_KEYS = ("role", "content", "name")
PART_TYPES = ("text", "image_url")


@dataclass
class ImageRef:
    """One image part: its URL and the request field it came from."""

    url: str
    param: str


@dataclass
class Conversation:
    """``history`` (``{"role", "content"}`` turns), the user ``text`` to answer, and every image in order."""

    history: list[dict[str, str]]
    text: str
    images: list[ImageRef] = field(default_factory=list)


def parse_messages(messages: list[dict[str, Any]], image_token: str) -> Conversation:
    """Check every message and turn them into a :class:`Conversation`; errors are 400s naming the field."""
    turns, images = [], []
    for index, message in enumerate(messages):
        role = _role(message, f"messages[{index}]")
        _check_keys(message, f"messages[{index}]")
        content, found = _content(message.get("content"), role, f"messages[{index}].content", image_token)
        turns.append({"role": role, "content": content})
        images += found
    if turns[-1]["role"] != "user":
        raise invalid("messages", f"the last message must be the user's (it is {messages[-1]['role']!r}): the "
                                  f"server answers the last user turn")
    return Conversation(history=turns[:-1], text=turns[-1]["content"], images=images)


def _role(message: dict[str, Any], param: str) -> str:
    role = message.get("role")
    if role is None:
        raise invalid(f"{param}.role", "Missing required parameter: 'role'.", code="missing_required_parameter")
    if role not in ROLES:
        raise invalid(f"{param}.role", f"role {role!r} is not supported; use one of {sorted(ROLES)} "
                                       f"(this server has no tools or functions)")
    return ROLES[role]


def _check_keys(message: dict[str, Any], param: str) -> None:
    """Refuse fields that would change the meaning (tool calls…); empty ones that clients echo back pass."""
    for key, value in message.items():
        if key not in MESSAGE_KEYS and value not in (None, "", [], {}):
            raise invalid(f"{param}.{key}", f"Unrecognized message field {key!r}: this server has no tools, "
                                            f"audio or refusals", code="unknown_parameter")


def _content(content: Any, role: str, param: str, image_token: str) -> tuple[str, list[ImageRef]]:
    """The turn's text with image placeholders, and its images."""
    if isinstance(content, str):
        _check_text(content, param, image_token)
        return content, []
    if not isinstance(content, list):
        kind = "null" if content is None else type(content).__name__
        raise invalid(param, f"content must be a string or a list of content parts, got {kind}")
    texts, images = [], []
    for index, part in enumerate(content):
        text, image = _part(part, role, f"{param}[{index}]", image_token)
        texts.append(text)
        if image is not None:
            images.append(image)
    return "\n".join(texts), images


def _part(part: Any, role: str, param: str, image_token: str) -> tuple[str, ImageRef | None]:
    """One content part → (its text or the image placeholder, its image or None)."""
    if not isinstance(part, dict):
        raise invalid(param, f"a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind not in PART_TYPES:
        raise invalid(f"{param}.type", f"content part type {kind!r} is not supported; use one of {list(PART_TYPES)}")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{param}.text", "a text part needs a string 'text'")
        _check_text(text, f"{param}.text", image_token)
        return text, None
    if role != "user":
        raise invalid(param, f"images may only appear in user messages, not in a {role} message")
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else None
    if not isinstance(url, str) or not url:
        raise invalid(f"{param}.image_url", "an image_url part needs {\"image_url\": {\"url\": \"...\"}}")
    return image_token, ImageRef(url=url, param=f"{param}.image_url")


def _check_text(text: str, param: str, image_token: str) -> None:
    if image_token in text:
        raise invalid(param, f"the text contains {image_token!r}, which this model reserves for images; send "
                             f"images as image_url parts")
