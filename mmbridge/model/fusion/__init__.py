"""Bridges that live inside the LLM, one file per family; importing this package registers them.

See :mod:`mmbridge.model.fusion.base` for the contract they keep.
"""

from mmbridge.model.fusion import gated_xattn  # noqa: F401  (registers gated_xattn)
from mmbridge.model.fusion import mma  # noqa: F401  (registers mma)
from mmbridge.model.fusion import moe  # noqa: F401  (registers moe)
from mmbridge.model.fusion import visual_expert  # noqa: F401  (registers visual_expert)
from mmbridge.model.fusion.base import FusionBridge

__all__ = ["FusionBridge"]
