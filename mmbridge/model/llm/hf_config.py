"""The config of an HF language model, and the config a built one exports to be rebuilt offline.

It sits apart from the builder (:mod:`mmbridge.model.llm.hf`) so that
:meth:`LanguageModel.export_config <mmbridge.model.llm.base.LanguageModel.export_config>` can
return one without importing the builder, which imports the adapters in turn.

Tying of the LM head is read from the weights, not from the HF config: transformers 5.25
makes every T5 config say ``tie_word_embeddings=True``, while Flan-T5 checkpoints (and
T5 v1.1) carry an LM head of their own. An exported config says what the model holds, and
the builder unties the head again when a config says ``tie_word_embeddings: false``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class HFLLMConfig:
    """An HF causal LM: ``path`` (dir or hub id, optional ``gguf_file`` inside it) or ``hf_config`` (dict).

    ``tokenizer`` is a directory or hub id (defaults to ``path``); with ``hf_config`` and no
    tokenizer, one must be attached by the caller. ``chat_template`` overrides the
    tokenizer's template. ``dtype`` is the storage dtype of the weights.
    ``attn_implementation`` is transformers' choice of attention kernel (``"sdpa"``, its default,
    or ``"eager"``…): on CPU in bf16, eager attention trains short sequences markedly faster
    than SDPA's flash kernel (``benchmarks/RESULTS.md``) but rounds differently and stores the
    ``[B, heads, L, L]`` scores for backward.
    """

    type: str = "hf"
    path: str | None = None
    gguf_file: str | None = None
    hf_config: dict | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None


def head_is_tied(model: nn.Module) -> bool:
    """Whether the HF model's LM head shares its weight with the input embeddings (checked on the tensors)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def export_hf_llm_config(model: nn.Module) -> HFLLMConfig:
    """An :class:`HFLLMConfig` that rebuilds ``model`` (an HF ``*ForCausalLM`` or T5) without its checkpoint."""
    hf_config = model.config.to_dict()
    if model.get_output_embeddings() is not None:
        hf_config["tie_word_embeddings"] = head_is_tied(model)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return HFLLMConfig(hf_config=hf_config, tokenizer=None, dtype=dtype,
                       attn_implementation=getattr(model.config, "_attn_implementation", None))
