"""Language models: the adapter over HF causal LMs and the bundled offline SmolLM2."""

from mmbridge.model.llm import hf  # noqa: F401  (registers hf, smollm2)
from mmbridge.model.llm.base import LLMS, LanguageModel, build_llm
from mmbridge.model.llm.hf import HFLLMConfig, load_tokenizer

__all__ = ["LLMS", "LanguageModel", "build_llm", "HFLLMConfig", "load_tokenizer"]
