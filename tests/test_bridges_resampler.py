"""Query and compression bridges: perceiver, qwen_resampler, pool, pixel_shuffle.

For each: shapes and ``num_tokens`` for several N, the full model's forward and loss, gradients
that reach exactly the bridge, the trainable set per stage, cache/no-cache generation parity and
save/load parity. Then the family specifics: temporal embeddings, sin-cos positions and grid hints,
exact pooling / space-to-depth values and the size errors.
"""

from __future__ import annotations

import pytest
import torch

from conftest import image_prompt
from mmbridge.model.bridges import BRIDGES, build_bridge
from mmbridge.model.bridges.compress import average_pool_grid, pixel_shuffle_grid
from mmbridge.model.bridges.qwen_resampler import sincos_1d
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.train import StageConfig, apply_stage

TEXT = [5, 6, 7, 8]
FEATURE_DIM, LLM_DIM = 32, 32  # the tiny CLIP tower's width and the tiny Llama's
BRIDGE_SPECS = {
    "perceiver": {"type": "perceiver", "num_latents": 8, "depth": 2, "heads": 4, "max_frames": 4},
    "qwen_resampler": {"type": "qwen_resampler", "num_queries": 9, "heads": 4},
    "pool": {"type": "pool", "kernel": 2},
    "pixel_shuffle": {"type": "pixel_shuffle", "factor": 2},
}
# N -> expected token count (the tiny tower gives N = 16)
EXPECTED_TOKENS = {
    "perceiver": {16: 8, 49: 8, 64: 8},
    "qwen_resampler": {16: 9, 49: 9, 64: 9},
    "pool": {16: 4, 49: 16, 64: 16},
    "pixel_shuffle": {16: 4, 36: 9, 64: 16},
}
ALIGN = {"name": "align", "train": {"bridge": "full"}, "precision": "fp32"}
INSTRUCT = {"name": "instruct", "precision": "fp32", "train": {"bridge": "full", "llm": {"mode": "lora", "r": 4}}}


def trainable_names(model: MultimodalModel) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def labelled_prompt(model: MultimodalModel) -> tuple[torch.Tensor, torch.Tensor]:
    """``text <image…> text`` ids and labels on the text after the image."""
    ids = image_prompt(model, TEXT)
    labels = ids.clone()
    labels[:, : len(TEXT) + model.tokens_per_image] = -100
    return ids, labels


# -- every bridge ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BRIDGE_SPECS))
def test_shapes_and_token_counts(name):
    torch.manual_seed(0)
    bridge = build_bridge(BRIDGE_SPECS[name], FEATURE_DIM, LLM_DIM)
    for count, expected in EXPECTED_TOKENS[name].items():
        assert bridge.num_tokens(count) == expected
        assert bridge(torch.randn(2, count, FEATURE_DIM)).shape == (2, expected, LLM_DIM)


@pytest.mark.parametrize("name", sorted(BRIDGE_SPECS))
def test_model_loss_and_gradients_reach_exactly_the_bridge(make_model, name):
    model = make_model(bridge=BRIDGE_SPECS[name])
    assert model.tokens_per_image == EXPECTED_TOKENS[name][16]
    apply_stage(model, StageConfig(**ALIGN), log=False)
    ids, labels = labelled_prompt(model)
    output = model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=labels)
    assert output.logits.shape == (1, ids.shape[1], model.llm.config.vocab_size)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for parameter_name, parameter in model.named_parameters():
        if parameter_name.startswith("bridge."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
        else:
            assert parameter.grad is None, parameter_name


@pytest.mark.parametrize("name", sorted(BRIDGE_SPECS))
def test_trainable_sets_per_stage(make_model, name):
    model = make_model(bridge=BRIDGE_SPECS[name])
    bridge = {parameter_name for parameter_name, _ in model.named_parameters() if parameter_name.startswith("bridge.")}
    apply_stage(model, StageConfig(**ALIGN), log=False)
    assert trainable_names(model) == bridge
    apply_stage(model, StageConfig(**INSTRUCT), log=False)
    lora = {parameter_name for parameter_name, _ in model.named_parameters() if "lora_" in parameter_name}
    assert lora and all(parameter_name.startswith("llm.") for parameter_name in lora)
    assert trainable_names(model) == bridge | lora


@pytest.mark.parametrize("name", sorted(BRIDGE_SPECS))
def test_generation_with_and_without_cache_agree(make_model, name):
    model = make_model(bridge=BRIDGE_SPECS[name])
    ids = image_prompt(model, TEXT)
    pixels = torch.randn(1, 3, 16, 16)
    settings = {"max_new_tokens": 5, "eos_token_id": []}
    cached = model.generate(ids, pixel_values=pixels, use_cache=True, **settings)
    uncached = model.generate(ids, pixel_values=pixels, use_cache=False, **settings)
    assert cached.shape == (1, 5)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", sorted(BRIDGE_SPECS))
def test_save_and_reload_gives_identical_logits(make_model, tmp_path, name):
    model = make_model(bridge=BRIDGE_SPECS[name])
    ids = image_prompt(model, TEXT, images=2)
    pixels = torch.randn(2, 3, 16, 16)
    expected = model(ids, pixel_values=pixels).logits
    model.save_pretrained(str(tmp_path / name))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / name))
    assert reloaded.config.bridge.type == name
    assert torch.equal(reloaded(ids, pixel_values=pixels).logits, expected)


# -- perceiver: frames and temporal embeddings -----------------------------------------------------
def test_perceiver_takes_frames_and_their_order_matters():
    torch.manual_seed(0)
    bridge = build_bridge(BRIDGE_SPECS["perceiver"], FEATURE_DIM, LLM_DIM)
    video = torch.randn(2, 3, 16, FEATURE_DIM)  # [B, T, N, D]
    reordered = video[:, [2, 0, 1]]
    output = bridge(video)
    assert output.shape == (2, 8, LLM_DIM)
    assert not torch.allclose(bridge(reordered), output, atol=1e-5)
    with torch.no_grad():
        bridge.time_embeddings.zero_()  # without temporal embeddings the latents see a set: order is lost
    torch.testing.assert_close(bridge(reordered), bridge(video))


def test_perceiver_errors():
    bridge = build_bridge(BRIDGE_SPECS["perceiver"], FEATURE_DIM, LLM_DIM)
    with pytest.raises(ValueError, match="got 5 frames but max_frames is 4"):
        bridge(torch.randn(1, 5, 16, FEATURE_DIM))
    with pytest.raises(ValueError, match=r"expects features \[B, N, D\] or \[B, T, N, D\]"):
        bridge(torch.randn(16, FEATURE_DIM))
    with pytest.raises(ValueError, match="hidden_dim 30 must be divisible by heads"):
        build_bridge({"type": "perceiver", "hidden_dim": 30, "heads": 4}, FEATURE_DIM, LLM_DIM)


def test_perceiver_default_hidden_width():
    assert build_bridge({"type": "perceiver"}, 64, 48).input_proj.out_features == 48
    assert build_bridge({"type": "perceiver", "depth": 1}, 8, 2048).input_proj.out_features == 1024


# -- qwen_resampler: sin-cos positions and grids ---------------------------------------------------
def test_sincos_codes():
    codes = sincos_1d(torch.tensor([0.0, 1.0]), 8)
    torch.testing.assert_close(codes[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    frequencies = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(codes[1], torch.cat([frequencies.sin(), frequencies.cos()]).float())


def test_qwen_key_positions_match_query_positions_on_the_query_grid():
    bridge = build_bridge(BRIDGE_SPECS["qwen_resampler"], FEATURE_DIM, LLM_DIM)
    torch.testing.assert_close(bridge.key_positions(3, 3), bridge.query_positions())
    assert bridge.key_positions(3, 5).shape == (15, LLM_DIM)


def test_qwen_non_square_grid_needs_a_hint():
    torch.manual_seed(0)
    bridge = build_bridge(BRIDGE_SPECS["qwen_resampler"], FEATURE_DIM, LLM_DIM)
    features = torch.randn(2, 12, FEATURE_DIM)
    wide = bridge(features, grid=(3, 4))
    assert wide.shape == (2, 9, LLM_DIM)
    assert not torch.allclose(bridge(features, grid=(4, 3)), wide, atol=1e-5)  # positions shape the output
    torch.testing.assert_close(bridge(features, grid=torch.tensor([[3, 4], [3, 4]])), wide)
    with pytest.raises(ValueError, match="N=12 is not a perfect square"):
        bridge(features)
    with pytest.raises(ValueError, match="grid 2x5 holds 10 cells but N=12"):
        bridge(features, grid=(2, 5))
    with pytest.raises(ValueError, match="must share one grid"):
        bridge(features, grid=torch.tensor([[3, 4], [4, 3]]))


def test_qwen_grid_hint_through_the_model(make_model):
    model = make_model(bridge=BRIDGE_SPECS["qwen_resampler"])
    ids = image_prompt(model, TEXT)
    pixels = torch.randn(1, 3, 16, 16)
    hinted = model(ids, pixel_values=pixels, bridge_grid=torch.tensor([[4, 4]])).logits
    assert torch.equal(hinted, model(ids, pixel_values=pixels).logits)


def test_qwen_config_errors():
    with pytest.raises(ValueError, match="num_queries must be a perfect square"):
        build_bridge({"type": "qwen_resampler", "num_queries": 10}, FEATURE_DIM, LLM_DIM)
    with pytest.raises(ValueError, match="hidden_dim 30 must be divisible by 4"):
        build_bridge({"type": "qwen_resampler", "hidden_dim": 30}, FEATURE_DIM, LLM_DIM)


# -- pool / pixel_shuffle: exact values and sizes --------------------------------------------------
def grid_features(side: int, width: int = 2) -> torch.Tensor:
    """``[1, side², width]`` with cell (r, c), channel d holding ``100·r + 10·c + d``."""
    rows, cols, channels = torch.meshgrid(torch.arange(side), torch.arange(side), torch.arange(width), indexing="ij")
    return (100 * rows + 10 * cols + channels).float().reshape(1, side * side, width)


def test_average_pool_is_the_mean_of_each_block():
    features = grid_features(4)
    cells = features.reshape(4, 4, 2)
    pooled = average_pool_grid(features, 2)
    expected = torch.stack([cells[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    torch.testing.assert_close(pooled[0], expected)


def test_average_pool_ceil_mode_averages_the_cells_a_partial_block_holds():
    features = grid_features(3)
    cells = features.reshape(3, 3, 2)
    pooled = average_pool_grid(features, 2)
    expected = torch.stack([cells[0:2, 0:2].mean(dim=(0, 1)), cells[0:2, 2].mean(dim=0),
                            cells[2, 0:2].mean(dim=0), cells[2, 2]])
    torch.testing.assert_close(pooled[0], expected)


def test_pixel_shuffle_concatenates_each_block_row_major():
    features = grid_features(4)
    cells = features.reshape(4, 4, 2)
    shuffled = pixel_shuffle_grid(features, 2)
    assert shuffled.shape == (1, 4, 8)
    for token, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        block = torch.cat([cells[r, c], cells[r, c + 1], cells[r + 1, c], cells[r + 1, c + 1]])
        assert torch.equal(shuffled[0, token], block)


@pytest.mark.parametrize("name, compress", [("pool", lambda f: average_pool_grid(f, 2)),
                                            ("pixel_shuffle", lambda f: pixel_shuffle_grid(f, 2))])
def test_compression_bridges_project_the_compressed_grid(name, compress):
    torch.manual_seed(0)
    bridge = build_bridge(BRIDGE_SPECS[name], FEATURE_DIM, LLM_DIM)
    features = torch.randn(2, 16, FEATURE_DIM)
    torch.testing.assert_close(bridge(features), bridge.projector(compress(features)))


def test_nested_projector_spec_gets_the_compressed_width():
    bridge = build_bridge({"type": "pixel_shuffle", "factor": 2, "projector": {"type": "linear"}}, 8, 16)
    assert bridge.projector.linear_1.in_features == 32 and bridge.projector.depth == 1
    assert BRIDGES.make_config({"type": "pool"}).projector == {"type": "mlp", "depth": 2, "activation": "gelu"}


def test_compression_size_errors():
    pool = build_bridge({"type": "pool", "kernel": 3}, FEATURE_DIM, LLM_DIM)
    shuffle = build_bridge({"type": "pixel_shuffle", "factor": 4}, FEATURE_DIM, LLM_DIM)
    for bridge, label in ((pool, r"pool bridge \(factor 3\)"), (shuffle, r"pixel_shuffle bridge \(factor 4\)")):
        with pytest.raises(ValueError, match=label + ".*N=12 is not a perfect square"):
            bridge(torch.randn(1, 12, FEATURE_DIM))
        with pytest.raises(ValueError, match="N=12 is not a perfect square"):
            bridge.num_tokens(12)
    with pytest.raises(ValueError, match=r"grid side 6 \(N=36\) is not divisible by factor 4"):
        shuffle(torch.randn(1, 36, FEATURE_DIM))
    with pytest.raises(ValueError, match=r"grid side 6 \(N=36\) is not divisible by factor 4"):
        shuffle.num_tokens(36)
    assert pool.num_tokens(16) == 4  # 4×4 in ceil mode by 3 → 2×2
    with pytest.raises(ValueError, match="factor must be >= 1"):
        build_bridge({"type": "pool", "kernel": 0}, FEATURE_DIM, LLM_DIM)
