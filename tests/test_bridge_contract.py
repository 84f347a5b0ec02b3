"""The bridge contract: every bridge reports its token layout for a feature grid, the core speaks to bridges only
through the hooks of :class:`~mmbridge.model.bridges.base.Bridge`, and what used to be guessed now composes:
``native`` + ``pool`` / ``pixel_shuffle``, ``anyres`` + a ceil-mode ``pool`` on a 7×7 grid, region–word alignment
refused in one line for a bridge whose tokens have no place in the image."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from PIL import Image

from mmbridge.cli import main
from mmbridge.data.collate import collate, model_inputs
from mmbridge.data.formats.llava import Sample
from mmbridge.model.bridges import BRIDGES, build_bridge
from mmbridge.model.grid import FeatureGrid
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image
from mmbridge.train import StageConfig, apply_stage

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mmbridge"
PATCH = {"type": "patch", "patch_size": 4, "image_size": 16}
SEVEN_BY_SEVEN = {"type": "module", "target": "torch.nn:Conv2d", "layout": "grid", "feature_dim": 24,
                  "kwargs": {"in_channels": 3, "out_channels": 24, "kernel_size": 4, "stride": 4},
                  "image_transform": {"size": [28, 28]}}  # the bundled EfficientNet's 7×7 grid, tiny
QUESTION = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "red"}]
SPECS = {  # one small spec per registered bridge; the features are 24 wide
    "linear": {}, "mlp": {}, "swiglu": {"hidden_dim": 16}, "pool": {"kernel": 3},
    "pixel_shuffle": {"factor": 2}, "internvl": {}, "perceiver": {"num_latents": 3, "depth": 1, "heads": 2},
    "qwen_resampler": {"num_queries": 4, "heads": 2},
    "qformer": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 16, "num_queries": 2},
}


def _image(width: int, height: int) -> Image.Image:
    return shape_image("red", "circle", size=max(width, height)).resize((width, height))


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("rows, cols", [(4, 4), (2, 6)])
def test_the_token_grid_holds_exactly_the_tokens_forward_returns(name, rows, cols):
    bridge = build_bridge({"type": name, **SPECS[name]}, 24, 32)
    grid = FeatureGrid(rows, cols)
    tokens = bridge(torch.randn(2, rows * cols, 24), grid)
    assert tokens.shape == (2, bridge.num_tokens(grid), 32)
    token_grid = bridge.token_grid(grid)
    assert token_grid is None or token_grid[0] * token_grid[1] == bridge.num_tokens(grid)


def test_every_registered_bridge_is_covered_here():
    fusion = {"gated_xattn", "mma", "moe", "visual_expert"}  # delegate to their projector; covered in test_fusion*
    text = {"instruct_qformer", "llama_vid"}  # need instruction text; covered in test_bridges_qformer
    assert set(BRIDGES.keys()) == set(SPECS) | fusion | text


def test_the_core_never_asks_what_kind_of_bridge_it_holds():
    """No ``isinstance`` on bridge classes and no probing of bridge attributes in the core: it calls the hooks of the
    one Bridge base."""
    core = ["model/multimodal.py", "generate.py", "train", "eval", "serve"]
    files = [path for entry in core for path in ([PACKAGE / entry] if entry.endswith(".py")
                                                  else sorted((PACKAGE / entry).rglob("*.py")))]
    offences = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                name, first = node.func.id, ast.unparse(node.args[0])
                if name in ("hasattr", "getattr") and "bridge" in first:
                    offences.append(f"{path.name}: {ast.unparse(node)}")
                if name == "isinstance" and ast.unparse(node.args[1]).endswith("Bridge"):
                    offences.append(f"{path.name}: {ast.unparse(node)}")
    assert files and not offences


# -- native resolution with compressing bridges -----------------------------------------------------------------
@pytest.mark.parametrize("bridge, padded, token_grid", [({"type": "pool", "kernel": 2}, (24, 40), (3, 5)),
                                                        ({"type": "pixel_shuffle", "factor": 2}, (24, 40), (3, 5))])
def test_native_with_a_compressing_bridge_trains_generates_and_reloads(make_model, tmp_path, bridge, padded,
                                                                       token_grid):
    model = make_model(vision=PATCH, bridge=bridge, highres={"type": "native", "max_size": [40, 56]})
    layout = model.highres.layout((23, 37))  # padded to multiples of 4 px (pool) or 8 px (pixel shuffle's blocks)
    assert layout.crops[0].size == padded and layout.extra["token_grid"] == token_grid
    assert layout.visual_tokens == token_grid[0] * token_grid[1]
    processor = model.processor()
    examples = [processor(Sample(str(index), QUESTION), images=[image])
                for index, image in enumerate([_image(37, 23), _image(20, 50)])]
    apply_stage(model, StageConfig(name="align", train={"bridge": "full"}, precision="fp32"), log=False)
    output = model(**model_inputs(collate(examples, processor.pad_token_id)))
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.bridge.projector.linear_1.weight.grad.abs().sum() > 0
    model.eval()
    prompt = processor.prompt_inputs("What colour?", [_image(37, 23)])
    inputs = dict(pixel_values=prompt["pixel_values"], image_sizes=prompt["image_sizes"], max_new_tokens=4,
                  eos_token_id=[])
    ids = prompt["input_ids"][None]
    assert torch.equal(model.generate(ids, **inputs), model.generate(ids, use_cache=False, **inputs))
    model.save_pretrained(str(tmp_path / "native"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "native"))
    arguments = dict(pixel_values=prompt["pixel_values"], image_sizes=prompt["image_sizes"])
    with torch.no_grad():
        assert torch.equal(reloaded(ids, **arguments).logits, model(ids, **arguments).logits)


def test_anyres_with_a_ceil_mode_pool_on_a_seven_by_seven_grid(make_model):
    model = make_model(vision=SEVEN_BY_SEVEN, bridge={"type": "pool", "kernel": 2},
                       highres={"type": "anyres", "grid": [[1, 2], [2, 1]]})
    assert model.vision.feature_layout() == FeatureGrid(7, 7) and model.tokens_per_image == 16
    layout = model.highres.layout((28, 56))  # two tiles side by side, each pooled to 4×4
    assert layout.extra["token_grid"] == (4, 4) and layout.grid == (1, 2)
    assert layout.visual_tokens == 16 + 4 * (8 + 1)  # the global view, then 4 rows of 8 tokens and a newline
    prompt = model.processor().prompt_inputs("What colour?", [_image(56, 28)])
    with torch.no_grad():
        tokens = model.encode_images(prompt["pixel_values"], prompt["image_sizes"])
    assert tokens.shape == (layout.visual_tokens, model.llm.hidden_size)


# -- region–word alignment on a bridge without a grid ----------------------------------------------------------
def test_region_words_on_latents_ends_in_one_line_naming_the_bridge(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from mmbridge.config import RunConfig, save_run_config
    from mmbridge.testing import tiny_model_config

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    model = tiny_model_config(tokenizer_dir, vocab, bridge={"type": "perceiver", "num_latents": 3, "depth": 1,
                                                            "heads": 2})
    stage = {"name": "ground", "objective": "region_words", "train": {"bridge": "full"}, "steps": 1,
             "batch_size": 2, "precision": "fp32"}
    data = {"sources": [{"miniworld": {"task": "caption", "split": "train", "n": 4}}]}
    recipe = tmp_path / "recipe.yaml"
    save_run_config(RunConfig(model=model, stages=[stage], data=data, output_dir=str(tmp_path / "run")), str(recipe))
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "perceiver bridge" in error[0] and "no place in the image" in error[0]
