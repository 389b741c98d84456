"""Run by tests/test_torch_distributed.py in a subprocess: two gloo ranks on 127.0.0.1 train a
small model through ZeroRedundancyOptimizer with the optimizer class named on the command line,
and rank 0 saves the parameters. Usage: python torch_distributed_worker.py CLASS PORT OUT."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastrms.torch as fastrms_torch

CLASSES = {"torch": torch.optim.RMSprop, "fastrms": fastrms_torch.RMSprop}


def worker(rank: int, world: int, name: str, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ddp = DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=CLASSES[name], lr=1e-2,
                                  momentum=0.9, centered=True)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        state = opt.state_dict()
        steps = sorted(float(s["step"]) for s in state["state"].values())
        # The local optimizer of this rank's shard ran its parameters on the kernel.
        kernel = not opt.optim.unfused_parameters() if name == "fastrms" else None
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "steps": steps,
                    "kernel": kernel}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    name, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mp.spawn(worker, args=(2, name, port, out), nprocs=2, join=True)
