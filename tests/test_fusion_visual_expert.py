"""CogVLM's visual expert: token-type routing, experts start as copies, one position id per image."""

from __future__ import annotations

import pytest
import torch

from mmbridge.model.fusion.base import shared_image_positions
from conftest import build_with_llm as build, image_batch, waken


def test_all_tokens_of_an_image_share_one_position_and_text_continues():
    image = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)  # text, 2 images of 2, text, image
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])  # one left pad
    positions = shared_image_positions(image, mask, tokens_per_image=2)
    assert positions.tolist() == [[0, 0, 1, 2, 2, 3, 3, 4, 5, 5, 6]]
    text_only = torch.zeros(1, 4, dtype=torch.bool)
    assert shared_image_positions(text_only, torch.tensor([[0, 1, 1, 1]]), 2).tolist() == [[0, 0, 1, 2]]


def test_model_positions_follow_the_bridge_and_can_be_turned_off(tokenizer_dir):
    batch = image_batch(build(tokenizer_dir, {"type": "visual_expert"}))
    shared = build(tokenizer_dir, {"type": "visual_expert"})
    positions = shared.position_ids(batch["input_ids"], batch["attention_mask"])
    tokens = shared.tokens_per_image
    assert positions[0].tolist() == [0, 1, 2] + [3] * tokens + [4, 5, 6, 7]
    plain = build(tokenizer_dir, {"type": "visual_expert", "shared_positions": False})
    assert plain.position_ids(batch["input_ids"], batch["attention_mask"])[0].tolist() == list(range(7 + tokens))


def test_fresh_experts_are_copies_so_images_read_as_through_the_projector_alone(tokenizer_dir):
    """With the positions of a plain model, a fresh visual expert equals an input-token model with its projector."""
    expert = build(tokenizer_dir, {"type": "visual_expert", "shared_positions": False})
    plain = build(tokenizer_dir, {"type": "swiglu"})
    plain.bridge.load_state_dict(expert.bridge.projector.state_dict())
    batch = image_batch(expert)
    with torch.no_grad():
        torch.testing.assert_close(expert(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-5)


def test_experts_change_visual_positions_and_what_attends_to_them_only(tokenizer_dir):
    model = build(tokenizer_dir, {"type": "visual_expert"})
    batch = image_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
        for parameter in model.bridge.layers.parameters():  # the experts, not the projector
            parameter.add_(0.3 * torch.randn_like(parameter))
        after = model(**batch).logits
    image_start = 3  # text, text, text, then the image
    assert torch.equal(after[:, :image_start], before[:, :image_start])  # text before the image: untouched
    assert (after[:, image_start:] - before[:, image_start:]).abs().amax(-1).min() > 1e-4  # every later position


@pytest.mark.parametrize("spec, message", [
    ({"type": "visual_expert", "modules": ["self_attn.qkv"]}, "no submodule 'self_attn.qkv'"),
    ({"type": "visual_expert", "layers": [5]}, "layer 5 does not exist; the LLM has 2"),
    ({"type": "visual_expert", "modules": []}, "'modules' is empty"),
])
def test_bad_specs_name_what_is_wrong(tokenizer_dir, spec, message):
    with pytest.raises(ValueError, match=message):
        build(tokenizer_dir, spec)


def test_experts_only_in_the_listed_layers(tokenizer_dir):
    model = build(tokenizer_dir, {"type": "visual_expert", "layers": [-1], "modules": ["mlp"]})
    assert sorted(model.bridge.layers) == ["1"] and list(model.bridge.layers["1"].experts) == ["mlp"]
    waken(model)
    batch = image_batch(model)
    cached = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5)
    uncached = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5,
                              use_cache=False)
    assert torch.equal(cached, uncached)
