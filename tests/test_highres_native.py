"""Native resolution (Fuyu / OtterHD): one crop per image at its own size, row-end ids after each row of tokens,
with the ``patch`` encoder, EfficientNet-Lite0 and an HF CLIP tower; processor → forward, generation, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.data.collate import collate, model_inputs
from mmbridge.data.formats.llava import Sample
from mmbridge.eval import harness
from mmbridge.interop import fuyu_inputs
from mmbridge.model.highres.native import encoder_stride
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image

PATCH = {"type": "patch", "patch_size": 4, "image_size": 16}
EFFICIENTNET = {"type": "efficientnet_lite0", "pretrained": False, "image_size": 64}
LINEAR = {"type": "mlp", "depth": 1}  # one nn.Linear with bias: Fuyu's vision_embed_tokens
NATIVE = {"type": "native", "max_size": [40, 56]}
ENCODERS = {"patch": PATCH, "efficientnet": EFFICIENTNET, "clip": None}  # None: the tiny CLIP of tiny_model_config
QUESTION = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "red"}]


def _image(width: int, height: int, colour: str = "red") -> Image.Image:
    return shape_image(colour, "circle", size=max(width, height)).resize((width, height))


def _native_model(make_model, encoder: str = "patch", **highres) -> MultimodalModel:
    model = make_model(vision=ENCODERS[encoder], bridge=LINEAR, highres={**NATIVE, **highres})
    with torch.no_grad():  # wide weights: a token in the wrong place changes the logits visibly
        for parameter in model.bridge.parameters():
            parameter.normal_(0, 0.5 if encoder != "efficientnet" else 0.05)
    return model


@pytest.fixture()
def patch_model(make_model) -> MultimodalModel:
    return _native_model(make_model)


def test_layout_counts_rows_and_row_end_ids_at_odd_sizes(patch_model):
    newline = patch_model.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    image = patch_model.image_token_id
    layout = patch_model.highres.layout((23, 37))  # padded to 24x40: 6 rows of 10 patches
    assert layout.crops[0].size == (24, 40) and layout.extra["token_grid"] == (6, 10)
    assert layout.tokens.count(newline) == 6 and layout.visual_tokens == 60 and len(layout.tokens) == 66
    assert patch_model.image_token_ids((23, 37)) == ([image] * 10 + [newline]) * 6
    assert patch_model.image_token_ids((3, 5)) == [image, image, newline]  # smaller than a patch: padded to 4x8
    tall = patch_model.highres.layout((100, 37))  # over max_size 40x56: scaled by 0.4 to 40x14, padded to 40x16
    assert tall.extra["scaled"] == (40, 14) and tall.crops[0].size == (40, 16) and len(tall.tokens) == 10 * 5
    assert patch_model.highres.layout((39, 56)).extra["scaled"] == (39, 56)  # fits: never scaled up or down


def test_row_end_none_and_other_strides(make_model):
    plain = _native_model(make_model, row_end=None)
    assert plain.image_token_ids((23, 37)) == [plain.image_token_id] * 60
    efficientnet = _native_model(make_model, "efficientnet")
    assert efficientnet.highres.stride == 32 and encoder_stride(efficientnet.vision) == 32
    assert efficientnet.highres.layout((23, 37)).crops[0].size == (32, 64)  # 1 row of 2 cells + row end
    assert len(efficientnet.highres.layout((23, 37)).tokens) == 3
    assert _native_model(make_model, "clip").highres.stride == 4  # the tower's patch size
    assert _native_model(make_model, stride=8).highres.layout((23, 37)).crops[0].size == (24, 40)


def test_crop_pads_bottom_right_with_fuyus_colour(patch_model):
    image = Image.new("RGB", (37, 23), (200, 100, 50))
    (crop,) = patch_model.highres.crop(image)
    pixels = np.asarray(crop)
    assert crop.size == (40, 24)
    assert (pixels[:23, :37] == (200, 100, 50)).all() and (pixels[23:] == 1).all() and (pixels[:, 37:] == 1).all()
    values = patch_model.highres.pixel_values(image)  # [1, 3, 24, 40], normalised
    assert values.shape == (1, 3, 24, 40)
    torch.testing.assert_close(values[0, :, 23, 39], torch.full((3,), (1 / 255 - 0.5) / 0.5))


@pytest.mark.parametrize("encoder", ["patch", "efficientnet", "clip"])
def test_processor_example_trains_and_batches_of_sizes_equal_each_alone(make_model, encoder):
    model = _native_model(make_model, encoder)
    processor = model.processor()
    newline = model.highres.row_end_id
    images = [_image(37, 23), _image(20, 50, "blue")]
    examples = [processor(Sample(id=str(index), images=["x"], conversation=QUESTION), images=[image])
                for index, image in enumerate(images)]
    for example, image in zip(examples, images):
        layout = model.highres.layout((image.height, image.width))
        ids = example["input_ids"].tolist()
        start = ids.index(model.image_token_id)
        assert ids[start:start + len(layout.tokens)] == model.image_token_ids((image.height, image.width))
        assert ids[start + len(layout.tokens) - 1] == newline and example["labels"][start] == -100
        assert example["pixel_values"].shape == (1, 3, *layout.crops[0].size)
        assert example["image_sizes"].tolist() == [[image.height, image.width]]
    batch = model_inputs(collate(examples, processor.pad_token_id))
    model.requires_grad_(False)
    model.bridge.requires_grad_(True)
    output = model(**batch)
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.bridge.linear_1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        together = model(**batch).logits
        for row, example in enumerate(examples):
            alone = model(**model_inputs(collate([example], processor.pad_token_id))).logits[0]
            torch.testing.assert_close(together[row, :len(example["input_ids"])], alone, atol=1e-5, rtol=1e-5)


def test_generation_with_cache_equals_without(patch_model):
    processor = patch_model.processor()
    prompts = [processor.prompt_inputs("What colour?", [image]) | {"id": str(index)}
               for index, image in enumerate([_image(37, 23), _image(20, 50, "blue")])]
    batch = collate(prompts, processor.pad_token_id, padding_side="left")
    inputs = dict(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                  max_new_tokens=6, do_sample=False)
    cached = patch_model.generate(batch["input_ids"], batch["attention_mask"], **inputs)
    plain = patch_model.generate(batch["input_ids"], batch["attention_mask"], use_cache=False, **inputs)
    assert cached.shape == (2, 6) and torch.equal(cached, plain)
    answer = patch_model.chat("What colour?", images=[_image(30, 30)], max_new_tokens=3)
    expected = harness.generate_answers(patch_model, [harness.Prompt("<image>\nWhat colour?", [_image(30, 30)])],
                                        max_new_tokens=3, batch_size=1)
    assert [answer] == expected  # chat answers as the harness decodes the same greedy tokens


def test_patchified_inputs_without_sizes_give_the_same_logits(patch_model):
    """transformers' Fuyu tensors (patches [N_total, 3·p·p] or [n, N, 3·p·p], no image sizes), converted by
    :func:`mmbridge.interop.fuyu_inputs`, give what the model's own crops and sizes give."""
    inputs = patch_model.processor().prompt_inputs("What colour?", [_image(37, 23)])
    ids = inputs["input_ids"][None]
    patches = patch_model.vision(inputs["pixel_values"])  # [1, 60, 48]
    with torch.no_grad():
        expected = patch_model(ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        flat = patch_model(ids, **fuyu_inputs(patch_model, {"pixel_values": patches[0]}))
        batched = patch_model(ids, **fuyu_inputs(patch_model, {"pixel_values": patches}))
    assert torch.equal(flat.logits, expected.logits) and torch.equal(batched.logits, expected.logits)


def test_save_and_load_give_identical_logits(make_model, tmp_path):
    model = _native_model(make_model, row_end=",")
    inputs = model.processor().prompt_inputs("What colour?", [_image(20, 50)])
    model.save_pretrained(str(tmp_path / "model"))
    saved = json.load(open(tmp_path / "model" / "config.json"))["model"]
    assert saved["highres"] == {"type": "native", "max_size": [40, 56], "row_end": ",", "pad_colour": [1, 1, 1],
                                "stride": None}
    assert saved["vision"]["type"] == "patch" and saved["bridge"]["depth"] == 1
    loaded = MultimodalModel.from_pretrained(str(tmp_path / "model"))
    arguments = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        assert torch.equal(loaded(inputs["input_ids"][None], **arguments).logits,
                           model(inputs["input_ids"][None], **arguments).logits)


def test_errors_name_what_is_wrong(make_model, patch_model):
    with pytest.raises(ValueError, match="native row_end 'What colour' must be one token"):
        _native_model(make_model, row_end="What colour")
    with pytest.raises(ValueError, match=r"max_size is \[height, width\]"):
        _native_model(make_model, max_size=[40])
    with pytest.raises(ValueError, match="pad_colour"):
        _native_model(make_model, pad_colour=[0, 0, 300])
    with pytest.raises(ValueError, match="native lays visual tokens out in rows, but the PerceiverResampler bridge's "
                                         "tokens have no place in the image"):
        make_model(vision=PATCH, bridge={"type": "perceiver", "num_latents": 5}, highres=NATIVE)
    inputs = patch_model.processor().prompt_inputs("What colour?", [_image(37, 23)])
    ids = inputs["input_ids"].tolist()
    ids.remove(patch_model.image_token_id)  # one slot short of the image's 60
    with pytest.raises(ValueError, match="hold 59 <image> token positions but the images' visual tokens number 60"):
        patch_model(torch.tensor([ids]), pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
