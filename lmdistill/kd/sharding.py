"""Sharded data parallelism for the student (`train.sharding: fsdp`): torch's FSDP2.

Each process holds 1/N of the student's weights, gradients and AdamW moments
(`fully_shard` on every decoder layer, then on the whole objective); a layer's weights are
gathered for its forward and backward pass and freed after. Gradients are reduce-scattered
(averaged over processes, as DDP's all-reduce is), so the loss normalisation of the
data-parallel path gives N sharded processes the update of one process with the combined
batch (tests/test_sharding.py).

Everything outside training sees whole tensors: checkpoints hold the full weights and
optimizer state in the format one process writes (a sharded run resumes unsharded and the
other way round), and after training the student given to `train_student` holds the trained
weights on every process, for evaluation and saving as in any run. The training copy is a
deep copy of the objective, sharded; the given one keeps its parameters (and so its tied
weights) with their storage freed while the shards train, and gets the whole weights back,
on the CPU, at each checkpoint (freed again after it is written) and at the end.

Works on the CPU over gloo and on GPUs over NCCL (the device mesh follows the run's device).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# FSDP2's public API (torch.distributed.fsdp.fully_shard, torch.distributed.tensor) is
# imported where it is used: torch >= 2.6 has it, and lmdistill without sharding runs on
# older torch (train.sharding=fsdp is refused there, lmdistill/config/checks.py).


def whole(tensor: Any) -> Any:
    """The full tensor of a shard (a collective: every process calls it), or the tensor."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def is_shard(tensor: Any) -> bool:
    return callable(getattr(tensor, "full_tensor", None))


class Snapshot:
    """An optimizer's state dict taken on every process, for the main process to save."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state_dict_ = state

    def state_dict(self) -> dict[str, Any]:
        return self.state_dict_


class ShardedStudent:
    """The sharded training copy of `objective` (`.model`) and the way back to whole tensors."""

    def __init__(self, objective: nn.Module, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.whole = objective
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # Copied on the CPU: fully_shard moves each process's shards to the mesh's device, so
        # a GPU never holds a second whole copy. `gather` puts the weights back on the CPU
        # and the caller moves the objective back to its device.
        model = copy.deepcopy(objective.to("cpu"))
        # One unit per decoder layer (transformers names their classes in _no_split_modules):
        # only one layer's weights are whole at a time. The rest (embeddings, head, norm, the
        # objective's projections) is the root unit. Innermost first: a unit nested in
        # another is sharded before its parent.
        student = getattr(objective, "student", objective)
        layers = set(getattr(student, "_no_split_modules", None) or [])
        units = [m for m in reversed(list(model.modules())) if type(m).__name__ in layers]
        for module in units:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.units = len(units) + 1

    def describe(self) -> str:
        """One line: how the student is split (this process's share, measured on its shards)."""
        params: list[Any] = [p for p in self.model.parameters() if is_shard(p)]
        total = sum(p.numel() for p in params)
        local = sum(p.to_local().numel() for p in params)
        return (
            f"fsdp: the student's {total:,} weights are sharded over {dist.get_world_size()} "
            f"processes in {self.units} units; this process holds {local:,} "
            f"({100 * local / max(total, 1):.1f}%)"
        )

    @torch.no_grad()
    def gather(self, keep: bool = True) -> nn.Module:
        """Put the trained weights into the whole objective, on the CPU, and return it. Every
        process takes part (a collective per tensor: one whole tensor in flight at a time);
        with `keep` false (a checkpoint's other processes) the whole tensors are dropped."""
        targets = dict(self.whole.named_parameters())
        for name, param in self.model.named_parameters():
            full = whole(param.detach())
            if keep:  # `.data` keeps the Parameter objects, so tied weights stay tied
                targets[name].data = full.to("cpu", copy=True)
        return self.whole

    def release(self) -> None:
        """Free the whole objective's weights while the shards train (`gather` puts them
        back): a process then holds its shard, not a whole copy besides. Until then the
        objective given to train_student has empty weights (a run that stops with an error
        does not use them: the pipeline re-raises, each protocol arm builds its own)."""
        for param in self.whole.parameters():
            param.data = torch.empty(0, dtype=param.dtype)

    @torch.no_grad()
    def scatter(self) -> None:
        """Load the whole objective's weights into the shards (after a resume). Buffers are
        not copied: the checkpoint holds the weights, and a decoder's buffers (rotary
        frequencies) are computed from its config."""
        from torch.distributed.tensor import distribute_tensor

        sources = dict(self.whole.named_parameters())
        param: Any
        for name, param in self.model.named_parameters():
            source = sources[name].detach().to(param.device)
            if is_shard(param):
                piece = distribute_tensor(source, param.device_mesh, param.placements)
                param.to_local().copy_(piece.to_local())
            else:
                param.copy_(source)


class WholeOptimizer:
    """A sharded optimizer seen as one process's: `snapshot` gathers its state whole (as
    checkpoints hold it), `load_state_dict` takes a whole state dict and keeps this
    process's shard of each tensor; `state` and `param_groups` are the optimizer's (a
    DTensor's numel is the whole tensor's)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def param_groups(self) -> Any:
        return self.optimizer.param_groups

    def snapshot(self, keep: bool = True) -> Snapshot:
        """The state dict with every tensor whole, on the CPU: exactly what one process with
        the same parameters writes. Every process calls it (a collective per tensor); with
        `keep` false the whole tensors are dropped as they come."""
        state = self.optimizer.state_dict()
        tensors: dict[Any, dict[str, Any]] = {}
        for key, entry in state["state"].items():
            values = {name: whole(value) for name, value in entry.items()}
            if keep:
                tensors[key] = {
                    name: value.to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
                    for name, value in values.items()
                }
        return Snapshot({"state": tensors, "param_groups": state["param_groups"]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded: dict[Any, dict[str, Any]] = {}
        for key, entry in state["state"].items():
            param = params[int(key)]
            sharded[key] = {
                name: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                if is_shard(param)
                and isinstance(value, torch.Tensor)
                and value.shape == param.shape
                else value
                for name, value in entry.items()
            }
        self.optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def shard_student(
    objective: nn.Module, sharding: str, processes: int, device: torch.device
) -> ShardedStudent | None:
    """The sharded copy when `train.sharding` asks for it and there are processes to shard
    over; None otherwise (one process: FSDP would hold everything, as a plain run does)."""
    if sharding == "none":
        return None
    if processes == 1:
        warnings.warn(
            "train.sharding=fsdp with one process: there is nothing to shard over, so the run "
            "trains as a plain one (launch with torchrun or accelerate launch to shard)",
            stacklevel=2,
        )
        return None
    return ShardedStudent(objective, device)
