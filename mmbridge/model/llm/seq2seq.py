"""The encoder–decoder language-model adapter (T5 / Flan-T5), as BLIP-2's FlanT5 variants use it.

BLIP-2 (arXiv 2301.12597, §3.3) connects its Q-Former to two kinds of LLM: a decoder-only
one reads the visual queries as a soft prefix, while an encoder–decoder one (Flan-T5)
gets the queries and the prompt in its *encoder* and produces the answer with its
*decoder*. :class:`Seq2SeqLanguageModel` is the adapter for the second kind, behind the
same small interface as :class:`~mmbridge.model.llm.base.LanguageModel`:

* :meth:`encode` runs the encoder on spliced input embeddings ``[B, L, D]``;
* :meth:`forward` runs the decoder on ``decoder_input_ids`` with cross-attention to the
  encoder states and returns its final hidden states (plus the KV cache);
* :meth:`logits` applies the LM head to any subset of them — with T5's rescaling of the
  decoder output by ``d_model ** -0.5`` when the config asks for it — so training still
  builds logits at label positions only;
* :meth:`decoder_start_ids` shifts labels right behind ``decoder_start_token_id`` exactly as
  the HF class does when it is given only ``labels``.

Only T5-family checkpoints (``model_type`` ``"t5"``, which covers Flan-T5) are accepted:
the logits path above is checked against ``T5ForConditionalGeneration`` to the last logit;
other encoder–decoder families (BART's ``final_logits_bias``, mT5's untied head…) compute
their logits differently and are refused with a clear error rather than run wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmbridge.model.llm.base import LanguageModel

SEQ2SEQ_MODEL_TYPES = ("t5",)


class Seq2SeqLanguageModel(LanguageModel):
    """An HF T5-family ``*ForConditionalGeneration`` plus its tokenizer."""

    is_encoder_decoder = True

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SEQ2SEQ_MODEL_TYPES:
            raise ValueError(f"encoder-decoder LLM of type {model_type!r} is not supported; supported: "
                             f"{list(SEQ2SEQ_MODEL_TYPES)} (decoder-only LLMs: any HF causal LM)")
        super().__init__(model, tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def encoder(self) -> nn.Module:
        return self.model.get_encoder()

    def decoder_layers(self) -> nn.ModuleList:
        raise TypeError(f"{type(self.model).__name__} is an encoder-decoder LLM: fusion bridges (cross-attention, "
                        f"visual experts, MoE) attach to decoder-only LLMs")

    @property
    def decoder_start_token_id(self) -> int:
        config = self.model.config
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        if start is None:
            raise ValueError(f"{type(self.model).__name__} config sets neither decoder_start_token_id nor pad_token_id")
        return int(start)

    # -- computation -------------------------------------------------------------------------
    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's final hidden states ``[B, L, D]`` for input embeddings ``[B, L, D]``."""
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    def decoder_start_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` labels → decoder inputs: shifted right behind the start token, ``-100`` → pad (HF's own)."""
        return self.model.prepare_decoder_input_ids_from_labels(labels=labels)

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
                encoder_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """Run the decoder: ``[B, T]`` ids attending to ``[B, L, D]`` encoder states → ``[B, T, D]`` and the cache."""
        kwargs = {self._cache_arg: cache}
        outputs = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                               encoder_hidden_states=encoder_hidden, encoder_attention_mask=encoder_mask,
                               use_cache=use_cache, **kwargs)
        return outputs.last_hidden_state, self._returned_cache(outputs)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        """LM-head logits; T5 first rescales the decoder output by ``d_model ** -0.5`` (tied embeddings)."""
        if getattr(self.model.config, "scale_decoder_outputs", False):
            hidden_states = hidden_states * (self.model.config.d_model ** -0.5)
        return self.lm_head(hidden_states)
