"""Parity between mmbridge and transformers' ``FuyuForCausalLM``, both directions.

A tiny random Fuyu: 4-px patches, a Persimmon decoder (hidden 32, 2 layers, 4 heads, qk layernorm, partial
rotary) whose vocabulary is the tiny tokenizer plus ``|SPEAKER|`` (the image token) and ``|NEWLINE|`` (the row
end). Fuyu's tensors are built as ``FuyuProcessor`` builds them — ``FuyuImageProcessorPil`` (downscale to fit,
pad with pixel value 1), crop to whole patches, ``patchify_image``, ``rows × (cols × |SPEAKER| + |NEWLINE|)``
then ``<s>`` and the text — for a left-padded batch of two images of different sizes; transformers 5.24's
``FuyuProcessor`` itself fails with its PIL image processor (numpy ``transpose`` on torch tensors in
``patchify_image``), and the torchvision one needs torchvision. Position ids: both sides get the attention
mask's running count explicitly (Fuyu's default is ``arange``, which counts the left padding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import FuyuConfig, FuyuForCausalLM, PersimmonConfig
from transformers.image_utils import SizeDict
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

from mmbridge.interop import from_hf_fuyu, fuyu_inputs, to_hf_fuyu
from mmbridge.model.multimodal import ModelConfig, MultimodalModel, positions_from_mask
from mmbridge.testing import shape_image, tiny_tokenizer, tiny_vision_config

PATCH, MAX_SIZE = 4, {"height": 24, "width": 32}
INIT_RANGE = 0.2  # large enough that a wrong image feature moves the logits far beyond the tolerance
LOGIT_TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-5
SIZES = [(23, 37), (13, 10)]  # (height, width): the first is scaled down to 19x32 and padded to 20x32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    tokenizer.add_tokens(["|SPEAKER|", "|NEWLINE|"], special_tokens=True)  # as in Fuyu's vocabulary
    return tokenizer


def _ids(tokenizer: Any) -> tuple[int, int]:
    speaker, newline = tokenizer.convert_tokens_to_ids(["|SPEAKER|", "|NEWLINE|"])
    return speaker, newline


def _text_config(tokenizer: Any, tie: bool = False) -> dict:
    return {"model_type": "persimmon", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": len(tokenizer), "max_position_embeddings": 256,
            "initializer_range": INIT_RANGE, "tie_word_embeddings": tie, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _hf_fuyu(tokenizer: Any, tie: bool = False, seed: int = 0) -> FuyuForCausalLM:
    torch.manual_seed(seed)
    text = dict(_text_config(tokenizer, tie))
    text.pop("model_type")
    config = FuyuConfig(text_config=PersimmonConfig(**text), image_size=16, patch_size=PATCH,
                        image_token_id=_ids(tokenizer)[0], initializer_range=INIT_RANGE, tie_word_embeddings=tie)
    return FuyuForCausalLM(config).eval()


def _mmbridge_fuyu(tokenizer: Any, bridge: dict | None = None, vision: dict | None = None,
                   highres: Any = "native", seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        vision=vision or {"type": "patch", "patch_size": PATCH, "image_size": 16},
        llm={"type": "hf", "hf_config": _text_config(tokenizer)}, bridge=bridge or {"type": "mlp", "depth": 1},
        image_token_id=_ids(tokenizer)[0], image_token="|SPEAKER|",
        highres={"type": "native", "max_size": [MAX_SIZE["height"], MAX_SIZE["width"]], "row_end": "|NEWLINE|"}
        if highres == "native" else highres)
    model = MultimodalModel.from_config(config, tokenizer=tokenizer)
    torch.nn.init.normal_(model.bridge.linear_1.weight, std=INIT_RANGE)
    return model.eval()


def _images() -> list[Image.Image]:
    return [shape_image(colour, "circle", size=max(size)).resize(size[::-1])
            for colour, size in zip(("red", "blue"), SIZES)]


def _fuyu_image(image: Image.Image, tokenizer: Any) -> tuple[torch.Tensor, list[int]]:
    """One image as FuyuProcessor makes it: patches ``[N, 3·p·p]`` and its span of ids (placeholders, row ends)."""
    processor = FuyuImageProcessorPil(size=MAX_SIZE, patch_size={"height": PATCH, "width": PATCH})
    processed = processor(image, return_tensors="pt")
    padded = np.asarray(processed["images"][0][0])  # [3, 24, 32]: downscaled to fit, padded with pixel value 1
    height = min(padded.shape[1], math.ceil(int(processed["image_unpadded_heights"][0][0]) / PATCH) * PATCH)
    width = min(padded.shape[2], math.ceil(int(processed["image_unpadded_widths"][0][0]) / PATCH) * PATCH)
    patches = processor.patchify_image(padded[:, :height, :width], SizeDict(height=PATCH, width=PATCH))
    speaker, newline = _ids(tokenizer)
    return torch.from_numpy(patches), ([speaker] * (width // PATCH) + [newline]) * (height // PATCH)


def _fuyu_batch(tokenizer: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fuyu's tensors for two prompts (image, ``<s>``, text), left-padded; labels on the last 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows, patches = [], []
    for image, length in zip(_images(), (5, 9)):
        image_patches, span = _fuyu_image(image, tokenizer)
        text = torch.randint(5, 300, (length,), generator=generator).tolist()
        rows.append(span + [tokenizer.bos_token_id] + text)
        patches.append(image_patches)
    longest = max(len(row) for row in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(row)) + row for row in rows])  # [2, L]
    attention_mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows])
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": positions_from_mask(attention_mask), "pixel_values": torch.cat(patches)}  # [N_total, 48]


def _assert_parity(model: MultimodalModel, hf_model: FuyuForCausalLM, tokenizer: Any) -> float:
    """Logits (real positions) to 1e-4 and the label loss to 1e-5; images must visibly matter. Returns the max
    logit difference."""
    batch = _fuyu_batch(tokenizer)
    with torch.no_grad():
        expected = hf_model(**batch)
        ours = model(**fuyu_inputs(model, batch))
        other_images = hf_model(**{**batch, "pixel_values": -batch["pixel_values"]})
    real = batch["attention_mask"].bool()
    assert ours.logits.shape == expected.logits.shape
    difference = float((ours.logits[real] - expected.logits[real]).abs().max())
    assert difference <= LOGIT_TOLERANCE
    torch.testing.assert_close(ours.loss, expected.loss, atol=LOSS_TOLERANCE, rtol=0)
    assert (other_images.logits[real] - expected.logits[real]).abs().max() > 100 * LOGIT_TOLERANCE
    return difference


# -- the image side ------------------------------------------------------------------------------
def test_native_processor_matches_fuyus_image_processing(tokenizer, tmp_path):
    """mmbridge's processor → crops → patch encoder gives FuyuImageProcessor's patches and FuyuProcessor's ids."""
    hf_model = _hf_fuyu(tokenizer)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    FuyuImageProcessorPil(size=MAX_SIZE, patch_size={"height": PATCH, "width": PATCH}).save_pretrained(tmp_path)
    model = from_hf_fuyu(tmp_path)
    assert model.config.highres.max_size == [24, 32] and model.vision.transform.resample == "bilinear"
    processor = model.processor()
    for image in _images():
        patches, span = _fuyu_image(image, tokenizer)
        crops = processor.encode_images([image])  # [1, 3, H, W]
        assert model.image_token_ids((image.height, image.width)) == span
        torch.testing.assert_close(model.vision(crops)[0], patches, atol=1e-6, rtol=0)
    inputs = processor.prompt_inputs("|SPEAKER|What colour?", _images()[:1])
    with torch.no_grad():  # mmbridge's own tensors (crops + sizes) and Fuyu's patches: the same logits
        own = model(inputs["input_ids"][None], pixel_values=inputs["pixel_values"],
                    image_sizes=inputs["image_sizes"]).logits
        fuyus = model(inputs["input_ids"][None],
                      **fuyu_inputs(model, {"pixel_values": _fuyu_image(_images()[0], tokenizer)[0]})).logits
        theirs = hf_model(inputs["input_ids"][None], pixel_values=_fuyu_image(_images()[0], tokenizer)[0]).logits
    torch.testing.assert_close(own, fuyus, atol=1e-5, rtol=0)  # patches equal to float rounding
    torch.testing.assert_close(own, theirs, atol=LOGIT_TOLERANCE, rtol=0)


# -- HF → mmbridge and back ----------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_from_hf_fuyu_matches_logits_and_loss(tokenizer, tie):
    hf_model = _hf_fuyu(tokenizer, tie=tie)
    model = from_hf_fuyu(hf_model, tokenizer=tokenizer)
    speaker, newline = _ids(tokenizer)
    assert not model.training and model.image_token_id == speaker and model.highres.row_end_id == newline
    assert type(model.llm.model).__name__ == "PersimmonForCausalLM" and model.bridge.depth == 1
    assert model.config.highres.max_size == [1080, 1920] and model.config.highres.pad_colour == [1, 1, 1]
    assert (model.llm.model.lm_head.weight is model.llm.model.model.embed_tokens.weight) is tie
    _assert_parity(model, hf_model, tokenizer)
    batch = _fuyu_batch(tokenizer)
    unpadded = {key: batch[key][1:] for key in ("input_ids", "attention_mask")}
    patches = batch["pixel_values"][-len(_fuyu_image(_images()[1], tokenizer)[0]):]
    with torch.no_grad():  # no padding: both sides' default (arange) position ids
        torch.testing.assert_close(model(**fuyu_inputs(model, {**unpadded, "pixel_values": patches[None]})).logits,
                                   hf_model(**unpadded, pixel_values=patches[None]).logits,
                                   atol=LOGIT_TOLERANCE, rtol=0)


def test_to_hf_fuyu_matches_logits_and_loss(tokenizer):
    model = _mmbridge_fuyu(tokenizer)
    hf_model = to_hf_fuyu(model)
    config = hf_model.config
    assert not hf_model.training and type(hf_model.model.language_model).__name__ == "PersimmonModel"
    assert (config.patch_size, config.image_size, config.image_token_id) == (PATCH, 16, model.image_token_id)
    _assert_parity(model, hf_model, tokenizer)


def test_greedy_generation_matches_hf_token_for_token(tokenizer):
    hf_model = _hf_fuyu(tokenizer, seed=3)
    model = from_hf_fuyu(hf_model, tokenizer=tokenizer)
    batch = _fuyu_batch(tokenizer, seed=3)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        expected = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    ours = model.generate(**fuyu_inputs(model, inputs), max_new_tokens=8, do_sample=False)
    assert expected.shape == (2, 8) and not (expected == model.image_token_id).any()  # mmbridge never emits it
    assert ours.tolist() == expected.tolist()


def test_round_trip_keeps_every_tensor(tokenizer):
    hf_model = _hf_fuyu(tokenizer, tie=True, seed=1)
    back = to_hf_fuyu(from_hf_fuyu(hf_model, tokenizer=tokenizer))
    original, returned = hf_model.state_dict(), back.state_dict()
    assert sorted(returned) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    for field in ("patch_size", "image_size", "image_token_id", "tie_word_embeddings", "num_channels"):
        assert getattr(back.config, field) == getattr(hf_model.config, field), field
    assert back.lm_head.weight is back.model.language_model.embed_tokens.weight


# -- refusals --------------------------------------------------------------------------------------
def test_import_refusals_name_the_problem(tokenizer, tmp_path):
    hf_model = _hf_fuyu(tokenizer)
    with pytest.raises(ValueError, match="from_hf_fuyu needs a tokenizer"):
        from_hf_fuyu(hf_model)
    plain = tiny_tokenizer(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"'\|NEWLINE\|', which must be one token of the tokenizer"):
        from_hf_fuyu(hf_model, tokenizer=plain)
    with pytest.raises(TypeError, match="takes a FuyuForCausalLM or a directory, got int"):
        from_hf_fuyu(3, tokenizer=tokenizer)
    hf_model.save_pretrained(tmp_path / "model")
    FuyuImageProcessorPil(patch_size={"height": 30, "width": 30}).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="patch_size .* differs from the model's patch_size 4"):
        from_hf_fuyu(tmp_path / "model", tokenizer=tokenizer)


@pytest.mark.parametrize("parts,message", [
    ({"vision": {"type": "hf", "hf_config": tiny_vision_config()}}, "needs the 'patch' vision encoder"),
    ({"bridge": {"type": "mlp", "depth": 2}}, "mlp' bridge of depth 1.*MLPBridge of depth 2"),
    ({"bridge": {"type": "mlp", "depth": 1, "bias": False}}, "has bias: false"),
    ({"highres": None}, "needs the 'native' high-resolution strategy.*got none"),
])
def test_export_refusals_name_the_problem(tokenizer, parts, message):
    model = _mmbridge_fuyu(tokenizer, **parts)
    with pytest.raises(ValueError, match=message):
        to_hf_fuyu(model)
