"""The language-model adapter: any HF causal LM behind one small interface.

:class:`LanguageModel` holds the HF ``*ForCausalLM`` (``self.model``) and its
tokenizer, and splits the forward pass in two so callers decide where logits are
needed: :meth:`forward` runs the decoder on input embeddings and returns hidden
states (plus the KV cache), :meth:`logits` applies the LM head to any subset of
them. Training therefore never materialises full-vocabulary logits over image and
prompt tokens.

Room for bridges that live inside the LLM (Flamingo cross-attention, CogVLM experts,
MoE): :meth:`decoder_layers` exposes the decoder's layer list and
:meth:`replace_layer` swaps one for a wrapper, without editing transformers' code;
the call's :class:`~mmbridge.model.bridges.base.FusionCall` (image mask, the bridge's prompt and call
state) is passed to :meth:`forward` and readable by such modules as :attr:`context` for the duration of
the call; they only read it.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from torch import nn

from mmbridge.model.llm.hf_config import export_hf_llm_config
from mmbridge.registry import Registry

LLMS: Registry["LanguageModel"] = Registry("llm")


class LanguageModel(nn.Module):
    """An HF causal LM plus its tokenizer (the tokenizer is not a module and is saved separately)."""

    is_encoder_decoder = False  # Seq2SeqLanguageModel (T5) says True: prompt into an encoder, answer from a decoder

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.context: Any = None  # the running call's FusionCall (None outside a call)
        decoder_params = inspect.signature(self.decoder.forward).parameters
        # transformers >= 5.24 names the KV cache argument `cache`, earlier releases `past_key_values`
        self._cache_arg = "cache" if "cache" in decoder_params else "past_key_values"

    # -- structure ---------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def decoder(self) -> nn.Module:
        """The transformer body (``LlamaModel``, ``Qwen2Model``…), without the LM head."""
        return self.model.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def final_norm(self) -> nn.Module:
        """The normalisation the decoder applies before the LM head (``norm`` in Llama/Qwen2/Mistral, ``ln_f``
        in GPT-2), so hidden states can be read out as :meth:`logits` would after the last layer."""
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
            module = getattr(self.decoder, name, None)
            if isinstance(module, nn.Module):
                return module
        raise TypeError(f"{type(self.decoder).__name__} has no final norm named norm/ln_f/final_layer_norm")

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D]
        return self.model.get_input_embeddings()(input_ids)

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's list of layers, for fusion bridges to wrap or replace."""
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{type(self.decoder).__name__} has no `layers` ModuleList; fusion bridges cannot attach")
        return layers

    def replace_layer(self, index: int, module: nn.Module) -> nn.Module:
        """Put ``module`` in place of decoder layer ``index``; returns the layer it replaced."""
        layers = self.decoder_layers()
        previous = layers[index]
        layers[index] = module
        return previous

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens to the tokenizer (if missing) and grow the embeddings to match; returns their ids."""
        missing = [token for token in tokens if token not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=True)
        size = len(self.tokenizer)
        if size > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(size, mean_resizing=False)
        return [self.tokenizer.convert_tokens_to_ids(token) for token in tokens]

    # -- computation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def use_context(self, context: Any) -> Iterator[None]:
        """Expose a call's :class:`~mmbridge.model.bridges.base.FusionCall` to modules inside the LLM while it runs."""
        previous, self.context = self.context, context
        try:
            yield
        finally:
            self.context = previous

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                context: Any = None) -> tuple[torch.Tensor, Any]:
        """Run the decoder: ``[B, L, D]`` embeddings → final hidden states ``[B, L, D]`` and the cache; ``context``:
        the call's :class:`~mmbridge.model.bridges.base.FusionCall`, for modules inside the layers."""
        kwargs = {self._cache_arg: cache}
        with self.use_context(context):
            outputs = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache, **kwargs)
        return outputs.last_hidden_state, self._returned_cache(outputs)

    def _returned_cache(self, outputs: Any) -> Any:
        """The KV cache in a decoder's outputs, under either transformers naming."""
        return getattr(outputs, "cache", None) if self._cache_arg == "cache" else outputs.past_key_values

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        """LM-head logits, with the final soft-capping some families (Gemma 2) apply."""
        logits = self.lm_head(hidden_states)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def export_config(self) -> Any:
        """A config that rebuilds this LLM's architecture without the original checkpoint."""
        return export_hf_llm_config(self.model)


def build_llm(spec: Any) -> LanguageModel:
    """Build an LLM adapter from a dict (``{"type": "hf", "path": ...}``) or a registered config."""
    return LLMS.build(spec)
