"""High-resolution strategies between the image and the encoder; importing this package registers them.

See :mod:`mmbridge.model.highres.base` for the contract (layouts known before encoding).
"""

from mmbridge.model.highres import anyres  # noqa: F401  (registers "anyres")
from mmbridge.model.highres import uhd  # noqa: F401  (registers "uhd")
from mmbridge.model.highres import native  # noqa: F401  (registers "native")
from mmbridge.model.highres import monkey  # noqa: F401  (registers "monkey")
from mmbridge.model.highres.base import HIGHRES, VISUAL, Crop, HighResStrategy, ImageLayout, build_highres

__all__ = ["HIGHRES", "VISUAL", "Crop", "HighResStrategy", "ImageLayout", "build_highres"]
