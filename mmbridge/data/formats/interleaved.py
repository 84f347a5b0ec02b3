"""Interleaved image–text documents (MMC4, OBELICS, M3W style) → :class:`Sample` lists.

A JSON list, or JSON Lines (one document per line), of::

    {"id": "doc-1", "texts": ["A red star.", "Then a blue square.", "The end."],
     "images": ["a.png", "b.png", null]}                 # images[i] stands just before texts[i]

``images`` may be shorter than ``texts`` (missing slots hold no image). The published MMC4 fields
work too: ``text_list`` for ``texts``, and ``image_info`` — ``[{"image_name": "a.png",
"matched_text_index": 0, …}]`` — whose images stand before their matched sentence; ``url`` serves
as the id when there is none. Each document becomes a sample of chunks ``[{"image": path | None,
"text": str}]``; the processor renders ``<image>`` + text per chunk (Flamingo's
``<|endofchunk|>`` after each, where the model has that token) and labels every text token.
Errors name the file, the record and the field.
"""

from __future__ import annotations

import os
from typing import Any

from mmbridge.data.formats.llava import Sample, read_records

DOCUMENT_KEYS = ("texts", "text_list")


def is_document(record: Any) -> bool:
    """Whether a record is an interleaved document (rather than a LLaVA conversation)."""
    return isinstance(record, dict) and any(key in record for key in DOCUMENT_KEYS)


def load_interleaved(path: str, image_root: str | None = None, source: str = "",
                     records: list[Any] | None = None) -> list[Sample]:
    """Read an interleaved-document file; image paths are resolved against ``image_root`` (default: its
    directory); ``records`` are the file's entries when already read."""
    records = read_records(path) if records is None else records
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    stem = os.path.splitext(os.path.basename(path))[0]
    return [parse_document(record, index, path, root, source, stem) for index, record in enumerate(records)]


def parse_document(record: Any, index: int, path: str, root: str, source: str, stem: str) -> Sample:
    """One record → a :class:`Sample` whose ``document`` holds the chunks (images as absolute paths)."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: document #{index} must be an object, got {type(record).__name__}")
    identity = record.get("id", record.get("url"))
    sample_id = str(identity) if identity is not None else f"{stem}-{index}"
    where = f"{path}: document #{index} (id {sample_id!r})"
    texts = _texts(record, where)
    slots = _image_slots(record, len(texts), where)
    chunks = [{"image": os.path.join(root, slot) if slot else None, "text": text} for slot, text in zip(slots, texts)]
    if not any(chunk["text"].strip() for chunk in chunks):
        raise ValueError(f"{where}: every text is empty; a document needs text to train on")
    images = [chunk["image"] for chunk in chunks if chunk["image"]]
    return Sample(id=sample_id, conversation=[], images=images, source=source, document=chunks)


def _texts(record: dict, where: str) -> list[str]:
    key = "texts" if "texts" in record else "text_list"
    texts = record.get(key)
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{where}: '{key}' must be a non-empty list of strings")
    return texts


def _image_slots(record: dict, count: int, where: str) -> list[str | None]:
    """Per text, the image standing before it (or None)."""
    slots: list[str | None] = [None] * count
    if "image_info" in record:  # MMC4
        for number, info in enumerate(record["image_info"] or []):
            name, matched = (info.get("image_name"), info.get("matched_text_index")) if isinstance(info, dict) \
                else (None, None)
            if not isinstance(name, str) or not isinstance(matched, int) or not 0 <= matched < count:
                raise ValueError(f"{where}: image_info[{number}] needs 'image_name' and a 'matched_text_index' "
                                 f"in 0..{count - 1}, got {info!r}")
            if slots[matched] is not None:
                raise ValueError(f"{where}: image_info[{number}] matches text {matched}, which already has an image")
            slots[matched] = name
        return slots
    images = record.get("images") or []
    if not isinstance(images, list) or len(images) > count:
        raise ValueError(f"{where}: 'images' must be a list of at most {count} paths or nulls (one slot per text)")
    for number, name in enumerate(images):
        if name is not None and not (isinstance(name, str) and name):
            raise ValueError(f"{where}: images[{number}] must be a path or null, got {name!r}")
        slots[number] = name
    return slots
