"""Metrics of the evaluation conventions (REFERENCE.md): VQA, POPE, multiple choice, grounding, captions.

Every function works on plain strings and lists, so each one can be checked by hand:

- VQA accuracy with the official VQAv2 answer normalisation (``vqaEval.py``): punctuation,
  digit words, articles, contractions; ``min(#matches / 3, 1)`` averaged over the
  leave-one-out subsets of 10 human answers, exact match against fewer answers; and
  exact match against a list of accepted alternatives of any length.
- POPE yes/no parsing as LLaVA's ``eval_pope.py`` (first sentence; "no" or "not" → no,
  anything else → yes, so every answer counts in the yes-ratio) and its accuracy,
  precision, recall, F1 and yes-ratio, "yes" being the positive class.
- Multiple choice: the first standalone option letter, MMBench circular accuracy.
- Grounding: the first box, plain ``[x0, y0, x1, y1]`` or Qwen-VL ``<box>(x1,y1),(x2,y2)</box>``, IoU,
  accuracy at IoU ≥ 0.5.
- Captions: CIDEr-D (pycocoevalcap's ``cider_scorer``, IDF from the evaluated references)
  and corpus BLEU-4 (closest reference length), on lowercase, punctuation-free tokens.
- Uncertainty: the Wilson score interval of an accuracy from n samples (95% by default).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from mmbridge.boxes import find_boxes
from mmbridge.eval.prompts import LETTERS

# -- VQA normalisation (official VQAv2 evaluation tables) ----------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # the official "(?!<=\d)(\.)(?!\d)" matches exactly this
HUMAN_ANSWERS = 10  # VQAv2 collects 10 answers per question


def _process_punctuation(text: str) -> str:
    """Official rule: a mark beside a space (or in text with a digit,digit comma) is deleted, else a space."""
    output = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or digit_comma:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", output)


def _process_digits_and_articles(text: str) -> str:
    """Lowercase, number words → digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """VQAv2 answer normalisation: ``"Two dogs."`` → ``"2 dogs"``, ``"the dont"`` → ``"don't"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against its gold answers (all normalised).

    With at least 10 (human) answers: for each answer left out, ``min(#matches among the
    others / 3, 1)``, averaged (the official 10-choose-9 average). With fewer: 1.0 when the
    prediction equals any accepted answer, else 0.0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one gold answer")
    predicted = normalize_answer(prediction)
    golds = [normalize_answer(answer) for answer in answers]
    if len(golds) < HUMAN_ANSWERS:
        return float(predicted in golds)
    scores = []
    for left_out in range(len(golds)):
        matches = sum(gold == predicted for index, gold in enumerate(golds) if index != left_out)
        scores.append(min(matches / 3.0, 1.0))
    return sum(scores) / len(scores)


def accepted_answer_match(prediction: str, accepted: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised accepted answer (however many), else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(answer) == predicted for answer in accepted))


# -- yes/no (POPE) --------------------------------------------------------------------------------
def parse_yes_no(text: str) -> str:
    """``"yes"`` or ``"no"`` as POPE's evaluation reads an answer.

    The first sentence, lowercased, split into words (punctuation removed): it is "no" when
    it contains the word "no" or "not", otherwise "yes" — so an answer that is neither
    (empty, "maybe") counts as yes, in the accuracy and in the yes-ratio alike.
    """
    first_sentence = text.split(".")[0].lower()
    words = re.sub(r"[^\w\s']", " ", first_sentence).split()
    return "no" if "no" in words or "not" in words else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def pope_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" is positive) and yes-ratio of raw answers vs gold yes/no."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    said_yes = [parse_yes_no(prediction) == "yes" for prediction in predictions]
    is_yes = [normalize_answer(gold) == "yes" for gold in golds]
    true_pos = sum(said and gold for said, gold in zip(said_yes, is_yes))
    false_pos = sum(said and not gold for said, gold in zip(said_yes, is_yes))
    false_neg = sum(not said and gold for said, gold in zip(said_yes, is_yes))
    correct = sum(said == gold for said, gold in zip(said_yes, is_yes))
    precision, recall = _ratio(true_pos, true_pos + false_pos), _ratio(true_pos, true_pos + false_neg)
    return {"accuracy": _ratio(correct, len(golds)), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": _ratio(sum(said_yes), len(golds))}


# -- multiple choice ------------------------------------------------------------------------------
def parse_choice_letter(text: str, choices: list[str]) -> str | None:
    """The first standalone option letter in ``text`` (``A``, ``A.``, ``(A)``, ``"The answer is B"``).

    Only letters of the given options count, uppercase (a whole answer of one lowercase
    letter also counts). Failing that, an answer equal to exactly one option's text
    (VQA-normalised) picks that option. ``None`` when nothing matches.
    """
    valid = LETTERS[:len(choices)]
    stripped = text.strip()
    if len(stripped) == 1 and stripped.upper() in valid:
        return stripped.upper()
    for match in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text):
        if match.group(1) in valid:
            return match.group(1)
    answer = normalize_answer(text)
    matching = [LETTERS[index] for index, choice in enumerate(choices) if normalize_answer(choice) == answer]
    return matching[0] if len(matching) == 1 else None


def rotate_choices(choices: list[str], gold_letter: str, shift: int) -> tuple[list[str], str]:
    """Options moved ``shift`` places up (``[a, b, c]``, 1 → ``[b, c, a]``) and the gold's new letter."""
    count = len(choices)
    shift %= count
    gold_index = (LETTERS.index(gold_letter) - shift) % count
    return choices[shift:] + choices[:shift], LETTERS[gold_index]


def circular_accuracy(correct_per_rotation: list[list[bool]]) -> float:
    """MMBench CircularEval: a question counts only when every rotation of its options was answered right."""
    return _ratio(sum(all(rotations) for rotations in correct_per_rotation), len(correct_per_rotation))


# -- grounding ------------------------------------------------------------------------------------
_NUMBER = r"-?\d+(?:\.\d+)?"


def parse_box(text: str) -> list[float] | None:
    """The first box in ``text`` of either format of :mod:`mmbridge.boxes`, in thousandths of the side, else ``None``.

    Plain: the first four numbers of the first ``[...]`` holding at least four numbers (lenient: decimals and
    extra numbers are read too). Qwen-VL: ``<box>(x1,y1),(x2,y2)</box>`` (values 0–1000, ``<ref>`` optional).
    Both scales are thousandths of the image side, so the values are returned as written and IoU compares them
    directly; whichever box comes first in the text counts."""
    qwen = next((box for box in find_boxes(text) if box.format == "qwen"), None)
    for bracket in re.finditer(r"\[([^\[\]]*)\]", text):
        if qwen is not None and bracket.start() > qwen.start:
            break
        numbers = re.findall(_NUMBER, bracket.group(1))
        if len(numbers) >= 4:
            return [float(number) for number in numbers[:4]]
    return [float(value) for value in qwen.values] if qwen is not None else None


def box_iou(first: list[float], second: list[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes; a box with ``x1 <= x0`` has no area."""
    def area(box: list[float]) -> float:
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    overlap = [max(first[0], second[0]), max(first[1], second[1]), min(first[2], second[2]), min(first[3], second[3])]
    intersection = area(overlap)
    return _ratio(intersection, area(first) + area(second) - intersection)


def grounding_metrics(predictions: list[str], gold_boxes: list[list[float]],
                      threshold: float = 0.5) -> dict[str, float]:
    """``accuracy`` (IoU ≥ ``threshold``; an unparsable answer scores 0), ``mean_iou`` and ``parse_rate``."""
    if len(predictions) != len(gold_boxes):
        raise ValueError(f"{len(predictions)} predictions for {len(gold_boxes)} gold boxes")
    boxes = [parse_box(prediction) for prediction in predictions]
    ious = [box_iou(box, gold) if box is not None else 0.0 for box, gold in zip(boxes, gold_boxes)]
    return {"accuracy": _ratio(sum(iou >= threshold for iou in ious), len(ious)),
            "mean_iou": _ratio(sum(ious), len(ious)),
            "parse_rate": _ratio(sum(box is not None for box in boxes), len(boxes))}


# -- captions -------------------------------------------------------------------------------------
def caption_tokens(text: str) -> list[str]:
    """Lowercase words with punctuation removed (the stand-in for the PTB tokenizer)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def ngram_counts(words: list[str], max_order: int = 4) -> Counter:
    """Counts of every n-gram (as a tuple) of order 1..``max_order``."""
    return Counter(tuple(words[start:start + order]) for order in range(1, max_order + 1)
                   for start in range(len(words) - order + 1))


def _cider_vector(counts: Counter, document_frequency: Counter, log_corpus_size: float,
                  max_order: int) -> tuple[list[dict], list[float], int]:
    """TF-IDF vector per n-gram order, its norms, and the length CIDEr-D compares (the bigram count)."""
    vectors: list[dict] = [{} for _ in range(max_order)]
    norms = [0.0] * max_order
    bigrams = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        weight = term_frequency * (log_corpus_size - math.log(max(1.0, document_frequency[ngram])))
        vectors[order][ngram] = weight
        norms[order] += weight ** 2
        if order == 1:  # pycocoevalcap counts bigrams as "length"; the difference equals the word-count one
            bigrams += term_frequency
    return vectors, [math.sqrt(norm) for norm in norms], bigrams


def _cider_similarity(hypothesis: tuple, reference: tuple, sigma: float) -> list[float]:
    """Per-order clipped cosine similarity times the Gaussian length penalty (CIDEr-D)."""
    (hyp_vectors, hyp_norms, hyp_length), (ref_vectors, ref_norms, ref_length) = hypothesis, reference
    penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma ** 2))
    values = []
    for order, hyp_vector in enumerate(hyp_vectors):
        ref_vector = ref_vectors[order]
        value = sum(min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
                    for ngram, weight in hyp_vector.items())
        if hyp_norms[order] and ref_norms[order]:
            value /= hyp_norms[order] * ref_norms[order]
        values.append(value * penalty)
    return values


def cider_d(predictions: list[str], references: list[list[str]], max_order: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (×10, clipped n-gram TF-IDF cosine, Gaussian length penalty with ``sigma``).

    Document frequencies come from the references of the evaluated set, as in pycocoevalcap;
    the result is the mean of the per-sample scores.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        return 0.0
    reference_counts = [[ngram_counts(caption_tokens(ref), max_order) for ref in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_corpus_size = math.log(len(references))
    scores = []
    for prediction, refs in zip(predictions, reference_counts):
        hypothesis = _cider_vector(ngram_counts(caption_tokens(prediction), max_order), document_frequency,
                                   log_corpus_size, max_order)
        total = [0.0] * max_order
        for ref in refs:
            similarity = _cider_similarity(hypothesis, _cider_vector(ref, document_frequency, log_corpus_size,
                                                                     max_order), sigma)
            total = [running + value for running, value in zip(total, similarity)]
        scores.append(10.0 * sum(total) / max_order / max(1, len(refs)))
    return sum(scores) / len(scores)


def _closest_length(hyp_length: int, ref_lengths: list[int]) -> int:
    """The reference length closest to the hypothesis length; ties go to the shorter one."""
    return min(ref_lengths, key=lambda length: (abs(length - hyp_length), length))


def bleu(predictions: list[str], references: list[list[str]], max_order: int = 4) -> float:
    """Corpus BLEU (BLEU-4 by default): clipped n-gram precisions summed over the corpus, geometric
    mean, brevity penalty ``exp(1 - r/c)`` when the total length ``c`` is below the closest-reference
    total ``r``. Any zero precision gives 0 (no smoothing)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    matched, guessed = [0] * max_order, [0] * max_order
    hyp_total = ref_total = 0
    for prediction, refs in zip(predictions, references):
        words = caption_tokens(prediction)
        ref_words = [caption_tokens(ref) for ref in refs]
        hyp_total += len(words)
        ref_total += _closest_length(len(words), [len(ref) for ref in ref_words])
        max_ref_counts: Counter = Counter()
        for ref in ref_words:
            max_ref_counts |= ngram_counts(ref, max_order)
        for ngram, count in ngram_counts(words, max_order).items():
            matched[len(ngram) - 1] += min(count, max_ref_counts[ngram])
            guessed[len(ngram) - 1] += count
    if hyp_total == 0 or 0 in matched:
        return 0.0
    log_precision = sum(math.log(match / guess) for match, guess in zip(matched, guessed)) / max_order
    brevity = 1.0 if hyp_total > ref_total else math.exp(1 - ref_total / hyp_total)
    return brevity * math.exp(log_precision)


# -- uncertainty ----------------------------------------------------------------------------------
WILSON_Z = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: int, total: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of the proportion ``successes / total`` (95% for the default z).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``total`` successes:
    20 of 20 gives about (0.839, 1.0)."""
    if total < 1 or not 0 <= successes <= total:
        raise ValueError(f"wilson_interval needs 0 <= successes <= total and total >= 1, got {successes}/{total}")
    share = successes / total
    spread = z * z / total
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / total + spread / (4 * total)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


__all__ = ["normalize_answer", "vqa_accuracy", "accepted_answer_match", "parse_yes_no", "pope_metrics",
           "parse_choice_letter", "rotate_choices", "circular_accuracy", "parse_box", "box_iou", "grounding_metrics",
           "caption_tokens", "cider_d", "bleu", "wilson_interval"]
