"""The evaluation harness: batched greedy answers, likelihood ranking, suites, results files and tables.

:func:`evaluate` scores one task's ``(sample dict, PIL images)`` pairs, so samples may come
from files (:func:`load_samples`) or straight from a generator. :func:`run_suite` runs a
suite's tasks and returns the results document::

    {"model": dir, "model_hash": sha256, "data_hash": sha256, "suite": name,
     "settings": {...}, "tasks": {key: {metric: float, ..., "n": int, "prompt_example": str, ...}},
     "blind_tasks": {...} (with_blind only), "created": ISO time}

Metric values are the float entries of a task's dict. The *blind* baseline asks the same
model the same prompts with the image placeholders removed and no pixels.

*In-context few-shot* (``shots=k``, any model): before each query the prompt holds ``k`` solved
examples of the same task from its ``train`` split — each a user turn with its image(s) and the
gold answer as the assistant's reply — drawn per query from a pool of ``max(16, 4k)`` samples by
a generator seeded with ``(seed, query index)``, so the same command always shows the same shots.

*Box format*: grounding is asked in the format the model was trained on — ``box_format`` of
:func:`run_suite`, else the ``box_format`` saved in the model's processor settings (the training data's
``data.box_format``), else ``plain``. MiniWorld writes its samples in that format (``<ref>`` around the
referring phrase for ``qwen``); other samples have their boxes rewritten (:func:`tasks.in_box_format`).
Answers are scored whichever format the model writes (:func:`mmbridge.eval.metrics.parse_box`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from mmbridge.boxes import check_box_format
from mmbridge.data.collate import collate, image_inputs
from mmbridge.eval import tasks
from mmbridge.eval.prompts import LETTERS
from mmbridge.eval.tasks import Pair, Suite, TaskSpec
from mmbridge.generate import resolve_config
from mmbridge.utils import atomic_write_json, eval_mode

SHOT_SPLIT = "train"  # where in-context examples come from


@dataclass
class Prompt:
    """One user turn to answer, the earlier turns (``{"role", "content"}``: in-context examples) and the images
    every placeholder of both stands for, in order."""

    text: str
    images: list[Image.Image]
    history: list[dict] = field(default_factory=list)
    video: bool = False  # the images are one clip's frames (a model that takes video reads them as one media)


Shots = list[list["Pair"]]  # per query, the solved examples shown before it


# -- model calls ----------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _encode_prompt(processor: Any, prompt: Prompt, index: int) -> dict:
    """A processed generation example: prompt ids ``[L]`` and pixel values ``[n, 3, H, W]`` (or None)."""
    return {"id": str(index), **processor.prompt_inputs(prompt.text, prompt.images, prompt.history, prompt.video)}


def generate_answers(model: nn.Module, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 8,
                     progress: tqdm | None = None) -> list[str]:
    """Greedy answers to ``prompts``, in batches of LEFT-padded prompts; decoded up to EOS and stripped."""
    processor, device = model.processor(), _device(model)
    config = resolve_config(model, max_new_tokens=max_new_tokens, do_sample=False)
    eos = config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = collate([_encode_prompt(processor, prompt, start + offset) for offset, prompt in enumerate(chunk)],
                        processor.pad_token_id, padding_side="left")
        new_tokens = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    generation_config=config, **image_inputs(batch, device))  # [B, new]
        answers += [_decode(model.tokenizer, row.cpu(), eos_ids) for row in new_tokens]
        if progress is not None:
            progress.update(len(chunk))
    return answers


def _decode(tokenizer: Any, tokens: torch.Tensor, eos_ids: torch.Tensor) -> str:
    """Text of ``tokens`` ``[new]`` before the first EOS, special tokens skipped, stripped."""
    stops = torch.isin(tokens, eos_ids)
    if bool(stops.any()):
        tokens = tokens[: int(stops.nonzero()[0, 0])]
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()


def continuation_log_likelihoods(model: nn.Module, prompt: Prompt, continuations: list[str]) -> list[float]:
    """Summed log-probability of each continuation as the assistant's reply to ``prompt`` (one batched forward).

    A decoder-only LLM scores the continuation after the prompt; an encoder–decoder LLM reads the
    prompt in its encoder and scores the continuation as its decoder's answer.
    """
    processor, device = model.processor(), _device(model)
    encoded = processor.prompt_inputs(prompt.text, prompt.images, prompt.history, prompt.video)
    prompt_ids = encoded["input_ids"]  # [P]
    targets = [torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
               for text in continuations]
    if model.llm.is_encoder_decoder:
        rows = [{"id": str(index), "input_ids": prompt_ids, "labels": target} for index, target in enumerate(targets)]
    else:
        rows = [{"id": str(index), "input_ids": torch.cat([prompt_ids, target])}
                for index, target in enumerate(targets)]
    batch = collate(rows, processor.pad_token_id, padding_side="right")
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # [N, L]
    labels = batch["labels"].to(device) if "labels" in batch else None  # [N, T], the decoder's
    with torch.inference_mode(), eval_mode(model):
        image_tokens = None
        if prompt.images:
            image_tokens = model.encode_images(**image_inputs(encoded, device))  # [n, M, D]
            image_tokens = image_tokens.repeat(len(rows), *[1] * (image_tokens.dim() - 1))  # [N * n, M, D]
        logits = model(input_ids, attention_mask, image_tokens=image_tokens, labels=labels, return_logits="all").logits
    if labels is not None:  # logits[:, t] scores labels[:, t]
        log_probs = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return [float(log_probs[row, :len(target)].sum()) for row, target in enumerate(targets)]
    log_probs = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    start = len(prompt_ids) - 1  # log_probs[:, t] scores the token at position t + 1
    return [float(log_probs[row, start:start + len(target)].sum()) for row, target in enumerate(targets)]


# -- one task -------------------------------------------------------------------------------------
def _prompt(text: str, images: list[Image.Image], blind: bool, image_token: str,
            shots: list[Pair] | None = None, video: bool = False) -> Prompt:
    """The prompt as sent: the model's placeholder token, or no placeholders and no images when blind; with
    ``shots``, their solved turns first (their images before the query's)."""
    history: list[dict] = []
    shown: list[Image.Image] = []
    for sample, shot_images in shots or []:
        if sample.get("video"):
            raise ValueError("in-context shots of video samples are not supported (one prompt holds one video)")
        turn = _prompt(tasks.user_text(sample), shot_images, blind, image_token)
        history += [{"role": "user", "content": turn.text}, {"role": "assistant", "content": tasks.shot_answer(sample)}]
        shown += turn.images
    if blind:
        return Prompt(tasks.blind_text(text), [], history)
    return Prompt(text.replace(tasks.SAMPLE_IMAGE_TOKEN, image_token), shown + list(images), history, video)


def choose_shots(pool: list[Pair], count: int, queries: int, seed: int) -> Shots:
    """``count`` examples from ``pool`` for each of ``queries`` queries, fixed by ``(seed, query index)``."""
    if count < 0:
        raise ValueError(f"shots must be >= 0, got {count}")
    if count > len(pool):
        raise ValueError(f"{count} shots asked for but the pool holds {len(pool)} samples")
    return [[pool[index] for index in random.Random(seed * 100003 + query).sample(range(len(pool)), count)]
            for query in range(queries)]


def _evaluate_generated(model: nn.Module, pairs: list[Pair], answer_format: str, spec: TaskSpec, blind: bool,
                        batch_size: int, progress: tqdm, shots: Shots,
                        box_format: str = "plain") -> tuple[dict[str, float], list[dict], str]:
    """Metrics, per-sample records and a prompt example for a format scored on generated answers."""
    image_token = model.config.image_token
    prompts = [_prompt(tasks.user_text(sample), images, blind, image_token, shown, bool(sample.get("video")))
               for (sample, images), shown in zip(pairs, shots)]
    progress.total += len(prompts)
    answers = generate_answers(model, prompts, spec.new_tokens(answer_format, box_format), batch_size, progress)
    samples = [sample for sample, _ in pairs]
    scorer = tasks.SCORERS[tasks.format_settings(answer_format).metric]
    records = [{"id": sample.get("id"), "prediction": answer, "gold": sample.get("answer")}
               for sample, answer in zip(samples, answers)]
    return scorer(samples, answers), records, _example(prompts[0])


def _example(prompt: Prompt) -> str:
    """A prompt's text as a results file shows it: the in-context turns, then the query."""
    turns = [f"{turn['role']}: {turn['content']}" for turn in prompt.history]
    return "\n".join(turns + [f"user: {prompt.text}"]) if turns else prompt.text


def _evaluate_multiple_choice(model: nn.Module, pairs: list[Pair], spec: TaskSpec, blind: bool,
                              batch_size: int, progress: tqdm, shots: Shots) -> tuple[dict[str, float], list[dict], str]:
    """Letter answers for every asked rotation, optional likelihood ranking, and their metrics."""
    image_token = model.config.image_token
    asked = [(index, shift) for index, (sample, _) in enumerate(pairs)
             for shift in range(len(sample["choices"]) if spec.circular else 1)]
    prompts = [_prompt(tasks.rotated_prompt(pairs[index][0], shift)[0], pairs[index][1], blind, image_token,
                       shots[index], bool(pairs[index][0].get("video"))) for index, shift in asked]
    progress.total += len(prompts) + (len(pairs) if spec.likelihood else 0)
    answers = generate_answers(model, prompts, spec.new_tokens("mc"), batch_size, progress)
    per_sample: list[list[str]] = [[] for _ in pairs]
    for (index, _), answer in zip(asked, answers):
        per_sample[index].append(answer)
    ranked = _rank_options(model, pairs, spec, blind, progress, shots) if spec.likelihood else None
    samples = [sample for sample, _ in pairs]
    records = [{"id": sample.get("id"), "prediction": rotations[0], "gold": sample.get("answer"),
                "rotations": rotations} for sample, rotations in zip(samples, per_sample)]
    for record, letter in zip(records, ranked or []):
        record["likelihood_choice"] = letter
    return tasks.score_multiple_choice(samples, per_sample, ranked), records, _example(prompts[0])


def _rank_options(model: nn.Module, pairs: list[Pair], spec: TaskSpec, blind: bool, progress: tqdm,
                  shots: Shots) -> list[str]:
    """The letter of the most likely option per sample (ties go to the first)."""
    letters = []
    for (sample, images), shown in zip(pairs, shots):
        text, continuations = tasks.likelihood_prompt(sample, spec.likelihood_target)
        scores = continuation_log_likelihoods(
            model, _prompt(text, images, blind, model.config.image_token, shown, bool(sample.get("video"))),
            continuations)
        letters.append(LETTERS[max(range(len(scores)), key=scores.__getitem__)])
        progress.update(1)
    return letters


def _group_by_format(pairs: list[Pair], shots: Shots) -> dict[str, tuple[list[Pair], Shots]]:
    groups: dict[str, tuple[list[Pair], Shots]] = {}
    for (sample, images), shown in zip(pairs, shots):
        tasks.format_settings(sample["format"])  # an unknown format fails before any generation
        group = groups.setdefault(sample["format"], ([], []))
        group[0].append((sample, images))
        group[1].append(shown)
    return groups


def evaluate(model: nn.Module, pairs: list[Pair], spec: TaskSpec | None = None, blind: bool = False,
             batch_size: int = 8, progress: bool = True, shots: Shots | None = None,
             box_format: str | None = None) -> dict[str, Any]:
    """Score one task: ``{metric: float, ..., "n", "prompt_example", "max_new_tokens", "data_hash", "predictions"}``.

    Samples are grouped by answer format; with several formats, metric names get a
    ``format/`` prefix and ``accuracy`` is their sample-weighted mean (when every format has one). ``blind`` removes the image placeholders and passes no pixels.
    ``shots`` gives, per sample, the solved examples shown before it (:func:`choose_shots`). Boxes in the
    samples' and shots' text are asked in ``box_format`` (:func:`tasks.in_box_format`; ``None``: the model's
    saved format, else plain — :func:`model_box_format`).
    """
    if not pairs:
        raise ValueError("evaluate needs at least one sample")
    box_format = model_box_format(model, box_format)
    pairs = [(tasks.in_box_format(sample, box_format), images) for sample, images in pairs]
    shots = [[(tasks.in_box_format(sample, box_format), images) for sample, images in shown]
             for shown in shots] if shots is not None else [[] for _ in pairs]
    if len(shots) != len(pairs):
        raise ValueError(f"{len(shots)} lists of shots for {len(pairs)} samples")
    spec = spec or TaskSpec(str(pairs[0][0].get("task", "task")))
    groups = _group_by_format(pairs, shots)
    entry: dict[str, Any] = {}
    examples, budgets, records = {}, {}, []
    with tqdm(total=0, desc=spec.key + (" (blind)" if blind else ""), disable=not progress, unit="prompt") as bar:
        for answer_format, (group, group_shots) in groups.items():
            if answer_format == "mc":
                scores, group_records, example = _evaluate_multiple_choice(model, group, spec, blind, batch_size, bar,
                                                                           group_shots)
            else:
                scores, group_records, example = _evaluate_generated(model, group, answer_format, spec, blind,
                                                                     batch_size, bar, group_shots, box_format)
            prefix = f"{answer_format}/" if len(groups) > 1 else ""
            entry.update({prefix + name: float(value) for name, value in scores.items()})
            examples[answer_format], budgets[answer_format] = example, spec.new_tokens(answer_format, box_format)
            records += group_records
    if len(groups) > 1 and all(f"{name}/accuracy" in entry for name in groups):  # one headline over the formats
        entry["accuracy"] = sum(entry[f"{name}/accuracy"] * len(group) for name, (group, _) in groups.items()) \
            / len(pairs)
    entry.update({"n": len(pairs), "prompt_example": next(iter(examples.values())) if len(examples) == 1 else examples,
                  "max_new_tokens": budgets, "data_hash": samples_hash(pairs), "predictions": records})
    if spec.likelihood and "mc" in groups:
        text, _ = tasks.likelihood_prompt(groups["mc"][0][0][0], spec.likelihood_target)  # the first sample
        entry["likelihood_target"] = spec.likelihood_target
        entry["likelihood_prompt_example"] = tasks.blind_text(text) if blind else text
    return entry


# -- files and hashes -----------------------------------------------------------------------------
def load_samples(path: str) -> list[Pair]:
    """Read a LLaVA-format eval JSON and open its images (paths relative to the file's directory)."""
    with open(path, encoding="utf-8") as handle:
        samples = json.load(handle)
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    for sample in samples:
        names = sample.get("image") or []
        names = [names] if isinstance(names, str) else names
        pairs.append((sample, [_open_image(os.path.join(root, name)) for name in names]))
    return pairs


def _open_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def samples_hash(pairs: list[Pair]) -> str:
    """SHA-256 over every sample dict (canonical JSON) and its images' mode, size and pixels."""
    digest = hashlib.sha256()
    for sample, images in pairs:
        digest.update(json.dumps(sample, sort_keys=True, default=str).encode())
        for image in images:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
    return digest.hexdigest()


def weights_hash(directory: str) -> str:
    """SHA-256 over the ``*.safetensors`` files of a model directory (names and bytes, sorted by name)."""
    names = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{directory} holds no .safetensors weights to hash")
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def state_hash(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and bytes), for models not on disk."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- suites ---------------------------------------------------------------------------------------
def run_suite(model: nn.Module, suite: Suite | str, task_names: list[str] | None = None, n: int = 100,
              seed: int = 0, blind: bool = False, with_blind: bool = False, batch_size: int = 8,
              progress: bool = True, model_dir: str | None = None, shots: int = 0,
              box_format: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on a suite's tasks (all, or those named); returns the results document.

    ``blind`` evaluates only the blind baseline; ``with_blind`` adds it as ``blind_tasks``.
    The model hash is over ``model_dir``'s safetensors when given, else over the state dict.
    ``shots`` solved examples from each task's ``train`` split precede every query (module docstring).
    ``box_format`` (``plain``/``qwen``): how grounding is asked; ``None``: the model's saved format, else plain.
    """
    suite = tasks.get_suite(suite) if isinstance(suite, str) else suite
    specs = suite.select(task_names)
    box_format = model_box_format(model, box_format)
    data = {spec.key: suite.samples(spec.task, spec.split, n, seed, box_format) for spec in specs}
    shown: dict[str, Shots | None] = {spec.key: None for spec in specs}
    if shots:
        for spec in specs:
            pool = suite.samples(spec.task, SHOT_SPLIT, max(16, 4 * shots), seed, box_format)
            shown[spec.key] = choose_shots(pool, shots, len(data[spec.key]), seed)
    results: dict[str, Any] = {
        "model": model_dir, "model_hash": weights_hash(model_dir) if model_dir else state_hash(model),
        "data_hash": samples_hash([pair for pairs in data.values() for pair in pairs]), "suite": suite.name,
        "settings": {"n": n, "seed": seed, "blind": blind, "with_blind": with_blind, "batch_size": batch_size,
                     "shots": shots, "box_format": box_format,
                     "generation": {"do_sample": False, "max_new_tokens": {
                         name: TaskSpec(name).new_tokens(name, box_format) for name in tasks.FORMAT_SETTINGS}},
                     "processor": dict(getattr(model, "processor_settings", {})),
                     "tasks": [asdict(spec) for spec in specs]},
        "tasks": {spec.key: evaluate(model, data[spec.key], spec, blind, batch_size, progress, shown[spec.key],
                                     box_format) for spec in specs},
    }
    if with_blind and not blind:
        results["blind_tasks"] = {spec.key: evaluate(model, data[spec.key], spec, True, batch_size, progress,
                                                     shown[spec.key], box_format) for spec in specs}
    results["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return results


def model_box_format(model: nn.Module, box_format: str | None = None) -> str:
    """The box format to evaluate grounding in: ``box_format`` when given, else the one saved with the model
    (``processor_settings["box_format"]``, written by training with ``data.box_format``), else ``plain``."""
    chosen = box_format or dict(getattr(model, "processor_settings", {})).get("box_format", "plain")
    return check_box_format(chosen, "eval box_format")


def save_results(path: str, results: dict[str, Any]) -> None:
    """Write a results document as JSON (atomically)."""
    atomic_write_json(path, results)


def load_results(path: str) -> dict[str, Any]:
    """Read a results document written by :func:`save_results`."""
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not an mmbridge eval results file (not JSON: {error})") from None
    if not isinstance(results, dict) or "tasks" not in results:
        raise ValueError(f"{path}: not an mmbridge eval results file (no 'tasks')")
    return results


# -- tables ---------------------------------------------------------------------------------------
def task_metrics(entry: dict[str, Any]) -> dict[str, float | int]:
    """A task entry's sample count and metrics (its float values), in order."""
    return {"n": entry["n"], **{name: value for name, value in entry.items() if isinstance(value, float)}}


def _cell(value: float | int | None) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def metric_table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown ``| task | metric | <column>… |`` over several ``(label, tasks dict)`` columns."""
    rows: dict[tuple[str, str], list[float | int | None]] = {}
    for position, (_, task_entries) in enumerate(columns):
        for task, entry in task_entries.items():
            for metric, value in task_metrics(entry).items():
                rows.setdefault((task, metric), [None] * len(columns))[position] = value
    lines = ["| task | metric | " + " | ".join(label for label, _ in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    lines += [f"| {task} | {metric} | " + " | ".join(_cell(value) for value in values) + " |"
              for (task, metric), values in rows.items()]
    return "\n".join(lines)


def results_table(results: dict[str, Any]) -> str:
    """The results as markdown: one ``value`` column, or ``image`` and ``blind`` side by side."""
    if "blind_tasks" in results:
        return metric_table([("image", results["tasks"]), ("blind", results["blind_tasks"])])
    return metric_table([("blind" if results["settings"].get("blind") else "value", results["tasks"])])


def compare_table(paths: list[str]) -> str:
    """Results files side by side, one column per file (and one per blind run a file holds)."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    labels = stems if len(set(stems)) == len(stems) else list(paths)
    columns = []
    for label, path in zip(labels, paths):
        results = load_results(path)
        columns.append((label + (" (blind)" if results.get("settings", {}).get("blind") else ""), results["tasks"]))
        if "blind_tasks" in results:
            columns.append((f"{label} (blind)", results["blind_tasks"]))
    return metric_table(columns)
