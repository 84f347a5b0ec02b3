"""Response-format prompts (LLaVA-1.5, arXiv 2310.03744), shared by data generators and the eval harness.

A question is posed the same way in training and evaluation: :func:`format_prompt`
appends the instruction that fixes the answer's form, so a model trained on
MiniWorld answers in the form the metric expects.
"""

from __future__ import annotations

import string

from mmbridge.boxes import BOX_INSTRUCTIONS, check_box_format, write_box

SHORT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
YES_NO = "Answer yes or no."
BOX = BOX_INSTRUCTIONS["plain"]  # a plain-format box; BOX_INSTRUCTIONS["qwen"] asks for Qwen-VL's <ref>/<box>
FORMATS = ("short", "yesno", "mc", "box", "caption", "free")
LETTERS = string.ascii_uppercase


def option_lines(choices: list[str]) -> str:
    """``A. red\\nB. blue…`` for multiple-choice options."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(choices)}")
    return "\n".join(f"{LETTERS[index]}. {choice}" for index, choice in enumerate(choices))


def format_prompt(question: str, answer_format: str, choices: list[str] | None = None, instruct: bool = True,
                  box_format: str = "plain") -> str:
    """The user-turn text (without ``<image>``) for ``question`` in ``answer_format``; ``instruct=False`` leaves
    out the format instruction (a later turn of a conversation that already gave it). A ``box`` answer is asked
    for in ``box_format`` (:mod:`mmbridge.boxes`: ``plain`` or ``qwen``)."""
    if answer_format not in FORMATS:
        raise ValueError(f"answer format must be one of {FORMATS}, got {answer_format!r}")
    if answer_format == "mc":
        if not choices:
            raise ValueError("a multiple-choice prompt needs choices")
        return f"{question}\n{option_lines(choices)}" + (f"\n{MULTIPLE_CHOICE}" if instruct else "")
    instructions = {"short": SHORT, "yesno": YES_NO, "box": BOX_INSTRUCTIONS[check_box_format(box_format)]}
    suffix = instructions.get(answer_format) if instruct else None
    return f"{question}\n{suffix}" if suffix else question


def format_box(box: list[float]) -> str:
    """``[x0, y0, x1, y1]`` in 000–999 integer coordinates (the plain format of :mod:`mmbridge.boxes`)."""
    return write_box(box, "plain")
