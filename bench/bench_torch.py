"""``fastrms.torch.RMSprop`` against ``torch.optim.RMSprop`` with torch's defaults, one step.

Two models, float32, a gradient on every parameter created once and reused (so the timed call is
``opt.step()`` alone):

- ``large``: 20 tensors of 500,000 elements (10^7 parameters). Target: fastrms at least 4x faster.
- ``many-small``: 400 tensors of 1,000 to 5,000 elements (about 1.2 * 10^6 parameters), where
  torch's per-tensor, several-pass loop is all overhead. Target: at least 10x faster.

``pytest bench --benchmark-only`` times torch, fastrms (``flatten=False``, the drop-in) and
fastrms with ``flatten=True``; ``benchmark.group`` makes one table per model, and ``extra_info``
records the bytes the fused update moves (20 per float32 element: SPEC.md) and the GB/s that
makes. ``test_speed_targets`` (last) times the roofline of the large model (the same streams with
trivial arithmetic) and checks the targets as ratios of this session's best times, measured in
this one process (the machine is shared, so never absolute times). With
``--benchmark-disable`` the file is a quick correctness test: each optimizer takes one step and
fastrms is compared with torch's step on the same values.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastrms import _dispatch  # noqa: E402
from fastrms.torch import RMSprop  # noqa: E402

CASES = {
    "large": [500_000] * 20,
    "many-small": np.random.default_rng(0).integers(1000, 5001, 400).tolist(),
}
IMPLEMENTATIONS = ["torch", "fastrms", "fastrms-flat"]
#: (case, minimum of time(torch) / time(fastrms)) for the drop-in (flatten=False) optimizer.
TARGETS = {"large": 4.0, "many-small": 10.0}
BYTES_PER_ELEMENT = 20  # float32, plain variant: read p, g, s; write p, s
_best: dict[tuple[str, str], float] = {}  # (implementation, case) -> best seconds per step


def make_params(case: str, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for n in CASES[case]:
        p = torch.nn.Parameter(torch.randn(n, generator=generator))
        p.grad = torch.randn(n, generator=generator)  # once: every timed step reuses it
        params.append(p)
    return params


def make_optimizer(name: str, params):
    if name == "torch":
        return torch.optim.RMSprop(params)
    return RMSprop(params, flatten=name == "fastrms-flat")


def _warm_up(step, seconds=0.3):
    # Fresh memory on these VMs runs slowly for a while after first touch; time steady state.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_step(benchmark, request, name, case):
    params = make_params(case)
    n = sum(p.numel() for p in params)
    opt = make_optimizer(name, params)
    disabled = request.config.getoption("benchmark_disable", False)
    if not disabled:
        _warm_up(opt.step)
    benchmark.group = f"{case}: {len(params)} float32 tensors, {n:.2e} elements"
    benchmark.extra_info["bytes_moved"] = BYTES_PER_ELEMENT * n
    benchmark(opt.step)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: one step was taken; check it
        if name != "torch":
            _check_one_step(case, params)
        return
    best = stats.stats.min
    _best[(name, case)] = best
    benchmark.extra_info["GB/s"] = round(BYTES_PER_ELEMENT * n / best / 1e9, 2)
    torch_best = _best.get(("torch", case))
    if torch_best is not None and name != "torch":
        benchmark.extra_info["x_faster_than_torch"] = round(torch_best / best, 2)


def _check_one_step(case: str, ours) -> None:
    theirs = make_params(case)
    torch.optim.RMSprop(theirs).step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def _roofline_step(n: int):
    """The large model's streams (read p, g, s; write p, s) with trivial arithmetic."""
    p, g, s = (np.random.default_rng(k).standard_normal(n).astype(np.float32) for k in range(3))
    module = _dispatch.resolve(None, n, np.float32, 0)
    if hasattr(module, "roofline"):
        return lambda: module.roofline(0, p, g, s)

    def numpy_streams():  # no compiled backend: NumPy moving about the same streams
        np.add(s, g, out=s)
        np.add(p, s, out=p)

    return numpy_streams


def test_speed_targets(benchmark, request):
    """Time the roofline of the large model (the speed limit of any update moving its bytes),
    then check the targets as ratios of this session's timings (runs last in this file)."""
    n = sum(CASES["large"])
    step = _roofline_step(n)
    step()
    benchmark.group = f"large: {len(CASES['large'])} float32 tensors, {n:.2e} elements"
    benchmark.extra_info["bytes_moved"] = BYTES_PER_ELEMENT * n
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is None or not _best:
        pytest.skip("needs timings: run with --benchmark-only")
    roofline = stats.stats.min
    benchmark.extra_info["GB/s"] = round(BYTES_PER_ELEMENT * n / roofline / 1e9, 2)
    lines, missed = [f"{'large':>10} {'roofline':>12}: {roofline * 1e3:8.3f} ms"], []
    for case in CASES:
        torch_best = _best.get(("torch", case))
        for name in ("fastrms", "fastrms-flat"):
            ours = _best.get((name, case))
            if torch_best is None or ours is None:
                continue
            ratio = torch_best / ours
            target = TARGETS[case] if name == "fastrms" else None
            line = (f"{case:>10} {name:>12}: {ours * 1e3:8.3f} ms, torch {torch_best * 1e3:8.3f} ms"
                    f" = {ratio:6.2f}x faster")
            if case == "large":
                line += f", {roofline / ours:.2f} of the roofline"
            if target is not None:
                line += f" (target >= {target}) {'ok' if ratio >= target else 'MISSED'}"
                if ratio < target:
                    missed.append(line)
            lines.append(line)
    print("\n" + "\n".join(lines))
    assert not missed, "speed targets missed:\n" + "\n".join(missed)
