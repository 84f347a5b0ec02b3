"""transformers' IdeficsForVisionText2Text ⇄ mmbridge gated_xattn: logits both ways (gates open, left padding,
different image counts per sample), greedy generation token for token, save/load, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from mmbridge.interop import from_hf_idefics, idefics_inputs, to_hf_idefics
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("idefics_tokenizer")))
    tokenizer.add_tokens(["<fake_token_around_image>", "<image>"], special_tokens=True)  # IDEFICS' additional vocab
    return tokenizer


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    config = IdeficsConfig(
        vocab_size=len(tokenizer) - 2, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, use_resampler=True,
        initializer_range=0.2,  # wide weights: images move the logits far beyond the tolerance
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_config={"embed_dim": 32, "image_size": 16, "patch_size": 4, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 64, "initializer_range": 0.2},
        perceiver_config={"resampler_n_latents": 4, "resampler_depth": 2, "resampler_n_heads": 2,
                          "resampler_head_dim": 8})
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # open the gates: closed ones would hide the cross-attention entirely
        for number, layer in enumerate(model.model.gated_cross_attn_layers):
            layer.alpha_cross_attn.fill_(0.6 + 0.2 * number)
            layer.alpha_dense.fill_(0.4 - 0.1 * number)
    return model


def batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two rows: the first left-padded with two images, the second with one (its second image slot padded);
    each token reads the last image before it, as IDEFICS' processor builds the mask."""
    image, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad, pad, 5, image, 7, 8, image, 9, 10], [5, 6, image, 7, 8, 9, 10, 11, 12]])
    attention_mask = (input_ids != pad).long()
    seen = (input_ids == image).long().cumsum(-1)  # [B, L]
    image_attention_mask = torch.nn.functional.one_hot((seen - 1).clamp(min=0), 2) * (seen > 0)[..., None]
    pixel_values = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pixel_values[1, 1] = 0  # the padded slot
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_attention_mask": image_attention_mask.long()}


def test_imported_model_gives_idefics_logits(hf_model, tokenizer):
    ours = from_hf_idefics(hf_model, tokenizer=tokenizer)
    inputs = batch(tokenizer)
    with torch.no_grad():
        theirs = hf_model(**inputs).logits
        mine = ours(**idefics_inputs(inputs)).logits
    real = inputs["attention_mask"].bool()
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine[real], theirs[real], rtol=0, atol=1e-4)
    assert (theirs[real] - hf_model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(1)}).logits[real]
            ).abs().max() > 1e-2  # the images matter, 100x the tolerance: the test could fail


def test_greedy_generation_matches_token_for_token(hf_model, tokenizer):
    ours = from_hf_idefics(hf_model, tokenizer=tokenizer)
    inputs = batch(tokenizer)
    image = tokenizer.convert_tokens_to_ids("<image>")  # mmbridge never generates it; IDEFICS' docs ban it too
    theirs = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=tokenizer.pad_token_id, bad_words_ids=[[image]])
    theirs = theirs[:, inputs["input_ids"].shape[1]:]
    mine = ours.generate(**idefics_inputs(inputs), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(mine, theirs)
    uncached = ours.generate(**idefics_inputs(inputs), max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert torch.equal(uncached, mine)


def test_export_gives_back_the_same_logits_after_training_moves_the_weights(hf_model, tokenizer, tmp_path):
    ours = from_hf_idefics(hf_model, tokenizer=tokenizer)
    with torch.no_grad():  # as training would: the bridge and the marker embedding move
        for parameter in ours.bridge.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
        ours.bridge.projector.time_embeddings.zero_()  # IDEFICS has no temporal embeddings
    inputs = batch(tokenizer)
    exported = to_hf_idefics(ours)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits[real], ours(**idefics_inputs(inputs)).logits[real],
                                   rtol=0, atol=1e-4)
    ours.save_pretrained(str(tmp_path))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(**idefics_inputs(inputs)).logits, ours(**idefics_inputs(inputs)).logits)
    assert to_hf_idefics(reloaded).config.vocab_size == hf_model.config.vocab_size


def test_lora_on_the_llm_is_merged_on_export(hf_model, tokenizer):
    from mmbridge.model.lora import LoraSpec

    ours = from_hf_idefics(hf_model, tokenizer=tokenizer)
    ours.add_lora("llm", LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2, generator=torch.Generator().manual_seed(3))
    inputs = batch(tokenizer)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        mine = ours(**idefics_inputs(inputs)).logits[real]
        assert (mine - hf_model(**inputs).logits[real]).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(to_hf_idefics(ours)(**inputs).logits[real], mine, rtol=0, atol=1e-4)


def test_refusals_name_what_has_no_counterpart(hf_model, tokenizer, make_model, tmp_path):
    with pytest.raises(ValueError, match="needs a gated_xattn bridge"):
        to_hf_idefics(make_model())
    ours = from_hf_idefics(hf_model, tokenizer=tokenizer)
    with torch.no_grad():
        ours.bridge.projector.time_embeddings.fill_(0.1)
    with pytest.raises(ValueError, match="no temporal embeddings"):
        to_hf_idefics(ours)
    with pytest.raises(ValueError, match="tokenizer must hold"):
        from_hf_idefics(hf_model, tokenizer=tiny_tokenizer(str(tmp_path / "plain")))  # lacks the image tokens
