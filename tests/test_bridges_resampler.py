"""Query and compression bridges: perceiver, qwen_resampler, pool, pixel_shuffle.

For each: shapes and ``num_tokens`` for several N, the full model's forward and loss, gradients
that reach exactly the bridge, the trainable set per stage, cache/no-cache generation parity and
save/load parity. Then the family specifics: temporal embeddings, sin-cos positions on the encoder's grid,
exact pooling / space-to-depth values and the size errors.
"""

from __future__ import annotations

import pytest
import torch

from conftest import image_prompt
from mmbridge.model.bridges import BRIDGES, build_bridge
from mmbridge.model.bridges.compress import average_pool_grid, pixel_shuffle_grid
from mmbridge.model.bridges.qwen_resampler import sincos_1d
from mmbridge.model.grid import FeatureGrid
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
# feature grid (rows, cols) -> (expected token count, expected token grid); the tiny tower gives a 4x4 grid
EXPECTED_TOKENS = {
    "perceiver": {(4, 4): (8, None), (7, 7): (8, None), (3, 5): (8, None)},
    "qwen_resampler": {(4, 4): (9, None), (7, 7): (9, None), (3, 5): (9, None)},
    "pool": {(4, 4): (4, (2, 2)), (7, 7): (16, (4, 4)), (3, 5): (6, (2, 3))},
    "pixel_shuffle": {(4, 4): (4, (2, 2)), (6, 6): (9, (3, 3)), (2, 8): (4, (1, 4))},
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
    for (rows, cols), (expected, token_grid) in EXPECTED_TOKENS[name].items():
        grid = FeatureGrid(rows, cols)
        assert bridge.num_tokens(grid) == expected and bridge.token_grid(grid) == token_grid
        assert bridge(torch.randn(2, rows * cols, FEATURE_DIM), grid).shape == (2, expected, LLM_DIM)


@pytest.mark.parametrize("name", sorted(BRIDGE_SPECS))
def test_model_loss_and_gradients_reach_exactly_the_bridge(make_model, name):
    model = make_model(bridge=BRIDGE_SPECS[name])
    assert model.tokens_per_image == EXPECTED_TOKENS[name][(4, 4)][0]
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
    grid = FeatureGrid(4, 4)
    output = bridge(video, grid)
    assert output.shape == (2, 8, LLM_DIM)
    assert not torch.allclose(bridge(reordered, grid), output, atol=1e-5)
    with torch.no_grad():
        bridge.time_embeddings.zero_()  # without temporal embeddings the latents see a set: order is lost
    torch.testing.assert_close(bridge(reordered, grid), bridge(video, grid))


def test_perceiver_errors():
    bridge = build_bridge(BRIDGE_SPECS["perceiver"], FEATURE_DIM, LLM_DIM)
    with pytest.raises(ValueError, match="got 5 frames but max_frames is 4"):
        bridge(torch.randn(1, 5, 16, FEATURE_DIM), FeatureGrid(4, 4))
    with pytest.raises(ValueError, match=r"expects features \[B, N, D\] or \[B, T, N, D\]"):
        bridge(torch.randn(16, FEATURE_DIM), FeatureGrid(4, 4))
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


def test_qwen_positions_follow_the_grid_it_is_given():
    torch.manual_seed(0)
    bridge = build_bridge(BRIDGE_SPECS["qwen_resampler"], FEATURE_DIM, LLM_DIM)
    features = torch.randn(2, 12, FEATURE_DIM)
    wide = bridge(features, FeatureGrid(3, 4))
    assert wide.shape == (2, 9, LLM_DIM)
    assert not torch.allclose(bridge(features, FeatureGrid(4, 3)), wide, atol=1e-5)  # positions shape the output
    with pytest.raises(ValueError, match="needs the encoder's features on a grid, but they are 12 tokens with no grid"):
        bridge(features, FeatureGrid.sequence(12))
    with pytest.raises(ValueError, match="the features hold 12 tokens but the grid 2x5 has 10"):
        bridge(features, FeatureGrid(2, 5))


def test_the_encoders_non_square_grid_reaches_the_bridge_through_the_model(make_model):
    """A 8x16 px image through a stride-4 convolution is a 2x4 grid: the model hands the bridge exactly that grid,
    not a guess from the token count (8 tokens could as well be 4x2)."""
    conv = {"type": "module", "target": "torch.nn:Conv2d", "layout": "grid", "feature_dim": FEATURE_DIM,
            "kwargs": {"in_channels": 3, "out_channels": FEATURE_DIM, "kernel_size": 4, "stride": 4},
            "image_transform": {"size": [8, 16]}}
    model = make_model(vision=conv, bridge=BRIDGE_SPECS["qwen_resampler"])
    assert model.vision.feature_layout() == FeatureGrid(2, 4)
    pixels = torch.randn(1, 3, 8, 16)
    with torch.no_grad():
        features = model.vision(pixels)  # [1, 8, 32]
        tokens = model.encode_images(pixels)
        assert torch.equal(tokens, model.bridge(features, FeatureGrid(2, 4)))
        assert not torch.allclose(tokens, model.bridge(features, FeatureGrid(4, 2)), atol=1e-5)
        ids = image_prompt(model, TEXT)
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits,
                                   model(ids, image_tokens=tokens).logits, rtol=0, atol=0)


def test_qwen_config_errors():
    with pytest.raises(ValueError, match="num_queries must be a perfect square"):
        build_bridge({"type": "qwen_resampler", "num_queries": 10}, FEATURE_DIM, LLM_DIM)
    with pytest.raises(ValueError, match="hidden_dim 30 must be divisible by 4"):
        build_bridge({"type": "qwen_resampler", "hidden_dim": 30}, FEATURE_DIM, LLM_DIM)


# -- pool / pixel_shuffle: exact values and sizes --------------------------------------------------
def grid_features(rows: int, cols: int | None = None, width: int = 2) -> torch.Tensor:
    """``[1, rows·cols, width]`` with cell (r, c), channel d holding ``100·r + 10·c + d``."""
    cols = rows if cols is None else cols
    row, col, channel = torch.meshgrid(torch.arange(rows), torch.arange(cols), torch.arange(width), indexing="ij")
    return (100 * row + 10 * col + channel).float().reshape(1, rows * cols, width)


def test_average_pool_is_the_mean_of_each_block():
    features = grid_features(4)
    cells = features.reshape(4, 4, 2)
    pooled = average_pool_grid(features, FeatureGrid(4, 4), 2)
    expected = torch.stack([cells[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    torch.testing.assert_close(pooled[0], expected)


def test_average_pool_ceil_mode_averages_the_cells_a_partial_block_holds():
    features = grid_features(3)
    cells = features.reshape(3, 3, 2)
    pooled = average_pool_grid(features, FeatureGrid(3, 3), 2)
    expected = torch.stack([cells[0:2, 0:2].mean(dim=(0, 1)), cells[0:2, 2].mean(dim=0),
                            cells[2, 0:2].mean(dim=0), cells[2, 2]])
    torch.testing.assert_close(pooled[0], expected)


def test_average_pool_on_a_non_square_grid():
    features = grid_features(2, 3)
    cells = features.reshape(2, 3, 2)
    pooled = average_pool_grid(features, FeatureGrid(2, 3), 2)  # 2x3 → 1x2 in ceil mode
    expected = torch.stack([cells[:, 0:2].mean(dim=(0, 1)), cells[:, 2].mean(dim=0)])
    torch.testing.assert_close(pooled[0], expected)


@pytest.mark.parametrize("rows, cols", [(4, 4), (2, 6), (6, 2)])
def test_pixel_shuffle_concatenates_each_block_row_major(rows, cols):
    features = grid_features(rows, cols)
    cells = features.reshape(rows, cols, 2)
    shuffled = pixel_shuffle_grid(features, FeatureGrid(rows, cols), 2)
    assert shuffled.shape == (1, rows * cols // 4, 8)
    blocks = [(r, c) for r in range(0, rows, 2) for c in range(0, cols, 2)]
    for token, (r, c) in enumerate(blocks):
        block = torch.cat([cells[r, c], cells[r, c + 1], cells[r + 1, c], cells[r + 1, c + 1]])
        assert torch.equal(shuffled[0, token], block)


@pytest.mark.parametrize("name, compress", [("pool", lambda f, g: average_pool_grid(f, g, 2)),
                                            ("pixel_shuffle", lambda f, g: pixel_shuffle_grid(f, g, 2))])
def test_compression_bridges_project_the_compressed_grid(name, compress):
    torch.manual_seed(0)
    bridge = build_bridge(BRIDGE_SPECS[name], FEATURE_DIM, LLM_DIM)
    features = torch.randn(2, 16, FEATURE_DIM)
    grid = FeatureGrid(4, 4)
    torch.testing.assert_close(bridge(features, grid), bridge.projector(compress(features, grid), FeatureGrid(2, 2)))


def test_nested_projector_spec_gets_the_compressed_width():
    bridge = build_bridge({"type": "pixel_shuffle", "factor": 2, "projector": {"type": "linear"}}, 8, 16)
    assert bridge.projector.linear_1.in_features == 32 and bridge.projector.depth == 1
    assert BRIDGES.make_config({"type": "pool"}).projector == {"type": "mlp", "depth": 2, "activation": "gelu"}


def test_compression_size_errors():
    pool = build_bridge({"type": "pool", "kernel": 3}, FEATURE_DIM, LLM_DIM)
    shuffle = build_bridge({"type": "pixel_shuffle", "factor": 4}, FEATURE_DIM, LLM_DIM)
    sequence = FeatureGrid.sequence(12)
    for bridge, label in ((pool, r"pool bridge \(kernel 3\)"), (shuffle, r"pixel_shuffle bridge \(factor 4\)")):
        with pytest.raises(ValueError, match=label + ".*12 tokens with no grid"):
            bridge(torch.randn(1, 12, FEATURE_DIM), sequence)
        with pytest.raises(ValueError, match=label + ".*12 tokens with no grid"):
            bridge.num_tokens(sequence)
        with pytest.raises(ValueError, match=label + r".*\(1 without a cell, then a 4x4 grid\)"):
            bridge.num_tokens(FeatureGrid(4, 4, extra=1))  # a kept CLS token
    with pytest.raises(ValueError, match="the feature grid 6x6 does not divide by factor 4"):
        shuffle(torch.randn(1, 36, FEATURE_DIM), FeatureGrid(6, 6))
    with pytest.raises(ValueError, match="the feature grid 4x6 does not divide by factor 4"):
        shuffle.num_tokens(FeatureGrid(4, 6))
    with pytest.raises(ValueError, match="the features hold 12 tokens but the grid 4x4 has 16"):
        pool(torch.randn(1, 12, FEATURE_DIM), FeatureGrid(4, 4))
    assert pool.num_tokens(FeatureGrid(4, 4)) == 4  # 4×4 in ceil mode by 3 → 2×2
    assert shuffle.grid_divisor() == 4 and pool.grid_divisor() == 1
    with pytest.raises(ValueError, match="factor must be >= 1"):
        build_bridge({"type": "pool", "kernel": 0}, FEATURE_DIM, LLM_DIM)
