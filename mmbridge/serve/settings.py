"""What an ``mmbridge serve`` process allows: request and image limits, batching, where images may come from, and
how much image answers may cost (diffusion steps, size)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

MIB = 2**20


@dataclass
class ServeSettings:
    """Limits and switches of one server; every limit has a command-line flag of the same name.

    ``max_prompt_tokens=None`` takes the model's processor ``max_length``. ``batch_wait_ms`` is how long the
    scheduler waits after the first queued request for others to join its batch.
    """

    served_model_name: str = "mmbridge"
    max_body_bytes: int = 20 * MIB  # a whole request, JSON and data URLs included
    max_image_bytes: int = 20 * MIB  # one image file fetched over http(s) or read under image_root
    max_image_pixels: int = 25_000_000  # width × height of one decoded image (also PIL's bomb limit)
    max_images: int = 8  # per request, the whole conversation
    max_tokens_cap: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request names none (cut to what the context leaves)
    max_prompt_tokens: int | None = None  # after images are expanded to their visual tokens
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_queued: int = 256  # requests waiting for a batch; beyond it the server answers 503
    allow_remote_images: bool = False
    image_root: str | None = None  # file:// URLs and bare paths are read only under this directory
    image_timeout_s: float = 10.0  # per remote image fetch
    max_image_steps: int = 30  # diffusion steps a request may ask of an image answer
    max_image_size: int = 512  # largest side, in pixels, of an image answer

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag of the first setting that cannot work."""
        positive = ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_tokens_cap", "default_max_tokens",
                    "max_batch", "max_queued", "image_timeout_s", "max_image_steps", "max_image_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{flag(name)} must be > 0, got {getattr(self, name)}")
        if self.max_images < 0 or self.batch_wait_ms < 0:
            raise ValueError(f"--max-images ({self.max_images}) and --batch-wait-ms ({self.batch_wait_ms}) "
                             f"must be >= 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ValueError(f"--max-prompt-tokens must be > 0, got {self.max_prompt_tokens}")
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise ValueError(f"--image-root {self.image_root!r} is not a directory")
        if not self.served_model_name:
            raise ValueError("--served-model-name must not be empty")

    def replace(self, **changes: object) -> "ServeSettings":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


# the settings with a flag of the same name (--max-body-bytes …): type and help
LIMIT_FLAGS: dict[str, tuple[type, str]] = {
    "max_body_bytes": (int, "largest request body in bytes (default %(default)s)"),
    "max_image_bytes": (int, "largest image file fetched or read, in bytes (default %(default)s)"),
    "max_image_pixels": (int, "most pixels (width x height) of one image (default %(default)s)"),
    "max_images": (int, "most images per request (default %(default)s)"),
    "max_tokens_cap": (int, "largest max_tokens a request may ask for (default %(default)s)"),
    "default_max_tokens": (int, "max_tokens of a request that names none (default %(default)s)"),
    "max_prompt_tokens": (int, "longest prompt in tokens, images included (default: the model's max_length)"),
    "max_batch": (int, "most requests decoded together (default %(default)s)"),
    "batch_wait_ms": (float, "how long the first queued request waits for others to join its batch "
                             "(default %(default)s)"),
    "max_queued": (int, "most requests waiting for a batch; beyond it the server answers 503 (default %(default)s)"),
    "image_timeout_s": (float, "timeout of one remote image fetch, in seconds (default %(default)s)"),
    "max_image_steps": (int, "most diffusion steps a request may ask of an image answer (request field image.steps; "
                             "default %(default)s)"),
    "max_image_size": (int, "largest side in pixels of an image answer (request field image.size; "
                            "default %(default)s)"),
}


def flag(field_name: str) -> str:
    """The command-line flag of a settings field, without its dashes (``max_images`` → ``max-images``)."""
    return field_name.replace("_", "-")
