"""Fully sharded data parallelism for one stage: shard, train, gather the full weights back.

A recipe with ``distributed: {strategy: fsdp}`` trains each stage the ZeRO-3 way (Rajbhandari et al.,
2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"), with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``; Zhao et al., 2023, "PyTorch FSDP"): every process keeps
1/N of each parameter, of its gradient and of its AdamW moments, and all-gathers a unit's
parameters just before the unit runs.

Units: each LLM decoder layer is one (all-gathered for its forward, freed after, gathered again for
its backward); everything else -- the vision encoder, the bridge, the embeddings, the final norm and
LM head -- is the root unit, gathered for the whole step. The vision encoder and the bridge sit in the
root on purpose: a process whose micro-batch is text-only skips them, and a unit of their own would
then be all-gathered and reduce-scattered by some processes only (the ZeRO-3 hang of DeepSpeed
#7170). In the root every process gathers them, and the root's reduce-scatter includes a zero
gradient for every trainable parameter a process left unused (``set_reduce_scatter_unused_params``),
so every process reduces the same tensors. A parameter no process used in a step gets no gradient
(``None``), as under DDP, so AdamW leaves it and its moments alone.

:class:`FullyShardedStage` shards at the start of a stage, after :func:`~mmbridge.train.recipe.apply_stage`
(so LoRA adapters and ``requires_grad`` are in place) and before the optimizer is built over the
sharded parameters; :meth:`FullyShardedStage.gather` puts full, plain parameters back at the end, so
the next stage (other trainable keys, LoRA injection, MoE upcycling), the saved model and the caller
see an ordinary model. Checkpoints gather full tensors on every process with :func:`full` and load
them with :func:`load_full`: the files are those of a one-process or DDP run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("mmbridge")


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter, gradient or AdamW moment sharded by FSDP)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one is all-gathered (every process must call this, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def load_full(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy the full tensor ``whole`` into ``target``; a sharded ``target`` takes its own shard (no communication)."""
    with torch.no_grad():
        if is_sharded(target):
            target.to_local().copy_(shard_like(whole, target).to_local())
        else:
            target.copy_(whole)


def shard_like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``whole`` as a DTensor placed like ``reference`` (this process's shard of it); ``whole`` itself when
    ``reference`` is not sharded (AdamW's ``step`` count)."""
    if not is_sharded(reference) or whole.shape != reference.shape:
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(reference.device), reference.device_mesh, reference.placements,
                             src_data_rank=None)  # every process read the same file: each takes its own shard


def shard_stage(strategy: str, objective: nn.Module, model: nn.Module, accelerator: Any,
                precision: str) -> "FullyShardedStage | None":
    """The stage's :class:`FullyShardedStage` when the recipe's ``distributed.strategy`` is ``fsdp`` and several
    processes run; ``None`` otherwise (one process trains unsharded, and says so)."""
    if strategy != "fsdp":
        return None
    if accelerator.num_processes == 1:
        logger.info("distributed.strategy is fsdp but this run has one process: it trains unsharded")
        return None
    return FullyShardedStage(objective, model, accelerator.device, accelerator.num_processes, precision)


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was wrapped by ``fully_shard``."""
    return isinstance(module, _fsdp().FSDPModule)


class FullyShardedStage:
    """One stage's FSDP: :attr:`root` is ``objective`` sharded across ``world`` processes (call it like the
    module; its ``set_requires_gradient_sync`` plays DDP's ``no_sync``); :meth:`finish_backward`,
    :meth:`clip_grad_norm` and :meth:`gather` serve the training loop."""

    def __init__(self, objective: nn.Module, model: nn.Module, device: torch.device, world: int,
                 precision: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        fsdp = _fsdp()
        mesh = init_device_mesh(device.type, (world,))
        layers = _decoder_layers(model)
        for layer in layers:
            fsdp.fully_shard(layer, mesh=mesh)
        self.root = fsdp.fully_shard(objective, mesh=mesh)
        self.root.set_reduce_scatter_unused_params(True)  # a text-only micro-batch leaves vision/bridge unused
        self.model, self.world = model, world
        in_layers = {id(parameter) for layer in layers for parameter in layer.parameters()}
        self.root_trainable = [name for name, parameter in model.named_parameters()  # may go unused by a process
                               if parameter.requires_grad and id(parameter) not in in_layers]
        self._used: set[str] = set()
        self._gathered: dict[int, str] = {}
        self._hooks = [self.root.register_forward_pre_hook(self._before_forward),  # after FSDP's (prepended one):
                       self.root.register_forward_hook(self._after_forward)]  # the root's parameters are gathered
        if layers:
            self._hooks.append(model.llm.decoder.register_forward_pre_hook(_inputs_need_grad, with_kwargs=True))
        local = sum(parameter.to_local().numel() for parameter in model.parameters())
        total = sum(parameter.numel() for parameter in model.parameters())
        logger.info("FSDP over %d processes: %d decoder layers as units, the rest as the root unit; this process "
                    "holds %d of %d parameters", world, len(layers), local, total)
        if precision == "bf16":
            logger.info("FSDP: frozen LLM weights stay fp32 in memory (no one-time bf16 cast); bf16 autocast "
                        "still runs the matmuls in bf16")

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Map the root unit's gathered (plain) trainable tensors to their names for this forward."""
        named = dict(self.model.named_parameters())
        self._gathered = {id(named[name]): name for name in self.root_trainable}

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Record which root-unit trainable parameters this micro-batch's loss reaches."""
        loss = output[0] if isinstance(output, tuple) else output
        self._used |= {self._gathered[key] for key in _leaves(loss) if key in self._gathered}
        self._gathered = {}

    def finish_backward(self) -> None:
        """After a step's last backward: a root-unit parameter that no process's micro-batches reached gets no
        gradient (``None``), as under DDP and on one process; the others keep the averaged gradient."""
        if not self.root_trainable:
            return
        named = dict(self.model.named_parameters())
        flags = torch.tensor([name in self._used for name in self.root_trainable], dtype=torch.int32,
                             device=named[self.root_trainable[0]].device)
        torch.distributed.all_reduce(flags)  # how many processes used each
        for name, used in zip(self.root_trainable, flags.tolist()):
            if not used:
                named[name].grad = None
        self._used = set()

    def clip_grad_norm(self, parameters: list[torch.Tensor], max_norm: float) -> float:
        """Clip the sharded gradients to a total norm of ``max_norm``; returns the norm before clipping."""
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if not grads:
            return 0.0
        total = full(torch.nn.utils.get_total_norm(grads, 2.0))  # each process's shards, then summed over processes
        scale = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # as torch.nn.utils.clip_grad_norm_
        with torch.no_grad():
            for grad in grads:
                grad.mul_(scale)
        return float(total)

    def gather(self) -> None:
        """Undo the sharding: every parameter becomes a plain full ``nn.Parameter`` again (gathered on every
        process) and the FSDP hooks and classes are removed, so the model is an ordinary module."""
        for hook in self._hooks:
            hook.remove()
        _unshard(self.root)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers, one FSDP unit each; none (the whole LLM in the root unit) where the LLM has no
    layer list (encoder-decoder LLMs)."""
    try:
        return list(model.llm.decoder_layers())
    except TypeError as error:
        logger.info("FSDP: %s; the whole LLM is one unit with the rest", error)
        return []


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger buffer (an all-gather's padded output): safetensors and
    ``save_pretrained`` refuse such views, and the buffer would stay alive."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _inputs_need_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Make the decoder's input embeddings require grad in every process. A layer unit reduce-scatters its
    gradients when the gradient reaches its input; with frozen embeddings a text-only micro-batch's input
    needs none, so there the first layers would reduce in FSDP's final callback, after the root unit, while an
    image micro-batch (the bridge trains) reduces them before it: the processes' collectives would not match."""
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.is_floating_point() and not embeds.requires_grad:
        kwargs["inputs_embeds"] = embeds.detach().requires_grad_(True)
    return args, kwargs


def _leaves(loss: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor (parameter) whose gradient ``loss`` reaches, by walking its autograd graph."""
    found: set[int] = set()
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return found
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def _unshard(root: nn.Module) -> None:
    """Replace every DTensor parameter under ``root`` by a plain ``nn.Parameter`` holding the full tensor (shared
    parameters stay shared), then strip FSDP from each module it wrapped: hooks, state, the ``FSDP*`` class."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    fsdp = _fsdp()
    wrapped = [module for module in root.modules() if isinstance(module, fsdp.FSDPModule)]
    for module in wrapped:
        module.reshard()  # registered parameters are the sharded ones
    replaced: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in root.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is None or not is_sharded(parameter):
                    continue
                if id(parameter) not in replaced:
                    whole = _own_storage(parameter.full_tensor())
                    replaced[id(parameter)] = nn.Parameter(whole, requires_grad=parameter.requires_grad)
                module._parameters[name] = replaced[id(parameter)]
    for module in wrapped:
        state = module._get_fsdp_state()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        states = module.__dict__.get(STATE_KEY, {})
        for key in [key for key, value in states.items() if value is state]:
            del states[key]
        module.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
        _module_state_mapping.pop(module, None)
        module.__class__ = next(cls for cls in type(module).__mro__[1:]
                                if not issubclass(cls, fsdp.FSDPModule))  # the class it had
    for module in root.modules():
        for attribute in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(attribute, None)
