"""Pixel shuffle against transformers' own (InternVL on non-square grids, Idefics3 on square ones), and the InternVL
connector (pixel shuffle → LayerNorm → MLP) against transformers' ``InternVLMultiModalProjector``, bit for bit;
then the connector inside a model: token count and grid from the encoder's grid, training, save/load, high
resolution and region–word alignment, which read its token grid."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

from conftest import image_prompt
from mmbridge.model.bridges import build_bridge
from mmbridge.model.bridges.compress import pixel_shuffle_grid
from mmbridge.model.grid import FeatureGrid
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.train import StageConfig, apply_stage
from mmbridge.train.region_words import check_grid

INTERNVL = {"type": "internvl", "factor": 2}


def _features(rows: int, cols: int, width: int = 6, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, rows * cols, width, generator=torch.Generator().manual_seed(rows * 31 + cols))


@pytest.mark.parametrize("rows, cols", [(4, 4), (2, 6), (6, 2), (4, 8)])
def test_pixel_shuffle_equals_internvls_on_any_grid(rows, cols):
    features = _features(rows, cols)
    grid = features.reshape(2, rows, cols, 6)
    theirs = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)  # [B, rows/2, cols/2, 4·6]
    ours = pixel_shuffle_grid(features, FeatureGrid(rows, cols), 2)
    assert torch.equal(ours, theirs.reshape(2, -1, 24))


@pytest.mark.parametrize("side, factor", [(4, 2), (6, 3), (6, 2)])
def test_pixel_shuffle_equals_idefics3s_on_square_grids(side, factor):
    features = _features(side, side)
    theirs = Idefics3Connector.pixel_shuffle(None, features, scale_factor=factor)  # Idefics3 takes square grids only
    assert torch.equal(pixel_shuffle_grid(features, FeatureGrid(side, side), factor), theirs)


def _internvl_projector(vision_width: int, text_width: int) -> InternVLMultiModalProjector:
    config = InternVLConfig(vision_config={"hidden_size": vision_width}, text_config={"hidden_size": text_width},
                            downsample_ratio=0.5, projector_hidden_act="gelu")
    torch.manual_seed(3)
    projector = InternVLMultiModalProjector(config)
    with torch.no_grad():  # away from LayerNorm's identity init, so a swapped weight would show
        for parameter in projector.parameters():
            parameter.normal_(std=0.5)
    return projector.eval()


@pytest.mark.parametrize("rows, cols", [(4, 4), (2, 6)])
def test_connector_equals_transformers_internvl(rows, cols):
    projector = _internvl_projector(6, 10)
    bridge = build_bridge(INTERNVL, 6, 10).eval()
    assert sorted(bridge.state_dict()) == sorted(projector.state_dict())  # transformers' names, one to one
    bridge.load_state_dict(projector.state_dict())
    features = _features(rows, cols)
    with torch.no_grad():
        shuffled = InternVLModel.pixel_shuffle(None, features.reshape(2, rows, cols, 6), scale_factor=0.5)
        theirs = projector(shuffled.reshape(2, -1, 24))
        ours = bridge(features, FeatureGrid(rows, cols))
    assert torch.equal(ours, theirs)
    assert bridge.num_tokens(FeatureGrid(rows, cols)) == theirs.shape[1]
    assert bridge.token_grid(FeatureGrid(rows, cols)) == (rows // 2, cols // 2)


def test_connector_refuses_what_is_not_a_divisible_grid():
    bridge = build_bridge(INTERNVL, 6, 10)
    with pytest.raises(ValueError, match="needs the encoder's features on a grid.*1 without a cell"):
        bridge.num_tokens(FeatureGrid(4, 4, extra=1))  # a CLS token InternVL would have dropped
    with pytest.raises(ValueError, match="the feature grid 3x4 does not divide by factor 2"):
        bridge.num_tokens(FeatureGrid(3, 4))
    with pytest.raises(ValueError, match="activation 'nope' is unknown"):
        build_bridge({**INTERNVL, "activation": "nope"}, 6, 10)


def test_connector_in_a_model_trains_only_itself_and_reloads(make_model, tmp_path):
    model = make_model(bridge=INTERNVL)
    assert model.tokens_per_image == 4  # the tiny tower's 4x4 grid, 2x2 blocks
    assert check_grid(model) == (2, 2)  # region-word alignment reads the connector's token grid
    apply_stage(model, StageConfig(name="align", train={"bridge": "full"}, precision="fp32"), log=False)
    ids = image_prompt(model, [5, 6, 7, 8])
    labels = ids.clone()
    labels[:, :8] = -100
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model(ids, pixel_values=pixels, labels=labels).loss.backward()
    grads = {name.split(".", 1)[0] for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert grads == {"bridge"}
    assert model.bridge.linear_1.weight.grad.abs().sum() > 0
    model.save_pretrained(str(tmp_path / "internvl"))
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "internvl"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


def test_connector_with_anyres_stitches_its_token_grid(make_model):
    model = make_model(bridge=INTERNVL, highres={"type": "anyres", "grid": [[1, 2]]})
    layout = model.highres.layout((16, 32))  # one 1x2 arrangement of 16 px tiles + the global view
    assert layout.extra["token_grid"] == (2, 2)
    assert layout.visual_tokens == 4 + 2 * (4 + 1)  # global 2x2, then 2 rows of 2 tiles × 2 cols + a newline
