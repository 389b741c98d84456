"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism on a CPU mesh): the kernel
updates each rank's local tensors, while ``opt.state`` holds DTensors of the parameter's
placements, as ``torch.optim.RMSprop`` creates them, so that distributed checkpoints
(``torch.distributed.checkpoint``) see the layout they expect.

RMSprop is elementwise, so a rank updating its shard of the parameter with its shard of the
gradient and of each state buffer computes exactly its part of the whole update, with the
bits of the single-process kernel.
"""
from __future__ import annotations

import torch

from ._buckets import TensorBucket
from ._tensors import get_grad, local_tensor


class DTensorBucket(TensorBucket):
    """A :class:`TensorBucket` of DTensor parameters of one group and dtype (one mesh and one
    set of placements per parameter; parameters may differ)."""

    memory_of = staticmethod(local_tensor)

    def __init__(self, context, state, index: int, group: dict, params: list, positions: list):
        state_format = group.get("state_format", "float32")
        if state_format != "float32":
            raise ValueError(f"param_groups[{index}]: state_format={state_format!r} does not "
                             f"go with DTensor parameters (FSDP2 shards): their state is "
                             f"DTensors of the parameter's placements, in float32; put them in "
                             f"a group with state_format='float32'")
        super().__init__(context, state, index, group, params, positions)

    def _grads(self) -> list:
        """The local tensors of the gradients, redistributed first where a gradient's
        placements differ from its parameter's (torch's DTensor ops would do the same)."""
        out = []
        for p, g in zip(self.params, map(get_grad, self.params)):
            if g is not None:
                if not isinstance(g, type(p)):
                    raise RuntimeError(f"the gradient of {self.label(len(out))} is a "
                                       f"{type(g).__name__} but its parameter is a DTensor")
                if g.device_mesh != p.device_mesh or g.placements != p.placements:
                    g = g.redistribute(p.device_mesh, p.placements)
                g = local_tensor(g)
            out.append(g)
        return out

    def _usable(self, name: str, k: int, tensor) -> torch.Tensor:
        """A state DTensor of the parameter's mesh and placements whose local tensor the kernel
        can walk, else a new one holding its values. A plain tensor (a checkpoint saved without
        FSDP, loaded as it is) holds the whole buffer: each rank keeps its own part of it."""
        p = self.params[k]
        dtensor = type(p)
        with torch.no_grad():
            if not isinstance(tensor, dtensor):
                from torch.distributed.tensor import distribute_tensor
                tensor = distribute_tensor(tensor.detach().to(self.state_dtype),
                                           p.device_mesh, p.placements, src_data_rank=None)
            elif tensor.device_mesh != p.device_mesh or tensor.placements != p.placements:
                tensor = tensor.redistribute(p.device_mesh, p.placements)
            if not tensor.requires_grad and self._walkable(k, local_tensor(tensor)):
                return tensor
            fresh = self._new_buffer(name, k)
            local_tensor(fresh).copy_(local_tensor(tensor))
        return fresh
