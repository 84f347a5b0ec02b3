"""Training on several processes: how a run was launched, the accelerator, and per-step figures over processes.

``accelerate launch`` (or ``torchrun``) starts one process per device. The trainer gives
process ``rank`` of ``world`` the micro-batches ``(step·grad_accum + a)·world + rank``, DDP
averages the gradients, and every figure a step logs is gathered from all processes, so a run
on N processes with ``grad_accum: k`` trains like one process with ``grad_accum: N·k``.

Two launches look like several processes but are not, and are refused here rather than
trained wrongly: ``accelerate launch --cpu --num_processes N`` without ``--mpirun_hostfile``
starts a single process (accelerate runs several CPU processes only through MPI), and
``accelerate``/``torchrun`` processes on a machine without a GPU each believe they are alone
unless accelerate is told to use the CPU — :func:`make_accelerator` tells it so.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate distributed types the trainer does not run: it shards
# with torch's fully_shard itself when the recipe says distributed: {strategy: fsdp} (mmbridge.train.sharding)


def launched_processes() -> int:
    """How many processes the launcher says it started (torchrun's ``WORLD_SIZE`` or MPI's); 1 when none."""
    for name in WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def check_launch() -> None:
    """Refuse a launch that asked for several processes and got one: ``accelerate launch --cpu --num_processes N``
    (or ``--num_processes N`` without ``--multi_gpu`` where there are fewer than two GPUs) starts one process."""
    # accelerate's single-process launcher sets both, and MASTER_ADDR only when asked for several processes
    asked_for_several = "MASTER_ADDR" in os.environ and "ACCELERATE_USE_CPU" in os.environ
    if asked_for_several and launched_processes() == 1 and "RANK" not in os.environ:
        raise ValueError(
            "accelerate launch was asked for several processes but started only this one (without --multi_gpu it "
            "starts several only through mpirun, --mpirun_hostfile), which would train alone on 1/N of each step's "
            "data. Launch with `accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N "
            "...`; on a machine without a GPU mmbridge then trains on the CPU over gloo")


def make_accelerator() -> Any:
    """The run's Accelerator: DDP that tolerates parameters a process's micro-batch leaves unused (a text-only
    batch skips the vision encoder and bridge; MoE experts may get no tokens), CPU + gloo when several processes
    run on a machine without an accelerator, and a clear error for a launch the trainer cannot run as asked."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    launched = launched_processes()
    cpu = launched > 1 and not torch.accelerator.is_available()  # else accelerate leaves each process alone
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # bf16 autocast is applied per stage (stages may differ), so accelerate's mixed precision stays off
    accelerator = Accelerator(mixed_precision="no", cpu=cpu, kwargs_handlers=[ddp])
    kind = accelerator.distributed_type.name
    if kind in SHARDED or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        asked = "FSDP" if kind not in SHARDED else kind
        raise ValueError(f"this launch asks accelerate for {asked}, which the trainer does not run: launch as for DDP "
                         f"(`accelerate launch --multi_gpu --num_processes N` or torchrun, without accelerate's "
                         f"FSDP/DeepSpeed config) and shard with the recipe's `distributed: {{strategy: fsdp}}` "
                         f"(or the override distributed.strategy=fsdp); DeepSpeed is not supported")
    if accelerator.num_processes != launched:
        raise ValueError(f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
                         f"({kind}); check the accelerate config and the devices this machine has")
    return accelerator


def gather(accelerator: Any, item: Any) -> list[Any]:
    """``item`` from every process, in rank order (``[item]`` on one process)."""
    if accelerator.num_processes == 1:
        return [item]
    from accelerate.utils import gather_object

    return gather_object([item])


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` is set in any process (a Ctrl-C may reach one process, or each at another moment)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "sum").item())


def micro_seed(stage_seed: int, position: int) -> int:
    """The torch seed for the micro-batch at ``position`` of a stage's stream: dropout draws the same masks for it
    whichever process runs it and however many run, and a resumed run draws what the uninterrupted one did."""
    return int(np.random.SeedSequence([stage_seed, position]).generate_state(1)[0])
