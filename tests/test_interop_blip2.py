"""Parity between mmbridge and transformers' BLIP-2 / InstructBLIP, both directions.

Tiny random HF models: a BLIP vision tower (hidden 32, 2 layers, 16 px, patch 4 → 17 tokens),
a Q-Former (hidden 32, 2–3 layers, 4 queries, cross-attention every 1 or 2 layers) and a
language model — decoder-only (OPT, BLIP-2's default, or Llama) or encoder–decoder (a
Flan-T5-shaped T5, as BLIP-2 FlanT5) — whose vocabulary is the tiny tokenizer plus the image
placeholder. ``input_ids`` carry ``num_query_tokens`` placeholders per image, as transformers
5's processors write them; with T5 they are the encoder's and ``labels`` the decoder's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                          InstructBlipVisionConfig, LlamaConfig, OPTConfig, T5Config)

from conftest import left_padded_pair
from mmbridge.interop import blip2_inputs, from_hf_blip2, from_hf_instructblip, to_hf_blip2, to_hf_instructblip
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.testing import tiny_llm_config, tiny_t5_config, tiny_tokenizer

LOGIT_TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-5
QUERIES, QFORMER_VOCAB = 4, 40
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 16, "patch_size": 4}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def _image_token_id(tokenizer: Any) -> int:
    return len(tokenizer)  # one past the tokenizer: pinned, never added to it


def _text_config(tokenizer: Any, lm: str) -> Any:
    vocab = len(tokenizer) + 1
    if lm == "t5":  # Flan-T5's shape: gated GELU, tied embeddings, decoder starts from the pad token
        return T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=vocab,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    if lm == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab,
                         word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that a wrong image, instruction or mask moves the logits far beyond the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name.lower():
                parameter.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                parameter.copy_(noise * (1.0 if "query_tokens" in name else 0.3))


def _hf_blip2(tokenizer: Any, lm: str = "opt", frequency: int = 2, seed: int = 0) -> Blip2ForConditionalGeneration:
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 cross_attention_frequency=frequency)
    config = Blip2Config(vision_config=Blip2VisionConfig(**TOWER), qformer_config=qformer,
                         text_config=_text_config(tokenizer, lm), num_query_tokens=QUERIES,
                         image_token_index=_image_token_id(tokenizer))
    model = Blip2ForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return model


def _hf_instructblip(tokenizer: Any, lm: str = "llama", frequency: int = 2,
                     seed: int = 0) -> InstructBlipForConditionalGeneration:
    qformer = InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=QFORMER_VOCAB, max_position_embeddings=32,
                                        cross_attention_frequency=frequency)
    config = InstructBlipConfig(vision_config=InstructBlipVisionConfig(**TOWER), qformer_config=qformer,
                                text_config=_text_config(tokenizer, lm), num_query_tokens=QUERIES,
                                image_token_index=_image_token_id(tokenizer))
    model = InstructBlipForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return model


def _batch(image_token_id: int, pad_id: int, instruct: bool, seed: int = 0,
           encoder_decoder: bool = False) -> dict[str, torch.Tensor]:
    """Two left-padded sequences (3 pads on the first), one image each, labels on the answer, Q-Former text.

    With ``encoder_decoder`` the labels are decoder targets ``[2, 4]`` (the second one padded with -100).
    """
    generator = torch.Generator().manual_seed(seed)
    batch = left_padded_pair(QUERIES, image_token_id, pad_id, generator)
    if encoder_decoder:
        batch["labels"] = torch.randint(5, image_token_id, (2, 4), generator=generator)
        batch["labels"][1, 3] = -100
    batch["pixel_values"] = torch.randn(2, 3, 16, 16, generator=generator)
    if instruct:
        batch["qformer_input_ids"] = torch.randint(1, QFORMER_VOCAB, (2, 6), generator=generator)
        batch["qformer_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return batch


def _assert_parity(model: MultimodalModel, hf_model: torch.nn.Module, tokenizer: Any, instruct: bool) -> None:
    """Logits (real positions) to 1e-4 and the loss to 1e-5; images (and instructions) must visibly matter."""
    encoder_decoder = model.llm.is_encoder_decoder
    batch = _batch(model.image_token_id, tokenizer.pad_token_id, instruct, encoder_decoder=encoder_decoder)
    with torch.no_grad():
        expected = hf_model(**batch)
        ours = model(**blip2_inputs(batch))
        other_images = hf_model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)})
    # decoder-only: every real position of the sequence; T5: every decoder position
    real = torch.ones(batch["labels"].shape, dtype=torch.bool) if encoder_decoder else batch["attention_mask"].bool()
    assert ours.logits.shape == expected.logits.shape
    torch.testing.assert_close(ours.logits[real], expected.logits[real], atol=LOGIT_TOLERANCE, rtol=0)
    torch.testing.assert_close(ours.loss, expected.loss, atol=LOSS_TOLERANCE, rtol=0)
    assert (other_images.logits[real] - expected.logits[real]).abs().max() > 100 * LOGIT_TOLERANCE
    if instruct:
        with torch.no_grad():
            other_text = hf_model(**{**batch, "qformer_input_ids": batch["qformer_input_ids"].flip(1)})
        assert (other_text.logits[real] - expected.logits[real]).abs().max() > 100 * LOGIT_TOLERANCE


# -- HF → mmbridge -------------------------------------------------------------------------------
@pytest.mark.parametrize("lm,frequency", [("opt", 2), ("llama", 1), ("t5", 2)])
def test_from_hf_blip2_matches_logits_and_loss(tokenizer, lm, frequency):
    hf_model = _hf_blip2(tokenizer, lm, frequency)
    model = from_hf_blip2(hf_model, tokenizer=tokenizer)
    assert not model.training and model.tokens_per_image == QUERIES
    assert model.config.bridge.type == "qformer" and model.bridge.qformer.vision_norm is None
    assert len(tokenizer) == _image_token_id(tokenizer)  # the image token was not added to the tokenizer
    _assert_parity(model, hf_model, tokenizer, instruct=False)


@pytest.mark.parametrize("lm,frequency", [("llama", 2), ("opt", 1), ("t5", 1)])
def test_from_hf_instructblip_matches_logits_and_loss(tokenizer, lm, frequency):
    hf_model = _hf_instructblip(tokenizer, lm, frequency)
    model = from_hf_instructblip(hf_model, tokenizer=tokenizer)
    assert model.config.bridge.type == "instruct_qformer"
    assert model.llm.is_encoder_decoder is (lm == "t5")
    _assert_parity(model, hf_model, tokenizer, instruct=True)


def test_t5_forward_takes_decoder_inputs_as_transformers_does(tokenizer):
    """Explicit ``decoder_input_ids`` and a ``decoder_attention_mask`` with a padded row give HF's logits."""
    hf_model = _hf_blip2(tokenizer, "t5", seed=6)
    model = from_hf_blip2(hf_model, tokenizer=tokenizer)
    batch = _batch(model.image_token_id, tokenizer.pad_token_id, instruct=False, seed=6, encoder_decoder=True)
    labels = batch.pop("labels")
    batch["decoder_input_ids"] = model.llm.decoder_start_ids(labels)
    batch["decoder_attention_mask"] = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])  # row 1 hides its 2nd token
    with torch.no_grad():
        expected, ours = hf_model(**batch), model(**batch)
        unmasked = hf_model(**{**batch, "decoder_attention_mask": None})
    real = batch["decoder_attention_mask"].bool()
    torch.testing.assert_close(ours.logits[real], expected.logits[real], atol=LOGIT_TOLERANCE, rtol=0)
    assert ours.loss is None and torch.equal(batch["decoder_input_ids"][:, 0],
                                             torch.full((2,), tokenizer.pad_token_id))
    assert (unmasked.logits[1, 2:] - expected.logits[1, 2:]).abs().max() > 100 * LOGIT_TOLERANCE  # the mask is used


# -- mmbridge → HF -------------------------------------------------------------------------------
def _mmbridge_model(tokenizer: Any, kind: str, tower_type: str, seed: int = 0, lm: str = "llama") -> MultimodalModel:
    """A seeded tiny BLIP-shaped mmbridge model built from config (no HF BLIP model involved)."""
    torch.manual_seed(seed)
    vision = {"type": "module", "target": "mmbridge.interop.blip2:BlipVisionTower",
              "kwargs": {"hf_config": {"model_type": tower_type, **TOWER}, "model_type": tower_type},
              "feature_dim": 32, "layout": "tokens", "num_tokens": 17}
    bridge = {"type": kind, "num_queries": QUERIES, "hidden_size": 32, "num_layers": 3, "num_heads": 4,
              "intermediate_size": 64, "vocab_size": QFORMER_VOCAB, "max_position_embeddings": 32,
              "vision_norm": False}
    vocab = len(tokenizer) + 1
    llm = {"type": "hf", "hf_config": tiny_llm_config(vocab, eos_token_id=tokenizer.eos_token_id) if lm == "llama"
           else tiny_t5_config(vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)}
    config = ModelConfig(vision=vision, llm=llm, bridge=bridge, image_token_id=_image_token_id(tokenizer))
    model = MultimodalModel.from_config(config, tokenizer=tokenizer)
    _randomise(model, seed)
    return model.eval()


@pytest.mark.parametrize("kind,tower,export,instruct,lm", [
    ("qformer", "blip_2_vision_model", to_hf_blip2, False, "llama"),
    ("qformer", "blip_2_vision_model", to_hf_blip2, False, "t5"),
    ("instruct_qformer", "instructblip_vision_model", to_hf_instructblip, True, "llama"),
    ("instruct_qformer", "instructblip_vision_model", to_hf_instructblip, True, "t5")])
def test_export_matches_logits_and_loss(tokenizer, kind, tower, export, instruct, lm):
    model = _mmbridge_model(tokenizer, kind, tower, lm=lm)
    hf_model = export(model)
    assert not hf_model.training
    assert hf_model.config.use_decoder_only_language_model is (lm == "llama")
    assert hf_model.config.num_query_tokens == QUERIES and hf_model.config.image_token_id == model.image_token_id
    _assert_parity(model, hf_model, tokenizer, instruct)


@pytest.mark.parametrize("make,importer,exporter", [(_hf_blip2, from_hf_blip2, to_hf_blip2),
                                                    (_hf_instructblip, from_hf_instructblip, to_hf_instructblip)])
@pytest.mark.parametrize("lm", ["llama", "t5"])
def test_round_trip_keeps_every_tensor(tokenizer, make, importer, exporter, lm):
    hf_model = make(tokenizer, lm=lm, seed=5)
    back = exporter(importer(hf_model, tokenizer=tokenizer))
    original, returned = hf_model.state_dict(), back.state_dict()
    assert sorted(returned) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name


# -- generation, directories, save/load ----------------------------------------------------------
@pytest.mark.parametrize("lm", ["llama", "t5"])
def test_greedy_generation_matches_hf(tokenizer, lm):
    hf_model = _hf_blip2(tokenizer, lm, seed=3)
    model = from_hf_blip2(hf_model, tokenizer=tokenizer)
    batch = _batch(model.image_token_id, tokenizer.pad_token_id, instruct=False, seed=3)
    input_ids, pixel_values = batch["input_ids"][1:], batch["pixel_values"][1:]  # batch 1, no padding
    with torch.no_grad():
        generated = hf_model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=6,
                                      do_sample=False, min_new_tokens=6)
    # a decoder-only LM returns prompt + answer, T5 the decoder start token + answer
    expected = generated[:, 1:] if lm == "t5" else generated[:, input_ids.shape[1]:]
    ours = model.generate(input_ids, pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6)
    assert expected.shape == (1, 6)
    assert ours.tolist() == expected.tolist()


def test_instructblip_generation_with_qformer_text_cache_agrees(tokenizer):
    model = from_hf_instructblip(_hf_instructblip(tokenizer, seed=4), tokenizer=tokenizer)
    batch = _batch(model.image_token_id, tokenizer.pad_token_id, instruct=True, seed=4)
    inputs = blip2_inputs({key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values",
                                                        "qformer_input_ids", "qformer_attention_mask")})
    cached = model.generate(**inputs, use_cache=True, max_new_tokens=5)
    uncached = model.generate(**inputs, use_cache=False, max_new_tokens=5)
    assert torch.equal(cached, uncached)


def test_from_directory_and_save_load(tokenizer, tmp_path):
    hf_model = _hf_instructblip(tokenizer, seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    model = from_hf_instructblip(tmp_path / "hf")
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab()
    _assert_parity(model, hf_model, tokenizer, instruct=True)
    model.save_pretrained(str(tmp_path / "ours"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "ours"))
    _assert_parity(reloaded, hf_model, tokenizer, instruct=True)


# -- refusals ------------------------------------------------------------------------------------
def test_export_refusals(tokenizer):
    model = _mmbridge_model(tokenizer, "qformer", "blip_2_vision_model")
    with pytest.raises(ValueError, match="'instruct_qformer' bridge"):
        to_hf_instructblip(model)
    normed = MultimodalModel.from_config(ModelConfig(
        vision=model.config.vision, llm=model.config.llm,
        bridge={**dataclasses.asdict(model.config.bridge), "vision_norm": True},
        image_token_id=model.image_token_id), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="vision_norm"):
        to_hf_blip2(normed)
