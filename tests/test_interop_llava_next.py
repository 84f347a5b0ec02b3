"""Parity between mmbridge and transformers' ``LlavaNextForConditionalGeneration``, both directions.

Tiny random CLIP/SigLIP towers (16 px tiles, patch 4: a 4×4 patch grid per tile) and a tiny Llama whose
vocabulary is the tiny tokenizer plus ``<image>``; pinpoints of 1×2, 2×1, 2×2, 3×1 and 1×3 tiles. Every
batch is built by transformers' own ``LlavaNextProcessor`` (slow PIL image processor): ``pixel_values``
``[n_images, max_tiles, 3, 16, 16]``, ``image_sizes`` and left-padded ``input_ids`` holding its count of
image tokens, one image per row, three aspect ratios in one batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor, SiglipVisionConfig)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from mmbridge.interop import from_hf_llava_next, llava_next_inputs, to_hf_llava, to_hf_llava_next
from mmbridge.interop.llava_next import grid_to_pinpoints, pinpoints_to_grid
from mmbridge.model.lora import LoraSpec
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.testing import tiny_llm_config, tiny_tokenizer, tiny_vision_config

PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]  # (height, width) px: 1×2, 2×1, 2×2, 3×1, 1×3 tiles
SIZES = [(16, 40), (50, 20), (30, 30)]  # (height, width): wide, tall, square
PROMPTS = ["hi <image> what", "one two three four five six <image> yes", "<image> no"]
TOWERS = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
STRATEGY = {"clip": "default", "siglip": "full"}  # what leaves each tile's 4×4 patch grid
INIT_RANGE = 0.2  # large enough that a wrong image feature moves the logits far beyond the tolerance
LOGIT_TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny tokenizer with ``<image>`` appended (its id is the last of the vocabulary), left padding."""
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def _image_token_id(tokenizer: Any) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Seeded RGB noise of each (height, width): every resize and padding pixel shows."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for height, width in sizes]


def _hf_llava_next(tokenizer: Any, tower: str = "clip", layer: Any = -2, pinpoints: list = PINPOINTS,
                   strategy: str | None = None, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """A seeded tiny HF LLaVA-NeXT."""
    torch.manual_seed(seed)
    vision = TOWERS[tower](hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                       initializer_range=INIT_RANGE, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=_image_token_id(tokenizer),
                             vision_feature_select_strategy=strategy or STRATEGY[tower], vision_feature_layer=layer,
                             image_grid_pinpoints=pinpoints)
    return LlavaNextForConditionalGeneration(config).eval()


def _mmbridge_model(tokenizer: Any, tower: str = "clip", select: str = "default", highres: Any = "anyres",
                    seed: int = 0) -> MultimodalModel:
    """A seeded tiny mmbridge anyres model built from config (no HF LLaVA-NeXT involved), with wide weights."""
    torch.manual_seed(seed)
    spec = {"type": "anyres", "grid": pinpoints_to_grid(PINPOINTS, 16)} if highres == "anyres" else highres
    config = ModelConfig(
        vision={"type": "hf", "hf_config": tiny_vision_config(f"{tower}_vision_model"), "select": select},
        llm={"type": "hf", "hf_config": tiny_llm_config(len(tokenizer), initializer_range=INIT_RANGE,
                                                        eos_token_id=tokenizer.eos_token_id)},
        bridge={"type": "mlp", "depth": 2, "activation": "gelu"}, image_token_id=_image_token_id(tokenizer),
        highres=spec)
    model = MultimodalModel.from_config(config, tokenizer=tokenizer)
    torch.nn.init.normal_(model.bridge.linear_1.weight, std=INIT_RANGE)
    return model.eval()


def _hf_processor(tokenizer: Any, tower: str = "clip", pinpoints: list = PINPOINTS,
                  **image_settings: Any) -> LlavaNextProcessor:
    """transformers' processor with the slow (PIL) image processor for 16-px tiles."""
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=pinpoints, **image_settings)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                              vision_feature_select_strategy=STRATEGY[tower],
                              num_additional_image_tokens=1 if tower == "clip" else 0)


def _batch(tokenizer: Any, model: MultimodalModel, tower: str = "clip") -> dict[str, torch.Tensor]:
    """HF's tensors for three images of different aspect ratios in one left-padded batch, labels on the last 2
    tokens; the image-token count of every row must be ours for that image size."""
    batch = dict(_hf_processor(tokenizer, tower)(text=PROMPTS, images=_images(SIZES), padding=True,
                                                  return_tensors="pt"))
    assert batch["pixel_values"].shape == (3, 5, 3, 16, 16)  # [n_images, max_tiles, 3, H, W]: 1 + 4 crops at most
    assert batch["image_sizes"].tolist() == [list(size) for size in SIZES]
    assert (batch["attention_mask"] == 0).any()  # left padding is exercised
    for row, size in zip(batch["input_ids"], SIZES):
        assert int((row == model.image_token_id).sum()) == len(model.image_token_ids(size))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    return {**batch, "labels": labels}


def _assert_parity(model: MultimodalModel, hf_model: LlavaNextForConditionalGeneration, tokenizer: Any,
                   tower: str, name: str) -> None:
    """Logits (real positions) to 1e-4 and the label loss to 1e-5; the pixels must visibly matter."""
    batch = _batch(tokenizer, model, tower)
    with torch.no_grad():
        expected = hf_model(**batch)
        ours = model(**llava_next_inputs(model, batch))
        mirrored = hf_model(**{**batch, "pixel_values": batch["pixel_values"].flip(-1)})
    real = batch["attention_mask"].bool()
    assert ours.logits.shape == expected.logits.shape
    print(f"{name}: largest logit difference {float((ours.logits[real] - expected.logits[real]).abs().max()):.1e}")
    torch.testing.assert_close(ours.logits[real], expected.logits[real], atol=LOGIT_TOLERANCE, rtol=0)
    torch.testing.assert_close(ours.loss, expected.loss, atol=LOSS_TOLERANCE, rtol=0)
    assert (mirrored.logits[real] - expected.logits[real]).abs().max() > 100 * LOGIT_TOLERANCE


# -- HF → mmbridge and mmbridge → HF -------------------------------------------------------------
@pytest.mark.parametrize("tower,layer,select", [("clip", -2, "default"), ("siglip", [-2, -1], "full")])
def test_from_hf_llava_next_matches_logits_and_loss(tokenizer, tower, layer, select) -> None:
    hf_model = _hf_llava_next(tokenizer, tower, layer)
    model = from_hf_llava_next(hf_model, tokenizer=tokenizer)
    assert not model.training and model.vision.select == select and model.vision.feature_layer == layer
    assert model.config.highres.grid == [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]
    assert model.config.highres.newline and model.config.highres.unpad
    assert torch.equal(model.bridge.image_newline, hf_model.model.image_newline)
    assert model.image_token_id == _image_token_id(tokenizer)
    _assert_parity(model, hf_model, tokenizer, tower, f"hf->mmbridge {tower}")


@pytest.mark.parametrize("tower,select,strategy", [("clip", "default", "default"), ("siglip", "default", "full")])
def test_to_hf_llava_next_matches_logits_and_loss(tokenizer, tower, select, strategy) -> None:
    model = _mmbridge_model(tokenizer, tower, select)
    hf_model = to_hf_llava_next(model)
    config = hf_model.config
    assert not hf_model.training
    assert config.image_grid_pinpoints == PINPOINTS and config.vision_feature_select_strategy == strategy
    assert config.image_token_id == model.image_token_id
    _assert_parity(model, hf_model, tokenizer, tower, f"mmbridge->hf {tower}")


def test_greedy_generation_matches_hf(tokenizer) -> None:
    hf_model = _hf_llava_next(tokenizer, seed=3)
    model = from_hf_llava_next(hf_model, tokenizer=tokenizer)
    batch = _batch(tokenizer, model)
    with torch.no_grad():
        expected = hf_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                     max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
        inputs = llava_next_inputs(model, {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values",
                                                                       "image_sizes")})
        ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert expected.shape == (3, 8)  # no early EOS: all eight steps of all three rows are compared
    assert ours.tolist() == expected.tolist()


# -- processor -----------------------------------------------------------------------------------
def test_processor_crops_equal_the_hf_image_processor(tokenizer, tmp_path) -> None:
    """Imported from a directory: the saved image settings reach our transform, and AnyRes cuts the crops
    transformers' slow image processor cuts (fit, black padding, tiles, global view), pixel for pixel."""
    processor = _hf_processor(tokenizer, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    processor.save_pretrained(tmp_path)
    _hf_llava_next(tokenizer, seed=1).save_pretrained(tmp_path)
    model = from_hf_llava_next(tmp_path)
    assert (model.vision.transform.mean, model.vision.transform.std) == ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    ours_processor = model.processor()
    for image in _images([*SIZES, (7, 53), (33, 17), (61, 100), (16, 16), (5, 5)], seed=4):
        ours = ours_processor.prompt_inputs("<image> what is it?", [image])["pixel_values"]  # [n_crops, 3, 16, 16]
        theirs = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        assert ours.shape[0] == len(model.highres.layout((image.height, image.width)).crops) <= theirs.shape[0]
        torch.testing.assert_close(ours, theirs[:ours.shape[0]], atol=1e-5, rtol=0)


# -- round trip, LoRA ----------------------------------------------------------------------------
def test_round_trip_keeps_every_tensor_and_field(tokenizer) -> None:
    hf_model = _hf_llava_next(tokenizer, "siglip", [-2, -1], seed=2)
    back = to_hf_llava_next(from_hf_llava_next(hf_model, tokenizer=tokenizer))
    original, returned = hf_model.state_dict(), back.state_dict()
    assert sorted(returned) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    for field in ("vision_feature_select_strategy", "vision_feature_layer", "projector_hidden_act",
                  "multimodal_projector_bias", "image_token_id", "image_grid_pinpoints", "tie_word_embeddings"):
        assert getattr(back.config, field) == getattr(hf_model.config, field), field


def test_lora_tuned_model_exports_merged_weights(tokenizer) -> None:
    model = _mmbridge_model(tokenizer)
    model.add_lora("llm", LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.eval()
    hf_model = to_hf_llava_next(model)
    assert not any("lora" in name for name in hf_model.state_dict())
    base = model.llm.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert (hf_model.model.language_model.layers[0].self_attn.q_proj.weight - base).abs().max() > 1e-2
    _assert_parity(model, hf_model, tokenizer, "clip", "mmbridge->hf clip+lora")


# -- refusals ------------------------------------------------------------------------------------
def test_pinpoints_map_to_tiles_and_others_are_refused(tokenizer) -> None:
    assert pinpoints_to_grid(PINPOINTS, 16) == [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]
    assert grid_to_pinpoints(pinpoints_to_grid(PINPOINTS, 16), 16) == PINPOINTS
    hf_model = _hf_llava_next(tokenizer, pinpoints=[[16, 32], [24, 16]])
    with pytest.raises(ValueError, match=r"\[24, 16\].*not a whole number of 16x16 tiles"):
        from_hf_llava_next(hf_model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not a whole number"):
        pinpoints_to_grid([[8, 16]], 16)


@pytest.mark.parametrize("tower,strategy,count", [("clip", "full", 17), ("siglip", "default", 15)])
def test_import_refuses_a_selection_that_is_not_a_patch_grid(tokenizer, tower, strategy, count) -> None:
    hf_model = _hf_llava_next(tokenizer, tower, strategy=strategy)
    with pytest.raises(ValueError, match=f"{strategy!r} on a {tower}_vision_model tower leaves {count} tokens"):
        from_hf_llava_next(hf_model, tokenizer=tokenizer)


def test_export_refuses_models_llava_next_cannot_run(tokenizer) -> None:
    with pytest.raises(ValueError, match="to_hf_llava_next needs an 'anyres'.*has none"):
        to_hf_llava_next(_mmbridge_model(tokenizer, highres=None))
    no_newline = {"type": "anyres", "grid": [[1, 2], [2, 1]], "newline": False}
    with pytest.raises(ValueError, match="newline=False"):
        to_hf_llava_next(_mmbridge_model(tokenizer, highres=no_newline))
    with pytest.raises(ValueError, match=r"no place in the image \(the encoder gives 15 tokens with no grid\)"):
        _mmbridge_model(tokenizer, "siglip", select="drop_first")  # a dropped patch leaves no grid to stitch
    with pytest.raises(ValueError, match="to_hf_llava: this model has a high-resolution strategy"):
        to_hf_llava(_mmbridge_model(tokenizer))
    with pytest.raises(TypeError, match="from_hf_llava_next takes a LlavaNextForConditionalGeneration"):
        from_hf_llava_next(to_hf_llava(_mmbridge_model(tokenizer, highres=None)), tokenizer=tokenizer)
