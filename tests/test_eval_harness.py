"""Tests for the eval harness, tasks and the ``mmbridge eval`` command, on tiny random models.

Samples are hand-made in the MiniWorld/LLaVA format (16×16 images), so these tests do not
depend on the generator; one test runs the real MiniWorld suite, which MiniWorld registers when ``mmbridge`` is
imported.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Any, Iterator

import pytest
import torch
from transformers import AutoTokenizer

from mmbridge.cli import main
from mmbridge.eval import harness, tasks
from mmbridge.eval.prompts import format_box, format_prompt
from mmbridge.eval.tasks import FORMAT_SETTINGS, Suite, TaskSpec
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image, tiny_llm_config, tiny_model_config

def make_pair(answer_format: str, question: str, answer: str, colour: str = "red", **extra: Any) -> tuple[dict, list]:
    """A LLaVA-format eval sample as the MiniWorld generator writes it, with one 16×16 image."""
    prompt = format_prompt(question, answer_format, extra.get("choices"))
    sample = {"id": f"{answer_format}-{question}-{answer}", "image": "images/0.png",
              "conversations": [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": answer}],
              "task": "handmade", "split": "test", "question": question, "format": answer_format,
              "answer": answer, "answers": [answer], **extra}
    return sample, [shape_image(colour, "circle", size=16)]


def mixed_pairs() -> list[tuple[dict, list]]:
    """One sample of every scored format."""
    return [
        make_pair("short", "What colour is the shape?", "red"),
        make_pair("yesno", "Is there a square?", "no", pope="adversarial"),
        make_pair("mc", "Which colour is the shape?", "B", choices=["blue", "red", "green"]),
        make_pair("box", "Where is the circle?", format_box([100, 100, 800, 800]), box=[100, 100, 800, 800]),
        make_pair("caption", "Describe the image.", "a red circle", references=["a red circle", "one red circle"]),
    ]


def mc_pairs() -> list[tuple[dict, list]]:
    """Two questions whose gold option is "red", at letters A and B."""
    return [make_pair("mc", "Which colour?", "A", choices=["red", "green", "blue"]),
            make_pair("mc", "What colour?", "B", choices=["green", "red", "blue"])]


def handmade_suite() -> Suite:
    """A suite over hand-made samples: a short-answer task, a POPE task, a circular + likelihood MC task."""
    pools = {"short": [make_pair("short", "How many shapes?", "one", answers=["1"])],
             "existence": [make_pair("yesno", "Is there a circle?", "yes"),
                           make_pair("yesno", "Is there a square?", "no", pope="random"),
                           make_pair("yesno", "Is there a star?", "no", pope="popular")],
             "mc": mc_pairs()}

    def load(task: str, split: str, n: int, seed: int) -> list[tuple[dict, list]]:
        return pools[task][:n]

    return Suite("handmade", (TaskSpec("short"), TaskSpec("existence"),
                              TaskSpec("mc", circular=True, likelihood=True)), load)


@pytest.fixture
def handmade_registered() -> Iterator[Suite]:
    """The hand-made suite registered as ``handmade`` for one test, as a package registers its own suite."""
    suite = tasks.SUITES.add("handmade", handmade_suite())
    yield suite
    tasks.SUITES.remove("handmade")


def ids_of(model: Any, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def fixed_generate(model: Any, answer_for: Any) -> Any:
    """A stand-in for ``model.generate`` answering ``answer_for(prompt_text)`` then EOS, for every row."""
    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Any = None,
                 **settings: Any) -> torch.Tensor:
        rows = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = model.tokenizer.decode(row[mask.bool()].tolist())
            rows.append(ids_of(model, answer_for(prompt)) + [model.tokenizer.eos_token_id])
        width = max(len(row) for row in rows)
        return torch.tensor([row + [model.tokenizer.eos_token_id] * (width - len(row)) for row in rows])

    return generate


# -- prompts and scoring without a model ----------------------------------------------------------
def test_prompts_blind_rotated_and_likelihood() -> None:
    sample, _ = make_pair("mc", "Which colour?", "B", choices=["red", "green", "blue"])
    assert tasks.user_text(sample).startswith("<image>\nWhich colour?\nA. red\nB. green")
    assert tasks.blind_text("<image>\n<image>\nWhat?") == "What?"
    text, choices, gold = tasks.rotated_prompt(sample, 1)
    assert (choices, gold) == (["green", "blue", "red"], "A")
    assert text == "<image>\n" + format_prompt("Which colour?", "mc", ["green", "blue", "red"])
    text, continuations = tasks.likelihood_prompt(sample, "text")
    assert (text, continuations) == ("<image>\n" + format_prompt("Which colour?", "short"), ["red", "green", "blue"])
    assert tasks.likelihood_prompt(sample, "letter") == (tasks.user_text(sample), ["A", "B", "C"])


def test_pope_scores_per_negative_type_share_untyped_positives() -> None:
    samples = [make_pair("yesno", "q1", "yes")[0], make_pair("yesno", "q2", "no", pope="random")[0],
               make_pair("yesno", "q3", "no", pope="adversarial")[0]]
    scores = tasks.score_pope(samples, ["yes", "no", "Yes, it is."])
    # random group = {q1, q2}: both right; adversarial group = {q1, q3}: q3 wrong (a false "yes")
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["random/accuracy"] == 1.0 and scores["random/yes_ratio"] == 0.5
    assert scores["adversarial/accuracy"] == 0.5 and scores["adversarial/precision"] == 0.5
    assert list(scores)[5:7] == ["random/accuracy", "random/precision"]  # POPE's order: random first


def test_short_answers_use_alternatives_or_human_answers() -> None:
    alternatives = make_pair("short", "Which?", "triangle", answers=[f"shape {index}" for index in range(17)])[0]
    human = make_pair("short", "How many?", "2", human_answers=["2"] * 2 + ["3"] * 8)[0]
    # alternatives: any match is right; human answers: the VQAv2 soft score (0.6 for "two", see test_metrics)
    assert tasks.score_vqa([alternatives, human], ["Triangle", "two"])["accuracy"] == pytest.approx((1.0 + 0.6) / 2)


def test_suite_selection_and_miniworld_spec() -> None:
    suite = tasks.get_suite("miniworld")
    keys = [spec.key for spec in suite.tasks]
    assert keys == ["attribute", "attribute:compositional", "counting", "spatial", "existence", "multiple_choice",
                    "grounding", "text_reading", "caption", "multi_image", "video"]
    assert [spec.key for spec in suite.select(["attribute"])] == ["attribute", "attribute:compositional"]
    mc = suite.select(["multiple_choice"])[0]
    assert mc.circular and mc.likelihood
    with pytest.raises(ValueError, match="known"):
        suite.select(["colour"])
    with pytest.raises(ValueError, match="known"):
        tasks.get_suite("imagenet")


def test_load_samples_reads_llava_json(tmp_path) -> None:
    sample, images = make_pair("short", "What colour?", "red")
    os.makedirs(tmp_path / "images")
    images[0].save(tmp_path / "images" / "0.png")
    (tmp_path / "data.json").write_text(json.dumps([sample]))
    (loaded, loaded_images), = harness.load_samples(str(tmp_path / "data.json"))
    assert loaded == sample and loaded_images[0].tobytes() == images[0].tobytes()
    assert harness.samples_hash([(loaded, loaded_images)]) == harness.samples_hash([(sample, images)])
    changed = images[0].copy()
    changed.putpixel((0, 0), (0, 0, 0))
    assert harness.samples_hash([(sample, [changed])]) != harness.samples_hash([(sample, images)])


# -- the harness on a tiny random model -----------------------------------------------------------
def test_evaluate_every_format_end_to_end(make_model) -> None:
    model = make_model()
    pairs = mixed_pairs()
    entry = harness.evaluate(model, pairs, TaskSpec("mixed", circular=True, likelihood=True), progress=False)
    for name in ["short/accuracy", "yesno/f1", "yesno/yes_ratio", "yesno/adversarial/accuracy", "mc/accuracy",
                 "mc/circular_accuracy", "mc/likelihood_accuracy", "box/accuracy", "box/mean_iou",
                 "caption/cider", "caption/bleu4"]:
        assert isinstance(entry[name], float), name
        assert 0.0 <= entry[name] <= (10.0 if name == "caption/cider" else 1.0)
    assert entry["n"] == len(pairs) and len(entry["predictions"]) == len(pairs)
    assert entry["max_new_tokens"] == {fmt: FORMAT_SETTINGS[fmt].max_new_tokens
                                       for fmt in ["short", "yesno", "mc", "box", "caption"]}
    assert entry["prompt_example"]["yesno"] == "<image>\nIs there a square?\nAnswer yes or no."
    mc_record = next(record for record in entry["predictions"] if record["id"].startswith("mc"))
    assert len(mc_record["rotations"]) == 3 and mc_record["likelihood_choice"] in "ABC"


def scored_pairs() -> list[tuple[dict, list]]:
    """``mixed_pairs`` plus a "yes" question (so F1 has a positive) and a second caption (so CIDEr's document
    frequencies can tell n-grams apart)."""
    return mixed_pairs() + [make_pair("yesno", "Is there a circle?", "yes"),
                            make_pair("caption", "Describe the picture.", "a blue square in the corner",
                                      references=["a blue square in the corner", "one small blue square at the top"])]


def scripted_answer(pairs: list[tuple[dict, list]], right: bool) -> Any:
    """For ``fixed_generate``: every question's gold answer (``right``), or an answer that shares nothing with it."""
    def answer(prompt: str) -> str:
        sample = next(sample for sample, _ in pairs if sample["question"] in prompt)
        if sample["format"] == "mc":  # the letter of red (gold) or of blue, wherever this rotation put it
            return re.search(rf"([A-C])\. {'red' if right else 'blue'}\n", prompt).group(1)
        if right:
            return sample["answer"]
        return {"short": "green", "yesno": "no" if sample["answer"] == "yes" else "yes",
                "box": format_box([900, 900, 990, 990]), "caption": "seven eight nine ten"}[sample["format"]]

    return answer


@pytest.mark.parametrize("right", [True, False], ids=["gold", "wrong"])
def test_evaluate_scores_every_format_from_the_answers(make_model, monkeypatch, right: bool) -> None:
    """Scripted answers, all right or all wrong: every metric takes its known value, so a scorer that returns a
    constant fails one of the two."""
    model = make_model()
    pairs = scored_pairs()
    monkeypatch.setattr(model, "generate", fixed_generate(model, scripted_answer(pairs, right)))
    entry = harness.evaluate(model, pairs, TaskSpec("mixed", circular=True), progress=False)
    score = float(right)
    for name in ["short/accuracy", "yesno/accuracy", "yesno/precision", "yesno/recall", "yesno/f1",
                 "yesno/adversarial/accuracy", "mc/accuracy", "mc/circular_accuracy", "box/accuracy",
                 "caption/bleu4"]:
        assert entry[name] == pytest.approx(score), name
    assert entry["box/mean_iou"] == pytest.approx(score)  # the same box, or one that does not overlap
    assert entry["yesno/yes_ratio"] == 0.5 and entry["mc/parse_rate"] == entry["box/parse_rate"] == 1.0
    assert (entry["caption/cider"] > 1.0) if right else (entry["caption/cider"] == 0.0)


def test_batched_answers_match_one_by_one(tokenizer_dir) -> None:
    """On wide LLM weights (initialiser range 0.2), whose greedy answers follow the pixels (the default init gives
    the same answer for any image), and with the first question asked of two images: a row that read another
    row's pixels would change its answer. Smallest top-1/top-2 logit gap along these decodes: 0.005."""
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    llm = {"hf_config": tiny_llm_config(vocab, initializer_range=0.2)}
    model = MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab, llm=llm)).eval()
    prompts = [harness.Prompt(tasks.user_text(sample), images) for sample, images in mixed_pairs()[:3]]
    prompts.insert(1, harness.Prompt(prompts[0].text, [shape_image("blue", "square", size=16)]))
    prompts.append(harness.Prompt("Describe the picture in detail.", []))  # no image, a shorter row
    batched = harness.generate_answers(model, prompts, max_new_tokens=6, batch_size=len(prompts))
    single = harness.generate_answers(model, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single and all(isinstance(answer, str) for answer in batched)
    assert batched[0] != batched[1]  # the image matters: the same question on a red circle and a blue square


def test_blind_baseline_passes_no_pixels(make_model, monkeypatch) -> None:
    model = make_model()
    encoded, generated = [], []
    original_encode, original_generate = model.encode_images, model.generate

    def spy_encode(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        encoded.append(pixel_values.shape[0])
        return original_encode(pixel_values, *args, **kwargs)

    def spy_generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Any = None,
                     **settings: Any) -> torch.Tensor:
        generated.append((bool((input_ids == model.image_token_id).any()), pixel_values))
        return original_generate(input_ids, attention_mask, pixel_values=pixel_values, **settings)

    monkeypatch.setattr(model, "encode_images", spy_encode)
    monkeypatch.setattr(model, "generate", spy_generate)
    spec = TaskSpec("mixed", circular=True, likelihood=True)
    blind = harness.evaluate(model, mixed_pairs()[:3], spec, blind=True, progress=False)
    assert generated and encoded == []
    assert all(not has_image_tokens and pixels is None for has_image_tokens, pixels in generated)
    assert all("<image>" not in example for example in blind["prompt_example"].values())
    assert blind["likelihood_prompt_example"] == format_prompt("Which colour is the shape?", "short")
    generated.clear()
    harness.evaluate(model, mixed_pairs()[:3], spec, blind=False, progress=False)
    assert encoded and generated
    assert all(has_image_tokens and pixels is not None for has_image_tokens, pixels in generated)


def test_continuation_log_likelihoods_match_an_unbatched_forward(make_model) -> None:
    model = make_model()
    sample, images = mixed_pairs()[2]
    prompt = harness.Prompt(tasks.user_text(sample), images)
    scores = harness.continuation_log_likelihoods(model, prompt, ["red", "a blue square"])
    processor = model.processor()
    prompt_ids = processor.prompt(prompt.text, num_images=1)
    target = torch.tensor(ids_of(model, "a blue square"))
    sequence = torch.cat([prompt_ids, target]).unsqueeze(0)  # [1, L]
    with torch.no_grad():
        logits = model(sequence, pixel_values=processor.encode_images(images)).logits[0]  # [L, V]
    log_probs = logits.float().log_softmax(-1)
    expected = sum(float(log_probs[len(prompt_ids) - 1 + step, token]) for step, token in enumerate(target.tolist()))
    assert scores[1] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("target", ["blue", "red"])
def test_likelihood_ranking_picks_the_option_made_most_likely(make_model, monkeypatch, target: str) -> None:
    model = make_model()
    options = ["red", "blue", "square"]  # no BPE token in common, so each can be favoured alone
    target_ids = set(ids_of(model, target))
    assert all(target_ids.isdisjoint(ids_of(model, option)) for option in options if option != target)
    original_logits = model.llm.logits
    bias = torch.zeros(model.llm.config.vocab_size)
    bias[list(target_ids)] = 30.0
    monkeypatch.setattr(model.llm, "logits", lambda hidden: original_logits(hidden) + bias)
    gold = "ABC"[options.index(target)]
    pairs = [make_pair("mc", "Which colour?", gold, choices=options),
             make_pair("mc", "Which one?", "A", choices=options)]
    entry = harness.evaluate(model, pairs, TaskSpec("mc", likelihood=True), progress=False)
    assert [record["likelihood_choice"] for record in entry["predictions"]] == [gold, gold]
    assert entry["likelihood_accuracy"] == (1.0 if gold == "A" else 0.5)


def test_circular_accuracy_catches_a_model_that_always_answers_a(make_model, monkeypatch) -> None:
    model = make_model()
    monkeypatch.setattr(model, "generate", fixed_generate(model, lambda prompt: "A"))
    entry = harness.evaluate(model, mc_pairs(), TaskSpec("mc", circular=True), progress=False)
    assert entry["accuracy"] == 0.5 and entry["circular_accuracy"] == 0.0 and entry["parse_rate"] == 1.0
    assert [record["rotations"] for record in entry["predictions"]] == [["A"] * 3] * 2


def test_circular_accuracy_rewards_a_model_that_reads_the_rotated_options(make_model, monkeypatch) -> None:
    model = make_model()
    monkeypatch.setattr(model, "generate", fixed_generate(model, lambda prompt: re.search(r"([A-C])\. red\n",
                                                                                          prompt).group(1)))
    entry = harness.evaluate(model, mc_pairs(), TaskSpec("mc", circular=True), progress=False)
    assert entry["accuracy"] == 1.0 and entry["circular_accuracy"] == 1.0
    assert entry["predictions"][0]["rotations"] == ["A", "C", "B"]  # red moves up one place per rotation


# -- suites, results files, tables, the command ---------------------------------------------------
def test_run_suite_results_document(make_model, tmp_path) -> None:
    model = make_model()
    results = harness.run_suite(model, handmade_suite(), n=3, seed=3, with_blind=True, progress=False)
    harness.save_results(str(tmp_path / "results.json"), results)
    loaded = harness.load_results(str(tmp_path / "results.json"))
    assert set(loaded) == {"model", "model_hash", "data_hash", "suite", "settings", "tasks", "blind_tasks",
                           "created"}
    assert re.fullmatch(r"[0-9a-f]{64}", loaded["model_hash"]) and loaded["model_hash"] == harness.state_hash(model)
    assert re.fullmatch(r"[0-9a-f]{64}", loaded["data_hash"])
    assert loaded["suite"] == "handmade" and datetime.fromisoformat(loaded["created"])
    assert loaded["settings"]["n"] == 3 and loaded["settings"]["seed"] == 3 and loaded["settings"]["with_blind"]
    assert loaded["settings"]["generation"]["max_new_tokens"]["yesno"] == 3
    assert list(loaded["tasks"]) == list(loaded["blind_tasks"]) == ["short", "existence", "mc"]
    existence = loaded["tasks"]["existence"]
    assert existence["n"] == 3 and {"f1", "yes_ratio", "random/f1", "popular/f1"} <= set(existence)
    assert {"accuracy", "circular_accuracy", "likelihood_accuracy"} <= set(loaded["tasks"]["mc"])
    assert loaded["tasks"]["short"]["prompt_example"].endswith("Answer the question using a single word or phrase.")
    table = harness.results_table(loaded)
    assert table.splitlines()[0] == "| task | metric | image | blind |"
    assert "| existence | popular/yes_ratio |" in table


def test_compare_table_has_one_column_per_file(tmp_path) -> None:
    def write(name: str, accuracy: float, extra: dict | None = None) -> str:
        results = {"settings": {"blind": False}, "tasks": {"attribute": {"accuracy": accuracy, "n": 50,
                                                                         **(extra or {})}}}
        path = str(tmp_path / f"{name}.json")
        harness.save_results(path, results)
        return path

    first, second = write("mlp", 0.5), write("qformer", 0.75, {"parse_rate": 1.0})
    table = harness.compare_table([first, second])
    assert table.splitlines()[0] == "| task | metric | mlp | qformer |"
    assert "| attribute | accuracy | 0.500 | 0.750 |" in table
    assert "| attribute | parse_rate | – | 1.000 |" in table
    assert "| attribute | n | 50 | 50 |" in table


def test_cli_eval_and_compare(make_model, tmp_path, handmade_registered, capsys) -> None:
    model = make_model()
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    outputs = []
    for name, flag in [("image", "--with-blind"), ("blind", "--blind")]:
        outputs.append(str(tmp_path / f"{name}.json"))
        assert main(["eval", "--model", model_dir, "--suite", "handmade", "--tasks", "short", "existence",
                     "--n", "2", "--out", outputs[-1], flag, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | image | blind |" in printed and "| task | metric | blind |" in printed
    results = json.loads(open(outputs[0]).read())
    assert results["model"] == model_dir and results["model_hash"] == harness.weights_hash(model_dir)
    assert list(results["tasks"]) == ["short", "existence"] and results["tasks"]["existence"]["n"] == 2
    assert main(["eval", "--compare", *outputs]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| task | metric | image | image (blind) | blind (blind) |"
    assert main(["eval", "--suite", "handmade"]) == 2  # no --model
    assert "--model" in capsys.readouterr().err


def test_miniworld_suite_runs_registered_by_importing_mmbridge(make_model) -> None:
    model = make_model()
    results = harness.run_suite(model, "miniworld", n=1, progress=False)
    assert list(results["tasks"]) == [spec.key for spec in tasks.get_suite("miniworld").tasks]
    assert all(entry["n"] == 1 for entry in results["tasks"].values())


# -- in-context few-shot --------------------------------------------------------------------------
def test_choose_shots_is_fixed_by_seed_and_query_and_checks_its_pool() -> None:
    pool = [make_pair("short", f"Question {index}?", str(index)) for index in range(6)]
    first = harness.choose_shots(pool, 2, 5, seed=1)
    assert first == harness.choose_shots(pool, 2, 5, seed=1) and first != harness.choose_shots(pool, 2, 5, seed=2)
    assert all(len(shots) == 2 and shots[0] is not shots[1] for shots in first)
    assert len({tuple(id(pair) for pair in shots) for shots in first}) > 1  # queries get different examples
    with pytest.raises(ValueError, match="3 shots asked for but the pool holds 2 samples"):
        harness.choose_shots(pool[:2], 3, 1, seed=0)
    with pytest.raises(ValueError, match="shots must be >= 0"):
        harness.choose_shots(pool, -1, 1, seed=0)


def test_shots_precede_the_query_as_solved_turns_with_their_images(make_model, monkeypatch) -> None:
    model = make_model()
    seen = []

    def answer_for(prompt: str) -> str:
        seen.append(prompt)
        return "red"

    monkeypatch.setattr(model, "generate", fixed_generate(model, answer_for))
    shots = [[make_pair("short", "Which shape is it?", "circle"), make_pair("yesno", "Is it blue?", "no")]]
    query = [make_pair("short", "What colour is the shape?", "red")]
    entry = harness.evaluate(model, query, progress=False, shots=shots)
    assert entry["accuracy"] == 1.0
    prompt = seen[0]
    order = [prompt.index("Which shape is it?"), prompt.index("circle<|im_end|>"), prompt.index("Is it blue?"),
             prompt.index("no<|im_end|>"), prompt.index("What colour is the shape?")]
    assert order == sorted(order)  # shot, its answer, shot, its answer, then the query
    processor = model.processor()
    built = harness._prompt(tasks.user_text(query[0][0]), query[0][1], False, model.config.image_token, shots[0])
    ids = harness._encode_prompt(processor, built, 0)
    assert int((ids["input_ids"] == model.image_token_id).sum()) == 3 * model.tokens_per_image
    assert ids["pixel_values"].shape[0] == 3
    blind = harness._prompt(tasks.user_text(query[0][0]), query[0][1], True, model.config.image_token, shots[0])
    assert blind.images == [] and all("<image>" not in turn["content"] for turn in blind.history)
    assert entry["prompt_example"].startswith("user: ") and "assistant: circle" in entry["prompt_example"]


def test_multiple_choice_shots_answer_with_the_gold_letter_and_rank_with_history(make_model) -> None:
    sample, _ = make_pair("mc", "Which colour?", "B", choices=["green", "red", "blue"])
    assert tasks.shot_answer(sample) == "B"
    model = make_model()
    results = harness.run_suite(model, handmade_suite(), ["mc"], n=2, shots=1, progress=False)
    entry = results["tasks"]["mc"]
    assert results["settings"]["shots"] == 1 and entry["n"] == 2
    assert entry["prompt_example"].count("user: ") == 2 and "likelihood_accuracy" in entry


def test_cli_eval_shots_names_its_results_file(make_model, tmp_path, handmade_registered, capsys) -> None:
    model = make_model()
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    assert main(["eval", "--model", model_dir, "--suite", "handmade", "--tasks", "existence", "--n", "2",
                 "--shots", "2", "--no-progress"]) == 0
    results = json.loads(open(os.path.join(model_dir, "eval-handmade-2shot.json")).read())
    assert results["settings"]["shots"] == 2
    assert main(["eval", "--model", model_dir, "--suite", "handmade", "--tasks", "existence", "--shots", "9",
                 "--no-progress"]) == 2
    assert "9 shots asked for but the pool holds 3 samples" in capsys.readouterr().err


def test_several_formats_also_get_one_sample_weighted_accuracy(make_model, monkeypatch) -> None:
    model = make_model()
    monkeypatch.setattr(model, "generate", fixed_generate(model, lambda prompt: "red"))
    pairs = [make_pair("short", "What colour?", "red"), make_pair("short", "Which colour?", "red"),
             make_pair("yesno", "Is it red?", "no")]  # "red" is right twice, wrong once
    entry = harness.evaluate(model, pairs, progress=False)
    assert entry["short/accuracy"] == 1.0 and entry["yesno/accuracy"] == 0.0
    assert entry["accuracy"] == pytest.approx(2 / 3)
    with_caption = harness.evaluate(model, mixed_pairs(), progress=False)
    assert "accuracy" not in with_caption  # a caption scores CIDEr, not accuracy: no headline to weigh
