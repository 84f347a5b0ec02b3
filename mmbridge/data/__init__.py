"""Data: LLaVA files → samples → processed examples → batches, with weighted multi-source mixing;
subsets of a file (random or SVIT coreset); source types that other packages register (:mod:`.sources`)."""

from mmbridge.data.collate import collate, model_inputs
from mmbridge.data.formats.llava import Sample, load_llava_json
from mmbridge.data.mixture import DataConfig, MixtureDataset, SourceConfig, batch_indices
from mmbridge.data.processor import (ImageLoadError, ImageTokens, ModelText, Processor, SampleError, TextSettings,
                                     VideoSettings)
from mmbridge.data.selection import select_records
from mmbridge.data.sources import SOURCE_TYPES, SourceType

__all__ = ["Sample", "load_llava_json", "Processor", "ImageTokens", "TextSettings", "ModelText", "VideoSettings",
           "ImageLoadError", "SampleError", "SourceConfig",
           "DataConfig", "MixtureDataset", "batch_indices", "collate", "model_inputs",
           "select_records", "SOURCE_TYPES", "SourceType"]
