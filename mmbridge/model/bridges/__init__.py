"""Input-token bridges, one file per family; importing this package registers them."""

from mmbridge.model.bridges import mlp  # noqa: F401  (registers linear, mlp, swiglu)
from mmbridge.model.bridges import compress  # noqa: F401  (registers pool, pixel_shuffle)
from mmbridge.model.bridges import internvl  # noqa: F401  (registers internvl)
from mmbridge.model.bridges import perceiver  # noqa: F401  (registers perceiver)
from mmbridge.model.bridges import qwen_resampler  # noqa: F401  (registers qwen_resampler)
from mmbridge.model.bridges import qformer  # noqa: F401  (registers qformer)
from mmbridge.model.bridges import instruct_qformer  # noqa: F401  (registers instruct_qformer)
from mmbridge.model.bridges import llama_vid  # noqa: F401  (registers llama_vid)
from mmbridge.model.bridges.base import BRIDGES, Bridge, FusionCall, ProcessorNeeds, StageHooks, build_bridge

__all__ = ["BRIDGES", "Bridge", "FusionCall", "ProcessorNeeds", "StageHooks", "build_bridge"]
