"""The errors of a sample that cannot become a training example, shared by both rooms of the processor.

:class:`SampleError` (a ``ValueError``) names the sample id and carries a short ``reason`` that datasets use to
count skipped samples; :class:`ImageLoadError` is the one for a missing or unreadable image file, naming the file.
Both are importable from :mod:`mmbridge.data.processor` and :mod:`mmbridge.data` as well.
"""

from __future__ import annotations


class SampleError(ValueError):
    """A sample that cannot become a training example; ``reason`` is a short key for counting skips."""

    def __init__(self, message: str, sample_id: str, reason: str) -> None:
        super().__init__(message)
        self.sample_id = sample_id
        self.reason = reason


class ImageLoadError(SampleError):
    """An image file of a sample is missing or unreadable; names the file and the sample id."""

    def __init__(self, path: str, sample_id: str, cause: str) -> None:
        super().__init__(f"sample {sample_id!r}: cannot load image {path}: {cause}", sample_id, "image_load")
        self.path = path
