"""The high-resolution core, shown with AnyRes: per-image layouts known before encoding, the processor's
expansion, batches of images of different sizes, training, generation, feature cache, save/load, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mmbridge.config import RunConfig
from mmbridge.data.collate import collate, model_inputs
from mmbridge.data.formats.llava import Sample
from mmbridge.model.highres.anyres import unpad_cut
from mmbridge.model.highres.base import select_best_resolution
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image, tiny_model_config
from mmbridge.train import train

ANYRES = {"type": "anyres", "grid": [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]}
QUESTION = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "red"}]


def _image(width: int, height: int, colour: str = "red") -> Image.Image:
    return shape_image(colour, "circle", size=max(width, height)).resize((width, height))


@pytest.fixture()
def anyres_model(make_model) -> MultimodalModel:
    model = make_model(highres=ANYRES)
    with torch.no_grad():  # wide weights: a token in the wrong place changes the logits visibly
        for parameter in model.bridge.parameters():
            parameter.normal_(0, 0.5)
    return model


def test_best_resolution_and_unpad_follow_llava_next():
    candidates = [(16, 32), (32, 16), (32, 32), (48, 16), (16, 48)]
    assert select_best_resolution((16, 40), candidates) == (16, 48)  # wide: the 1×3 strip keeps most pixels
    assert select_best_resolution((50, 20), candidates) == (48, 16)
    assert select_best_resolution((30, 30), candidates) == (32, 32)
    assert unpad_cut((10, 40), (4, 12)) == (0, 0, 0, 0)  # 3 of 4 rows hold image: (4 - 3) // 2 = 0 cut per side
    assert unpad_cut((10, 40), (8, 8)) == (3, 3, 0, 0)  # 40 wide fills 8 columns, 10 high fills 2 of 8 rows
    assert unpad_cut((40, 10), (8, 8)) == (0, 0, 3, 3)


def test_layout_counts_global_view_tiles_unpad_and_newlines(anyres_model):
    layout = anyres_model.highres.layout((30, 30))  # 2×2 tiles of the 16-px tower (4×4 patches each)
    assert layout.grid == (2, 2) and len(layout.crops) == 5 and layout.crops[0].overview
    assert layout.visual_tokens == 16 + 8 * (8 + 1)  # global 4×4, then an 8×8 map with a newline per row
    wide = anyres_model.highres.layout((8, 40))  # 1×3 tiles: a 4×12 map whose image covers round(2.4) = 2 rows
    assert wide.grid == (1, 3) and wide.extra["cut"] == (1, 1, 0, 0)
    assert wide.visual_tokens == 16 + 2 * (12 + 1)
    assert anyres_model.image_token_ids((8, 40)) == [anyres_model.image_token_id] * wide.visual_tokens


def test_processor_expands_each_image_to_its_own_count_and_carries_sizes(anyres_model):
    processor = anyres_model.processor()
    images = [_image(40, 10), _image(30, 30)]
    sample = Sample(id="s", images=["a", "b"], conversation=[
        {"role": "user", "content": "<image> and <image>: what colours?"}, {"role": "assistant", "content": "red"}])
    example = processor(sample, images=images)
    counts = [anyres_model.highres.layout((image.height, image.width)).visual_tokens for image in images]
    assert int((example["input_ids"] == anyres_model.image_token_id).sum()) == sum(counts)
    assert example["image_sizes"].tolist() == [[10, 40], [30, 30]]
    assert example["pixel_values"].shape == (4 + 5, 3, 16, 16)  # 1 + 3 crops, 1 + 4 crops
    assert not (example["labels"][example["input_ids"] == anyres_model.image_token_id] != -100).any()


def test_batch_of_different_sizes_equals_each_image_alone(anyres_model):
    processor = anyres_model.processor()
    images = [_image(40, 10), _image(20, 50, "blue"), _image(30, 30)]
    examples = [processor(Sample(id=str(index), images=["x"], conversation=QUESTION), images=[image])
                for index, image in enumerate(images)]
    batch = model_inputs(collate(examples, processor.pad_token_id))
    with torch.no_grad():
        together = anyres_model(**batch).logits
        for row, example in enumerate(examples):
            alone = anyres_model(**model_inputs(collate([example], processor.pad_token_id))).logits[0]
            length = len(example["input_ids"])
            torch.testing.assert_close(together[row, :length], alone, atol=1e-5, rtol=1e-5)


def test_training_reaches_the_bridge_and_image_newline(anyres_model):
    processor = anyres_model.processor()
    examples = [processor(Sample(id=str(index), images=["x"], conversation=QUESTION), images=[image])
                for index, image in enumerate([_image(40, 10), _image(30, 30)])]
    anyres_model.requires_grad_(False)
    anyres_model.bridge.requires_grad_(True)
    output = anyres_model(**model_inputs(collate(examples, processor.pad_token_id)))
    output.loss.backward()
    assert anyres_model.bridge.image_newline.grad.abs().sum() > 0
    assert all(parameter.grad is not None for parameter in anyres_model.bridge.parameters())


def test_generation_with_cache_equals_without_and_chat_runs(anyres_model):
    processor = anyres_model.processor()
    prompts = [processor.prompt_inputs("What colour?", [image]) | {"id": str(index)}
               for index, image in enumerate([_image(40, 10), _image(30, 30)])]
    batch = collate(prompts, processor.pad_token_id, padding_side="left")
    inputs = dict(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                  max_new_tokens=6, do_sample=False)
    cached = anyres_model.generate(batch["input_ids"], batch["attention_mask"], **inputs)
    plain = anyres_model.generate(batch["input_ids"], batch["attention_mask"], use_cache=False, **inputs)
    assert torch.equal(cached, plain)
    alone = anyres_model.generate(prompts[1]["input_ids"][None], pixel_values=prompts[1]["pixel_values"],
                                  image_sizes=prompts[1]["image_sizes"], max_new_tokens=6,
                                  do_sample=False)
    assert torch.equal(alone[0], cached[1])
    answer = anyres_model.chat("What colour?", images=[_image(30, 30)], max_new_tokens=6)
    assert answer == anyres_model.tokenizer.decode(alone[0].tolist(), skip_special_tokens=True).strip()


def test_save_and_load_rebuild_the_strategy_and_its_newline(anyres_model, tmp_path):
    processor = anyres_model.processor()
    inputs = processor.prompt_inputs("What colour?", [_image(20, 50)])
    anyres_model.save_pretrained(str(tmp_path / "model"))
    saved = json.load(open(tmp_path / "model" / "config.json"))["model"]["highres"]
    assert saved["type"] == "anyres" and saved["grid"] == ANYRES["grid"]
    loaded = MultimodalModel.from_pretrained(str(tmp_path / "model"))
    arguments = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        assert torch.equal(loaded(inputs["input_ids"][None], **arguments).logits,
                           anyres_model(inputs["input_ids"][None], **arguments).logits)


PERCEIVER = {"type": "perceiver", "num_latents": 8, "depth": 1, "heads": 4}
CACHED = {  # every strategy with a frozen encoder: crops of one size (anyres, monkey) or of many (uhd, native)
    "anyres": (ANYRES, None, None),
    "uhd": ({"type": "uhd", "max_slices": 4}, PERCEIVER, None),
    "monkey": ({"type": "monkey", "windows": [1, 2], "r": 4}, PERCEIVER, None),
    "native": ({"type": "native", "max_size": [40, 56]}, {"type": "mlp", "depth": 1},
               {"type": "patch", "patch_size": 4, "image_size": 16}),
}


@pytest.mark.parametrize("strategy", sorted(CACHED))
def test_feature_cache_trains_as_pixels_do(strategy, tokenizer_dir, tmp_path):
    directory = tmp_path / "images"
    directory.mkdir()
    records = []
    for index, (width, height) in enumerate([(40, 10), (20, 50), (30, 30), (16, 16)]):
        _image(width, height, ("red", "blue")[index % 2]).save(directory / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": ("red", "blue")[index % 2]}]})
    (directory / "data.json").write_text(json.dumps(records))
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1

    def run(output: str, cache: str | None) -> list[float]:
        highres, bridge, vision = CACHED[strategy]
        model = tiny_model_config(tokenizer_dir, vocab, highres=highres, bridge=bridge, vision=vision)
        config = RunConfig(model=model, output_dir=output, seed=0, stages=[
            {"name": "align", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 2, "precision": "fp32",
             "steps": 3}], data={"sources": [{"path": str(directory / "data.json")}], "feature_cache": cache})
        return [record["loss"] for record in train(config, progress=False).history]

    plain = run(str(tmp_path / "plain"), None)
    cached = run(str(tmp_path / "cached"), str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert cached == pytest.approx(plain, rel=1e-5)


def test_errors_name_what_is_wrong(anyres_model, make_model):
    processor = anyres_model.processor()
    inputs = processor.prompt_inputs("What colour?", [_image(40, 10)])
    ids = inputs["input_ids"][None]
    with pytest.raises(ValueError, match="needs image_sizes"):
        anyres_model(ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="need 5 crops but pixel_values holds 4"):
        anyres_model(ids, pixel_values=inputs["pixel_values"], image_sizes=torch.tensor([[30, 30]]))
    with pytest.raises(ValueError, match="anyres lays visual tokens out in rows, but the PerceiverResampler bridge's "
                                         "tokens have no place in the image"):
        make_model(highres=ANYRES, bridge={"type": "perceiver", "num_latents": 5})
    with pytest.raises(ValueError, match="input-token bridges"):
        make_model(highres=ANYRES, bridge={"type": "mma"})
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        make_model(highres={"type": "anyres", "grid": [[0, 2]]})
    with pytest.raises(KeyError, match="known: anyres"):
        make_model(highres={"type": "anyress"})


def test_info_reports_tokens_and_encoder_flops_per_image_size(anyres_model, make_model, tmp_path, capsys):
    from mmbridge.cli import main
    from mmbridge.model.highres.compute import image_cost

    base = make_model()
    single = image_cost(base.vision, base.bridge, None, (1000, 1000))  # one crop whatever the size
    assert (single.crops, single.visual_tokens, single.separator_tokens) == (1, 16, 0)
    assert single.encoder_flops > 0 and single.bridge_flops == 2 * 16 * (32 * 32 + 32 * 32)  # two 32×32 linears
    wide = image_cost(anyres_model.vision, anyres_model.bridge, anyres_model.highres, (8, 40))
    assert wide.crops == 4 and wide.visual_tokens == anyres_model.highres.layout((8, 40)).visual_tokens
    assert wide.encoder_flops == 4 * single.encoder_flops and wide.bridge_flops == 4 * single.bridge_flops
    anyres_model.save_pretrained(str(tmp_path / "model"))
    assert main(["info", "--model", str(tmp_path / "model"), "--image-size", "40x8", "16x16"]) == 0
    printed = capsys.readouterr().out
    assert "high resolution: type=anyres" in printed
    assert "8×40" in printed and "16×16" in printed and "encoder FLOPs" in printed
    with pytest.raises(SystemExit):
        main(["info", "--model", str(tmp_path / "model"), "--image-size", "40by8"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_region_words_refuses_a_high_resolution_model(anyres_model):
    from mmbridge.train.region_words import check_grid

    with pytest.raises(ValueError, match="region_words reads one token grid"):
        check_grid(anyres_model)
