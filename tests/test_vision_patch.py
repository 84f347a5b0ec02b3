"""The ``patch`` vision encoder (Fuyu): transformers' patch order, pass-through of patchified tensors, feature grid,
Fuyu's normalisation, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import SizeDict
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

from mmbridge.model.vision import VISION_ENCODERS, build_vision
from mmbridge.model.vision.patch import PatchEncoder


@pytest.mark.parametrize("patch,height,width", [(4, 8, 12), (3, 9, 3), (30, 60, 90)])
def test_patch_order_equals_transformers_patchify(patch, height, width):
    encoder = build_vision({"type": "patch", "patch_size": patch, "image_size": 2 * patch})
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(patch))
    expected = FuyuImageProcessorPil().patchify_image(pixels.numpy(), SizeDict(height=patch, width=patch))
    ours = encoder(pixels)  # [2, (H/p)*(W/p), 3*p*p]
    assert ours.shape == (2, (height // patch) * (width // patch), 3 * patch * patch)
    assert np.array_equal(ours.numpy(), expected)


def test_patch_layout_is_row_major_with_channels_innermost():
    pixels = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(1, 3, 4, 6)  # value = c*24 + y*6 + x
    tokens = build_vision({"type": "patch", "patch_size": 2, "image_size": 4})(pixels)
    assert tokens.shape == (1, 2 * 3, 12)
    second = tokens[0, 1].reshape(2, 2, 3)  # patch (row 0, col 1): [y, x, c]
    assert second[0, 0].tolist() == [2.0, 26.0, 50.0]  # pixel (0, 2) in R, G, B
    assert second[1, 1].tolist() == [9.0, 33.0, 57.0]  # pixel (1, 3)
    assert tokens[0, 3].reshape(2, 2, 3)[0, 0, 0] == 12.0  # patch (row 1, col 0) starts at pixel (2, 0)


def test_patchified_tensors_pass_through_unchanged():
    encoder = build_vision({"type": "patch", "patch_size": 4, "image_size": 8})
    for shape in [(2, 6, 48), (11, 48)]:  # [n, N, 3·p·p] and transformers' Fuyu [N_total, 3·p·p]
        patches = torch.randn(*shape)
        assert encoder(patches) is patches


def test_feature_grid_dim_and_tokens():
    encoder = build_vision({"type": "patch"})  # Fuyu: 30 px patches, 300 px native
    assert isinstance(encoder, PatchEncoder) and encoder.feature_dim == 3 * 30 * 30
    assert encoder.feature_grid(1080, 1920) == (36, 64)
    assert encoder.num_tokens() == 100 and list(encoder.parameters()) == []
    small = build_vision({"type": "patch", "patch_size": 4, "image_size": 8})
    assert small.feature_grid(12, 20) == (3, 5)
    assert small(torch.zeros(1, 3, 12, 20)).shape == (1, 15, 48)


def test_transform_normalises_as_fuyu():
    """Rescale 1/255, mean/std 0.5 and bilinear resizing: the values FuyuImageProcessor gives at the same size."""
    encoder = build_vision({"type": "patch", "patch_size": 4, "image_size": 8})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    expected = FuyuImageProcessorPil(size={"height": 8, "width": 8})(image, return_tensors="pt")["images"][0][0]
    torch.testing.assert_close(encoder.transform(image), torch.as_tensor(np.asarray(expected)), atol=1e-6, rtol=0)
    assert encoder.transform.resample == "bilinear"


def test_refusals_name_the_problem():
    encoder = build_vision({"type": "patch", "patch_size": 4, "image_size": 8})
    with pytest.raises(ValueError, match="multiples of patch_size 4, got 10x12"):
        encoder(torch.zeros(1, 3, 10, 12))
    with pytest.raises(ValueError, match=r"patches \[n, N, 48\].*\(2, 5, 47\)"):
        encoder(torch.zeros(2, 5, 47))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of patch_size 30, got 100"):
        build_vision({"type": "patch", "image_size": 100})
    assert VISION_ENCODERS.make_config(encoder.export_config().__dict__) == encoder.export_config()
