"""WebDataset tar shards (what img2dataset writes for LAION / CC3M-style pairs) → :class:`Sample` lists.

A shard is an uncompressed tar whose members are grouped by key, webdataset's convention: the
member ``dir/000123.jpg`` belongs to sample ``dir/000123`` (the key is the name up to the first
dot of its last path part). A sample holds one image (``jpg``, ``jpeg``, ``png`` or ``webp``)
and its text: a ``json`` member with LLaVA-style ``conversations`` (``from``/``value`` turns), or
a caption — the ``txt`` member, else the json's ``caption`` string. A caption becomes LLaVA's
pretraining pair: the user turn is ``<image>`` alone, the assistant turn the caption; with the
data option ``template: plain`` that trains exactly as LLaVA's stage 1 (image tokens, then the
caption). A json with conversations and no image member is a text-only sample. Other members
(img2dataset's metadata ``json`` beside a ``txt``, ``.cls``…) are read only as just said.

Why the standard library's ``tarfile`` and not the ``webdataset`` package: webdataset's readers
stream shards front to back and have no random access, so a run could not resume at an exact
micro-batch, group by length, or count what it skipped; its indexed reader (``wids``) needs an
index file written beforehand. Instead each shard is scanned once when the dataset is built:
``tarfile`` reads the 512-byte headers and seeks past member data, only the small text members are
read, and each sample records its shard path and its image member's data offset and size. The
image bytes are read when the processor asks for them (:class:`ShardImage`), so no image is held
in memory and the mixture's random access, length grouping, skip counting and exact resume work
unchanged. The ``webdataset`` package reads the shards we write (``mmbridge data miniworld
--format webdataset``; ``tests/test_webdataset.py`` checks it).

Damage: a member that ends past the end of the file, a header that does not parse, or a shard
without its end-of-archive blocks (a cut-off copy) is a truncated shard; a key without text, or
with two images, or unparsable json, is a bad key. Each raises ``ValueError`` naming the shard and
the key — or, with ``skip_bad_samples``, is left out and reported as ``(shard:key, reason)`` so the
dataset counts it (a truncated shard keeps the samples complete before the damage). A corrupt
image is found when loaded: an :class:`~mmbridge.data.processor.ImageLoadError` naming the shard
and the member.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmbridge.data.formats.llava import ROLES, Sample, check_turn_order
from mmbridge.data.sources import LoadedSource

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")
MAX_TEXT_BYTES = 16 * 2**20  # a text member larger than this is not a caption or a conversation
MAX_OPEN_SHARDS = 64  # file descriptors kept open per process (least recently used closed first)
BRACE_RANGE = re.compile(r"\{([^{}]*)\}")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths of a ``webdataset`` source: brace ranges ``{00000..00009}`` (zero padding kept) and lists
    ``{a,b}`` expanded, in order; a list of such patterns is expanded item by item."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ValueError(f"webdataset source: expected a shard path pattern or a list of them, got {spec!r}")
    return [path for pattern in patterns for path in _expand(pattern)]


def _expand(pattern: str) -> list[str]:
    match = BRACE_RANGE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        if int(last) < int(first):
            raise ValueError(f"webdataset pattern {pattern!r}: range {{{body}}} runs backwards")
        choices = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [path for choice in choices for path in _expand(head + choice + tail)]


@dataclass(frozen=True, slots=True)
class ShardImage:
    """A sample's ``image_loader``: where its image lies inside a shard. It holds no bytes and no open file
    (it is pickled into DataLoader workers); each call reads the member from a descriptor opened by the
    calling process (:func:`read_member`) and decodes it."""

    shard: str
    member: str
    offset: int
    size: int
    sample_id: str

    def __call__(self) -> list[Image.Image]:
        from PIL import Image

        from mmbridge.data.processor import ImageLoadError

        where = f"{self.shard}:{self.member}"
        try:
            data = read_member(self.shard, self.offset, self.size)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return [image.copy()]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise ImageLoadError(where, self.sample_id, f"{type(error).__name__}: {error}") from error


class _ShardFiles:
    """Read-only descriptors of the shards this process reads, least recently used closed beyond
    :data:`MAX_OPEN_SHARDS`. After a fork the child drops (and closes its copies of) the parent's
    descriptors and opens its own; reads use ``os.pread``, which moves no shared file position."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.open: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self.lock:
            if self.pid != os.getpid():
                for descriptor in self.open.values():
                    os.close(descriptor)
                self.open.clear()
                self.pid = os.getpid()
            descriptor = self.open.pop(path, None)
            if descriptor is None:
                descriptor = os.open(path, os.O_RDONLY)
                while len(self.open) >= MAX_OPEN_SHARDS:
                    os.close(self.open.popitem(last=False)[1])
            self.open[path] = descriptor
        data = os.pread(descriptor, size, offset)
        if len(data) != size:
            raise OSError(f"shard ends after {len(data)} of the member's {size} bytes")
        return data


_SHARD_FILES = _ShardFiles()


def read_member(shard: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of ``shard``, through this process's cached descriptor."""
    return _SHARD_FILES.read(shard, offset, size)


def load_webdataset(spec: str | list[str], source: str = "", skip_bad_samples: bool = False) -> LoadedSource:
    """Scan every shard of ``spec`` (see :func:`expand_shards`): samples per shard plus what was skipped."""
    loaded = LoadedSource(shards=[])
    for shard in expand_shards(spec):
        samples, skipped = scan_shard(shard, source, skip_bad_samples)
        loaded.shards.append(samples)
        loaded.skipped.extend(skipped)
    return loaded


def scan_shard(path: str, source: str = "", skip_bad_samples: bool = False) -> tuple[list[Sample], list]:
    """One shard's samples in member order, reading headers and text members only; with ``skip_bad_samples``
    the bad keys and a truncation are returned as ``(shard:key, reason)`` instead of raised."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"webdataset shard {path} does not exist")
    groups: dict[str, dict[str, Any]] = {}
    damage = None
    file_size = os.path.getsize(path)
    with open(path, "rb") as handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.ReadError as error:
            archive, damage = None, ("", f"not a readable tar: {error}")
        if archive is not None:
            damage = _read_members(archive, handle, file_size, groups)
    samples, skipped = [], []
    if damage is not None:
        key, cause = damage
        groups.pop(key, None)  # the key being read when the damage began may lack members
        _fail(path, key, f"truncated or corrupt shard ({cause})", "corrupt_shard", skip_bad_samples, skipped)
    for key, members in groups.items():
        try:
            samples.append(_sample(path, key, members, source))
        except _BadKey as error:
            _fail(path, key, str(error), error.reason, skip_bad_samples, skipped)
    return samples, skipped


class _BadKey(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _fail(path: str, key: str, message: str, reason: str, skip: bool, skipped: list) -> None:
    if not skip:
        raise ValueError(f"webdataset shard {path}: key {key!r}: {message} (set skip_bad_samples to drop it)")
    skipped.append((f"{path}:{key}", reason))


def _read_members(archive: tarfile.TarFile, handle, file_size: int,
                  groups: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """Fill ``groups`` (key → extension → text, or (offset, size) for an image); the damage found, if any, as
    ``(key, cause)``. ``tarfile`` stops quietly at a header it cannot parse past the first, so the bytes after
    the last member must be the end-of-archive zeros."""
    key = ""
    while True:
        try:
            member = archive.next()
        except tarfile.TarError as error:
            return key, str(error)
        if member is None:
            break
        if not member.isfile():
            continue
        key, extension = _split_name(member.name)
        if member.offset_data + member.size > file_size:
            return key, f"member {member.name} ends past the end of the file"
        if extension in IMAGE_EXTENSIONS:
            groups.setdefault(key, {}).setdefault("images", []).append((member.name, member.offset_data, member.size))
        elif extension in TEXT_EXTENSIONS and member.size <= MAX_TEXT_BYTES:
            handle.seek(member.offset_data)
            groups.setdefault(key, {})[extension] = handle.read(member.size)
    handle.seek(archive.offset)
    rest = handle.read()
    if not rest or rest.strip(b"\0"):
        return key, "no end-of-archive blocks after the last member" if not rest else \
            f"unreadable data at byte {archive.offset}"
    return None


def _split_name(name: str) -> tuple[str, str]:
    """``"dir/000123.seg.jpg"`` → (``"dir/000123"``, ``"seg.jpg"`` lower-cased): webdataset's key rule."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, extension.lower()


def _sample(path: str, key: str, members: dict[str, Any], source: str) -> Sample:
    """A key's members → a :class:`Sample` (raises :class:`_BadKey`)."""
    images = members.get("images", [])
    if len(images) > 1:
        raise _BadKey(f"{len(images)} image members ({', '.join(name for name, _, _ in images)}); "
                      f"a sample holds one", "several_images")
    record = _json(members, key)
    sample_id = str(record.get("id", key)) if record.get("id") is not None else key
    if "conversations" in record:
        conversation = _conversation(record["conversations"])
    else:
        caption = members["txt"].decode("utf-8", "replace").strip() if "txt" in members \
            else record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise _BadKey("no text: needs a txt caption, or a json with 'conversations' or 'caption'", "no_text")
        if not images:
            raise _BadKey("a caption without an image member", "no_image")
        conversation = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption.strip()}]
    if not images:
        return Sample(id=sample_id, conversation=conversation, source=source)
    name, offset, size = images[0]
    return Sample(id=sample_id, conversation=conversation, images=[f"{path}:{name}"], source=source,
                  image_loader=ShardImage(path, name, offset, size, sample_id))


def _json(members: dict[str, Any], key: str) -> dict:
    if "json" not in members:
        return {}
    try:
        record = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _BadKey(f"json member does not parse: {error}", "bad_json") from None
    if not isinstance(record, dict):
        raise _BadKey(f"json member must be an object, got {type(record).__name__}", "bad_json")
    return record


def _conversation(turns: Any) -> list[dict]:
    """LLaVA ``conversations`` → ``[{"role", "content"}]``, in a trainable order (raises :class:`_BadKey`)."""
    if not isinstance(turns, list) or not turns:
        raise _BadKey("'conversations' must be a non-empty list", "bad_conversation")
    conversation = []
    for number, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        content = turn.get("value") if isinstance(turn, dict) else None
        if speaker not in ROLES or not isinstance(content, str):
            raise _BadKey(f"conversations[{number}] needs 'from' in {sorted(ROLES)} and a string 'value', "
                          f"got {turn!r}", "bad_conversation")
        conversation.append({"role": ROLES[speaker], "content": content})
    try:
        check_turn_order(conversation, "json")
    except ValueError as error:
        raise _BadKey(str(error), "bad_conversation") from None
    return conversation
