"""Every recipe in configs/ parses: top-level fields, component specs, stages and data sections."""

from __future__ import annotations

import glob
import os

import pytest

from mmbridge.config import load_run_config
from mmbridge.data import DataConfig
from mmbridge.model.bridges import BRIDGES
from mmbridge.model.highres import HIGHRES
from mmbridge.model.generators import GENERATORS
from mmbridge.model.llm import LLMS
from mmbridge.model.output import output_configs
from mmbridge.model.vision import VISION_ENCODERS
from mmbridge.registry import config_from_dict
from mmbridge.train.denoising import parse_generator_spec
from mmbridge.train.ranges import check_ranges
from mmbridge.train.recipe import stage_from_dict

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_there_are_recipes():
    assert {os.path.basename(path) for path in RECIPES} >= {"llava.yaml", "llava15.yaml", "smollm2_efficientnet.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_parses(path):
    run = load_run_config(path)
    check_ranges(run)  # every numeric field within its range
    if any(stage.get("objective") == "denoising" for stage in run.stages):  # a generator: its own model section
        parse_generator_spec(run.model)
    else:
        check_components(run)
    assert run.stages
    for stage in map(stage_from_dict, run.stages):
        data = stage.data if stage.data is not None else run.data
        assert data is not None, f"{path}: stage {stage.name} has no data"
        config_from_dict(DataConfig, dict(data))
        assert isinstance(stage.lr, float)


def check_components(run) -> None:
    """The registries' configs of the recipe's vision, bridge, llm, highres and output parts."""
    VISION_ENCODERS.make_config(run.model["vision"])
    BRIDGES.make_config(run.model["bridge"])
    LLMS.make_config(run.model["llm"])
    if run.model.get("highres"):
        HIGHRES.make_config(run.model["highres"])
    for config in output_configs(run.model.get("output")).values():  # the generator's files are not read here
        GENERATORS.make_config(config.generator)



def _on_bundled_backbones(path: str) -> bool:
    model = load_run_config(path).model
    return model["vision"]["type"] == "efficientnet_lite0" and model["llm"]["type"] == "smollm2"


BUNDLED_RECIPES = [path for path in RECIPES if _on_bundled_backbones(path)]  # what `make` installs (see README)


def test_some_recipes_run_on_the_bundled_backbones():
    assert {os.path.basename(path) for path in BUNDLED_RECIPES} >= {"demo_miniworld.yaml", "nextgpt.yaml",
                                                                    "perceiver.yaml", "pooled_mlp.yaml",
                                                                    "qwen_resampler.yaml"}


@pytest.mark.parametrize("path", BUNDLED_RECIPES, ids=os.path.basename)
def test_recipes_on_the_bundled_backbones_read_only_shipped_data(path):
    """A recipe on the bundled backbones reads only data that ships: MiniWorld streams or files in the repository
    (nothing is downloaded). The recipe is not run here."""
    run = load_run_config(path)
    for stage in map(stage_from_dict, run.stages):
        data = config_from_dict(DataConfig, dict(stage.data if stage.data is not None else run.data))
        for source in data.sources:
            assert source.miniworld or os.path.isfile(source.path), \
                f"{path}: stage {stage.name} reads {source.path}, which nothing ships or writes"
