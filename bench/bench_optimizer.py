"""RMSprop.step over 200 float32 arrays of 5000 elements: the list path, the FlatParams path and
``torch.optim.RMSprop(foreach=True)`` on the same values.

``pytest bench --benchmark-only`` times each (``benchmark.group``: one table per variant) and
records bytes moved, GB/s, the thread counts and, for FlatParams, the fraction of the C roofline
in ``extra_info``, timed interleaved with the roofline on buffers of the same size.
``test_speed_targets`` (last) times the three again, interleaved in batches of 50 ms
(bench/targets.py), and checks the targets as ratios: list path at most 2x the FlatParams time;
FlatParams at least 15x faster than torch foreach. (Ratios of two tests' minima, taken seconds
apart on a noisy machine, are not reported.)

With ``--benchmark-disable`` the file is a quick correctness test: each step runs once and
``test_paths_agree`` checks list == FlatParams bit for bit and torch within tolerance.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from fastrms import backends
from fastrms.flat import FlatParams
from fastrms.optimizer import RMSprop
from targets import Ratio, check_targets, interleave, target, thread_settings

N_ARRAYS, SIZE = 200, 5000
LR = 1e-3
#: Constant gradients every step: the centered variant would drive square_avg - grad_avg**2 to
#: zero and time denormals, so the two variants are the torch paths that stay well-conditioned.
VARIANTS = {"plain": {}, "momentum": {"momentum": 0.9}}
#: float32 bytes read + written per element (docs/contract.md, "What the memory system allows").
BYTES_PER_ELEMENT = {"plain": 20, "momentum": 28}
IMPLEMENTATIONS = ["flat", "list", "torch-foreach"]  # flat first: the others report x_flat
_best: dict[tuple[str, str], float] = {}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(N_ARRAYS)]
    grads = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(N_ARRAYS)]
    return params, grads


def make_step(name: str, variant: str):
    """A zero-argument callable doing one optimizer step on arrays it owns, and a function that
    returns the parameters afterwards as NumPy arrays."""
    params, grads = _data()
    options = VARIANTS[variant]
    if name == "list":
        opt = RMSprop(params, lr=LR, **options)
        return (lambda: opt.step(grads)), (lambda: params)
    if name == "flat":
        flat = FlatParams(params)
        for view, g in zip(flat.grads, grads):
            view[...] = g
        opt = RMSprop(flat, lr=LR, **options)
        return opt.step, (lambda: list(flat.params))
    if name == "torch-foreach":
        torch = pytest.importorskip("torch")
        tensors = [torch.from_numpy(p) for p in params]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        opt = torch.optim.RMSprop(tensors, lr=LR, foreach=True, **options)
        return opt.step, (lambda: [t.detach().numpy() for t in tensors])
    raise ValueError(name)


def _warm_up(step, seconds=0.3):
    # Fresh memory on these VMs runs slowly for a while after first touch; time steady state.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()


def _roofline_step(variant: str, flat_opt_buffers):
    """The C roofline over buffers of the flat path's size (None without the C backend)."""
    if not backends.availability("c")[0]:
        return None
    from fastrms._coefficients import MOMENTUM

    roofline = backends.load("c").roofline
    param, grad, square, momentum = flat_opt_buffers
    flags = MOMENTUM if variant == "momentum" else 0
    return lambda: roofline(flags, param, grad, square, momentum)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_step(benchmark, name, variant):
    step, read_params = make_step(name, variant)
    step()  # first use (page faults, lazy imports) outside the timing
    benchmark.group = f"RMSprop.step {variant}: {N_ARRAYS} x {SIZE} float32"
    moved = BYTES_PER_ELEMENT[variant] * N_ARRAYS * SIZE
    benchmark.extra_info["bytes_moved"] = moved
    if not benchmark.disabled:
        _warm_up(step)
    benchmark(step)
    assert all(np.isfinite(p).all() for p in read_params())
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    best, median = stats.stats.min, stats.stats.median
    _best[(name, variant)] = best
    benchmark.extra_info["GB/s (min)"] = round(moved / best / 1e9, 2)
    benchmark.extra_info["GB/s (median)"] = round(moved / median / 1e9, 2)
    benchmark.extra_info["threads"] = thread_settings()
    if name == "flat":
        flat = FlatParams(_data()[0])
        f32 = np.dtype(np.float32)
        buffers = (flat.param_buffers[f32], flat.grad_buffers[f32],
                   np.ones(N_ARRAYS * SIZE, np.float32),
                   np.zeros(N_ARRAYS * SIZE, np.float32) if variant == "momentum" else None)
        roofline = _roofline_step(variant, buffers)
        if roofline is not None:
            timed = interleave({"flat": step, "roofline": roofline}, rounds=15,
                               batch_seconds=0.05, max_seconds=2.0)
            benchmark.extra_info["fraction_of_roofline"] = timed.ratio("roofline",
                                                                       "flat").as_dict()


def test_paths_agree():
    """One step on each path: list and FlatParams give the same bits; torch agrees to a few
    float32 ulps of the parameter scale (see tests/test_optimizer.py for the bound)."""
    for variant in VARIANTS:
        results = {}
        for name in IMPLEMENTATIONS:
            try:
                step, read_params = make_step(name, variant)
            except pytest.skip.Exception:
                continue
            step()
            step()
            results[name] = [np.array(p) for p in read_params()]
        assert all(a.tobytes() == b.tobytes() for a, b in zip(results["list"], results["flat"]))
        if "torch-foreach" in results:
            for ours, theirs in zip(results["flat"], results["torch-foreach"]):
                scale = np.spacing(np.float32(np.abs(theirs).max()))
                assert np.abs(ours.astype(np.float64) - theirs).max() <= 16 * scale


def _target_ratios() -> list[Ratio]:
    """Time again, interleaved, the steps this session benchmarked, and form the ratios."""
    ratios = []
    for variant in VARIANTS:
        names = [name for name in IMPLEMENTATIONS if (name, variant) in _best]
        if "flat" not in names or len(names) < 2:
            continue
        steps = {name: make_step(name, variant)[0] for name in names}
        # Batches of 50 ms, each after an untimed step of its own (bench/targets.py): each path
        # runs on its own warm caches, as in the tables above (the 20 MB of one path fits the
        # L3 beside little else), and after the spinning of the previous step's thread pool.
        timed = interleave(steps, rounds=15, batch_seconds=0.05, warmup_seconds=0.3)
        if "list" in timed.samples:
            ratios.append(target(f"{variant}: list / flat", timed.ratio("list", "flat"), 2.0,
                                 at_most=True))
        if "torch-foreach" in timed.samples:
            ratios.append(target(f"{variant}: torch-foreach / flat",
                                 timed.ratio("torch-foreach", "flat"), 15.0))
    return ratios


def test_speed_targets(benchmark, request):
    """Check the targets as ratios of interleaved timings (runs last in this file)."""
    check_targets(benchmark, request, _target_ratios)
