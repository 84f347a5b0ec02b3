"""MultimodalModel: splicing, counts, label-only loss, bridges, LLM families, save/load."""

from __future__ import annotations

import pytest
import torch

from conftest import image_prompt
from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges import BRIDGES
from mmbridge.model.grid import FeatureGrid
from mmbridge.model.lora import LoraSpec
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.registry import Registry
from mmbridge.testing import tiny_llm_config

TEXT = [5, 6, 7, 8]


@pytest.mark.parametrize("bridge", [{"type": "linear"}, {"type": "mlp", "depth": 2, "activation": "gelu"},
                                    {"type": "mlp", "depth": 3, "activation": "silu", "hidden_dim": 24},
                                    {"type": "swiglu", "hidden_dim": 40}])
def test_bridges_shapes_and_token_counts(make_model, bridge):
    model = make_model(bridge=bridge)
    features = torch.randn(3, 16, model.vision.feature_dim)
    tokens = model.bridge(features, FeatureGrid(4, 4))
    assert tokens.shape == (3, model.bridge.num_tokens(FeatureGrid(4, 4)), model.llm.hidden_size)
    ids = image_prompt(model, TEXT, images=2)
    output = model(ids, pixel_values=torch.randn(2, 3, 16, 16))
    assert output.logits.shape == (1, ids.shape[1], model.llm.config.vocab_size)


def test_visual_tokens_land_at_placeholders(make_model):
    model = make_model()
    ids = image_prompt(model, TEXT, images=1)
    pixels = torch.randn(1, 3, 16, 16)
    embeds = model.embed(ids, pixels)
    visual = model.encode_images(pixels)[0]
    start = len(TEXT)
    assert torch.equal(embeds[0, start:start + model.tokens_per_image], visual)
    assert torch.equal(embeds[0, :start], model.llm.embed_tokens(ids[:, :start])[0])


def test_placeholder_image_count_mismatch_names_both_counts(make_model):
    model = make_model()
    ids = image_prompt(model, TEXT, images=2)
    with pytest.raises(ValueError, match=r"32 <image> token positions.*1 image\(s\) × 16 visual tokens = 16"):
        model(ids, pixel_values=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)


def test_label_only_loss_equals_full_logits_loss(make_model):
    model = make_model()
    ids = image_prompt(model, TEXT, images=1)
    labels = ids.clone()
    labels[:, : len(TEXT) + model.tokens_per_image] = -100
    output = model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=labels)
    reference = torch.nn.functional.cross_entropy(output.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert output.num_label_tokens == len(TEXT)
    torch.testing.assert_close(output.loss, reference, rtol=1e-6, atol=1e-6)
    no_logits = model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=labels, return_logits="none")
    assert no_logits.logits is None


def test_frozen_vision_runs_without_autograd_but_bridge_gets_gradients(make_model):
    model = make_model()
    model.vision.requires_grad_(False)  # tests may set flags directly; the library leaves it to apply_stage
    model.llm.requires_grad_(False)
    ids = image_prompt(model, TEXT)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bridge.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.llm.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_llm_families(make_model, tokenizer_dir, family):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    model = make_model(llm={"hf_config": tiny_llm_config(vocab, model_type=family)})
    assert model.llm.config.model_type == family
    ids = image_prompt(model, TEXT)
    assert model(ids, pixel_values=torch.randn(1, 3, 16, 16)).logits.shape[-1] == vocab


def test_save_and_reload_gives_identical_logits(make_model, tmp_path):
    model = make_model()
    model.add_lora("llm", LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    ids = image_prompt(model, TEXT, images=2)
    pixels = torch.randn(2, 3, 16, 16)
    expected = model(ids, pixel_values=pixels).logits
    model.save_pretrained(str(tmp_path / "saved"))
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert files == ["config.json", "model.safetensors", "processor.json", "tokenizer"]
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "saved"))
    assert torch.equal(reloaded(ids, pixel_values=pixels).logits, expected)
    assert reloaded.image_token_id == model.image_token_id
    assert reloaded.tokenizer.convert_ids_to_tokens(model.image_token_id) == "<image>"


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        MultimodalModel.from_pretrained(str(tmp_path))


def test_registry_errors_list_known_keys_and_fields():
    with pytest.raises(KeyError, match=r"unknown bridge .qformr.; known: .*linear.*mlp.*swiglu"):
        BRIDGES.build({"type": "qformr"}, 8, 8)
    with pytest.raises(ValueError, match=r"bridge 'mlp': unknown field\(s\) \['deepth'\]; valid fields"):
        BRIDGES.make_config({"type": "mlp", "deepth": 2})
    with pytest.raises(ValueError, match="needs a 'type'"):
        BRIDGES.make_config({"depth": 2})
    registry = Registry("thing")
    with pytest.raises(TypeError, match="must be a dataclass"):
        registry.register("x", dict)


def test_bridge_inputs_and_the_grid_reach_the_bridge_and_unknown_arguments_fail(make_model):
    model = make_model()
    seen = {}
    original = model.bridge.forward

    def recording_forward(features, grid, inputs=None):
        seen.update(grid=grid, inputs=inputs)
        return original(features, grid)

    model.bridge.forward = recording_forward
    ids = image_prompt(model, TEXT)
    text_ids = torch.tensor([[3, 4, 5]])
    extras = BridgeInputs(text_ids, torch.ones_like(text_ids))
    model(ids, pixel_values=torch.randn(1, 3, 16, 16), bridge_inputs=extras)
    assert seen["inputs"] is extras and seen["grid"] == model.vision.feature_layout() == FeatureGrid(4, 4)
    with pytest.raises(TypeError, match="image_grid_thw"):
        model(ids, pixel_values=torch.randn(1, 3, 16, 16), image_grid_thw=[(1, 4, 4)])
    with pytest.raises(TypeError, match="image_sizes are for models with a high-resolution strategy"):
        model(ids, pixel_values=torch.randn(1, 3, 16, 16), image_sizes=torch.tensor([[16, 16]]))


def test_llm_storage_dtype_survives_save_and_reload(make_model, tmp_path):
    model = make_model(llm={"dtype": "bfloat16"})
    assert next(model.llm.parameters()).dtype == torch.bfloat16
    model.save_pretrained(str(tmp_path / "bf16"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "bf16"))
    assert next(reloaded.llm.parameters()).dtype == torch.bfloat16
