"""LoRA adapters (peft) injected in place into one module key, recorded so a saved model reloads them.

Injection uses ``peft.inject_adapter_in_model`` on the sub-module itself (no
``PeftModel`` wrapper), so parameter names keep their ``vision``/``bridge``/``llm``
prefix and the rest of mmbridge sees an ordinary ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA settings for one module key."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def to_dict(self) -> dict:
        return asdict(self)


def inject_lora(module: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> None:
    """Add LoRA layers to every ``spec.target_modules`` linear inside ``module`` (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    targets = [target for target in spec.target_modules if target in present]
    if not targets:
        raise ValueError(f"LoRA target_modules {spec.target_modules} match no sub-module of "
                         f"{type(module).__name__}; its linear layers include: {sorted(_linear_names(module))}")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    module.train(module.training)  # new LoRA dropout layers follow the module's train/eval mode


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every LoRA delta folded into its base weight and LoRA names removed."""
    from peft.tuners.lora import LoraLayer

    state = {}
    lora_layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}
    for name, tensor in module.state_dict().items():
        if "lora_" in name:
            continue
        owner = next((layer_name for layer_name in lora_layers if name.startswith(layer_name + ".base_layer.")), None)
        clean = name.replace(".base_layer.", ".")
        if owner is not None and name == f"{owner}.base_layer.weight":
            layer = lora_layers[owner]
            delta = sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters if adapter in layer.lora_A)
            tensor = tensor + delta.to(tensor.dtype)
        state[clean] = tensor
    return state


def _linear_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}
