"""Preflight: everything a recipe can get wrong, checked in a second, before any model loads.

:func:`check_run` parses every stage (fields and their types, named as ``stages.N ('name')``),
the model's component specs (known types and fields), the processor settings, and each
stage's data: files that exist and parse as LLaVA JSON, image roots that are directories,
MiniWorld tasks and splits that exist; and it refuses an ``output_dir`` or ``feature_cache``
that is an existing file. First of all, every numeric field is checked against its range
(:mod:`mmbridge.train.ranges`). Training starts only when all of it holds, so a typo costs a
second, not the minute it takes to load the backbones.
"""

from __future__ import annotations

import os
from typing import Any

from mmbridge.config import RunConfig
from mmbridge.data import DataConfig, SourceConfig
from mmbridge.data.mixture import load_source
from mmbridge.data.sources import SOURCE_TYPES
from mmbridge.registry import config_from_dict
from mmbridge.train.ranges import check_ranges
from mmbridge.train.recipe import DENOISING_OBJECTIVE as DENOISING
from mmbridge.train.recipe import STAGE1_OBJECTIVE as STAGE1
from mmbridge.train.recipe import StageConfig

OWN_RUN_OBJECTIVES = {STAGE1: "BLIP-2 stage 1, no LLM", DENOISING: "an image generator, no LLM"}

PROCESSOR_FIELDS = {"max_length": int, "system_prompt": (str, type(None))}
STAGE1_DATA_DEFAULTS = {"prefix_lm": False, "template": "chat", "labels": "assistant", "video_stride": 1}


def check_run(run: RunConfig) -> list[StageConfig]:
    """Validate ``run``; returns its parsed stages. Raises ``ValueError``/``FileNotFoundError`` naming the field.

    A run of BLIP-2 stage 1 (every stage ``objective: itc_itm_itg``) builds no LLM: its ``model.llm`` (stage 2's)
    is not checked, and its bridge must be of the Q-Former family. A ``denoising`` run's ``model`` names the VAE, the
    UNet and the text encoder (:func:`~mmbridge.train.denoising.parse_generator_spec`)."""
    if not run.stages:
        raise ValueError("the recipe has no stages")
    if not isinstance(run.stages, list):
        raise ValueError(f"the recipe's 'stages' must be a list, got {run.stages!r}")
    check_ranges(run)
    stages = [parse_stage(data, index) for index, data in enumerate(run.stages)]
    components = model_components(run, stages)
    conditioning_length = None
    if stages[0].objective == DENOISING:
        from mmbridge.train.denoising import parse_generator_spec

        conditioning_length = parse_generator_spec(run.model).llm.max_length
    else:
        check_model(run.model, components)
    if components == ("vision", "bridge"):
        check_stage1_bridge(run.model["bridge"])
    check_processor(run.processor)
    check_not_a_file(run.output_dir, "output_dir")
    for index, stage in enumerate(stages):
        data = stage_data(run, index, stage)
        if stage.objective == STAGE1:
            check_stage1(stage, data, stage_label(index, stage.name))
        elif stage.objective == DENOISING:
            check_denoising(data, stage_label(index, stage.name), conditioning_length)
    return stages


def model_components(run: RunConfig, stages: list[StageConfig]) -> tuple[str, ...]:
    """The registry components ``run`` builds: ``vision``, ``llm``, ``bridge``; only ``vision`` and ``bridge`` for
    BLIP-2 stage 1; none for ``denoising`` (its parts are the generator's own). Each of those two is a run of its
    own (with another objective in the same run, or sharded by FSDP, it is refused)."""
    own = next((stage.objective for stage in stages if stage.objective in OWN_RUN_OBJECTIVES), None)
    if own is None:
        return ("vision", "llm", "bridge")
    first = next(index for index, stage in enumerate(stages) if stage.objective == own)
    for index, stage in enumerate(stages):
        if stage.objective != own:
            raise ValueError(f"{stage_label(index, stage.name)} has objective {stage.objective!r} but "
                             f"{stage_label(first, stages[first].name)} trains '{own}' ({OWN_RUN_OBJECTIVES[own]}): "
                             f"{_own_run_reason(own)}")
    if run.distributed.strategy == "fsdp":
        raise ValueError(f"distributed.strategy 'fsdp' shards the LLM's decoder layers; objective '{own}' "
                         f"({OWN_RUN_OBJECTIVES[own]}) has no LLM: train it with strategy 'ddp' (the default)")
    return ("vision", "bridge") if own == STAGE1 else ()


def _own_run_reason(objective: str) -> str:
    if objective == STAGE1:
        return "stage 1 is a recipe of its own, whose output_dir/final a stage-2 recipe's Q-Former bridge reads with " \
               "init_from"
    return "the generator is a recipe of its own, whose output_dir/final (a diffusers pipeline directory) a model's " \
           "generator reads"


def check_stage1_bridge(spec: Any) -> None:
    """BLIP-2 stage 1 trains a Q-Former: the bridge must be of the family (``qformer``, ``instruct_qformer``,
    ``llama_vid``)."""
    from mmbridge.model.bridges import BRIDGES
    from mmbridge.model.bridges.qformer import QFormerBridgeConfig

    config = BRIDGES.make_config(spec)
    if not isinstance(config, QFormerBridgeConfig):
        raise ValueError(f"recipe model.bridge: objective '{STAGE1}' (BLIP-2 stage 1) needs a qformer-family bridge "
                         f"(qformer, instruct_qformer, llama_vid), got {config.type!r}")


def check_stage1(stage: StageConfig, data: DataConfig, label: str) -> None:
    """Stage 1 reads each sample's image and caption (its first reply) in batches of at least 2 (ITC and ITM take
    their negatives from the batch): data settings that shape an LLM's prompt and labels mean nothing there and are
    refused rather than ignored."""
    if stage.batch_size < 2:
        raise ValueError(f"{label}: objective '{STAGE1}' takes its negatives from the batch: batch_size must be at "
                         f"least 2, got {stage.batch_size}")
    refuse_prompt_settings(data, label, STAGE1)


def refuse_prompt_settings(data: DataConfig, label: str, objective: str) -> None:
    """An image-caption objective reads no prompt or labels: a data setting that shapes them is refused, named."""
    for name, default in STAGE1_DATA_DEFAULTS.items():
        if getattr(data, name) != default:
            raise ValueError(f"{label} data sets {name}={getattr(data, name)!r}, which objective '{objective}' does "
                             f"not read (it trains on image-caption pairs); remove it")


def check_denoising(data: DataConfig, label: str, conditioning_length: int) -> None:
    """A ``denoising`` stage reads each sample's image and caption: data settings that shape an LLM's prompt and
    labels are refused rather than ignored, and so is a feature cache (the VAE's latents are not cached); captions
    are cut at the conditioning length ``model.llm.max_length``, so ``data.max_length`` may only repeat it."""
    if data.max_length is not None and data.max_length != conditioning_length:
        raise ValueError(f"{label} data sets max_length={data.max_length}, but objective '{DENOISING}' cuts captions "
                         f"at the conditioning length model.llm.max_length={conditioning_length}; remove it")
    refuse_prompt_settings(data, label, DENOISING)
    if data.feature_cache:
        raise ValueError(f"{label} data sets feature_cache, which objective '{DENOISING}' does not use (its VAE's "
                         f"latents are computed per step); remove it")


def stage_label(index: int, name: str) -> str:
    return f"stages.{index} ('{name}')"


def parse_stage(data: Any, index: int) -> StageConfig:
    """A recipe's stage ``index`` as a :class:`StageConfig`; errors say ``stages.N ('name')``."""
    if isinstance(data, StageConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"stages.{index} must be a mapping of stage fields, got {data!r}")
    name = data.get("name", StageConfig.name)
    label = stage_label(index, name)
    try:
        return config_from_dict(StageConfig, data, where=label)
    except ValueError as error:
        message = str(error)
        if message.startswith(f"stage '{name}'"):
            message = label + message[len(f"stage '{name}'"):]
        elif not message.startswith(label):
            message = f"{label}: {message}"
        raise ValueError(message) from None


def stage_data(run: RunConfig, index: int, stage: StageConfig) -> DataConfig:
    """The checked :class:`DataConfig` of a stage (its own, or the recipe's default)."""
    label = stage_label(index, stage.name)
    spec = stage.data if stage.data is not None else run.data
    if spec is None:
        raise ValueError(f"{label} has no data and the recipe has no default 'data'")
    if not isinstance(spec, dict):
        raise ValueError(f"{label} data must be a mapping with 'sources', got {spec!r}")
    sources = spec.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError(f"{label} data needs 'sources', a non-empty list; got {sources!r}")
    parsed = [source if isinstance(source, SourceConfig) else
              SourceConfig.from_dict(source, where=f"{label} data.sources.{number}")
              for number, source in enumerate(sources)]
    data = config_from_dict(DataConfig, {**spec, "sources": parsed}, where=f"{label} data")
    for number, source in enumerate(data.sources):
        check_source(source, f"{label} data.sources.{number}")
    if data.feature_cache:
        check_not_a_file(data.feature_cache, f"{label} data.feature_cache")
    return data


def check_source(source: SourceConfig, label: str) -> None:
    """A file source exists and parses; a source type's spec passes its ``check`` (a MiniWorld source names a known
    task and split); a webdataset source's shards exist."""
    if source.type is not None:
        check = SOURCE_TYPES.get(source.type).check
        try:
            if check is not None:
                check(source.spec)
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        return
    if source.webdataset is not None:  # the shards exist; they are scanned when the dataset is built
        from mmbridge.data.formats.webdataset import expand_shards

        try:
            shards = expand_shards(source.webdataset)
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        missing = [shard for shard in shards if not os.path.isfile(shard)]
        if missing:
            raise FileNotFoundError(f"{label}: {len(missing)} of {len(shards)} webdataset shard(s) do not exist, "
                                    f"first {missing[0]}")
        return
    if not os.path.isfile(source.path):
        what = "is a directory, not a data file" if os.path.isdir(source.path) else "does not exist"
        raise FileNotFoundError(f"{label}: data file {source.path} {what}")
    if source.image_root is not None and not os.path.isdir(source.image_root):
        raise FileNotFoundError(f"{label}: image_root {source.image_root} is not a directory")
    load_source(source, label)  # LLaVA or interleaved documents; the errors name the file, the sample and the field


def check_model(model: Any, components: tuple[str, ...] = ("vision", "llm", "bridge")) -> None:
    """The model spec's keys and each listed component's type and fields (nothing is built)."""
    from mmbridge.model.bridges import BRIDGES
    from mmbridge.model.llm import LLMS
    from mmbridge.model.multimodal import ModelConfig
    from mmbridge.model.vision import VISION_ENCODERS

    config = config_from_dict(ModelConfig, model, where="recipe model")
    registries = {"vision": VISION_ENCODERS, "llm": LLMS, "bridge": BRIDGES}
    for key in components:
        registry, spec = registries[key], getattr(config, key)
        if spec is None:
            raise ValueError(f"recipe model needs a '{key}' spec")
        try:
            registry.make_config(spec)
        except KeyError as error:
            raise ValueError(f"recipe model.{key}: {error.args[0]}") from None
        except ValueError as error:
            raise ValueError(f"recipe model.{key}: {error}") from None
    check_output(config.output)


def check_output(output: Any) -> None:
    """The output side (``model.output``): each modality's fields, and its generator's spec and files (a
    directory missing a component is named now, not after the stages before the first that needs it)."""
    from mmbridge.model.generators import check_generator
    from mmbridge.model.output import output_configs

    try:
        configs = output_configs(output)
    except ValueError as error:
        raise ValueError(f"recipe model.{error}" if str(error).startswith("output") else
                         f"recipe model.output: {error}") from None
    for modality, config in configs.items():
        if config.generator is None:
            continue
        try:
            check_generator(config.generator)
        except (KeyError, ValueError, FileNotFoundError) as error:
            message = error.args[0] if isinstance(error, KeyError) else str(error)
            raise ValueError(f"recipe model.output.{modality}.generator: {message}") from None


def check_processor(settings: Any) -> None:
    """``processor:`` holds only ``max_length`` (a positive integer) and ``system_prompt`` (text or null)."""
    if not isinstance(settings, dict):
        raise ValueError(f"recipe processor must be a mapping, got {settings!r}")
    unknown = sorted(set(settings) - set(PROCESSOR_FIELDS))
    if unknown:
        raise ValueError(f"recipe processor: unknown field(s) {unknown}; valid fields: {sorted(PROCESSOR_FIELDS)}")
    length = settings.get("max_length", 1)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"recipe processor: field 'max_length' must be a positive integer, got {length!r}")
    if not isinstance(settings.get("system_prompt"), PROCESSOR_FIELDS["system_prompt"]):
        raise ValueError(f"recipe processor: field 'system_prompt' must be a string or null, "
                         f"got {settings['system_prompt']!r}")


def check_not_a_file(path: str, field: str) -> None:
    """``path`` (a directory to write into) must not be, or lie under, an existing file."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{field} must be a directory path, got {path!r}")
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe) and not os.path.isdir(probe):
            where = "is" if probe == os.path.abspath(path) else f"lies under {probe}, which is"
            raise ValueError(f"{field} {path} {where} an existing file, not a directory")
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
