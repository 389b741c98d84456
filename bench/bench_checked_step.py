"""What the safety of a checked step costs: ``RMSprop(skip_nonfinite=True)`` (and with a loss
scale) against a plain step, over a FlatParams of 10^7 float32 elements, per compiled backend.

``pytest bench --benchmark-only`` times each mode (one table per backend) and records bytes
moved and GB/s. ``test_speed_targets`` (last) times the modes again, interleaved per backend
(bench/targets.py), and checks that a checked step costs at most 1.3x a plain step. The
loss-scaled modes are reported beside it as ratios to the plain step: a power-of-two scale
(what ``torch.amp.GradScaler`` uses) is unscaled by an exact multiplication; another scale needs
a division, which competes with the update's own ``sqrt`` and division for the divider. With
``--benchmark-disable`` each mode runs once and ``test_modes_agree`` checks that the checked and
power-of-two modes give the plain step's bits.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastrms import backends
from fastrms.flat import FlatParams
from fastrms.optimizer import RMSprop
from targets import Ratio, check_targets, interleave, target, thread_settings

N = 10**7
#: float32 plain step: read p, g, s; write p, s. The check reads g once more.
BYTES_PER_ELEMENT = {"plain": 20, "checked": 24, "checked-scaled-pow2": 24,
                     "checked-scaled-1000": 24}
#: mode -> (constructor options, step options)
MODES = {
    "plain": ({}, {}),
    "checked": ({"skip_nonfinite": True}, {}),
    "checked-scaled-pow2": ({"skip_nonfinite": True}, {"grad_scale": 65536.0}),
    "checked-scaled-1000": ({"skip_nonfinite": True}, {"grad_scale": 1000.0}),
}
COMPILED = [name for name in backends.BACKEND_NAMES if name != "numpy"]
_best: dict[tuple[str, str], float] = {}


def make_step(backend: str, mode: str):
    """A zero-argument step on a fresh FlatParams of N elements, and the parameters after it."""
    rng = np.random.default_rng(0)
    flat = FlatParams([rng.standard_normal(N).astype(np.float32)])
    construct, step_options = MODES[mode]
    scale = np.float32(step_options.get("grad_scale", 1.0))
    flat.grads[0][...] = rng.standard_normal(N).astype(np.float32) * scale
    opt = RMSprop(flat, lr=1e-4, backend=backend, **construct)
    return (lambda: opt.step(**step_options)), (lambda: flat.params[0])


def _require(backend: str) -> None:
    available, reason = backends.availability(backend)
    if not available:
        pytest.skip(f"{backend} is absent: {reason}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", COMPILED)
def test_step(benchmark, backend, mode):
    _require(backend)
    step, _ = make_step(backend, mode)
    assert step() is True  # compiles, warms the memory, and proves the step was not skipped
    benchmark.group = f"checked step, {backend}, float32 n=1e7"
    moved = BYTES_PER_ELEMENT[mode] * N
    benchmark.extra_info["bytes_moved"] = moved
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    _best[(backend, mode)] = stats.stats.min
    benchmark.extra_info["GB/s"] = round(moved / stats.stats.min / 1e9, 2)
    benchmark.extra_info["threads"] = thread_settings()
    # The ratio to the plain step is the speed-target test's (interleaved), not min / min.


@pytest.mark.parametrize("backend", COMPILED)
def test_modes_agree(backend):
    """A checked step on finite gradients is the plain step; gradients scaled by 2^16 (exact)
    and unscaled by the kernel give the plain step's bits too."""
    _require(backend)
    results = {}
    for mode in ("plain", "checked", "checked-scaled-pow2"):
        step, params = make_step(backend, mode)
        step()
        results[mode] = params().copy()
    assert results["plain"].tobytes() == results["checked"].tobytes()
    # Multiplying by 2^16 and dividing again is exact: the same gradients, the same bits.
    assert results["plain"].tobytes() == results["checked-scaled-pow2"].tobytes()


def _target_ratios() -> list[Ratio]:
    """Time again, interleaved per backend in batches of 50 ms, the modes this session
    benchmarked."""
    ratios: list[Ratio] = []
    for backend in COMPILED:
        modes = [mode for mode in MODES if (backend, mode) in _best]
        if "plain" not in modes or len(modes) < 2:
            continue
        timed = interleave({mode: make_step(backend, mode)[0] for mode in modes}, rounds=15,
                           batch_seconds=0.05, warmup_seconds=0.3)
        if "checked" in timed.samples:
            ratios.append(target(f"{backend} checked step / plain step, n=1e7",
                                 timed.ratio("checked", "plain"), 1.3, at_most=True))
        for mode in ("checked-scaled-pow2", "checked-scaled-1000"):
            if mode in timed.samples:  # reported, no target
                ratios.append(target(f"{backend} {mode} / plain step",
                                     timed.ratio(mode, "plain"), float("inf"), at_most=True))
    return ratios


def test_speed_targets(benchmark, request):
    """Check the target as ratios of interleaved timings (runs last in this file)."""
    check_targets(benchmark, request, _target_ratios)
