"""Data selection (mmbridge/data/selection.py): seeded random subsets, SVIT-style concept coresets with yes/no
balancing, the ``mmbridge data select`` command and its errors."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from mmbridge.cli import main
from mmbridge.data.formats.llava import load_llava_json
from mmbridge.data.selection import build_vocabulary, parse_keep, select_records
from mmbridge.worlds.miniworld import write_task


def record(number: int, question: str, answer: str) -> dict:
    return {"id": f"s{number:03d}", "image": f"images/{number}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def plain_records(count: int) -> list[dict]:
    colours = ["red", "blue", "green", "amber", "violet"]
    return [record(number, f"What colour is the {colours[number % 5]} kite?", colours[number % 5])
            for number in range(count)]


@pytest.fixture(scope="module")
def miniworld(tmp_path_factory) -> tuple[str, list[dict]]:
    """Varied MiniWorld data in one directory: yes/no, captions, conversations, attributes, counts."""
    directory = str(tmp_path_factory.mktemp("miniworld"))
    records = []
    for task in ["existence", "caption_detailed", "conversation", "attribute", "counting"]:
        with open(write_task(task, "train", 30, directory, progress=False)) as handle:
            records += json.load(handle)
    path = os.path.join(directory, "mixed.json")
    with open(path, "w") as handle:
        json.dump(records, handle)
    return path, records


def test_random_keeps_the_count_in_input_order_and_is_seeded():
    records = plain_records(40)
    kept, report = select_records(records, "random", 0.25, seed=3)
    assert len(kept) == 10 and report["kept"] == 10 and report["total"] == 40
    indices = [records.index(item) for item in kept]
    assert indices == sorted(indices) and len(set(indices)) == 10  # a subset, input order, records unchanged
    assert all(item is records[index] for item, index in zip(kept, indices))
    assert select_records(records, "random", 0.25, seed=3)[0] == kept
    assert len(select_records(records, "random", 7, seed=3)[0]) == 7
    others = {tuple(s["id"] for s in select_records(records, "random", 10, seed=seed)[0]) for seed in range(5)}
    assert len(others) >= 4  # different seeds give different subsets
    assert not report["yes_no"]["balanced"]  # random does not rebalance unless asked


def test_keep_is_a_fraction_or_a_count():
    assert parse_keep("0.5", 9) == 4 or parse_keep("0.5", 9) == 5
    assert parse_keep("1.0", 9) == 9 and parse_keep("1", 9) == 1 and parse_keep("3", 9) == 3
    assert parse_keep(0.01, 9) == 1  # never empty
    for bad, message in [("0", "between 1 and the 9"), ("10", "between 1 and the 9"), ("1.5", "in (0, 1]"),
                         ("0.0", "in (0, 1]"), ("half", "fraction in (0, 1] or a sample count"),
                         (-0.5, "in (0, 1]")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_keep(bad, 9)


def test_vocabulary_rule():
    words = [["red", "kite", "the", "image"], ["red", "ball", "the", "image"], ["blue", "kite", "image"],
             ["green", "box", "image"]]
    # red, kite: in 2 of 4 samples; "the" a stop word; "image" in all; blue/green/ball/box in one
    assert build_vocabulary(words, min_count=2, max_fraction=0.5) == ["kite", "red"]
    assert build_vocabulary(words, min_count=1, max_fraction=0.5) == ["ball", "blue", "box", "green", "kite", "red"]


def informative_and_repetitive() -> tuple[list[dict], set[str]]:
    """12 rich samples naming 5 of 30 concepts each (each concept in two of them) and 48 repetitive ones
    naming the same two words in four groups."""
    pool = ["apple", "bridge", "candle", "desk", "eagle", "fence", "guitar", "hammer", "island", "jacket",
            "kettle", "ladder", "mirror", "needle", "orchid", "pillow", "quilt", "rocket", "saddle", "tunnel",
            "umbrella", "violin", "wagon", "yacht", "zebra", "anchor", "barrel", "cactus", "dragon", "engine"]
    rich = [record(number, "Describe the scene.", "There is " + ", ".join(pool[(5 * number + k) % 30]
                                                                        for k in range(5)) + ".")
            for number in range(12)]
    pairs = [("dog", "brown"), ("cat", "white"), ("car", "blue"), ("tree", "green")]
    repetitive = [record(12 + number, "Describe the scene.", "A {1} {0}.".format(*pairs[number % 4]))
                  for number in range(48)]
    records = [item for pair in zip(repetitive[:12], rich) for item in pair] + repetitive[12:]
    return records, {item["id"] for item in rich}


def test_coreset_prefers_samples_with_many_distinct_concepts():
    records, rich = informative_and_repetitive()
    kept, report = select_records(records, "coreset", 12, seed=0)
    assert sum(item["id"] in rich for item in kept) >= 10  # random would keep about 12 * 12/60 = 2.4
    assert report["vocabulary"]["size"] == 38 and report["vocabulary"]["covered_kept"] >= 30
    assert report["score_kept"]["mean"] >= 4.5 > report["score_input"]["mean"]
    random_means = [select_records(records, "random", 12, seed=seed)[1]["score_kept"]["mean"] for seed in range(5)]
    assert max(random_means) < 4
    # every kept sample says why: its score, its greedy gain and its concepts
    first = next(sample for sample in report["samples"] if sample["order"] == 0)
    assert first["score"] == 5 and first["gain"] == 5 and len(first["concepts"]) == 5
    ids = [item["id"] for item in kept]
    assert ids == [item["id"] for item in records if item["id"] in set(ids)]  # input order


def test_coreset_ties_are_broken_by_seed():
    records = plain_records(40)  # every sample has the same score: only the seed decides
    subsets = {tuple(s["id"] for s in select_records(records, "coreset", 10, seed=seed)[0]) for seed in range(4)}
    assert len(subsets) >= 3
    assert select_records(records, "coreset", 10, seed=1)[0] == select_records(records, "coreset", 10, seed=1)[0]


def test_coreset_covers_more_vocabulary_than_random(miniworld):
    _, records = miniworld
    kept, report = select_records(records, "coreset", 0.2, seed=0)
    random_cover = [select_records(records, "random", 0.2, seed=seed)[1]["vocabulary"]["covered_kept"]
                    for seed in range(8)]
    coreset_cover = report["vocabulary"]["covered_kept"]
    assert len(kept) == 30 and report["vocabulary"]["size"] >= 40
    assert coreset_cover >= max(random_cover) and coreset_cover >= sum(random_cover) / 8 + 3


def yes_heavy_records() -> list[dict]:
    """40 yes (each naming three concepts) and 10 no answers (one concept), 80 % yes, plus 10 captions."""
    things = ["kite", "boat", "lamp", "drum", "rope", "vase", "sock", "tent", "bell", "coin"]
    colours = ["red", "blue", "green", "amber", "violet"]
    sizes = ["tiny", "huge", "narrow", "wide"]
    records = [record(number, f"Is there a {sizes[number % 4]} {colours[number % 5]} {things[number % 10]}?",
                      "Yes") for number in range(40)]
    records += [record(40 + number, f"Is there a {things[number]}?", "No, there is not.") for number in range(10)]
    records += [record(50 + number, f"What is the {things[number]} near?", f"The {things[(number + 1) % 10]}.")
                for number in range(10)]
    return records


def answers(kept: list[dict]) -> Counter:
    return Counter(item["conversations"][-1]["value"].split(",")[0].strip(".").lower() for item in kept)


def test_yes_no_balancing_evens_out_an_80_percent_yes_input():
    records = yes_heavy_records()
    kept, report = select_records(records, "coreset", 20, seed=0)
    counts = answers(kept)
    assert len(kept) == 20 and abs(counts["yes"] - counts["no"]) <= 1 and counts["yes"] + counts["no"] >= 2
    assert report["yes_no"]["input"]["yes_ratio"] == pytest.approx(0.8)
    assert abs(report["yes_no"]["kept"]["yes_ratio"] - 0.5) <= 1 / (counts["yes"] + counts["no"])
    assert report["yes_no"]["balanced"] and report["yes_no"]["reached"] and report["yes_no"]["swaps"] > 0
    # only yes/no samples: the kept set is 10 yes, 10 no
    only = select_records(records[:50], "coreset", 20, seed=0)[0]
    assert answers(only) == Counter(yes=10, no=10)


def test_without_balancing_the_coreset_follows_the_scores():
    records = yes_heavy_records()
    kept, report = select_records(records, "coreset", 20, seed=0, balance_yes_no=False)
    assert sorted(sample["order"] for sample in report["samples"]) == list(range(20))  # the greedy top 20
    assert report["yes_no"]["kept"]["yes_ratio"] > 0.8  # the three-concept yes questions win
    assert report["yes_no"]["swaps"] == 0
    balanced = select_records(records, "random", 20, seed=0, balance_yes_no=True)[0]  # random may balance too
    counts = answers(balanced)
    assert abs(counts["yes"] - counts["no"]) <= 1


def test_given_concepts_and_phrases():
    records = [record(0, "Is the traffic light red?", "Yes"), record(1, "Where is the light?", "Left."),
               record(2, "Is the traffic jam long?", "No")]
    _, report = select_records(records, "coreset", 1, concepts=["traffic light", "Traffic Jam", "  red "],
                               balance_yes_no=False)
    assert report["vocabulary"]["size"] == 3 and report["vocabulary"]["source"] == "given"
    assert report["samples"][0]["id"] == "s000" and report["samples"][0]["concepts"] == ["red", "traffic light"]


def test_cli_writes_out_and_report_that_load_as_a_llava_source(miniworld, tmp_path, capsys):
    path, records = miniworld
    out = os.path.join(os.path.dirname(path), "selected.json")
    assert main(["data", "select", path, "--method", "coreset", "--keep", "0.3", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "kept 45/150 samples (coreset, seed 0)" in printed and "vocabulary:" in printed
    assert "yes/no answers:" in printed and "top concepts kept:" in printed
    report_file = os.path.join(os.path.dirname(path), "selected.report.json")
    with open(report_file) as handle:
        report = json.load(handle)
    assert report["kept"] == 45 and len(report["samples"]) == 45 and report["out"] == out
    with open(out) as handle:
        kept = json.load(handle)
    assert all(item in records for item in kept)  # records unchanged, image paths included
    samples = load_llava_json(out)
    assert len(samples) == 45 and all(os.path.isfile(image) for sample in samples for image in sample.images)
    jsonl = str(tmp_path / "selected.jsonl")
    assert main(["data", "select", path, "--method", "random", "--keep", "12", "--seed", "2", "--out", jsonl]) == 0
    assert f"load {jsonl} with image_root:" in capsys.readouterr().out  # another directory: say where images are
    with open(jsonl) as handle:
        assert len(handle.read().splitlines()) == 12
    assert len(load_llava_json(jsonl, image_root=os.path.dirname(path))) == 12
    assert os.path.isfile(str(tmp_path / "selected.report.json"))


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmbridge data: error: ")
    return lines[0]


def test_cli_errors_are_clear(tmp_path, capsys):
    source = tmp_path / "in.json"
    source.write_text(json.dumps(plain_records(6)))
    out = str(tmp_path / "out.json")
    run = ["data", "select", str(source), "--out", out]
    assert main(run + ["--method", "random", "--keep", "1.5"]) == 2
    assert "keep fraction must be in (0, 1], got 1.5" in error_line(capsys)
    assert main(run + ["--method", "random", "--keep", "7"]) == 2
    assert "between 1 and the 6 input samples, got 7" in error_line(capsys)
    assert main(["data", "select", str(source), "--out", str(source), "--method", "random", "--keep", "2"]) == 2
    assert "is the input file" in error_line(capsys)
    assert main(run + ["--method", "coreset", "--keep", "2", "--concepts", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: concepts file not found" in error_line(capsys)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["data", "select", str(empty), "--out", out, "--method", "random", "--keep", "1"]) == 2
    assert "empty.json: no samples to select from" in error_line(capsys)
    broken = plain_records(3)
    del broken[1]["conversations"]
    source.write_text(json.dumps(broken))
    assert main(run + ["--method", "coreset", "--keep", "1"]) == 2
    assert "in.json: sample #1 (id 's001'): missing field 'conversations'" in error_line(capsys)
    assert not os.path.exists(out)  # nothing written on error
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(run + ["--method", "best", "--keep", "1"])
    assert "invalid choice: 'best'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown selection method 'best'; known: random, coreset"):
        select_records(plain_records(3), "best", 1)
    context = plain_records(3)
    context[2]["in_context"] = ["s000"]
    with pytest.raises(ValueError, match="sample #2 names in-context examples"):
        select_records(context, "random", 1)
