"""``fastrms.torch.RMSprop`` against ``torch.optim.RMSprop``, eager and under ``torch.compile``.

Two cases, float32, lr 1e-4 and torch's other defaults:

- ``large``: the parameters of a 10-layer MLP of width 990 (9,810,900 float32 elements in 20
  tensors, 196 MB moved per step). Targets: the drop-in's step at least 0.90 of a roofline
  kernel moving the same bytes (one C call over torch-allocated p, g, s of the model's size,
  as the step is one kernel call), ``flatten=True`` at least 0.95 of it, and fastrms ahead of
  ``torch.compile``.
- ``many-small``: 400 tensors of 1,000 to 5,000 elements (about 1.2 * 10^6 parameters), where
  torch's per-tensor, several-pass loop is all overhead. Target: at least 10x faster than torch.

``pytest bench --benchmark-only`` times torch, torch.compile (compile time in
``extra_info["compile_seconds"]``, never in the timed rounds), fastrms (``flatten=False``, the
drop-in) and fastrms with ``flatten=True``, with a gradient created once and reused;
``extra_info`` records bytes moved (20 per element), GB/s, the thread counts and the fraction
of the roofline, timed interleaved in the test itself. ``test_speed_targets`` (last) times the
large case again, interleaved, both alone and in a training loop (each step timed right after
``loss.backward()`` of its own model; the roofline right after the backward of a
``flatten=True`` model, reading the gradient buffer it wrote), checks the targets on the steps
alone and reports the loop's figures. With ``--benchmark-disable`` the file is a quick
correctness test: each optimizer takes one step and is compared with torch's step on the same
values.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastrms import backends  # noqa: E402
from fastrms.torch import RMSprop  # noqa: E402
from targets import (Ratio, check_targets, interleave, target,  # noqa: E402
                     thread_settings)

WIDTH, LAYERS, BATCH = 990, 10, 32
CASES = {
    "large": [(WIDTH, WIDTH), (WIDTH,)] * LAYERS,  # the MLP's parameters, in model order
    "many-small": [(n,) for n in np.random.default_rng(0).integers(1000, 5001, 400).tolist()],
}
IMPLEMENTATIONS = ["torch", "torch-compile", "fastrms", "fastrms-flat"]
#: torch.compile of a 400-tensor step compiles for minutes: it is timed on the large model.
COMPILED_CASES = {"large"}
OPTIONS = {"lr": 1e-4}  # small enough that the training loop below stays well-conditioned
BYTES_PER_ELEMENT = 20  # float32, plain variant: read p, g, s; write p, s
_ran: set[tuple[str, str]] = set()  # (implementation, case) benchmarked this session


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    layers = []
    for k in range(LAYERS):
        layers.append(torch.nn.Linear(WIDTH, WIDTH))
        if k < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def make_params(case: str, seed: int = 0) -> list:
    """The case's parameters, each with a gradient created once (every step reuses it)."""
    generator = torch.Generator().manual_seed(seed)
    if case == "large":
        params = list(make_model(seed).parameters())
    else:
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator))
                  for shape in CASES[case]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def make_step(name: str, params):
    """One optimizer step on ``params`` as a zero-argument callable; torch.compile's carries
    ``compile_seconds`` (its first call, made here)."""
    if name == "torch":
        return torch.optim.RMSprop(params, **OPTIONS).step
    if name in ("fastrms", "fastrms-flat"):
        return RMSprop(params, flatten=name == "fastrms-flat", **OPTIONS).step
    if name == "torch-compile":
        opt = torch.optim.RMSprop(params, **OPTIONS)
        torch.compiler.reset()  # past 8 recompilations torch would run the step uncompiled

        @torch.compile
        def step():
            opt.step()

        start = time.perf_counter()
        step()
        step.compile_seconds = time.perf_counter() - start
        return step
    raise ValueError(name)


def _roofline_available() -> bool:
    return backends.availability("c")[0]


def roofline_over(total: int, grad=None):
    """The C roofline over the streams of one step on ``total`` float32 elements (read p, g, s;
    write p, s) in ONE call, as the drop-in's step is one kernel call: one thread team per step
    (a per-tensor roofline would pay a team wake-up per tensor, which on a busy machine is a
    scheduler tick each). Its parameter and square_avg stand-ins are torch-allocated, like the
    optimizer's tensors (torch's allocator does not ask for huge pages; NumPy's does); ``grad``
    (a 1-D tensor) is read if given, for example a ``flatten=True`` optimizer's gradient buffer
    right after a backward, else a stand-in too. Its arithmetic is no optimizer step."""
    roofline = backends.load("c").roofline
    generator = torch.Generator().manual_seed(1)
    p = torch.randn(total, generator=generator).numpy()
    s = torch.rand(total, generator=generator).numpy()
    s += 0.5
    g = (torch.randn(total, generator=generator) if grad is None else grad).numpy()

    def step():
        roofline(0, p, g, s)
    return step


def flat_gradient_buffer(params):
    """The 1-D tensor that a ``flatten=True`` optimizer's gradients are views of (after its
    first step), or None if they are not views of one buffer of exactly their size."""
    total = sum(p.numel() for p in params)
    storage = params[0].grad.untyped_storage()
    if storage.nbytes() != 4 * total or any(p.grad.untyped_storage().data_ptr()
                                            != storage.data_ptr() for p in params):
        return None
    return torch.empty(0).set_(storage)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_step(benchmark, request, name, case):
    if name == "torch-compile" and case not in COMPILED_CASES:
        pytest.skip(f"torch.compile is timed on {', '.join(COMPILED_CASES)} only "
                    "(a 400-tensor step compiles for minutes)")
    params = make_params(case)
    n = sum(p.numel() for p in params)
    step = make_step(name, params)
    disabled = request.config.getoption("benchmark_disable", False)
    benchmark.group = f"{case}: {len(params)} float32 tensors, {n:.2e} elements"
    benchmark.extra_info["bytes_moved"] = BYTES_PER_ELEMENT * n
    if hasattr(step, "compile_seconds"):
        benchmark.extra_info["compile_seconds"] = round(step.compile_seconds, 2)
    if not disabled:
        _warm_up(step)
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: one step was taken; check it
        if name != "torch":
            _check_steps(case, params, 2 if name == "torch-compile" else 1)
        return
    _ran.add((name, case))
    best = stats.stats.min
    benchmark.extra_info["GB/s"] = round(BYTES_PER_ELEMENT * n / best / 1e9, 2)
    benchmark.extra_info["threads"] = thread_settings()
    if _roofline_available():
        timed = interleave({"step": step, "roofline": roofline_over(n)}, rounds=15,
                           max_seconds=1.0)
        benchmark.extra_info["fraction_of_roofline"] = timed.ratio("roofline", "step").as_dict()


def _warm_up(step, seconds=0.3):
    # Fresh memory on these VMs runs slowly for a while after first touch; time steady state.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()


def _check_steps(case: str, ours, steps: int) -> None:
    theirs = make_params(case)
    reference = torch.optim.RMSprop(theirs, **OPTIONS)
    for _ in range(steps):
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


# -- the targets -------------------------------------------------------------------------------

class TrainingLoop:
    """A model of the large case (10 x Linear(990, 990)) with its optimizer ``name``:
    ``backward()`` is one iteration's zero_grad, forward and ``loss.backward()``, untimed; a
    step is then timed right after it, where it runs in a training loop."""

    def __init__(self, name: str, seed: int = 0):
        self.model = make_model(seed)
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(BATCH, WIDTH, generator=generator)
        self.y = torch.randn(BATCH, WIDTH, generator=generator)
        self.params = list(self.model.parameters())
        self.optimizer = None
        self.backward()
        self.step = make_step(name, self.params)
        self.optimizer = getattr(self.step, "__self__", None)
        self.step()
        self.backward()  # flatten=True: the gradients are now views of the flat buffer

    def backward(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        else:
            self.model.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()


def _large_steps(names) -> tuple[dict, tuple[dict, dict]]:
    """Steps timed alone, and steps timed in the training loop with their before-calls. The
    roofline in the loop runs right after the backward of a ``flatten=True`` model and reads
    the gradient buffer that backward wrote: the cache state a step finds there, in one call."""
    alone, in_loop, before = {}, {}, {}
    for name in names:
        alone[name] = make_step(name, make_params("large"))
        loop = TrainingLoop(name)
        in_loop[name], before[name] = loop.step, loop.backward
    if _roofline_available():
        total = sum(p.numel() for p in make_params("large"))
        alone["roofline"] = roofline_over(total)
        loop = TrainingLoop("fastrms-flat")
        grad = flat_gradient_buffer(loop.params)
        in_loop["roofline"] = roofline_over(total, grad)
        before["roofline"] = loop.backward
    return alone, (in_loop, before)


def _target_ratios() -> list[Ratio]:
    """Time again, interleaved, what this session benchmarked, and form the ratios."""
    ratios: list[Ratio] = []
    names = [name for name in IMPLEMENTATIONS if (name, "large") in _ran]
    if names:
        alone, (in_loop, before) = _large_steps(names)
        timed = interleave(alone, rounds=20, warmup_seconds=0.3, max_seconds=30)
        looped = interleave(in_loop, rounds=15, before=before, max_seconds=60)
        for where, result in (("alone", timed), ("after loss.backward()", looped)):
            checked = where == "alone"  # in the loop: reported
            for name, bound in (("fastrms", 0.90), ("fastrms-flat", 0.95)):
                if "roofline" in result.samples and name in result.samples:
                    ratios.append(target(f"large, {where}: roofline / {name}",
                                         result.ratio("roofline", name), bound if checked else 0))
            for slower, faster, bound in (("torch", "fastrms", 0.0),
                                          ("torch-compile", "fastrms", 1.0),
                                          ("torch-compile", "fastrms-flat", 0.0)):
                if slower in result.samples and faster in result.samples:
                    ratios.append(target(f"large, {where}: {slower} / {faster}",
                                         result.ratio(slower, faster), bound if checked else 0))
        for name in ("fastrms", "fastrms-flat"):
            if name in looped.samples:
                ratios.append((f"large: {name} step after loss.backward() / alone (medians)",
                               looped.median(name) / timed.median(name), float("inf"), True))
    small = [name for name in ("torch", "fastrms", "fastrms-flat") if (name, "many-small") in _ran]
    if "torch" in small and len(small) > 1:
        steps = {name: make_step(name, make_params("many-small")) for name in small}
        timed = interleave(steps, rounds=20, batch_seconds=0.02, warmup_seconds=0.3)
        for name in small[1:]:
            ratios.append(target(f"many-small: torch / {name}", timed.ratio("torch", name),
                                 10.0 if name == "fastrms" else 0.0))
    return ratios


def test_speed_targets(benchmark, request):
    """Check the targets as ratios of interleaved timings (runs last in this file)."""
    check_targets(benchmark, request, _target_ratios)
