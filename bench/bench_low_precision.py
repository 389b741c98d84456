"""16-bit parameters with float32 state against the float32 step and their own roofline.

A bfloat16 (or float16) parameter and gradient with float32 ``square_avg`` move 14 bytes per
element in the plain variant (read p 2, g 2, s 4; write p 2, s 4) where the float32 step moves
20, so on large buffers the step can be up to 20/14 = 1.43x faster. ``pytest bench
--benchmark-only -k low_precision`` times, at each size, the float32 C step, the 16-bit C step
with nearest and stochastic rounding and with a float32 master copy (20 bytes per element: it
reads and writes the master instead of reading the 16-bit param), the Numba backend, the 16-bit
roofline kernel (the same streams, trivial arithmetic) and, when installed, torch.optim.RMSprop
on bfloat16 tensors (whose state is bfloat16 too). ``extra_info`` records bytes moved, GB/s,
the fraction of the 16-bit roofline and the CPU model. The last test checks the speed targets
of issue 14 as ratios of interleaved timings (bench/targets.py); ``--bench-large`` adds
10^8 elements; with ``--benchmark-disable`` the file is a quick correctness test.
"""
from __future__ import annotations

import platform

import ml_dtypes
import numpy as np
import pytest

import fastrms
from fastrms import backends
from fastrms._coefficients import MOMENTUM
from targets import Ratio, check_targets, interleaved_best

SIZES = [10**3, 10**5, 10**7]
LARGE_SIZES = [10**8]
BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
LR, ALPHA, EPS, MOMENTUM_VALUE = 1e-3, 0.99, 1e-8, 0.9
VARIANTS = {"plain": {}, "momentum": {"momentum": MOMENTUM_VALUE}}
#: name -> (param dtype, backend, rounding mode or "roofline" / "torch"); "float32-c" is the
#: float32 step the targets compare with.
IMPLEMENTATIONS = {
    "float32-c": (np.dtype(np.float32), "c", "nearest"),
    "bfloat16-c-nearest": (BF16, "c", "nearest"),
    "bfloat16-c-stochastic": (BF16, "c", "stochastic"),
    "bfloat16-c-master": (BF16, "c", "master"),
    "float16-c-nearest": (F16, "c", "nearest"),
    "float16-c-stochastic": (F16, "c", "stochastic"),
    "bfloat16-numba-nearest": (BF16, "numba", "nearest"),
    "bfloat16-numba-stochastic": (BF16, "numba", "stochastic"),
    "roofline-16": (BF16, "c", "roofline"),
    "torch-bfloat16": (BF16, None, "torch"),
}
_best: dict[tuple, float] = {}  # (implementation, variant, n) -> best s per step


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def pytest_generate_tests(metafunc):
    if "n" in metafunc.fixturenames:
        sizes = SIZES + (LARGE_SIZES if metafunc.config.getoption("--bench-large") else [])
        metafunc.parametrize("n", sizes, ids=lambda n: f"n=1e{len(str(n)) - 1}")


def make_state(variant: str, dtype, n: int, mode: str) -> dict:
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal(n, dtype=np.float32)
    state = {"param": p32.astype(dtype), "grad": rng.standard_normal(n, dtype=np.float32)
             .astype(dtype),
             "square_avg": np.abs(rng.standard_normal(n, dtype=np.float32)) + np.float32(1e-3),
             "momentum_buffer": np.zeros(n, np.float32) if variant == "momentum" else None,
             "master_param": p32 if mode == "master" else None}
    return state


def bytes_moved(variant: str, name: str, n: int) -> int:
    dtype, _, mode = IMPLEMENTATIONS[name]
    if mode == "torch":  # its state is bfloat16 too
        return (5 if variant == "plain" else 7) * 2 * n
    param, grad = dtype.itemsize, dtype.itemsize
    per = 2 * param + grad + 8 + (8 if variant == "momentum" else 0)
    if mode == "master":  # reads and writes the float32 master instead of reading the param
        per += 8 - param
    return per * n


def make_step(name: str, variant: str, state: dict, backend: str | None = None):
    """One step of ``name`` on ``state``; ``backend`` overrides the implementation's."""
    dtype, default_backend, mode = IMPLEMENTATIONS[name]
    backend = backend or default_backend
    p, g, s, b, m = (state[k] for k in ("param", "grad", "square_avg", "momentum_buffer",
                                         "master_param"))
    if mode == "roofline":
        roofline = backends.load("c").roofline_low_precision
        flags = MOMENTUM if variant == "momentum" else 0
        arrays = (p.copy(), g, s.copy(), None if b is None else b.copy())
        return lambda: roofline(flags, *arrays)
    if mode == "torch":
        return _torch_step(variant, state)
    update = fastrms.rmsprop_update
    extra = dict(VARIANTS[variant])
    if b is not None:
        extra["momentum_buffer"] = b
    if m is not None:
        extra["master_param"] = m
    if mode == "stochastic":
        counter = iter(range(1 << 62))
        return lambda: update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, backend=backend,
                              param_rounding="stochastic", seed=1, step=next(counter), **extra)
    return lambda: update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, backend=backend, **extra)


def _torch_step(variant, state):
    import torch

    param = torch.nn.Parameter(torch.from_numpy(state["param"].view(np.uint16).astype(np.int16))
                               .view(torch.bfloat16).clone())
    param.grad = torch.from_numpy(state["grad"].view(np.uint16).astype(np.int16)) \
        .view(torch.bfloat16).clone()
    optimizer = torch.optim.RMSprop([param], lr=LR, alpha=ALPHA, eps=EPS,
                                    momentum=VARIANTS[variant].get("momentum", 0.0))
    return optimizer.step


def _available(name: str) -> tuple[bool, str]:
    _, backend, mode = IMPLEMENTATIONS[name]
    if mode == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            return False, "torch is not installed (pip install torch==2.13.0)"
        return True, ""
    return backends.availability(backend)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_low_precision_update(benchmark, name, variant, n):
    available, reason = _available(name)
    if not available:
        pytest.skip(f"{name} is absent: {reason}")
    if name.startswith("torch") and n > 10**7:
        pytest.skip("torch on bfloat16 at 10^8 adds minutes and no information")
    dtype, backend, mode = IMPLEMENTATIONS[name]
    state = make_state(variant, dtype, n, mode)
    step = make_step(name, variant, state)
    with np.errstate(all="ignore"):
        step()  # compile and warm up outside the timing
    if n <= 10**5:
        _check_first_step(name, variant, n)
    moved = bytes_moved(variant, name, n)
    benchmark.group = f"low precision {variant} n={n:.0e}"
    benchmark.extra_info.update(bytes_moved=moved, cpu=cpu_model())
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    best = stats.stats.min
    _best[(name, variant, n)] = best
    benchmark.extra_info["GB/s"] = round(moved / best / 1e9, 2)
    roofline = _best.get(("roofline-16", variant, n))
    if roofline and mode in ("nearest", "stochastic") and dtype.itemsize == 2 and backend:
        benchmark.extra_info["fraction_of_roofline_16"] = round(roofline / best, 3)


def _check_first_step(name, variant, n) -> None:
    """After one step the fastrms rows hold the NumPy reference's bits (--benchmark-disable
    makes this file a correctness test)."""
    dtype, _, mode = IMPLEMENTATIONS[name]
    if mode in ("roofline", "torch"):
        return
    state = make_state(variant, dtype, n, mode)
    expected = make_state(variant, dtype, n, mode)
    with np.errstate(all="ignore"):
        make_step(name, variant, state)()
        make_step(name, variant, expected, backend="numpy")()
    for key, array in expected.items():
        if array is not None:
            assert np.array_equal(state[key].view(np.uint8), array.view(np.uint8)), (name, key)


# Issue 14's targets on the plain variant: (slower, faster, n, bound, at_most):
# time(slower) / time(faster) >= bound, or <= bound where at_most.
TARGETS = [(slower, faster, n, bound, at_most)
           for n in (10**7, 10**8)
           for slower, faster, bound, at_most in (
               ("float32-c", "bfloat16-c-nearest", 1.3, False),
               ("roofline-16", "bfloat16-c-nearest", 0.90, False),
               ("bfloat16-c-stochastic", "bfloat16-c-nearest", 1.10, True))]


def _target_ratios() -> list[Ratio]:
    """Time again, interleaved, the implementations each target compares (among those this
    session benchmarked, so that -k narrows the check)."""
    ratios = []
    for n in sorted({n for _, _, n, _, _ in TARGETS}):
        wanted = [t for t in TARGETS if t[2] == n
                  and all((name, "plain", n) in _best for name in t[:2])]
        if not wanted:
            continue
        names = sorted({name for t in wanted for name in t[:2]})
        steps = {}
        for name in names:
            dtype, _, mode = IMPLEMENTATIONS[name]
            steps[name] = make_step(name, "plain", make_state("plain", dtype, n, mode))
        with np.errstate(all="ignore"):
            best = interleaved_best(steps, rounds=60 if n <= 10**7 else 15,
                                    batch_seconds=0.05)
        for slower, faster, _, bound, at_most in wanted:
            ratios.append((f"{faster} n={n:.0e}: {slower}/{faster} ({cpu_model()})",
                           best[slower] / best[faster], bound, at_most))
    return ratios


def test_speed_targets(benchmark, request):
    """Check issue 14's targets as ratios of interleaved timings (runs last in this file)."""
    check_targets(benchmark, request, _target_ratios)
