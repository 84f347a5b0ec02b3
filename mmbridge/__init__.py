"""mmbridge: bridge any pretrained vision encoder to any pretrained LLM.

Public API (re-exported names only)::

    from mmbridge import MultimodalModel, ModelConfig, load_run_config
    from mmbridge.train import train
"""

from mmbridge.config import RunConfig, load_run_config
from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges import BRIDGES, Bridge
from mmbridge.model.grid import FeatureGrid
from mmbridge.model.llm import LLMS
from mmbridge.model.multimodal import ModelConfig, MultimodalModel
from mmbridge.model.vision import VISION_ENCODERS, ImageTransform
from mmbridge.worlds import miniworld as _miniworld  # registers the MiniWorld data source type and eval suites

__version__ = "0.1.0"


__all__ = ["MultimodalModel", "ModelConfig", "RunConfig", "load_run_config", "BRIDGES", "Bridge", "BridgeInputs",
           "FeatureGrid", "LLMS", "VISION_ENCODERS", "ImageTransform", "__version__"]
