"""``python -m mmbridge.demo --tiny``: the whole pipeline on tiny random backbones in about a minute.

It writes a small LLaVA-format dataset of coloured shapes, a recipe YAML, trains the
``mlp2x_gelu`` bridge in two stages (align: bridge only; instruct: bridge + LoRA on the
LLM) on a tiny random CLIP tower and a tiny random Llama, saves and reloads the model,
prints ``mmbridge info``, and answers questions about fresh images (paths shown),
scoring the colour answers against what was drawn. Every figure printed is measured.

``make demo`` runs the same flow on the bundled pretrained backbones (``mmbridge.demo``).
"""

from __future__ import annotations

import json
import os
import time

import yaml

from mmbridge.cli import info_text
from mmbridge.config import load_run_config
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_model_config, tiny_tokenizer, write_shape_dataset


def write_recipe(out: str, steps: tuple[int, int]) -> str:
    """Write the demo's recipe (tiny random backbones, two stages) and return its path."""
    tokenizer_dir = os.path.join(out, "tokenizer")
    tokenizer = tiny_tokenizer(tokenizer_dir)
    model = tiny_model_config(tokenizer_dir, len(tokenizer) + 1)
    model["vision"]["hf_config"].update(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128)
    model["llm"]["hf_config"].update(hidden_size=96, intermediate_size=192, initializer_range=0.1,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    recipe = {
        "model": model,
        "processor": {"max_length": 128},
        "data": {"sources": [{"path": os.path.join(out, "data", "train", "data.json"), "name": "shapes"}]},
        "output_dir": os.path.join(out, "run"),
        "seed": 0,
        "stages": [
            {"name": "align", "train": {"bridge": "full"}, "lr": 3e-3, "steps": steps[0], "batch_size": 8,
             "precision": "bf16"},
            {"name": "instruct", "train": {"bridge": "full", "llm": {"mode": "lora", "r": 16, "alpha": 32,
                                                                     "dropout": 0.0, "lr": 3e-3}},
             "lr": 1e-3, "steps": steps[1], "batch_size": 8, "precision": "bf16", "save_every": 50},
        ],
    }
    path = os.path.join(out, "recipe.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    return path


def answer_fresh_images(model: MultimodalModel, data_json: str) -> float:
    """Ask the colour question about each held-out image; print path, answer, truth; return accuracy."""
    samples = json.load(open(data_json))
    root = os.path.dirname(data_json)
    correct = 0
    for sample in samples:
        path = os.path.join(root, sample["image"])
        truth = sample["conversations"][1]["value"]
        answer = model.chat("<image>\nWhat colour is the shape?", [path], max_new_tokens=16)
        correct += answer.strip().lower() == truth.strip().lower()
        print(f"  {path}\n    answer: {answer!r:24} drawn: {truth!r}")
    return correct / len(samples)


def run_tiny(out: str) -> int:
    """Data → recipe → two-stage training → save/reload → info → scored answers; returns 0."""
    from mmbridge.train import train

    began = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    write_shape_dataset(os.path.join(out, "data", "train"), 256, seed=1)
    test_json = write_shape_dataset(os.path.join(out, "data", "test"), 12, seed=2)
    recipe = write_recipe(out, (60, 240))
    print(f"recipe: {recipe}\n")
    result = train(load_run_config(recipe))
    for stage in ("align", "instruct"):
        losses = [record["loss"] for record in result.history if record["stage"] == stage]
        print(f"{stage:9} loss: first 5 steps {sum(losses[:5]) / 5:.3f} → last 5 steps {sum(losses[-5:]) / 5:.3f}")
    final = os.path.join(result.output_dir, "final")
    model = MultimodalModel.from_pretrained(final)
    print(f"\nmmbridge info --model {final}\n{info_text(model)}\n")
    print("questions about fresh images:")
    accuracy = answer_fresh_images(model, test_json)
    print(f"\ncolour accuracy on {len(json.load(open(test_json)))} fresh images: {accuracy:.0%} "
          f"(chance 25%); took {time.perf_counter() - began:.0f} s")
    return 0
