"""Generators that models answering with images call (NExT-GPT's output side); importing this package registers
them. diffusers itself is imported only when a generator is built."""

from mmbridge.model.generators import diffusers  # noqa: F401  (registers "diffusers")
from mmbridge.model.generators.base import (GENERATORS, Generator, TextConditioning, build_generator, check_generator,
                                            min_snr_weights)
from mmbridge.model.generators.diffusers import DiffusersGenerator, DiffusersGeneratorConfig

__all__ = ["GENERATORS", "Generator", "TextConditioning", "build_generator", "check_generator", "min_snr_weights", "DiffusersGenerator",
           "DiffusersGeneratorConfig"]
