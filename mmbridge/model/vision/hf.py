"""HF vision towers (CLIP, SigLIP, ViT) as mmbridge vision encoders.

Loaded from a local directory, a hub id, or an in-memory config dict. Feature
selection follows transformers' LLaVA: ``feature_layer`` is one hidden-state index
(``-2`` = penultimate, LLaVA-1.5) or a list whose states are concatenated on the
channel axis. ``select``:

* ``default`` — drop the CLS token where the tower has one (CLIP, ViT); SigLIP has none,
  so all its patches are kept;
* ``full`` — keep every token;
* ``drop_first`` — always drop the first token. This is what transformers' LLaVA does for
  ``vision_feature_select_strategy="default"`` whatever the tower, so it is used when a
  SigLIP LLaVA is imported, to keep logits identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.image_processing_base import ImageProcessingMixin
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mmbridge.model.grid import FeatureGrid
from mmbridge.model.vision.base import VISION_ENCODERS, VisionEncoder
from mmbridge.model.vision.transform import ImageTransform

SELECT_STRATEGIES = ("default", "full", "drop_first")
# model_type of the vision sub-config -> (has a CLS token, default mean, default std)
_FAMILIES = {
    "clip_vision_model": (True, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": (False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2_vision_model": (False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit": (True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass
class HFVisionConfig:
    """An HF vision tower. Give ``path`` (directory or hub id) or ``hf_config`` (a config dict)."""

    type: str = "hf"
    path: str | None = None
    hf_config: dict | None = None
    feature_layer: int | list[int] = -2
    select: str = "default"
    image_processor: dict | None = None  # HF preprocessor_config.json settings, or an ImageTransform dict
    pad_to_square: bool = False


def tower_has_cls(model_type: str) -> bool:
    """Whether a tower of this ``model_type`` prepends a CLS token (CLIP, ViT) or not (SigLIP)."""
    return _FAMILIES.get(model_type, (True,))[0]


def _vision_sub_config(config: PretrainedConfig) -> PretrainedConfig:
    """The vision part of a full CLIP/SigLIP config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def _saved_image_processor(path: str) -> dict | None:
    """The image-processor settings saved with a checkpoint, or None when it has none.

    Reads ``preprocessor_config.json`` or, as transformers 5 processors write it, the
    ``image_processor`` section of ``processor_config.json``; works for hub ids too.
    """
    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(path)
    except OSError:
        return None
    return settings or None


def _load_transform(cfg: HFVisionConfig, vision_config: PretrainedConfig) -> ImageTransform:
    """``cfg.image_processor`` if given, else the checkpoint's saved processor, over the family's defaults."""
    settings = cfg.image_processor
    if settings is None and cfg.path:
        settings = _saved_image_processor(cfg.path)
    if settings is not None and "resize" in settings and "size" in settings and "image_mean" not in settings:
        return ImageTransform.from_dict(settings)  # already an exported ImageTransform
    _, mean, std = _FAMILIES.get(vision_config.model_type, (True, (0.5,) * 3, (0.5,) * 3))
    side = vision_config.image_size
    defaults = {"size": {"height": side, "width": side}, "image_mean": mean, "image_std": std}
    return ImageTransform.from_hf({**defaults, **(settings or {})}, pad_to_square=cfg.pad_to_square)


class HFVisionEncoder(VisionEncoder):
    """Wraps an HF vision model; forward returns the selected hidden states ``[B, N, D_v]``."""

    def __init__(self, model: torch.nn.Module, feature_layer: int | list[int], select: str,
                 transform: ImageTransform) -> None:
        super().__init__()
        if select not in SELECT_STRATEGIES:
            raise ValueError(f"vision select must be one of {SELECT_STRATEGIES}, got {select!r}")
        self.model = model
        self.feature_layer = list(feature_layer) if isinstance(feature_layer, (list, tuple)) else int(feature_layer)
        if not self._layers():
            raise ValueError("vision feature_layer must be an index or a non-empty list of indices")
        self.select = select
        self.transform = transform
        config = model.config
        num_states = config.num_hidden_layers + 1
        for layer in self._layers():
            if not -num_states <= layer < num_states:
                raise ValueError(f"vision feature_layer {layer} is out of range for a tower with {num_states} hidden states")
        self.has_cls = tower_has_cls(config.model_type)
        self.feature_dim = config.hidden_size * len(self._layers())

    def _layers(self) -> list[int]:
        return self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]

    def _drops_first(self) -> bool:
        return self.select == "drop_first" or (self.select == "default" and self.has_cls)

    def num_tokens(self) -> int:
        height, width = self.transform.output_size
        patch = self.model.config.patch_size
        count = (height // patch) * (width // patch) + (1 if self.has_cls else 0)
        return count - (1 if self._drops_first() else 0)

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patches per column and row of a ``height × width`` input, when every kept token is a patch of the grid."""
        layout = self.feature_layout(height, width)
        return layout.cells(f"the feature grid of this {self.model.config.model_type} tower (select {self.select!r})")

    def feature_layout(self, height: int | None = None, width: int | None = None,
                       count: int | None = None) -> FeatureGrid:
        """The patch grid, after the CLS token when the tower keeps it (``select: full``); a plain sequence when the
        first patch itself is dropped (``drop_first`` on a tower without CLS, as transformers' LLaVA does)."""
        height, width = self.transform.output_size if height is None else (height, width)
        patch = self.model.config.patch_size
        rows, cols = height // patch, width // patch
        if self._drops_first() and not self.has_cls:
            layout = FeatureGrid.sequence(rows * cols - 1)
        else:
            layout = FeatureGrid(rows, cols, extra=int(self.has_cls and not self._drops_first()))
        if count is not None and count != layout.count:
            raise ValueError(f"the {self.model.config.model_type} tower gave {count} features for a {height}x{width} "
                             f"input, not the {layout.count} of {layout.describe()}")
        return layout

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D_v]
        dtype = next(self.model.parameters()).dtype
        native = self.model.config.image_size
        resized = {"interpolate_pos_encoding": True} if tuple(pixel_values.shape[-2:]) != (native, native) else {}
        outputs = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **resized)
        states = [outputs.hidden_states[layer] for layer in self._layers()]
        if self._drops_first():
            states = [state[:, 1:] for state in states]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)

    def export_config(self) -> HFVisionConfig:
        return HFVisionConfig(hf_config=self.model.config.to_dict(), feature_layer=self.feature_layer,
                              select=self.select, image_processor=self.transform.to_dict(),
                              pad_to_square=self.transform.pad_to_square)


def _model_kwargs(config: PretrainedConfig) -> dict:
    """Constructor options: ViT's pooler is never used for features, so it is not built."""
    return {"add_pooling_layer": False} if config.model_type == "vit" else {}


def _load_pretrained(path: str, config: PretrainedConfig) -> torch.nn.Module:
    """Load the vision tower of ``path`` in float32; a full CLIP/SigLIP checkpoint gives its vision part.

    Every tower weight must be in the checkpoint: a missing one (e.g. a LLaVA directory whose keys
    carry another prefix) is a ``ValueError``, never a silently random tower.
    """
    model_cls = MODEL_MAPPING[type(config)]
    model, info = model_cls.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True,
                                            **_model_kwargs(config))
    mismatched = [key if isinstance(key, str) else key[0] for key in info["mismatched_keys"]]  # (name, shapes)
    missing = sorted(info["missing_keys"]) + sorted(mismatched)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weight(s) of the {config.model_type} "
                         f"vision tower, e.g. {missing[:3]}")
    return model


@VISION_ENCODERS.register("hf", HFVisionConfig)
def build_hf_vision(cfg: HFVisionConfig) -> HFVisionEncoder:
    """Build an HF tower from ``cfg.path`` (pretrained weights) or ``cfg.hf_config`` (random init)."""
    if cfg.path:
        config = _vision_sub_config(AutoConfig.from_pretrained(cfg.path))
        model = _load_pretrained(cfg.path, config)
    elif cfg.hf_config:
        data = dict(cfg.hf_config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("vision hf_config needs a 'model_type' (e.g. clip_vision_model, siglip_vision_model, vit)")
        config = _vision_sub_config(AutoConfig.for_model(model_type, **data))
        model = AutoModel.from_config(config, **_model_kwargs(config))
    else:
        raise ValueError("vision encoder 'hf' needs 'path' (directory or hub id) or 'hf_config'")
    encoder = HFVisionEncoder(model, cfg.feature_layer, cfg.select, _load_transform(cfg, config))
    encoder.eval()  # the wrapper too, so its ``training`` flag agrees with the tower's
    return encoder
