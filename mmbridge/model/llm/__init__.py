"""Language models: the adapters over HF causal LMs and T5-family encoder-decoders, and the bundled SmolLM2."""

from mmbridge.model.llm import hf  # noqa: F401  (registers hf, smollm2)
from mmbridge.model.llm.base import LLMS, LanguageModel, build_llm
from mmbridge.model.llm.hf import load_tokenizer
from mmbridge.model.llm.hf_config import HFLLMConfig
from mmbridge.model.llm.seq2seq import Seq2SeqLanguageModel

__all__ = ["LLMS", "LanguageModel", "Seq2SeqLanguageModel", "build_llm", "HFLLMConfig", "load_tokenizer"]
