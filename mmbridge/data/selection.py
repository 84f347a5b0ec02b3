"""Choosing a subset of a LLaVA conversation file: a seeded random subset, or an informative coreset.

The coreset follows SVIT (Zhao et al., "SVIT: Scaling up Visual Instruction Tuning", arXiv 2307.04087):
a sample is worth keeping for the concepts it mentions, the kept set should cover the concept
vocabulary rather than repeat the same concepts, and its yes/no answers should not lean to "yes"
(SVIT observed the bias on POPE; LRV-Instruction, arXiv 2306.14565, makes the same point with negative
instructions). The rules, exactly:

* **Text** of a sample: its own turns (in-context examples excluded), lower-cased, split into letter runs.
* **Concept vocabulary** (``concepts=None``): every word of 3+ letters, not in :data:`STOP_WORDS`, that
  appears in at least ``min_count`` samples (rarer words are ids, typos or names that cannot be
  covered twice) and in at most ``max_fraction`` of the samples (words in most samples — "image",
  "describe", "answer" of a prompt template — tell samples apart no more than stop words do). The stop
  list (function words, auxiliaries, question words, common verbs, yes/no) stands in for a
  part-of-speech tagger, so what remains is mostly nouns and adjectives. Given concepts (a list, or
  ``--concepts FILE`` one per line, "#" comments) may be phrases: "traffic light" matches those two
  words in a row.
* **Score** of a sample: the number of distinct vocabulary concepts its text mentions.
* **Coreset order** (greedy, diminishing returns): repeatedly take the sample of largest gain
  ``sum over its concepts c of 1 / (1 + n_c)``, where ``n_c`` counts the already-taken samples that mention
  ``c``. An uncovered concept is worth 1, a concept taken once ½, twice ⅓ …, so the set first covers the
  vocabulary, then adds second and third views of each concept, and a sample repeating covered concepts
  waits. Ties go to the higher score, then to a seeded random rank (``seed``). The first ``keep`` of this
  order are kept (lazy greedy: gains only shrink, so a stale gain is an upper bound).
* **Random order**: a seeded permutation; its first ``keep`` are a uniform subset.
* **Yes/no balance** (``balance_yes_no``, default on for coreset, off for random): a sample is "yes" when
  every assistant turn starts with the word "yes" ("Yes, there is a cat." counts), "no" likewise, otherwise
  it is not a yes/no sample. While the kept majority answer outnumbers the minority by 2 or more, the
  kept majority sample latest in the order is replaced by the earliest not-kept sample that is not of the
  majority (a minority answer or a non-yes/no sample); when they differ by 1, only a non-yes/no sample
  may replace it (a minority one would merely flip the surplus). The kept set then holds equal numbers of
  yes and no, or one apart, unless the replacements run out (the report says so).

Kept records are written unchanged, in input order. :func:`select_records` is the library entry point;
:func:`select_file` reads, validates (errors name the file, sample and field), writes ``OUT`` and
``OUT.report.json`` atomically.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from mmbridge.data.formats.llava import Sample, load_llava_json, read_records
from mmbridge.utils import atomic_path, atomic_write_json

METHODS = ("random", "coreset")

STOP_WORDS = frozenset("""
a about above across after again against all almost also although always am among an and another any anyone
anything are around as ask asked at away back be because been before behind being below beside besides between
both but by can cannot could did do does doing done down during each either else enough even ever every
everything few for from further get gets give given go goes going got had has have having he her here hers
herself him himself his how however i if in inside into is it its itself just least less let like made make
makes many may maybe me might mine more most much must my myself near neither never next no none nor not nothing
now of off often on once one only onto or other others otherwise our ours ourselves out outside over own
perhaps please quite rather really said same say says see seen shall she should show shown shows since so some
someone something sometimes still such than that the their theirs them themselves then there therefore these
they thing things this those though through thus to too toward towards under until up upon us very was we well
were what whatever when where whereas whether which while who whom whose why will with within without would yes
yet you your yours yourself answer answers asked describe described describes tell explain question questions
provide word words sentence single short brief detail detailed picture photo image images shown visible appear
appears look looks looking lot lots kind sort type way ways part parts
""".split())

WORD = re.compile(r"[a-z]+")


@dataclass
class Scored:
    """One sample's concepts and yes/no label (``"yes"``, ``"no"`` or ``None``)."""

    index: int
    id: str
    concepts: frozenset[str]
    answer: str | None


def sample_words(sample: Sample) -> list[str]:
    """The sample's own turns (in-context examples excluded) as lower-case letter runs."""
    text = " ".join(turn["content"] for turn in sample.conversation[sample.context_turns:])
    return WORD.findall(text.replace("<image>", " ").lower())


def yes_no_answer(sample: Sample) -> str | None:
    """``"yes"``/``"no"`` when every assistant turn of the sample's own starts with that word, else ``None``."""
    firsts = set()
    for turn in sample.conversation[sample.context_turns:]:
        if turn["role"] == "assistant":
            words = WORD.findall(turn["content"].lower())
            firsts.add(words[0] if words else "")
    return firsts.pop() if len(firsts) == 1 and firsts <= {"yes", "no"} else None


def build_vocabulary(word_lists: list[list[str]], min_count: int = 2, max_fraction: float = 0.5) -> list[str]:
    """Concepts from the data: words of 3+ letters, not stop words, in ``min_count`` or more samples and in at
    most ``max_fraction`` of them (see the module docstring); sorted."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    frequency = Counter(word for words in word_lists for word in set(words))
    limit = max_fraction * len(word_lists)
    return sorted(word for word, count in frequency.items()
                  if len(word) >= 3 and word not in STOP_WORDS and min_count <= count <= limit)


def read_concepts(path: str) -> list[str]:
    """A concepts file: one concept (word or phrase) per line; blank lines and ``#`` comments skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: concepts file not found")
    with open(path, encoding="utf-8") as handle:
        concepts = [line.split("#", 1)[0].strip() for line in handle]
    concepts = [concept for concept in concepts if concept]
    if not concepts:
        raise ValueError(f"{path}: concepts file holds no concepts (one per line expected)")
    return concepts


def _normalise_concepts(concepts: list[str]) -> list[tuple[str, ...]]:
    """Each concept as its tuple of lower-case words; one with no letters is an error naming it."""
    result = []
    for concept in concepts:
        words = tuple(WORD.findall(str(concept).lower()))
        if not words:
            raise ValueError(f"concept {concept!r} has no letters; concepts are words or phrases")
        result.append(words)
    return sorted(set(result))


def _mentioned(words: list[str], concepts: set[tuple[str, ...]], longest: int) -> frozenset[str]:
    """The concepts (joined by spaces) whose words occur in a row in ``words``."""
    found = set()
    for length in range(1, longest + 1):
        for start in range(len(words) - length + 1):
            gram = tuple(words[start:start + length])
            if gram in concepts:
                found.add(" ".join(gram))
    return frozenset(found)


def parse_keep(keep: int | float | str, total: int) -> int:
    """``keep`` as a count: an int (or integer string) is a count in [1, total]; a float (or a string with
    "." or "e") a fraction in (0, 1], rounded to the nearest count, at least 1."""
    value: int | float = keep
    if isinstance(keep, str):
        try:
            value = float(keep) if any(mark in keep.lower() for mark in ".e") else int(keep)
        except ValueError:
            raise ValueError(f"--keep must be a fraction in (0, 1] or a sample count, got {keep!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"keep must be a fraction in (0, 1] or a sample count, got {keep!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"keep fraction must be in (0, 1], got {value}")
        return max(1, round(value * total))
    if not 1 <= value <= total:
        raise ValueError(f"keep count must be between 1 and the {total} input samples, got {value}")
    return value


def _greedy_order(scored: list[Scored], ranks: list[int]) -> Iterator[tuple[int, float]]:
    """Sample indices in coreset order, each with its gain when taken (module docstring), computed lazily."""
    taken_with: Counter[str] = Counter()

    def gain(item: Scored) -> float:
        return round(sum(1.0 / (1 + taken_with[concept]) for concept in item.concepts), 9)

    heap = [(-gain(item), -len(item.concepts), ranks[item.index], item.index) for item in scored]
    heapq.heapify(heap)
    while heap:
        _, negative_score, rank, index = heapq.heappop(heap)
        fresh = (-gain(scored[index]), negative_score, rank, index)
        if heap and fresh > heap[0]:  # stale: its gain shrank below the next one's bound
            heapq.heappush(heap, fresh)
            continue
        taken_with.update(scored[index].concepts)
        yield index, -fresh[0]


def _balance(kept: list[int], rest: Iterator[int], scored: list[Scored]) -> tuple[list[int], int, bool]:
    """``kept`` (the first of the order) with yes/no evened out by later samples of ``rest`` (module
    docstring); also the number of swaps and whether the balance was reached."""
    answers = Counter(scored[index].answer for index in kept)
    majority = "yes" if answers["yes"] >= answers["no"] else "no"
    minority = "no" if majority == "yes" else "yes"
    pending: list[int] = []  # not-kept, non-majority samples read from ``rest`` but not used yet, in order

    def next_of(allowed: tuple[str | None, ...]) -> int | None:
        for number, index in enumerate(pending):
            if scored[index].answer in allowed:
                return pending.pop(number)
        for index in rest:
            if scored[index].answer in allowed:
                return index
            if scored[index].answer != majority:
                pending.append(index)
        return None

    outgoing = [index for index in reversed(kept) if scored[index].answer == majority]  # latest first
    dropped, added = set(), []
    while answers[majority] - answers[minority] >= 1:
        incoming = next_of((None,) if answers[majority] - answers[minority] == 1 else (None, minority))
        if incoming is None:
            break
        dropped.add(outgoing[len(dropped)])
        added.append(incoming)
        answers[majority] -= 1
        answers[scored[incoming].answer] += 1
    kept = [index for index in kept if index not in dropped] + added
    return kept, len(added), abs(answers["yes"] - answers["no"]) <= 1


def _answer_figures(items: list[Scored]) -> dict[str, Any]:
    answers = Counter(item.answer for item in items)
    yes_no = answers["yes"] + answers["no"]
    return {"yes": answers["yes"], "no": answers["no"], "yes_ratio": answers["yes"] / yes_no if yes_no else None}


def _score_figures(items: list[Scored]) -> dict[str, Any]:
    scores = [len(item.concepts) for item in items]
    return {"min": min(scores), "max": max(scores), "mean": sum(scores) / len(scores)}


def select_records(records: list[Any], method: str, keep: int | float | str, seed: int = 0, *,
                   concepts: list[str] | None = None, balance_yes_no: bool | None = None, min_count: int = 2,
                   max_fraction: float = 0.5, path: str = "<records>", top: int = 10) -> tuple[list[Any], dict]:
    """Select ``keep`` of LLaVA ``records`` by ``method`` (``random`` or ``coreset``); returns the kept records
    (unchanged, in input order) and a report (figures, vocabulary, per-kept-sample scores).

    ``keep``: an int count or a float fraction in (0, 1]; ``concepts``: the vocabulary (default: built from
    the data with ``min_count`` and ``max_fraction``); ``balance_yes_no``: default on for coreset, off for
    random. Records are validated by the LLaVA parser; errors name ``path``, the sample and the field.
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; known: {', '.join(METHODS)}")
    if not records:
        raise ValueError(f"{path}: no samples to select from")
    named = [index for index, record in enumerate(records)
             if isinstance(record, dict) and (record.get("in_context") or record.get("rel_ins_ids"))]
    samples = load_llava_json(path, records=records)
    if named:
        raise ValueError(f"{path}: sample #{named[0]} names in-context examples ('in_context'); selection would "
                         f"break such references, so files with them are not supported")
    count = parse_keep(keep, len(records))
    balance = method == "coreset" if balance_yes_no is None else balance_yes_no
    words = [sample_words(sample) for sample in samples]
    source = "given" if concepts is not None else "data"
    vocabulary = (_normalise_concepts(concepts) if concepts is not None
                  else [(word,) for word in build_vocabulary(words, min_count, max_fraction)])
    lookup, longest = set(vocabulary), max((len(concept) for concept in vocabulary), default=1)
    scored = [Scored(index, sample.id, _mentioned(text_words, lookup, longest), yes_no_answer(sample))
              for index, (sample, text_words) in enumerate(zip(samples, words))]
    generator = random.Random(seed)
    permutation = list(range(len(records)))
    generator.shuffle(permutation)
    ranks = [0] * len(records)
    for rank, index in enumerate(permutation):
        ranks[index] = rank
    gains: dict[int, float] = {}
    position: dict[int, int] = {}  # place in the order of every sample read from it
    ranked = _greedy_order(scored, ranks) if method == "coreset" else ((index, None) for index in permutation)

    def order() -> Iterator[int]:
        for index, gain in ranked:
            position[index] = len(position)
            if gain is not None:
                gains[index] = gain
            yield index

    ordered = order()
    kept = list(itertools.islice(ordered, count))
    kept, swaps, balanced = _balance(kept, ordered, scored) if balance else (kept, 0, True)
    kept_items = [scored[index] for index in sorted(kept)]
    report = _report(method, seed, count, scored, kept_items, vocabulary, source, min_count, max_fraction,
                     balance, swaps, balanced, gains, position, top)
    return [records[item.index] for item in kept_items], report


def _report(method: str, seed: int, count: int, scored: list[Scored], kept: list[Scored],
            vocabulary: list[tuple[str, ...]], source: str, min_count: int, max_fraction: float, balance: bool,
            swaps: int, balanced: bool, gains: dict[int, float], position: dict[int, int], top: int) -> dict:
    """The figures the summary prints, and why each kept sample was kept."""
    size = len(vocabulary)
    covered_input = set().union(*(item.concepts for item in scored))
    covered_kept = set().union(*(item.concepts for item in kept))
    kept_counts = Counter(concept for item in kept for concept in item.concepts)
    input_counts = Counter(concept for item in scored for concept in item.concepts)
    rule = (f"words of 3+ letters, not stop words, in >= {min_count} samples and <= {max_fraction:g} of them"
            if source == "data" else "given")
    return {
        "method": method, "seed": seed, "kept": len(kept), "total": len(scored), "requested": count,
        "score": "distinct vocabulary concepts a sample mentions",
        "score_input": _score_figures(scored), "score_kept": _score_figures(kept),
        "vocabulary": {"source": source, "rule": rule, "size": size,
                       "covered_input": len(covered_input), "covered_kept": len(covered_kept),
                       "coverage_input": len(covered_input) / size if size else None,
                       "coverage_kept": len(covered_kept) / size if size else None,
                       "uncovered_kept": sorted(covered_input - covered_kept)},
        "yes_no": {"balanced": balance, "swaps": swaps, "reached": balanced,
                   "input": _answer_figures(scored), "kept": _answer_figures(kept)},
        "top_concepts_kept": kept_counts.most_common(top),
        "top_concepts_input": input_counts.most_common(top),
        "samples": [{"index": item.index, "id": item.id, "score": len(item.concepts),
                     "gain": gains.get(item.index), "order": position[item.index], "answer": item.answer,
                     "concepts": sorted(item.concepts)} for item in kept],
    }


def report_path(out: str) -> str:
    """``OUT.report.json`` beside ``OUT``: ``sel.json`` → ``sel.report.json``."""
    return os.path.splitext(out)[0] + ".report.json"


def _same_file(first: str, second: str) -> bool:
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    return os.path.realpath(first) == os.path.realpath(second)


def write_records(path: str, records: list[Any]) -> None:
    """``records`` as a JSON list, or JSON Lines when ``path`` ends in ``.jsonl``; written atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            else:
                json.dump(records, handle, ensure_ascii=False)


def select_file(in_path: str, out_path: str, method: str, keep: int | float | str, seed: int = 0, *,
                concepts_path: str | None = None, **options: Any) -> dict:
    """Read ``in_path``, select (:func:`select_records`), write the kept records to ``out_path`` and the report
    to :func:`report_path`; returns the report (with ``out``, ``report`` and ``in`` paths added)."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; known: {', '.join(METHODS)}")
    report_file = report_path(out_path)
    for target, name in ((out_path, "OUT"), (report_file, "the report")):
        if _same_file(in_path, target):
            raise ValueError(f"{target}: {name} is the input file {in_path}; write the selection elsewhere")
    concepts = read_concepts(concepts_path) if concepts_path is not None else None
    records = read_records(in_path)
    kept, report = select_records(records, method, keep, seed, concepts=concepts, path=in_path, **options)
    report = {"in": in_path, "out": out_path, "report": report_file, **report}
    if concepts_path is not None:
        report["vocabulary"]["source"] = concepts_path
    write_records(out_path, kept)
    atomic_write_json(report_file, report)
    return report


def summary(report: dict) -> str:
    """The report as the few lines ``mmbridge data select`` prints."""
    def scores(figures: dict) -> str:
        return f"{figures['min']}-{figures['max']} (mean {figures['mean']:.2f})"

    def answers(figures: dict) -> str:
        ratio = "n/a" if figures["yes_ratio"] is None else f"{figures['yes_ratio']:.2f}"
        return f"{figures['yes']} yes / {figures['no']} no (yes ratio {ratio})"

    vocabulary, yes_no = report["vocabulary"], report["yes_no"]
    size = vocabulary["size"]
    balance = (f"balanced with {yes_no['swaps']} swap(s)" + ("" if yes_no["reached"] else
                                                             ", ran out of replacements before even")
               if yes_no["balanced"] else "not balanced")
    top = ", ".join(f"{concept} {count}" for concept, count in report["top_concepts_kept"]) or "none"
    return "\n".join([
        f"kept {report['kept']}/{report['total']} samples ({report['method']}, seed {report['seed']})",
        f"  score (distinct concepts per sample): input {scores(report['score_input'])}, "
        f"kept {scores(report['score_kept'])}",
        f"  vocabulary: {size} concepts ({vocabulary['rule']}); covered by input {vocabulary['covered_input']}"
        f"/{size}, by kept {vocabulary['covered_kept']}/{size}",
        f"  yes/no answers: input {answers(yes_no['input'])}, kept {answers(yes_no['kept'])}; {balance}",
        f"  top concepts kept: {top}",
    ])
