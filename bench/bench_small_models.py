"""Per-step overhead on a small model: a 64-64-10 MLP (four float32 arrays, 4,810 parameters),
each path against a cffi call of the roofline kernel over the same 4,810 elements.

The paths, each one optimizer step with torch's defaults:

- ``rmsprop_update``: ``fastrms.rmsprop_update`` over one buffer of 4,810 elements;
- ``flat``: ``fastrms.RMSprop`` on ``FlatParams`` holding the four arrays;
- ``list``: ``fastrms.RMSprop`` on the four arrays, their gradients passed to ``step``;
- ``torch``: ``fastrms.torch.RMSprop`` on the same MLP as ``torch.nn`` layers
  (``torch-optim``: ``torch.optim.RMSprop``, for scale);
- ``roofline``: ``c_backend.roofline`` (the same streams, trivial arithmetic: what any Python
  call of a C kernel over these elements costs) and ``roofline-raw``, the cffi call alone
  with its pointers made beforehand.

Targets (issue 17), time(path) / time(roofline): rmsprop_update <= 1.2, flat <= 1.3, list <= 2,
torch <= 4. ``test_speed_targets`` (last, ``--benchmark-only``) times the paths interleaved
(bench/targets.py) and checks them; the targets not met yet are listed in ``NOT_MET_YET`` and
reported without failing. ``python bench/bench_small_models.py`` prints the ratios and where
the time of each path goes (``cost_breakdown``: microseconds per piece, each piece timed on
its own). With ``--benchmark-disable`` the file is a quick correctness test: each path runs
once, and ``test_paths_agree`` checks that the fastrms paths give the reference's bits.
"""
from __future__ import annotations

import os
import sys
import timeit

import numpy as np
import pytest

import fastrms
from fastrms import backends
from fastrms.flat import FlatParams
from fastrms.optimizer import RMSprop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from targets import check_targets, interleaved_best  # noqa: E402

SHAPES = [(64, 64), (64,), (10, 64), (10,)]
N = sum(int(np.prod(shape)) for shape in SHAPES)  # 4,810
LR = 1e-2
#: path -> the largest time(path) / time(roofline) allowed.
TARGETS = {"rmsprop_update": 1.2, "flat": 1.3, "list": 2.0, "torch": 4.0}
#: Targets missed when this file was written (see the module docstring and the report of
#: bench/bench_small_models.py): measured and printed, not yet enforced. Remove a path from
#: here when it meets its target.
NOT_MET_YET = {"rmsprop_update", "flat", "list", "torch"}
PATHS = ["roofline", "roofline-raw", "rmsprop_update", "flat", "list", "torch", "torch-optim"]
_measured: set[str] = set()


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    grads = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    return params, grads


def make_step(path: str):
    """(step, read): a zero-argument callable doing one step on state it owns, and a function
    returning the parameters as NumPy arrays (None for the rooflines)."""
    params, grads = _arrays()
    if path in ("roofline", "roofline-raw", "rmsprop_update"):
        p = np.concatenate([a.ravel() for a in params])
        g = np.concatenate([a.ravel() for a in grads])
        s = np.zeros(N, np.float32)
        if path == "rmsprop_update":
            return (lambda: fastrms.rmsprop_update(p, g, s, lr=LR)), (lambda: [p])
        if not backends.availability("c")[0]:
            pytest.skip("the roofline needs the C backend")
        from fastrms.backends import c_backend

        if path == "roofline":
            return (lambda: c_backend.roofline(0, p, g, s)), None
        ffi, lib = c_backend.ffi, c_backend.lib
        pointers = [ffi.from_buffer("float[]", a) for a in (p, g, s)]
        kernel, null = lib.fastrms_roofline_f32, ffi.NULL
        return (lambda: kernel(0, *pointers, null, null, N)), None
    if path == "flat":
        flat = FlatParams(params)
        for view, g in zip(flat.grads, grads):
            view[...] = g
        opt = RMSprop(flat, lr=LR)
        return opt.step, (lambda: list(flat.params))
    if path == "list":
        opt = RMSprop(params, lr=LR)
        return (lambda: opt.step(grads)), (lambda: params)
    torch = pytest.importorskip("torch")
    from fastrms.torch import RMSprop as TorchRMSprop

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        for parameter, value, g in zip(model.parameters(), params, grads):
            parameter.copy_(torch.from_numpy(value))
            parameter.grad = torch.from_numpy(g.copy())
    opt = (torch.optim.RMSprop if path == "torch-optim" else TorchRMSprop)(model.parameters(), lr=LR)
    return opt.step, (lambda: [t.detach().numpy() for t in model.parameters()])


@pytest.mark.parametrize("path", PATHS)
def test_step(benchmark, path):
    step, read = make_step(path)
    step()  # first use (lazy imports, buffer requests) outside the timing
    benchmark.group = f"one step, 64-64-10 MLP ({N} float32 parameters)"
    benchmark(step)
    if getattr(benchmark, "stats", None) is not None:
        _measured.add(path)
    if read is not None:
        assert all(np.isfinite(a).all() for a in read())


def test_paths_agree():
    """Two steps on each fastrms path give the reference's bits; torch's own optimizer agrees
    within a few float32 ulps."""
    params, grads = _arrays()
    expected = [a.copy() for a in params]
    squares = [np.zeros_like(a) for a in params]
    for _ in range(2):
        for p, g, s in zip(expected, grads, squares):
            fastrms.rmsprop_update(p, g, s, lr=LR, backend="numpy")
    flat_expected = np.concatenate([a.ravel() for a in expected])
    for path in ("rmsprop_update", "flat", "list", "torch", "torch-optim"):
        try:
            step, read = make_step(path)
        except pytest.skip.Exception:
            continue
        step()
        step()
        got = np.concatenate([np.asarray(a).ravel() for a in read()])
        if path == "torch-optim":
            assert np.abs(got - flat_expected).max() <= 16 * np.spacing(np.float32(1))
        else:
            assert got.tobytes() == flat_expected.tobytes(), path


def ratios(rounds: int = 60) -> tuple[dict[str, float], dict[str, float]]:
    """time(path) / time(roofline) and the best seconds per step of each path, all paths timed
    interleaved in 2 ms batches."""
    steps = {}
    for path in PATHS:
        try:
            steps[path] = make_step(path)[0]
        except pytest.skip.Exception:
            pass
    best = interleaved_best(steps, rounds=rounds)
    return {path: seconds / best["roofline"] for path, seconds in best.items()}, best


def _target_ratios():
    if not {"roofline"} <= _measured:
        return []
    measured, _ = ratios()
    result = []
    for path, bound in TARGETS.items():
        if path not in measured or path not in _measured:
            continue
        label = f"{path} / roofline ({N} elements)"
        if path in NOT_MET_YET:
            state = "met" if measured[path] <= bound else "not met yet"
            print(f"\n{label} = {measured[path]:.2f} (target <= {bound}, {state}; not enforced)")
            continue
        result.append((label, measured[path], bound, True))
    return result


def test_speed_targets(benchmark, request):
    """The targets as ratios of interleaved timings (runs last in this file)."""
    check_targets(benchmark, request, _target_ratios)


# -- where the time goes ----------------------------------------------------------------------

def _seconds(call, number=2000, repeat=15) -> float:
    call()
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number


def cost_breakdown() -> dict[str, dict[str, float]]:
    """Microseconds per piece of each path's call, each piece timed on its own (best of many),
    pieces listed in the order a call runs them. The pieces are the code of fastrms/_update.py,
    fastrms/backends/c_backend.py, fastrms/optimizer.py and fastrms/torch.py as they stand;
    ``rest`` is the total minus the listed pieces."""
    from fastrms import _dispatch
    from fastrms.backends import c_backend

    ffi, lib = c_backend.ffi, c_backend.lib
    params, grads = _arrays()
    p = np.concatenate([a.ravel() for a in params])
    g = np.concatenate([a.ravel() for a in grads])
    s = np.zeros(N, np.float32)
    coeffs = fastrms.kernel_coefficients(np.float32, lr=LR)
    kernel, buffer_type, struct, flags = c_backend._prepared(coeffs)
    pointers = [ffi.from_buffer(buffer_type, a, True) for a in (p, g, s)]
    null = ffi.NULL
    from_buffer = ffi.from_buffer

    def empty(param, grad, square_avg, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
              momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
              lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
              momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None):
        return None

    pieces = {
        "Python call of a function with rmsprop_update's signature": lambda: empty(p, g, s, lr=LR),
        "the kernel through cffi, pointers made beforehand (GIL released)":
            lambda: kernel(struct, flags, *pointers, null, null, N),
        "three ffi.from_buffer requests": lambda: (from_buffer(buffer_type, p, True),
                                                  from_buffer(buffer_type, g, False),
                                                  from_buffer(buffer_type, s, True)),
        "_dispatch.context_choice()": _dispatch.context_choice,
        "c_backend.update_if_ready (from_buffer x3 + kernel)":
            lambda: c_backend.update_if_ready(coeffs, p, g, s, None, None),
    }
    timed = {name: _seconds(call) * 1e6 for name, call in pieces.items()}
    total = _seconds(lambda: fastrms.rmsprop_update(p, g, s, lr=LR)) * 1e6
    update_if_ready = timed["c_backend.update_if_ready (from_buffer x3 + kernel)"]
    breakdown = {"rmsprop_update": {
        "total": total,
        "Python call with 3 arrays and 1 keyword": timed[
            "Python call of a function with rmsprop_update's signature"],
        "kernel (cffi call + C, pointers ready)": timed[
            "the kernel through cffi, pointers made beforehand (GIL released)"],
        "3 from_buffer requests": timed["three ffi.from_buffer requests"],
        "update_if_ready's own lines": update_if_ready - timed[
            "the kernel through cffi, pointers made beforehand (GIL released)"] - timed[
            "three ffi.from_buffer requests"],
        "_update.py's checks (identity, types, dtypes, shapes, dispatch)": total - timed[
            "Python call of a function with rmsprop_update's signature"] - update_if_ready,
    }}
    roofline = {"total": _seconds(lambda: c_backend.roofline(0, p, g, s)) * 1e6,
                "raw cffi call": _seconds(lambda: lib.fastrms_roofline_f32(
                    0, *pointers, null, null, N)) * 1e6}
    breakdown["roofline"] = dict(roofline, **{
        "from_buffer x3 and the wrapper": roofline["total"] - roofline["raw cffi call"]})
    return breakdown


SPIN = r"""
import sys, time
import bench_small_models as bench
step = bench.make_step(sys.argv[1])[0]
end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    step()
"""


def line_profile(path: str, seconds: float = 10.0, top: int = 14) -> dict[str, float] | None:
    """Microseconds per source line of one step of ``path``: py-spy samples a process that runs
    the step in a loop (sampling does not slow the lines it measures, as a tracing profiler
    would); each sample counts for the line it was in (a C call counts for the line that made
    it), and the shares of the step's samples are scaled to the step's measured time. None
    without py-spy on PATH."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("py-spy") is None:
        return None
    total = _seconds(make_step(path)[0]) * 1e6
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.txt")
        subprocess.run(["py-spy", "record", "-r", "997", "-f", "raw", "-o", out, "--",
                        sys.executable, "-c", SPIN, path, str(seconds)], env=env, check=True,
                       capture_output=True, timeout=seconds + 120)
        with open(out) as samples:
            lines = samples.read().splitlines()
    own: dict[str, int] = {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any("(<string>:7)" in frame for frame in frames):  # inside step()
            continue
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
    in_step = sum(own.values())
    ranked = sorted(own.items(), key=lambda item: -item[1])
    result = {"total": total}
    for leaf, count in ranked[:top]:
        result[leaf] = count / in_step * total
    result["(other lines)"] = sum(count for _, count in ranked[top:]) / in_step * total
    return result


def main() -> None:
    import platform

    print(f"{platform.processor() or platform.machine()}, {N} float32 parameters")
    measured, best = ratios()
    for path, ratio in measured.items():
        target = TARGETS.get(path)
        print(f"{path:>15}: {best[path] * 1e6:7.2f} us = {ratio:5.2f} x roofline"
              + (f" (target <= {target}: {'met' if ratio <= target else 'not met'})"
                 if target else ""))
    for path, pieces in cost_breakdown().items():
        print(f"\n{path}: {pieces.pop('total'):.2f} us per call")
        for piece, us in pieces.items():
            print(f"    {us:6.2f} us  {piece}")
    for path in ("rmsprop_update", "flat", "list", "torch"):
        try:
            lines = line_profile(path)
        except pytest.skip.Exception:
            continue
        if lines is None:
            print("\n(py-spy is not on PATH: no time per line)")
            break
        print(f"\n{path}: {lines.pop('total'):.2f} us per step, by line (py-spy samples)")
        for line, us in lines.items():
            print(f"    {us:6.2f} us  {line}")


if __name__ == "__main__":
    main()
