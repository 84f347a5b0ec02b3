"""Grounding boxes written in text: the two formats, finding them, parsing them, rewriting one into the other.

Two ways of writing a box are in use:

- ``plain`` — ``[x0, y0, x1, y1]``, four integers in 000–999 written with three digits
  (CogVLM / Shikra style; what MiniWorld writes by default): ``[120, 045, 388, 410]``.
- ``qwen`` — Qwen-VL's (arXiv 2308.12966, §3.2 and appendix) ``<box>(x1,y1),(x2,y2)</box>``, integers
  in 0–1000, after the phrase it grounds in ``<ref>…</ref>`` (the ``<ref>`` is optional):
  ``<ref>the red circle</ref><box>(120,45),(388,410)</box>``.

Both scales mean the same thing: a value ``v`` is the position ``v / 1000`` of the image side,
i.e. pixel ``v / 1000 · W`` (``x``) or ``v / 1000 · H`` (``y``), as :func:`pixel_box` of MiniWorld
reads it and as Qwen-VL's evaluation converts its boxes (``v / 1000 · W``). The *canonical* box is
the plain one: four integers in ``[0, 999]`` (MiniWorld's ``box_999``). So converting between the
formats keeps every number: plain → qwen → plain is exact, and qwen → plain is exact for values
0–999; only Qwen's ``1000`` (the far edge) becomes ``999`` in plain, a change of one thousandth of
the side (:func:`canonical_box`). Scores (IoU) compare boxes in thousandths of the side whatever the
format, so the same box written either way scores the same.

Finding is strict, so that a list of numbers in ordinary text is not taken for a box: a plain box
is exactly four integers of 1–3 digits in one pair of square brackets (spaces allowed around
numbers and commas); a Qwen box is ``<box>`` + two ``(x,y)`` pairs of integers + ``</box>`` (spaces
allowed), each value at most 1000. Anything out of range (``[1000, …]``, ``(1001,…)``), with
another count of numbers, or with decimals is not a box.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BOX_FORMATS = ("plain", "qwen")
SCALE = 1000  # a value v is v / SCALE of the image side, in both formats
PLAIN_MAX = 999  # plain boxes: three digits
QWEN_MAX = 1000  # Qwen-VL boxes: 0–1000
BOX_INSTRUCTIONS = {
    "plain": "Answer with the bounding box [x0, y0, x1, y1], coordinates from 000 to 999.",
    "qwen": "Answer with <ref>the object</ref><box>(x1,y1),(x2,y2)</box>, coordinates from 0 to 1000.",
}

_SPACE = r"[ \t]*"
_PLAIN = re.compile(r"\[" + _SPACE + (_SPACE + "," + _SPACE).join([r"(\d{1,3})"] * 4) + _SPACE + r"\]")
_PAIR = r"\(" + _SPACE + r"(\d{1,4})" + _SPACE + "," + _SPACE + r"(\d{1,4})" + _SPACE + r"\)"
_QWEN = re.compile(r"(?:<ref>([^<]*)</ref>" + _SPACE + r")?<box>" + _SPACE + _PAIR + _SPACE + "," + _SPACE + _PAIR
                   + _SPACE + r"</box>")
_REF = re.compile(r"<ref>([^<]*)</ref>")


@dataclass(frozen=True)
class FoundBox:
    """One box found in a text: where (``[start, end)``, the ``<ref>`` included), its values as written, its
    format and, for a Qwen box written after ``<ref>phrase</ref>``, the phrase."""

    start: int
    end: int
    values: tuple[int, int, int, int]
    format: str
    phrase: str | None = None

    @property
    def canonical(self) -> list[int]:
        """The box on the canonical 0–999 scale (:func:`canonical_box`)."""
        return canonical_box(self.values)


def check_box_format(box_format: str, where: str = "box_format") -> str:
    """``box_format`` when it is ``plain`` or ``qwen``; otherwise a ``ValueError`` naming ``where`` and the choices."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"{where} must be one of {BOX_FORMATS}, got {box_format!r}")
    return box_format


def canonical_box(values: list[float] | tuple[float, ...]) -> list[int]:
    """Four values in thousandths of the side (either format) as canonical integers in 0–999.

    Values are rounded to integers and Qwen's 1000 becomes 999 (the only lossy step: one thousandth)."""
    if len(values) != 4:
        raise ValueError(f"a box has 4 values [x0, y0, x1, y1], got {len(values)}: {list(values)}")
    return [min(PLAIN_MAX, max(0, int(round(value)))) for value in values]


def write_box(box: list[float] | tuple[float, ...], box_format: str = "plain") -> str:
    """``box`` (thousandths of the side, ``[x0, y0, x1, y1]``) written in ``box_format``.

    ``plain`` → ``[012, 340, 560, 999]``; ``qwen`` → ``<box>(12,340),(560,999)</box>``. Values are rounded to
    integers and must lie in the format's range (0–999 plain, 0–1000 qwen), else ``ValueError``."""
    check_box_format(box_format)
    if len(box) != 4:
        raise ValueError(f"a box has 4 values [x0, y0, x1, y1], got {len(box)}: {list(box)}")
    values = [int(round(value)) for value in box]
    highest = PLAIN_MAX if box_format == "plain" else QWEN_MAX
    if any(value < 0 or value > highest for value in values):
        raise ValueError(f"box {list(box)} has a value outside 0–{highest}, the range of {box_format} boxes")
    if box_format == "plain":
        return "[" + ", ".join(f"{value:03d}" for value in values) + "]"
    return f"<box>({values[0]},{values[1]}),({values[2]},{values[3]})</box>"


def write_ref(phrase: str, box_format: str = "plain") -> str:
    """A phrase that a box grounds: ``<ref>phrase</ref>`` in Qwen-VL's format, the bare phrase in plain."""
    return f"<ref>{phrase}</ref>" if check_box_format(box_format) == "qwen" else phrase


def write_grounded(phrase: str, box: list[float], box_format: str = "plain") -> str:
    """A phrase with its box: ``<ref>phrase</ref><box>(…),(…)</box>`` (qwen) or ``phrase [x0, y0, x1, y1]``."""
    if check_box_format(box_format) == "qwen":
        return write_ref(phrase, box_format) + write_box(box, box_format)
    return f"{phrase} {write_box(box, box_format)}"


def find_boxes(text: str) -> list[FoundBox]:
    """Every box of either format in ``text``, in order of position (strict rules of the module docstring)."""
    found = [FoundBox(match.start(), match.end(), tuple(int(group) for group in match.groups()), "plain")
             for match in _PLAIN.finditer(text)]
    for match in _QWEN.finditer(text):
        values = tuple(int(group) for group in match.groups()[1:])
        if max(values) <= QWEN_MAX:
            found.append(FoundBox(match.start(), match.end(), values, "qwen", match.group(1)))
    return sorted(found, key=lambda box: box.start)


def parse_box(text: str) -> list[int] | None:
    """The first box of either format in ``text`` on the canonical 0–999 scale, or ``None`` when there is none."""
    found = find_boxes(text)
    return found[0].canonical if found else None


def rewrite_boxes(text: str, box_format: str) -> str:
    """``text`` with every box written in ``box_format``; boxes already in it are left exactly as written.

    To ``qwen``: ``[x0, y0, x1, y1]`` → ``<box>(x0,y0),(x1,y1)</box>`` (same numbers). To ``plain``:
    ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` → ``phrase [x1, y1, x2, y2]`` (1000 → 999), and a
    ``<ref>`` with no box keeps its phrase without the tags. The other format's answer instruction
    (:data:`BOX_INSTRUCTIONS`) becomes this format's, so a rewritten question asks for the new form.
    """
    check_box_format(box_format)
    other = "qwen" if box_format == "plain" else "plain"
    text = text.replace(BOX_INSTRUCTIONS[other], BOX_INSTRUCTIONS[box_format])
    pieces, position = [], 0
    for box in find_boxes(text):
        if box.format == box_format or box.start < position:
            continue
        pieces.append(text[position:box.start])
        if box_format == "qwen":
            pieces.append(write_box(box.values, "qwen"))
        else:
            prefix = f"{box.phrase} " if box.phrase else ""
            pieces.append(prefix + write_box(box.canonical, "plain"))
        position = box.end
    text = "".join(pieces) + text[position:]
    return _REF.sub(r"\1", text) if box_format == "plain" else text


__all__ = ["BOX_FORMATS", "BOX_INSTRUCTIONS", "SCALE", "FoundBox", "check_box_format", "canonical_box", "write_box",
           "write_ref", "write_grounded", "find_boxes", "parse_box", "rewrite_boxes"]
