"""Attribute accuracy of a trained model split by question kind (colour/shape/size) and object count.

    python benchmarks/attribute_breakdown.py --model demo_out/run/final [--n 160] [--split test]

The demo's headline attribute figure mixes three questions of different difficulty; this
breakdown is what located its weak point (colour, even with one object). Scenes and answers
come from MiniWorld's records, the answers from the evaluation harness's batched greedy
decoding with the same prompt the harness sends.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from mmbridge.eval.harness import Prompt, generate_answers
from mmbridge.eval.tasks import SAMPLE_IMAGE_TOKEN, gold_answers
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.worlds.miniworld import SIZES, make_record, render_images


def question_kind(question: str, gold: str) -> str:
    """``size`` (the answer is a size word), ``colour`` (the question names colour) or ``shape``."""
    if gold in SIZES:
        return "size"
    return "colour" if "colo" in question.lower() else "shape"


def breakdown(model: MultimodalModel, n: int, split: str = "test", seed: int = 0) -> dict[tuple[str, int], list[int]]:
    """``(kind, objects in the scene) → [correct, asked]`` over the first ``n`` attribute samples."""
    records = [make_record("attribute", split, index, seed) for index in range(n)]
    prompts = [Prompt(record["conversations"][0]["value"].replace(SAMPLE_IMAGE_TOKEN, model.config.image_token),
                      render_images("attribute", split, index, seed)) for index, record in enumerate(records)]
    answers = generate_answers(model, prompts, max_new_tokens=8)
    counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for record, answer in zip(records, answers):
        gold = record["conversations"][1]["value"]
        key = (question_kind(record["conversations"][0]["value"], gold), len(record["scene"]["objects"]))
        counts[key][0] += answer.strip().lower().rstrip(".") in {text.lower() for text in gold_answers(record)}
        counts[key][1] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a directory written by save_pretrained")
    parser.add_argument("--n", type=int, default=160)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    counts = breakdown(MultimodalModel.from_pretrained(args.model), args.n, args.split)
    print("| kind | objects | correct | asked | accuracy |\n|---|---:|---:|---:|---:|")
    for (kind, objects), (correct, asked) in sorted(counts.items()):
        print(f"| {kind} | {objects} | {correct} | {asked} | {correct / asked:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
