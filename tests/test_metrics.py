"""Tests for mmbridge.eval.metrics: every metric against cases computed by hand (shown in comments)."""

from __future__ import annotations

import math

import pytest

from mmbridge.eval.metrics import (accepted_answer_match, bleu, box_iou, cider_d, circular_accuracy,
                                   grounding_metrics, normalize_answer, parse_box, parse_choice_letter, parse_yes_no,
                                   pope_metrics, rotate_choices, vqa_accuracy, wilson_interval)


# -- VQA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),                       # digit words become digits
    ("None", "0"),
    ("The Dog.", "dog"),                # lowercase, article dropped, final period stripped
    ("a tree and an apple", "tree and apple"),
    ("dont", "don't"),                  # contractions restored
    ("yes!", "yes"),                    # a mark not next to a space becomes a space, then split away
    ("red-blue", "red blue"),
    ("what is it ?", "what is it"),     # a mark next to a space is deleted
    ("1,000", "1000"),                  # a digit,digit comma deletes every mark
    ("3.5", "3.5"),                     # a period before a digit stays
    ("  left\tof\nit ", "left of it"),  # tabs and newlines are spaces
])
def test_vqa_normalisation(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_single_gold_is_exact_match_after_normalisation() -> None:
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("The red one", ["red one"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    assert vqa_accuracy("blue", ["navy", "Blue"]) == 1.0  # any accepted alternative


def test_vqa_accuracy_ten_human_answers_averages_leave_one_out_subsets() -> None:
    answers = ["2"] * 2 + ["3"] * 8
    # "2": leaving out one of the two "2"s leaves 1 match → 1/3 (2 subsets); leaving out a "3" leaves
    # 2 matches → 2/3 (8 subsets): (2 · 1/3 + 8 · 2/3) / 10 = 0.6
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)
    # "3": at least 7 matches in every subset → 1
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    # exactly 3 matches: leaving one of them out → 2/3 (3 subsets), else 1 (7 subsets): (2 + 7) / 10 = 0.9
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("bird", answers) == 0.0


def test_accepted_answer_match_takes_any_of_many_alternatives() -> None:
    colours = ("red", "green", "blue", "pink", "grey")
    accepted = [f"{size} {colour} triangle" for size in ("small", "large") for colour in colours]
    accepted.append("triangle")
    assert len(accepted) >= 10  # alternatives, not human answers: no 3-match rule
    assert vqa_accuracy("The triangle.", accepted) < 0.5  # as human answers, one match of 11 scores 10/11 · 1/3
    assert accepted_answer_match("The triangle.", accepted) == 1.0
    assert accepted_answer_match("a Large blue triangle", accepted) == 1.0
    assert accepted_answer_match("square", accepted) == 0.0


# -- POPE -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("Yes, there is a cat.", "yes"), ("No.", "no"), ("no!", "no"),
    ("There is not a dog.", "no"), ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("maybe", "yes"), ("", "yes"),  # POPE: anything without no/not is yes
])
def test_parse_yes_no_follows_pope(answer: str, parsed: str) -> None:
    assert parse_yes_no(answer) == parsed


def test_pope_metrics_on_a_small_confusion_matrix() -> None:
    golds = ["yes", "yes", "yes", "no", "no"]
    predictions = ["Yes", "yes.", "No", "Yes", "no"]
    # TP = 2, FN = 1, FP = 1, TN = 1
    scores = pope_metrics(predictions, golds)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 5)


def test_pope_metrics_without_yes_answers_has_zero_precision() -> None:
    scores = pope_metrics(["no", "no"], ["yes", "no"])
    assert scores == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


# -- multiple choice ------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, letter", [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ('"D"', "D"), ("The answer is B", "B"), ("b", "B"),
    ("Answer: C. green", "C"), ("E", None), ("I don't know", None),
    ("blue", "B"),  # no letter: an answer equal to exactly one option's text picks it
])
def test_parse_choice_letter(answer: str, letter: str | None) -> None:
    assert parse_choice_letter(answer, ["red", "blue", "green", "yellow"]) == letter


def test_rotate_choices_moves_the_gold_letter() -> None:
    assert rotate_choices(["a", "b", "c"], "A", 1) == (["b", "c", "a"], "C")
    assert rotate_choices(["a", "b", "c"], "B", 1) == (["b", "c", "a"], "A")
    assert rotate_choices(["a", "b", "c"], "B", 2) == (["c", "a", "b"], "C")
    assert rotate_choices(["a", "b", "c"], "B", 3) == (["a", "b", "c"], "B")


def test_circular_accuracy_needs_every_rotation_right() -> None:
    assert circular_accuracy([[True, True, True], [True, False, True], [False, True, True]]) == pytest.approx(1 / 3)


# -- grounding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, box", [
    ("[100, 200, 300, 400]", [100, 200, 300, 400]),
    ("The box is [010,020,030,040].", [10, 20, 30, 40]),
    ("[12.5, 3, 40, 50.5, 7] then [1, 2, 3, 4]", [12.5, 3, 40, 50.5]),
    ("[1, 2] [5, 6, 7, 8]", [5, 6, 7, 8]),  # the first bracket with four numbers
    ("100, 200, 300, 400", None), ("[1, 2, 3]", None), ("no box", None),
])
def test_parse_box(answer: str, box: list[float] | None) -> None:
    assert parse_box(answer) == box


def test_box_iou() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)  # overlap 5×5, union 100+100-25
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # an inverted box has no area


def test_grounding_accuracy_at_iou_half() -> None:
    golds = [[0, 0, 10, 10]] * 4
    # IoU 0.5 exactly (half the box) counts; 25/175 does not; an unparsable answer scores 0
    predictions = ["[0, 0, 10, 5]", "[5, 5, 15, 15]", "[0, 0, 10, 10]", "somewhere"]
    scores = grounding_metrics(predictions, golds)
    assert scores["accuracy"] == pytest.approx(2 / 4)
    assert scores["mean_iou"] == pytest.approx((0.5 + 25 / 175 + 1.0 + 0.0) / 4)
    assert scores["parse_rate"] == pytest.approx(3 / 4)


# -- captions -------------------------------------------------------------------------------------
def test_cider_d_identical_captions() -> None:
    # two images, so log(corpus size) = log 2. "a" is in both reference sets: df 2, weight log2 - log2 = 0.
    # "cat", "a cat" (image 1) and "dog", "a dog" (image 2) have df 1: weight log 2.
    # Per image: orders 1 and 2 have cosine 1, orders 3, 4 have no n-grams (0); equal lengths, no
    # penalty. Score = mean([1, 1, 0, 0]) × 10 = 5 for each image.
    assert cider_d(["A cat.", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)


def test_cider_d_length_penalty_and_unseen_ngrams() -> None:
    # image 1: hypothesis "a cat sat" vs reference "a cat".
    # hyp vectors: order 1 {a: 0, cat: l, sat: l} (l = log 2; "sat" has df 0 → weight log2 - log(max(1, 0)) = l),
    # order 2 {a cat: l, cat sat: l}, order 3 {a cat sat: l}; ref: order 1 {a: 0, cat: l}, order 2 {a cat: l}.
    # order 1: l·l / (√2·l · l) = 1/√2; order 2: same; order 3: ref norm 0 → 0.
    # lengths (bigram counts) 2 vs 1 → penalty exp(-1 / (2·36)).
    first = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider_d(["a cat sat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx((first + 5.0) / 2)


def test_cider_d_clips_repeated_ngrams() -> None:
    # image 1: "cat cat" vs "a cat": order 1 hyp {cat: 2l}, ref {a: 0, cat: l}; clipped
    # min(2l, l)·l / (2l · l) = 1/2 (unclipped it would be 1); order 2 "cat cat" is not in the
    # reference → 0; equal bigram counts → no penalty. Score = (1/2 + 0) / 4 × 10 = 1.25.
    assert cider_d(["cat cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx((1.25 + 5.0) / 2)


def test_cider_d_averages_over_references() -> None:
    # image 1 has references "a cat" and "a dog", image 2 "a dog": df(a) = df(dog) = df(a dog) = 2
    # (weight 0), df(cat) = df(a cat) = 1 (weight log 2).
    # hyp "a cat" vs "a cat": orders 1, 2 cosine 1 → 5; vs "a dog": every shared n-gram has weight 0 → 0.
    # image 1 = (5 + 0) / 2 = 2.5; image 2 "a dog" vs "a dog": all weights 0 → 0.
    assert cider_d(["a cat", "a dog"], [["a cat", "a dog"], ["a dog"]]) == pytest.approx((2.5 + 0.0) / 2)


def test_bleu_identical_and_brevity_penalty() -> None:
    assert bleu(["The cat sat on the mat."], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # every n-gram of "the cat sat on the" is in the reference: precisions 1; c = 5 < r = 6 → exp(1 - 6/5)
    assert bleu(["the cat sat on the"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-0.2))


def test_bleu_is_corpus_level() -> None:
    # sentence 1 matches exactly (5, 4, 3, 2 n-grams). Sentence 2 "a b x d e": unigrams 4/5,
    # bigrams {ab, de} 2/4, trigrams 0/3, 4-grams 0/2. Corpus precisions: 9/10, 6/8, 3/6, 2/4.
    # lengths 10 vs 10 → no penalty. BLEU = (0.9 · 0.75 · 0.5 · 0.5)^(1/4).
    score = bleu(["a b c d e", "a b x d e"], [["a b c d e"], ["a b c d e"]])
    assert score == pytest.approx((0.9 * 0.75 * 0.5 * 0.5) ** 0.25)


def test_bleu_closest_reference_length_and_clipping() -> None:
    # references of 6 and 9 words, hypothesis of 4: closest r = 6 → penalty exp(1 - 6/4); all n-grams match.
    assert bleu(["a b c d"], [["a b c d e f", "a b c d e f g h i"]]) == pytest.approx(math.exp(-0.5))
    # "the the the the" vs "the cat": unigram precision clipped to 1/4, no bigram matches → 0
    assert bleu(["the the the the"], [["the cat"]]) == 0.0


# -- Wilson intervals ----------------------------------------------------------------------------
def test_wilson_interval_by_hand() -> None:
    # 31/60: p = 0.5167, z² = 3.8415; centre = (p + z²/120) / (1 + z²/60) = 0.5157;
    # half = z * sqrt(p(1-p)/60 + z²/14400) / (1 + z²/60) = 0.1226 -> (0.393, 0.638), the README's 39–64%
    low, high = wilson_interval(31, 60)
    assert low == pytest.approx(0.3931, abs=5e-4) and high == pytest.approx(0.6382, abs=5e-4)
    # all correct: centre = (1 + z²/2n) / (1 + z²/n), half the same distance down; the top is exactly 1
    low, high = wilson_interval(20, 20)
    assert low == pytest.approx(20 / (20 + 1.959964 ** 2), abs=1e-6) and high == 1.0
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2), abs=1e-6)
    assert wilson_interval(50, 100, z=1.0) == pytest.approx((0.5 - 0.5 / math.sqrt(101), 0.5 + 0.5 / math.sqrt(101)))


@pytest.mark.parametrize("successes, total", [(3, 0), (-1, 5), (6, 5)])
def test_wilson_interval_refuses_impossible_counts(successes: int, total: int) -> None:
    with pytest.raises(ValueError, match="wilson_interval needs"):
        wilson_interval(successes, total)
