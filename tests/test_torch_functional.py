"""``fastrms.torch.FunctionalRMSprop``: the functional equivalent that
``ZeroRedundancyOptimizer(..., overlap_with_ddp=True)`` looks up for ``fastrms.torch.RMSprop``,
registered in torch's table whichever of the two modules is imported first."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import fastrms.torch as fastrms_torch  # noqa: E402

OPTIONS = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)


def model_params(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in ((7, 5), (5,), (3, 2, 4))]


def gradients(seed: int):
    generator = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(shape, generator=generator) for shape in ((7, 5), (5,), (3, 2, 4))]


def test_step_with_gradients_equals_a_step_reading_grad_with_none_left_alone():
    ours, theirs = model_params(), model_params()
    functional = fastrms_torch.FunctionalRMSprop(ours, **OPTIONS)
    plain = fastrms_torch.RMSprop(theirs, **OPTIONS)
    kept = torch.zeros(5)
    ours[1].grad = kept
    for step in range(4):
        grads = gradients(step)
        if step % 2:
            grads[1] = None  # that parameter skips this step, in both runs
        functional.step(grads)
        for p, g in zip(theirs, grads):
            p.grad = g
        plain.step()
        assert ours[1].grad is kept  # .grad is left as it was
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs):
        for key, value in plain.state[b].items():
            assert torch.equal(functional.state[a][key], value), key


def test_wrong_number_of_gradients_raises_and_changes_nothing():
    params = model_params()
    before = [p.clone() for p in params]
    opt = fastrms_torch.FunctionalRMSprop(params, **OPTIONS)
    with pytest.raises(ValueError, match="gradients has 2 entries but the optimizer has 3"):
        opt.step(gradients(0)[:2])
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state


def test_empty_parameter_list_only_when_zero_asks_for_it():
    with pytest.raises(ValueError, match="empty parameter list"):
        fastrms_torch.FunctionalRMSprop([], lr=0.1)
    opt = fastrms_torch.FunctionalRMSprop([], lr=0.1, _allow_empty_param_list=True)
    assert opt.param_groups[0]["params"] == []
    opt.step([])


REGISTRATION = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    import fastrms.torch as fastrms_torch
    assert "torch.distributed.optim.utils" not in sys.modules
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.optim.utils import functional_optim_map
    assert functional_optim_map[fastrms_torch.RMSprop] is fastrms_torch.FunctionalRMSprop
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = torch.nn.Linear(4, 2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=fastrms_torch.RMSprop,
                                   overlap_with_ddp=True, lr=0.01)
    assert zero._optim_constructor is fastrms_torch.FunctionalRMSprop
    # torch itself refuses to overlap ZeRO with DDP on gloo (the only CPU backend):
    from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    try:
        ddp.register_comm_hook(None, hook_with_zero_step(allreduce_hook, ddp, zero))
    except RuntimeError as error:
        assert "Gloo" in str(error), error
    else:
        raise AssertionError("torch accepted the overlap hook on gloo")
    dist.destroy_process_group()
    print("registered")
""")


def test_zero_with_overlap_finds_the_functional_equivalent_when_fastrms_is_imported_first():
    run = subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "registered" in run.stdout, run.stderr[-3000:]


def test_registered_when_torch_distributed_optim_is_imported_first():
    code = ("import torch.distributed.optim.utils as table, fastrms.torch as ft; "
            "assert table.functional_optim_map[ft.RMSprop] is ft.FunctionalRMSprop; "
            "print('registered')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "registered" in run.stdout, run.stderr[-3000:]
