"""The speed paths change nothing: greedy tokens, losses and gradients equal the plain paths.

* decoding with the preallocated KV cache, no mask when nothing is padded and decode steps
  straight through the Llama layers gives the same greedy tokens as steps through
  ``MultimodalModel.forward`` with transformers' concatenating cache, as decoding without a
  cache, and as ``LlavaForConditionalGeneration.generate`` on the exported model — also when
  the cache outgrows its first allocation;
* ``image_features`` (cached encoder outputs) give the same logits as ``pixel_values``;
* casting frozen LLM weights to bf16 once per stage gives bit-identical losses and gradients
  to autocast casting them on every call, with a frozen LLM and with LoRA.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from mmbridge import generate as generation
from mmbridge.interop import to_hf_llava
from mmbridge.model.lora import LoraSpec
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.train import precision
from mmbridge.train.precision import FrozenBf16Weights, frozen_weights_in_bf16, resolve_precision
from mmbridge.train.recipe import StageConfig, apply_stage

NO_EOS: dict[str, Any] = {"eos_token_id": []}


@pytest.fixture(scope="module")
def model(tokenizer_dir: str) -> MultimodalModel:
    from transformers import AutoTokenizer

    from mmbridge.testing import tiny_model_config

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    config = tiny_model_config(tokenizer_dir, vocab)
    config["llm"]["hf_config"]["initializer_range"] = 0.2  # peaked logits: greedy paths would diverge on a bug
    return MultimodalModel.from_config(config).eval()


def _prompts(model: MultimodalModel, padded: bool) -> dict[str, torch.Tensor]:
    """One image per row; with ``padded`` a second, longer row, so the first is left-padded."""
    generator = torch.Generator().manual_seed(5)
    image = [model.image_token_id] * model.tokens_per_image
    rows = [torch.tensor([7, 8, 9] + image + [10, 11, 12, 13]),
            torch.tensor([9, 30, 31, 32, 33, 34, 35] + image + [40])]
    rows = rows if padded else rows[:1]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), model.tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = row
        attention_mask[index, length - len(row):] = 1
    pixel_values = torch.randn(len(rows), 3, 16, 16, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_tokens_equal_every_decoding_path(model, monkeypatch, padded):
    prompts = _prompts(model, padded)
    fast = model.generate(**prompts, max_new_tokens=12, **NO_EOS)
    no_cache = model.generate(**prompts, max_new_tokens=12, use_cache=False, **NO_EOS)
    hf_tokens = to_hf_llava(model).generate(**prompts, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                            pad_token_id=model.tokenizer.pad_token_id)
    monkeypatch.setattr(generation, "fast_step_decoder", lambda *args: None)  # steps through model.forward
    full_forward = model.generate(**prompts, max_new_tokens=12, **NO_EOS)
    monkeypatch.setattr(generation, "preallocated_cache", lambda *args: None)  # and transformers' own cache
    unoptimised = model.generate(**prompts, max_new_tokens=12, **NO_EOS)
    assert torch.equal(fast, no_cache) and torch.equal(fast, full_forward) and torch.equal(fast, unoptimised)
    assert torch.equal(fast, hf_tokens[:, prompts["input_ids"].shape[1]:])


def test_preallocated_cache_grows_past_its_capacity(model, monkeypatch):
    prompts = _prompts(model, padded=True)
    expected = model.generate(**prompts, max_new_tokens=8, **NO_EOS)
    real = generation.preallocated_cache
    layers: list = []

    def tiny(model_: Any, capacity: int) -> Any:
        cache = real(model_, 3)  # smaller than the prompt: the first update already grows
        layers.extend(cache.layers)
        return cache

    monkeypatch.setattr(generation, "preallocated_cache", tiny)
    assert torch.equal(model.generate(**prompts, max_new_tokens=8, **NO_EOS), expected)
    assert layers and all(isinstance(layer, generation.PreallocatedLayer) and layer.capacity >= layer.length
                          for layer in layers)


def test_fast_steps_only_for_unmodified_llama_decoders(model, tokenizer_dir):
    assert generation.fast_step_decoder(model) is model.llm.decoder
    replaced = copy.deepcopy(model)
    replaced.llm.replace_layer(0, torch.nn.Identity())  # as a fusion bridge would
    assert generation.fast_step_decoder(replaced) is None
    from mmbridge.testing import tiny_model_config

    gpt2 = {"model_type": "gpt2", "vocab_size": model.llm.config.vocab_size, "n_embd": 32, "n_layer": 2, "n_head": 4}
    other = MultimodalModel.from_config(tiny_model_config(tokenizer_dir, gpt2["vocab_size"], llm={"hf_config": gpt2}))
    assert generation.fast_step_decoder(other) is None


def test_image_features_give_the_logits_of_pixels(model):
    prompts = _prompts(model, padded=True)
    with torch.no_grad():
        from_pixels = model(**prompts).logits
        features = model.vision(prompts.pop("pixel_values"))
        from_features = model(**prompts, image_features=features).logits
    assert torch.equal(from_pixels, from_features)


def _loss_and_grads(model: MultimodalModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, return_logits="none").loss
    loss.backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_bf16_weights_are_bit_identical_to_autocast(model, lora):
    trained = copy.deepcopy(model)
    if lora:
        trained.add_lora("llm", LoraSpec(r=4, dropout=0.0))
    apply_stage(trained, StageConfig(train={"bridge": "full", "llm": "lora" if lora else "frozen"}), log=False)
    batch = _prompts(trained, padded=True)
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    batch["labels"][batch["input_ids"] == trained.image_token_id] = -100
    plain = _loss_and_grads(trained, batch)
    originals = {name: parameter.data_ptr() for name, parameter in trained.named_parameters()}
    with frozen_weights_in_bf16(trained, "bf16", exclude=set()) as frozen:
        assert len(frozen) > 0 and trained.llm.model.lm_head.weight.dtype == torch.bfloat16
        cast = _loss_and_grads(trained, batch)
        with frozen.fp32():
            assert all(parameter.dtype == torch.float32 for parameter in trained.parameters())
    assert torch.equal(plain[0], cast[0]) and plain[1].keys() == cast[1].keys()
    assert all(torch.equal(plain[1][name], cast[1][name]) for name in plain[1])
    assert all(parameter.data_ptr() == originals[name] and parameter.dtype == torch.float32
               for name, parameter in trained.named_parameters())  # the very fp32 tensors are back


def test_cast_skips_tied_trainable_and_excluded_weights(model):
    tied = copy.deepcopy(model)
    tied.llm.model.lm_head.weight = tied.llm.model.get_input_embeddings().weight
    apply_stage(tied, StageConfig(train={"bridge": "full"}), log=False)
    chosen = {id(parameter) for parameter in FrozenBf16Weights(tied, exclude=set()).casts}
    assert id(tied.llm.model.lm_head.weight) not in chosen  # shared with the embedding: never cast
    assert not chosen & {id(parameter) for parameter in tied.bridge.parameters()}
    q_proj = "llm.model.model.layers.0.self_attn.q_proj.weight"
    excluded = FrozenBf16Weights(tied, exclude={q_proj}).casts
    assert id(tied.get_parameter(q_proj)) in chosen and id(tied.get_parameter(q_proj)) not in map(id, excluded)


def test_bf16_falls_back_to_fp32_without_native_support(monkeypatch):
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    assert resolve_precision("bf16", torch.device("cpu")) == "fp32"
