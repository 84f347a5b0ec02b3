"""LaVIN's mixture-of-modality adapters: per-sample routing by modality, kept while decoding; a tiny trainable part."""

from __future__ import annotations

import pytest
import torch

from conftest import build_with_llm as build, image_batch, waken
from mmbridge.model.bridges import FusionCall


def test_router_mixes_paths_by_whether_the_sample_holds_an_image(tokenizer_dir):
    model = build(tokenizer_dir, {"type": "mma"})
    waken(model, scale=1.0)
    adapter = next(iter(model.bridge.adapters.values()))
    call = FusionCall(torch.zeros(2, 3, dtype=torch.bool), prompt=torch.tensor([False, True]))
    with model.llm.use_context(call):
        weights = adapter.path_weights(2)  # [2, paths]
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert (weights[0] - weights[1]).abs().max() > 1e-3


def test_each_sample_is_routed_by_its_own_modality_in_a_mixed_batch(tokenizer_dir):
    model = build(tokenizer_dir, {"type": "mma"})
    waken(model)
    batch = image_batch(model)
    text = torch.randint(5, 200, (1, batch["input_ids"].shape[1]), generator=torch.Generator().manual_seed(4))
    mixed = torch.cat([text, batch["input_ids"][:1]])  # row 0 text only, row 1 with an image
    with torch.no_grad():
        together = model(mixed, torch.ones_like(mixed), batch["pixel_values"][:1]).logits
        alone = model(text, torch.ones_like(text)).logits
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-5)


def test_decoding_keeps_the_prompts_modality(tokenizer_dir):
    """Decode steps feed text tokens only; the prompt's modality must still pick the paths (with the cache
    a step sees one token, without it the whole sequence with its image: the two agree only if it is kept)."""
    model = build(tokenizer_dir, {"type": "mma"})
    waken(model, scale=1.0)
    batch = image_batch(model)
    settings = {"max_new_tokens": 10, "eos_token_id": []}
    cached = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **settings)
    uncached = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], use_cache=False,
                              **settings)
    assert torch.equal(cached, uncached)
    forgetful = model.prompt_state
    model.prompt_state = lambda *args: None  # a decoder that forgets: steps would route as text-only
    try:
        assert not torch.equal(model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                              **settings), cached)
    finally:
        model.prompt_state = forgetful


def test_trainable_part_is_the_adapters_routers_modality_tokens_and_projector(tokenizer_dir):
    model = build(tokenizer_dir, {"type": "mma", "rank": 4, "paths": 3})
    hidden, rank, paths, layers, sites = 32, 4, 3, 2, 2
    per_site = (hidden * rank + rank) + paths * (rank * hidden + hidden) + (hidden * paths + paths)
    projector = sum(parameter.numel() for parameter in model.bridge.projector.parameters())
    expected = layers * sites * per_site + 2 * hidden + projector
    assert sum(parameter.numel() for parameter in model.bridge.parameters()) == expected


@pytest.mark.parametrize("spec, message", [
    ({"type": "mma", "rank": 0}, "rank must be >= 1"),
    ({"type": "mma", "temperature": 0}, "temperature must be > 0"),
    ({"type": "mma", "sites": ["cross_attn"]}, "no submodule 'cross_attn'"),
])
def test_bad_specs_name_what_is_wrong(tokenizer_dir, spec, message):
    with pytest.raises(ValueError, match=message):
        build(tokenizer_dir, spec)
