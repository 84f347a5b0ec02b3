"""``moe``: MoE-LLaVA's sparse experts (Lin et al., "MoE-LLaVA: Mixture of Experts for Large Vision-Language
Models", arXiv 2401.15947).

The FFN of each chosen decoder layer (by default every other layer, MoE-LLaVA's "sparse"
layout) becomes ``num_experts`` experts copied from it. A router (``Linear(D, E)``, no bias)
scores each token; its top-``top_k`` experts run on it and their outputs are summed with the
softmax scores renormalised over the chosen ones — the computation of transformers'
``MixtralSparseMoeBlock``, which ``tests/test_fusion_moe.py`` reproduces to 1e-5. Training adds
``aux_loss_weight`` × the Switch-Transformer load-balancing loss (transformers'
``load_balancing_loss_func``: E · Σ_e f_e · P_e over all MoE layers and attended tokens) to the
loss, and logs it with the tokens each expert received per layer.

MoE-tuning (``configs/moe_llava.yaml``) is three stages: the projector alone, then everything
but the encoder with the LLM's dense FFNs, then only the MoE layers. So the layers can start
*dense* (``start: dense``: the LLM's own FFN runs, the experts wait) and a stage with
``upcycle: true`` copies each FFN, as trained so far, into its experts and switches the layers
to routing. With ``start: moe`` (the default) the experts are copies from the start.

The layer's FFN module is replaced by :class:`MoEFeedForward`, which adopts the original FFN's
children under their own names (``llm.…mlp.gate_proj.weight`` is unchanged) and routes to the
bridge's experts without registering them a second time; with all experts equal copies a fresh
model gives the LLM's output (the renormalised weights sum to one).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmbridge.model.bridges.base import BRIDGES, FusionCall
from mmbridge.model.bridges.mlp import default_projector
from mmbridge.model.fusion.base import FusionBridge, projector_of, selected_layers, submodule

STARTS = ("moe", "dense")


@dataclass
class MoEConfig:
    """``layers`` (None: every ``every``-th layer from the first), ``ffn``: the FFN's path inside a layer."""

    type: str = "moe"
    projector: Any = field(default_factory=default_projector)
    num_experts: int = 4
    top_k: int = 2
    layers: list[int] | None = None
    every: int = 2
    aux_loss_weight: float = 0.01
    start: str = "moe"
    ffn: str = "mlp"


class SparseMoE(nn.Module):
    """A router and ``E`` expert FFNs for one decoder layer."""

    def __init__(self, dense: nn.Module, dim: int, cfg: MoEConfig, bridge: "MoEBridge") -> None:
        super().__init__()
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(cfg.num_experts))
        self.top_k = cfg.top_k
        self.__dict__["bridge"] = bridge  # referenced for the running call, not registered

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        flat = hidden.reshape(-1, hidden.shape[-1])  # [T, D]
        logits = self.router(flat)  # [T, E]
        weights, chosen = self.route(logits)  # [T, k] fp32, [T, k]
        output = torch.zeros_like(flat)
        for expert_index, expert in enumerate(self.experts):
            token_index, slot = (chosen == expert_index).nonzero(as_tuple=True)
            if token_index.numel() == 0:
                continue
            expert_output = expert(flat[token_index]) * weights[token_index, slot, None]  # [n, D]
            output.index_add_(0, token_index, expert_output.to(output.dtype))
        self.bridge.record(logits, chosen)
        return output.view_as(hidden)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their softmax scores renormalised over the k (float32)."""
        probabilities = logits.float().softmax(-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), chosen


class MoEFeedForward(nn.Module):
    """Stands in the decoder layer for its FFN: the FFN's own children under their own names, and either the
    dense FFN (before upcycling) or the bridge's :class:`SparseMoE` (after)."""

    def __init__(self, dense: nn.Module, moe: SparseMoE) -> None:
        super().__init__()
        self.__dict__["dense"] = dense  # the original module; its children are adopted below
        self.__dict__["moe"] = moe  # lives under bridge.…
        self._parameters, self._buffers, self._modules = dense._parameters, dense._buffers, dense._modules

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden) if self.moe.bridge.active else self.dense(hidden)


class MoEBridge(FusionBridge):
    """Projector + sparse MoE FFNs in the chosen layers (see the module docstring)."""

    def __init__(self, cfg: MoEConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(projector_of(cfg.projector, in_dim, out_dim))
        if cfg.num_experts < 1 or not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"moe: need 1 <= top_k <= num_experts, got top_k={cfg.top_k}, "
                             f"num_experts={cfg.num_experts}")
        if cfg.start not in STARTS:
            raise ValueError(f"moe: start must be one of {STARTS}, got {cfg.start!r}")
        if cfg.aux_loss_weight < 0:
            raise ValueError(f"moe: aux_loss_weight must be >= 0, got {cfg.aux_loss_weight}")
        self.cfg = cfg
        self.active = cfg.start == "moe"
        self.moe_layers = nn.ModuleDict()  # str(layer index) → SparseMoE
        self.__dict__["dense_ffns"] = {}  # str(layer index) → the LLM's FFN (referenced, not registered)
        # the router logits and choices of every MoE layer in the latest training call, kept from that call's
        # first layer until training_outputs reads them (or the next training call starts)
        self.__dict__["routing"] = None  # (the FusionCall, [(logits [T, E], chosen [T, k]) per layer]) or None

    def _attach(self, llm: nn.Module) -> None:
        decoder_layers = llm.decoder_layers()
        parent_path, _, name = self.cfg.ffn.rpartition(".")
        for index in selected_layers(llm, self.cfg.layers, self.cfg.every, where="moe"):
            dense = submodule(decoder_layers[index], self.cfg.ffn, index, "moe")
            moe = SparseMoE(dense, llm.hidden_size, self.cfg, self)
            self.moe_layers[str(index)] = moe
            self.dense_ffns[str(index)] = dense
            parent = decoder_layers[index].get_submodule(parent_path) if parent_path else decoder_layers[index]
            setattr(parent, name, MoEFeedForward(dense, moe))

    # -- MoE-tuning -----------------------------------------------------------------------------
    def check_stage(self, stage: Any) -> None:
        """Every stage suits MoE-tuning (``upcycle`` included)."""

    def start_stage(self, stage: Any) -> None:
        """A stage with ``upcycle`` copies the FFNs as trained so far (a checkpoint of later training overwrites
        them on resume)."""
        if getattr(stage, "upcycle", False):
            self.upcycle()

    @torch.no_grad()
    def upcycle(self) -> None:
        """Copy each layer's FFN (as trained so far) into all its experts and route from now on."""
        for index, moe in self.moe_layers.items():
            state = self.dense_ffns[index].state_dict()
            for expert in moe.experts:
                expert.load_state_dict(state)
        self.active = True

    def export_config(self, config: Any = None) -> MoEConfig:
        """The config that rebuilds this bridge as it is now (``start: moe`` once upcycled)."""
        from dataclasses import replace

        return replace(self.cfg, start="moe" if self.active else "dense")

    # -- training signals -----------------------------------------------------------------------
    def record(self, logits: torch.Tensor, chosen: torch.Tensor) -> None:
        """Keep one layer's router logits ``[T, E]`` and choices ``[T, k]`` during a training call."""
        call = self.call
        if call is None or not call.training:
            return
        if self.routing is None or self.routing[0] is not call:
            self.__dict__["routing"] = (call, [])
        self.routing[1].append((logits, chosen))

    def training_outputs(self, call: FusionCall) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``moe_aux_loss`` (weighted load-balancing loss) and ``moe_tokens_per_expert`` (per layer) of ``call``."""
        routing = self.routing[1] if self.routing is not None and self.routing[0] is call else []
        self.__dict__["routing"] = None
        if not routing:
            return {}, {}
        tokens = routing[0][0].shape[0]
        mask = call.attention_mask
        keep = (mask.reshape(-1).float() if mask is not None and mask.numel() == tokens
                else torch.ones(tokens, device=routing[0][0].device))  # [T]
        experts = self.cfg.num_experts
        assigned = torch.zeros(experts, device=keep.device)
        probability = torch.zeros(experts, device=keep.device)
        counts = []
        for logits, chosen in routing:
            per_layer = torch.zeros(experts, device=keep.device).scatter_add_(
                0, chosen.reshape(-1), keep.repeat_interleave(self.cfg.top_k))
            assigned = assigned + per_layer
            probability = probability + (logits.float().softmax(-1) * keep[:, None]).sum(0)
            counts.append(per_layer)
        rows = keep.sum() * len(routing)
        balance = experts * torch.sum((assigned / rows) * (probability / rows))
        stats = {"moe_tokens_per_expert": torch.stack(counts).round().long().tolist()}
        return {"moe_aux_loss": self.cfg.aux_loss_weight * balance}, stats

    # -- reporting ------------------------------------------------------------------------------
    def inactive_parameters_per_token(self) -> int:
        """Per MoE layer, a token skips E − k experts and the dense FFN (or, before upcycling, every expert and
        the router)."""
        idle = 0
        for index, moe in self.moe_layers.items():
            expert = sum(parameter.numel() for parameter in moe.experts[0].parameters())
            if self.active:
                idle += (self.cfg.num_experts - self.cfg.top_k) * expert
                idle += sum(parameter.numel() for parameter in self.dense_ffns[index].parameters())
            else:
                idle += sum(parameter.numel() for parameter in moe.parameters())
        return idle


@BRIDGES.register("moe", MoEConfig)
def build_moe(cfg: MoEConfig, in_dim: int, out_dim: int) -> MoEBridge:
    return MoEBridge(cfg, in_dim, out_dim)
