"""The output side of models that answer with images (NExT-GPT): signal tokens and the output projection."""

from mmbridge.model.output.projection import OutputProjection
from mmbridge.model.output.side import MODALITIES, ModalityOutput, OutputModalityConfig, OutputSide, output_configs

__all__ = ["MODALITIES", "ModalityOutput", "OutputModalityConfig", "OutputProjection", "OutputSide", "output_configs"]
