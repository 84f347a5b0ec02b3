"""Evaluation tasks: what each answer format is scored with, how its prompts are built, and the suites.

A sample is a LLaVA-format dict as the MiniWorld generator writes it (``conversations``,
``question``, ``format``, ``answer``, ``answers``, ``choices``, ``box``, ``references``,
``pope``), paired with its PIL images. The answer format decides the metric and the
generation budget (:data:`FORMAT_SETTINGS`); a :class:`TaskSpec` adds what a task asks for
beyond that (circular options, likelihood ranking). Prompts are the LLaVA-1.5
response-format prompts of :mod:`mmbridge.eval.prompts`, i.e. the sample's own user turn;
the *blind* variant is the same text with every ``<image>`` placeholder removed.

Likelihood ranking scores each option as the assistant's continuation. With the
``"text"`` target the prompt is the question in short-answer form (the options are what
is being ranked, so they are not listed); with ``"letter"`` it is the multiple-choice
prompt and the continuations are the option letters.

Grounding boxes are asked for and read in either format of :mod:`mmbridge.boxes` (plain
``[x0, y0, x1, y1]`` in 000–999 or Qwen-VL's ``<ref>…</ref><box>(x1,y1),(x2,y2)</box>`` in 0–1000):
:func:`in_box_format` rewrites a sample's text into the format a model was trained on, and the
metric parses whichever format an answer uses (both scales are thousandths of the side).

Short answers: ``answers`` lists *accepted alternatives* (MiniWorld may give 18 phrasings
of one object), so a prediction is right when it matches any of them after VQAv2
normalisation. Samples carrying VQAv2's ten annotator answers as ``human_answers`` get
the official soft score ``min(#matches / 3, 1)`` (10-choose-9 average) instead.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from mmbridge.boxes import check_box_format, rewrite_boxes
from mmbridge.eval import metrics
from mmbridge.eval.prompts import LETTERS, format_prompt
from mmbridge.registry import Table

SAMPLE_IMAGE_TOKEN = "<image>"  # the placeholder LLaVA-format files use
POPE_TYPES = ("random", "popular", "adversarial")
Pair = tuple[dict, list[Image.Image]]  # a sample and its images


@dataclass(frozen=True)
class FormatSettings:
    """How answers of one format are scored and how many tokens they may take."""

    metric: str
    max_new_tokens: int


FORMAT_SETTINGS = {
    "short": FormatSettings("vqa", 8),
    "yesno": FormatSettings("pope", 3),
    "mc": FormatSettings("multiple_choice", 3),
    "box": FormatSettings("grounding", 24),
    "caption": FormatSettings("caption", 40),
    "free": FormatSettings("caption", 40),
}
QWEN_BOX_MAX_NEW_TOKENS = 64  # <ref>phrase</ref><box>(x1,y1),(x2,y2)</box> takes about twice a plain box's tokens


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: its samples (``task`` on ``split``) and the extra evaluations it asks for.

    ``circular``: multiple-choice questions are asked once per rotation of the options and
    count only when all are right. ``likelihood``: options are also ranked by the summed
    log-probability of ``likelihood_target`` (``"text"`` or ``"letter"``).
    ``max_new_tokens`` overrides the format's budget.
    """

    task: str
    split: str = "test"
    circular: bool = False
    likelihood: bool = False
    likelihood_target: str = "text"
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.likelihood_target not in ("text", "letter"):
            raise ValueError(f"likelihood_target must be 'text' or 'letter', got {self.likelihood_target!r}")

    @property
    def key(self) -> str:
        """The name results are stored under: the task, with the split when it is not ``test``."""
        return self.task if self.split == "test" else f"{self.task}:{self.split}"

    def new_tokens(self, answer_format: str, box_format: str = "plain") -> int:
        """The generation budget for answers of ``answer_format`` (a ``box`` answer in Qwen-VL's longer form gets
        :data:`QWEN_BOX_MAX_NEW_TOKENS`)."""
        if self.max_new_tokens:
            return self.max_new_tokens
        if answer_format == "box" and box_format == "qwen":
            return QWEN_BOX_MAX_NEW_TOKENS
        return format_settings(answer_format).max_new_tokens


def format_settings(answer_format: str) -> FormatSettings:
    """The settings of a known answer format; an unknown one is a ``ValueError`` listing the known."""
    if answer_format not in FORMAT_SETTINGS:
        raise ValueError(f"unknown answer format {answer_format!r}; known: {sorted(FORMAT_SETTINGS)}")
    return FORMAT_SETTINGS[answer_format]


# -- prompts --------------------------------------------------------------------------------------
def user_text(sample: dict) -> str:
    """The sample's user turn: its first human message, else ``<image>`` lines + the formatted question."""
    for turn in sample.get("conversations", []):
        if turn.get("from") in ("human", "user"):
            return turn["value"]
    placeholders = f"{SAMPLE_IMAGE_TOKEN}\n" * _image_count(sample)
    return placeholders + format_prompt(sample["question"], sample["format"], sample.get("choices"))


def _image_count(sample: dict) -> int:
    image = sample.get("image")
    return 0 if image is None else (len(image) if isinstance(image, list) else 1)


def blind_text(text: str, image_token: str = SAMPLE_IMAGE_TOKEN) -> str:
    """``text`` with every image placeholder (and the newline right after it) removed."""
    return re.sub(re.escape(image_token) + r"\n?", "", text)


def _with_question_text(sample: dict, new_text: str) -> str:
    """The user turn with its formatted question replaced by ``new_text`` (placeholders kept)."""
    original = user_text(sample)
    formatted = format_prompt(sample["question"], sample["format"], sample.get("choices"))
    if formatted in original:
        return original.replace(formatted, new_text, 1)
    return f"{SAMPLE_IMAGE_TOKEN}\n" * original.count(SAMPLE_IMAGE_TOKEN) + new_text


def rotated_prompt(sample: dict, shift: int) -> tuple[str, list[str], str]:
    """The multiple-choice user turn with options rotated by ``shift``; also the options and gold letter."""
    choices, gold = metrics.rotate_choices(list(sample["choices"]), sample["answer"], shift)
    if shift % len(choices) == 0:
        return user_text(sample), choices, gold
    return _with_question_text(sample, format_prompt(sample["question"], "mc", choices)), choices, gold


def likelihood_prompt(sample: dict, target: str) -> tuple[str, list[str]]:
    """The user turn and the continuations to rank: option texts after a short-answer prompt, or letters."""
    choices = list(sample["choices"])
    if target == "letter":
        return user_text(sample), list(LETTERS[:len(choices)])
    return _with_question_text(sample, format_prompt(sample["question"], "short")), choices


def shot_answer(sample: dict) -> str:
    """The reply a solved in-context example shows: the gold letter of a multiple-choice sample (options as
    :func:`user_text` lists them), else the gold answer."""
    if sample.get("format") == "mc":
        return rotated_prompt(sample, 0)[2]
    return str(sample["answer"])


def in_box_format(sample: dict, box_format: str) -> dict:
    """``sample`` with the boxes of its turns, question and answers written in ``box_format`` (the same dict when
    nothing changes). ``box`` stays the canonical 000–999 box."""
    check_box_format(box_format, "eval box_format")
    changed = dict(sample)
    if sample.get("conversations"):
        changed["conversations"] = [{**turn, "value": rewrite_boxes(turn["value"], box_format)}
                                    for turn in sample["conversations"]]
    for key in ("question", "answer"):
        if isinstance(sample.get(key), str):
            changed[key] = rewrite_boxes(sample[key], box_format)
    if sample.get("answers"):
        changed["answers"] = [rewrite_boxes(answer, box_format) for answer in sample["answers"]]
    return sample if changed == sample else changed


# -- gold answers ---------------------------------------------------------------------------------
def gold_answers(sample: dict) -> list[str]:
    """The accepted answers: the gold answer and its alternatives (``answers``)."""
    return list(dict.fromkeys([sample["answer"], *(sample.get("answers") or [])]))


def gold_references(sample: dict) -> list[str]:
    """Reference captions: ``references``, else the answer and its alternatives."""
    return list(sample.get("references") or dict.fromkeys([sample["answer"], *(sample.get("answers") or [])]))


def gold_box(sample: dict) -> list[float]:
    """The gold box ``[x0, y0, x1, y1]``: ``box``, else parsed from the answer."""
    box = sample.get("box") or metrics.parse_box(sample["answer"])
    if box is None:
        raise ValueError(f"sample {sample.get('id')!r}: a grounding sample needs 'box' or a box answer")
    return [float(value) for value in box]


# -- scoring generated answers --------------------------------------------------------------------
def _short_answer_score(sample: dict, prediction: str) -> float:
    """VQAv2 soft accuracy against ``human_answers`` when a sample has them, else a match with any accepted answer."""
    if sample.get("human_answers"):
        return metrics.vqa_accuracy(prediction, list(sample["human_answers"]))
    return metrics.accepted_answer_match(prediction, gold_answers(sample))


def score_vqa(samples: list[dict], predictions: list[str]) -> dict[str, float]:
    """Mean VQA accuracy (all answers normalised as VQAv2 does)."""
    scores = [_short_answer_score(sample, prediction) for sample, prediction in zip(samples, predictions)]
    return {"accuracy": sum(scores) / len(scores)}


def score_pope(samples: list[dict], predictions: list[str]) -> dict[str, float]:
    """POPE metrics over all samples, then per negative type (``random/accuracy``…).

    A type's group holds its samples plus the samples without a type (shared positives).
    """
    golds = [sample["answer"] for sample in samples]
    scores = metrics.pope_metrics(predictions, golds)
    found = {sample.get("pope") for sample in samples} - {None}
    for kind in [kind for kind in POPE_TYPES if kind in found] + sorted(found - set(POPE_TYPES)):
        rows = [index for index, sample in enumerate(samples) if sample.get("pope") in (kind, None)]
        group = metrics.pope_metrics([predictions[index] for index in rows], [golds[index] for index in rows])
        scores.update({f"{kind}/{name}": value for name, value in group.items()})
    return scores


def score_grounding(samples: list[dict], predictions: list[str]) -> dict[str, float]:
    """Accuracy at IoU ≥ 0.5, mean IoU and the share of answers holding a box."""
    return metrics.grounding_metrics(predictions, [gold_box(sample) for sample in samples])


def score_caption(samples: list[dict], predictions: list[str]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 against each sample's references."""
    references = [gold_references(sample) for sample in samples]
    return {"cider": metrics.cider_d(predictions, references), "bleu4": metrics.bleu(predictions, references)}


SCORERS: dict[str, Callable[[list[dict], list[str]], dict[str, float]]] = {
    "vqa": score_vqa, "pope": score_pope, "grounding": score_grounding, "caption": score_caption}


def score_multiple_choice(samples: list[dict], answers_per_rotation: list[list[str]],
                          likelihood_letters: list[str] | None = None) -> dict[str, float]:
    """Letter accuracy on the original order, circular accuracy when several rotations were asked,
    the share of parsable answers, and likelihood-ranking accuracy when ranked letters are given."""
    correct, parsed = [], []
    for sample, answers in zip(samples, answers_per_rotation):
        row = []
        for shift, answer in enumerate(answers):
            _, choices, gold = rotated_prompt(sample, shift)
            row.append(metrics.parse_choice_letter(answer, choices) == gold)
        correct.append(row)
        parsed.append(metrics.parse_choice_letter(answers[0], list(sample["choices"])) is not None)
    scores = {"accuracy": sum(row[0] for row in correct) / len(correct), "parse_rate": sum(parsed) / len(parsed)}
    if any(len(row) > 1 for row in correct):
        scores["circular_accuracy"] = metrics.circular_accuracy(correct)
    if likelihood_letters is not None:
        hits = [letter == sample["answer"] for sample, letter in zip(samples, likelihood_letters)]
        scores["likelihood_accuracy"] = sum(hits) / len(hits)
    return scores


# -- suites ---------------------------------------------------------------------------------------
# (task, split, n, seed) -> samples with images; a loader that can write boxes in either format also takes box_format
SampleLoader = Callable[..., list[Pair]]


@dataclass(frozen=True)
class Suite:
    """Named tasks and the function that produces their samples."""

    name: str
    tasks: tuple[TaskSpec, ...]
    load: SampleLoader

    def select(self, names: list[str] | None = None) -> list[TaskSpec]:
        """The tasks named (by task, which takes all its splits, or by key); all when ``names`` is empty."""
        if not names:
            return list(self.tasks)
        known = list(dict.fromkeys([spec.task for spec in self.tasks] + [spec.key for spec in self.tasks]))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"suite '{self.name}' has no task(s) {unknown}; known: {known}")
        return [spec for spec in self.tasks if spec.task in names or spec.key in names]

    def samples(self, task: str, split: str, n: int, seed: int, box_format: str = "plain") -> list[Pair]:
        """The loader's samples; a loader with a ``box_format`` parameter writes boxes in it (the harness rewrites
        any other loader's boxes with :func:`in_box_format`)."""
        if box_format != "plain" and "box_format" in inspect.signature(self.load).parameters:
            return self.load(task, split, n, seed, box_format=box_format)
        return self.load(task, split, n, seed)


# Suites by name. A package adds its own when imported: SUITES.add(suite.name, suite); MiniWorld's (``miniworld``,
# ``highres``) are added by mmbridge.worlds.miniworld.suites, which importing ``mmbridge`` loads.
SUITES: Table[Suite] = Table("suite")
_MOVED_TO_MINIWORLD = ("MINIWORLD", "HIGHRES", "load_miniworld")  # now in mmbridge.worlds.miniworld.suites


def get_suite(name: str) -> Suite:
    """The registered suite ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return SUITES.get(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None


def __getattr__(name: str) -> Any:
    """The MiniWorld suites and their loader, as this module held them before MiniWorld registered itself."""
    if name in _MOVED_TO_MINIWORLD:
        suite = get_suite("highres" if name == "HIGHRES" else "miniworld")
        return suite.load if name == "load_miniworld" else suite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
