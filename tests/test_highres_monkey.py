"""Monkey (arXiv 2311.06607): a fixed window of tiles with one LoRA per tile position on the shared encoder, the
global view on the plain encoder, a shared resampler per crop; training, generation, save/load."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmbridge.data.collate import collate, model_inputs
from mmbridge.data.formats.llava import Sample
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image
from mmbridge.train.recipe import apply_stage, optimizer_groups, stage_from_dict

MONKEY = {"type": "monkey", "windows": [1, 2], "r": 4, "alpha": 8, "dropout": 0.0}
PERCEIVER = {"type": "perceiver", "num_latents": 4, "depth": 1, "heads": 4}
LATENTS = PERCEIVER["num_latents"]
QUESTION = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "red"}]


def _image(width: int, height: int, colour: str = "red") -> Image.Image:
    return shape_image(colour, "circle", size=max(width, height)).resize((width, height))


def _lora(model: MultimodalModel, adapter: str) -> list[torch.nn.Parameter]:
    return [parameter for name, parameter in model.vision.named_parameters() if f".{adapter}." in name]


def _perturb(parameters: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture()
def monkey_model(make_model) -> MultimodalModel:
    model = make_model(highres=MONKEY, bridge=PERCEIVER)
    with torch.no_grad():  # wide bridge weights: a token in the wrong place changes the logits visibly
        for parameter in model.bridge.parameters():
            parameter.normal_(0, 0.5)
    return model


def _tokens(model: MultimodalModel, image: Image.Image) -> torch.Tensor:
    pixels = model.highres.pixel_values(image)
    with torch.no_grad():
        return model.encode_images(pixels, image_sizes=torch.tensor([[image.height, image.width]]))  # [M, D]


def test_layout_is_tiles_in_reading_order_then_the_global_view(monkey_model):
    strategy = monkey_model.highres
    for size in [(10, 40), (50, 20), (16, 16)]:  # every image is resized to the same 16×32 input
        layout = strategy.layout(size)
        assert [(crop.position, crop.overview) for crop in layout.crops] == [(1, False), (2, False), (0, True)]
        assert all(crop.size == (16, 16) for crop in layout.crops)
        assert layout.visual_tokens == len(layout.tokens) == (1 + 2) * LATENTS
    assert strategy.input_size == (16, 32)
    assert monkey_model.highres.pixel_values(_image(40, 10)).shape == (3, 3, 16, 16)
    names = [name for name, _ in monkey_model.vision.named_parameters() if "lora_" in name]
    assert {name.split(".")[-2] for name in names} == {"tile1", "tile2"}
    assert any(".fc1." in name for name in names) and any(".q_proj." in name for name in names)


def test_crops_follow_the_reference_geometry(monkey_model):
    image = Image.new("RGB", (30, 12), (255, 255, 255))
    image.paste((200, 0, 0), (0, 0, 15, 12))  # left half red, right half white
    tiles = monkey_model.highres.crop(image)
    assert [crop.size for crop in tiles] == [(16, 16)] * 3
    assert tiles[0].getpixel((8, 8)) == (200, 0, 0) and tiles[1].getpixel((8, 8)) == (255, 255, 255)
    assert tiles[2].getpixel((3, 8)) == (200, 0, 0) and tiles[2].getpixel((12, 8)) == (255, 255, 255)


def test_each_position_has_its_own_adapter_and_the_global_view_none(monkey_model):
    image = _image(40, 10)
    before = _tokens(monkey_model, image)  # [3 * LATENTS, D]: tile1, tile2, global
    tile1, tile2, overview = before.split(LATENTS)
    _perturb(_lora(monkey_model, "tile2"), seed=1)
    after = _tokens(monkey_model, image)
    assert torch.equal(after[:LATENTS], tile1)
    assert not torch.allclose(after[LATENTS:2 * LATENTS], tile2, atol=1e-3)
    assert torch.equal(after[2 * LATENTS:], overview)
    _perturb(_lora(monkey_model, "tile1"), seed=2)
    again = _tokens(monkey_model, image)
    assert not torch.allclose(again[:LATENTS], tile1, atol=1e-3)
    assert torch.equal(again[LATENTS:], after[LATENTS:])
    global_pixels = monkey_model.highres.pixel_values(image)[2:]  # outside a context: the plain encoder
    with torch.no_grad():
        plain = monkey_model.bridge(monkey_model.vision(global_pixels), monkey_model.vision.feature_layout())[0]
    torch.testing.assert_close(again[2 * LATENTS:], plain, atol=1e-6, rtol=1e-6)


def test_a_stage_trains_the_tiles_lora_and_bridge_only(monkey_model):
    processor = monkey_model.processor()
    examples = [processor(Sample(id=str(index), images=["x"], conversation=QUESTION), images=[image])
                for index, image in enumerate([_image(40, 10), _image(20, 50, "blue")])]
    batch = model_inputs(collate(examples, processor.pad_token_id))
    stage = stage_from_dict({"name": "monkey", "train": {"vision": "lora", "bridge": "full"}, "lr": 1e-2,
                             "precision": "fp32", "steps": 1})
    rows = apply_stage(monkey_model, stage, log=False)
    lora_count = sum(parameter.numel() for name, parameter in monkey_model.vision.named_parameters()
                     if "lora_" in name)
    assert rows[0]["key"] == "vision" and rows[0]["trainable"] == lora_count
    assert len(monkey_model.config.adapters) == 0  # the stage added no adapter of its own
    flags = {name: parameter.requires_grad for name, parameter in monkey_model.named_parameters()}
    before = {name: parameter.detach().clone() for name, parameter in monkey_model.named_parameters()}
    groups, _ = optimizer_groups(monkey_model, stage)
    optimizer = torch.optim.AdamW(groups, lr=stage.lr)
    monkey_model.train()
    monkey_model(**batch).loss.backward()
    assert {name: parameter.requires_grad for name, parameter in monkey_model.named_parameters()} == flags
    optimizer.step()
    changed = {name for name, parameter in monkey_model.named_parameters() if not torch.equal(parameter, before[name])}
    assert any(".tile1." in name for name in changed) and any(".tile2." in name for name in changed)
    assert any(name.startswith("bridge.") for name in changed)
    assert all(name.startswith("bridge.") or "lora_" in name for name in changed)  # encoder base and LLM untouched


def test_a_stage_without_vision_leaves_the_adapters_frozen_through_forward(monkey_model):
    apply_stage(monkey_model, stage_from_dict({"name": "align", "train": {"bridge": "full"}, "steps": 1}), log=False)
    monkey_model.train()
    processor = monkey_model.processor()
    example = processor(Sample(id="a", images=["x"], conversation=QUESTION), images=[_image(40, 10)])
    monkey_model(**model_inputs(collate([example], processor.pad_token_id))).loss.backward()
    assert not any(parameter.requires_grad for parameter in monkey_model.vision.parameters())
    assert all(parameter.grad is None for parameter in monkey_model.vision.parameters())


def test_batch_of_different_sizes_with_labels_equals_each_image_alone(monkey_model):
    _perturb(_lora(monkey_model, "tile1") + _lora(monkey_model, "tile2"), seed=3)
    processor = monkey_model.processor()
    examples = [processor(Sample(id=str(index), images=["x"], conversation=QUESTION), images=[image])
                for index, image in enumerate([_image(40, 10), _image(20, 50, "blue")])]
    assert all(example["pixel_values"].shape == (3, 3, 16, 16) for example in examples)
    batch = model_inputs(collate(examples, processor.pad_token_id))
    with torch.no_grad():
        output = monkey_model(**batch)
        assert torch.isfinite(output.loss) and output.num_label_tokens > 0
        for row, example in enumerate(examples):
            alone = monkey_model(**model_inputs(collate([example], processor.pad_token_id))).logits[0]
            length = len(example["input_ids"])
            torch.testing.assert_close(output.logits[row, :length], alone, atol=1e-5, rtol=1e-5)


def test_generation_with_cache_equals_without(monkey_model):
    _perturb(_lora(monkey_model, "tile1") + _lora(monkey_model, "tile2"), seed=4)
    processor = monkey_model.processor()
    prompts = [processor.prompt_inputs("What colour?", [image]) | {"id": str(index)}
               for index, image in enumerate([_image(40, 10), _image(30, 30, "blue")])]
    batch = collate(prompts, processor.pad_token_id, padding_side="left")
    inputs = dict(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                  max_new_tokens=6, do_sample=False)
    cached = monkey_model.generate(batch["input_ids"], batch["attention_mask"], **inputs)
    plain = monkey_model.generate(batch["input_ids"], batch["attention_mask"], use_cache=False, **inputs)
    assert torch.equal(cached, plain)


def test_save_and_load_rebuild_the_adapters(monkey_model, tmp_path):
    _perturb(_lora(monkey_model, "tile1") + _lora(monkey_model, "tile2"), seed=5)
    inputs = monkey_model.processor().prompt_inputs("What colour?", [_image(20, 50)])
    monkey_model.save_pretrained(str(tmp_path / "model"))
    loaded = MultimodalModel.from_pretrained(str(tmp_path / "model"))
    assert loaded.config.highres.type == "monkey" and loaded.config.highres.windows == [1, 2]
    arguments = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        assert torch.equal(loaded(inputs["input_ids"][None], **arguments).logits,
                           monkey_model(inputs["input_ids"][None], **arguments).logits)


def test_errors_name_what_is_wrong(make_model):
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        make_model(highres={"type": "monkey", "windows": [0, 2]})
    with pytest.raises(ValueError, match="match no sub-module"):
        make_model(highres={**MONKEY, "target_modules": ["nope"]})
