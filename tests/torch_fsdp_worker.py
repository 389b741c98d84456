"""Run by tests/test_torch_distributed.py in a subprocess: two gloo ranks on 127.0.0.1 train a
small model sharded with FSDP2's ``fully_shard`` on a CPU mesh (DTensor parameters, shards of
uneven sizes, one of them empty) three times from the same start and data: with
torch.optim.RMSprop, with fastrms.torch.RMSprop, and with fastrms.torch.RMSprop on the NumPy
reference backend. Rank 0 saves the full parameters of each. Usage: python torch_fsdp_worker.py
PORT OUT."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastrms.torch as fastrms_torch

OPTIMIZERS = {"torch": torch.optim.RMSprop, "fastrms": fastrms_torch.RMSprop,
              "reference": lambda params, **options: fastrms_torch.RMSprop(
                  params, backend="numpy", **options)}


def train(name: str, rank: int, mesh) -> dict:
    torch.manual_seed(0)
    # 15 rows shard 8 / 7; the last bias (1 element) leaves rank 1 an empty shard.
    model = torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.Tanh(), torch.nn.Linear(15, 1))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2, momentum=0.9, centered=True)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    # The state is what torch.optim.RMSprop keeps for a DTensor parameter: DTensors of its
    # placements (what torch.distributed.checkpoint expects).
    layouts_match = all(
        isinstance(state[key], DTensor) and state[key].placements == p.placements
        for p in model.parameters() for state in [opt.state[p]]
        for key in ("square_avg", "momentum_buffer", "grad_avg"))
    kernel = not opt.unfused_parameters() if name != "torch" else None
    steps = sorted(float(opt.state[p]["step"]) for p in model.parameters())
    return {"params": params, "steps": steps, "kernel": kernel, "layouts_match": layouts_match}


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = {name: train(name, rank, mesh) for name in OPTIMIZERS}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, out = int(sys.argv[1]), sys.argv[2]
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
