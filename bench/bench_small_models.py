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
torch <= 4. With ``--benchmark-only``, ``test_speed_targets`` times the paths again interleaved
(bench/targets.py) and checks the targets met so far; those listed in ``NOT_MET_YET`` are
printed by ``test_speed_targets_not_met_yet``, which xfails while any is missed (so a run with
timings stays green until they are met, and says so when one is). ``python bench/bench_small_models.py`` prints the ratios and where
the time of each path goes (``cost_breakdown``: microseconds per piece, each piece timed on
its own). With ``--benchmark-disable`` the file is a quick correctness test: each path runs
once, and ``test_paths_agree`` checks that the fastrms paths give the reference's bits.
"""
from __future__ import annotations

import os
import sys

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


_ratios_measured: dict[str, float] = {}


def _measured_ratios() -> dict[str, float]:
    """The paths' ratios, timed once per session (after the benchmarks ran them)."""
    if not _ratios_measured and "roofline" in _measured:
        _ratios_measured.update(ratios()[0])
    return _ratios_measured


def _target_ratios(enforced: bool):
    measured = _measured_ratios()
    return [(f"{path} / roofline ({N} elements)", measured[path], bound, True)
            for path, bound in TARGETS.items()
            if path in measured and path in _measured and (path not in NOT_MET_YET) == enforced]


def test_speed_targets(benchmark, request):
    """The targets met so far, as ratios of interleaved timings (runs after the benchmarks)."""
    check_targets(benchmark, request, lambda: _target_ratios(enforced=True))


def test_speed_targets_not_met_yet(benchmark, request):
    """The targets in NOT_MET_YET: measured and printed; xfail while missed."""
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("needs timings: run with --benchmark-only")
    measured = benchmark.pedantic(lambda: _target_ratios(enforced=False), rounds=1,
                                  iterations=1)
    lines = [f"{what} = {ratio:.2f} (target <= {bound}): "
             f"{'met: remove it from NOT_MET_YET' if ratio <= bound else 'not met yet'}"
             for what, ratio, bound, _ in measured]
    print("\n" + "\n".join(lines))
    benchmark.extra_info["ratios"] = {what: round(ratio, 3) for what, ratio, _, _ in measured}
    missed = [line for line in lines if line.endswith("not met yet")]
    if missed:
        pytest.xfail("speed targets not met yet:\n" + "\n".join(missed))


# -- where the time goes ----------------------------------------------------------------------

def cost_breakdown(rounds: int = 40) -> dict[str, dict[str, float]]:
    """Microseconds per piece of a ``rmsprop_update`` call and of the roofline call, in the
    order a call runs them. Every piece is timed on its own, all interleaved in one process
    (so that all see the same phases of a noisy machine); the last piece of each is its total
    minus the others. The pieces are fastrms/_update.py's and fastrms/backends/c_backend.py's
    code as it stands."""
    from fastrms.backends import c_backend

    ffi, lib = c_backend.ffi, c_backend.lib
    params, grads = _arrays()
    p = np.concatenate([a.ravel() for a in params])
    g = np.concatenate([a.ravel() for a in grads])
    s = np.zeros(N, np.float32)
    coeffs = fastrms.kernel_coefficients(np.float32, lr=LR)
    kernel, buffer_type, struct, flags = c_backend._prepared(coeffs)
    pointers = [ffi.from_buffer(buffer_type, a, True) for a in (p, g, s)]
    null, from_buffer, roofline = ffi.NULL, ffi.from_buffer, lib.fastrms_roofline_f32

    def empty(param, grad, square_avg, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
              momentum=0.0, centered=False, maximize=False, eps_in_sqrt=False,
              lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
              momentum_buffer=None, grad_avg=None, grad_scale=None, backend=None):
        return None

    t = interleaved_best({
        "call": lambda: empty(p, g, s, lr=LR),
        "update kernel, 16 elements": lambda: kernel(struct, flags, *pointers, null, null, 16),
        "update kernel": lambda: kernel(struct, flags, *pointers, null, null, N),
        "roofline kernel, 16 elements": lambda: roofline(0, *pointers, null, null, 16),
        "roofline kernel": lambda: roofline(0, *pointers, null, null, N),
        "from_buffer x3": lambda: (from_buffer(buffer_type, p, True),
                                   from_buffer(buffer_type, g, False),
                                   from_buffer(buffer_type, s, True)),
        "update_if_ready": lambda: c_backend.update_if_ready(coeffs, p, g, s, None, None),
        "roofline wrapper": lambda: c_backend.roofline(0, p, g, s),
        "rmsprop_update": lambda: fastrms.rmsprop_update(p, g, s, lr=LR),
    }, rounds=rounds)
    t = {name: seconds * 1e6 for name, seconds in t.items()}
    return {
        "rmsprop_update": {
            "total": t["rmsprop_update"],
            "the Python call (3 arrays, 1 keyword)": t["call"],
            "_update.py's own lines (identity test, types, dtypes, shapes, dispatch)":
                t["rmsprop_update"] - t["call"] - t["update_if_ready"],
            "3 ffi.from_buffer requests": t["from_buffer x3"],
            "update_if_ready's own lines": t["update_if_ready"] - t["from_buffer x3"]
                - t["update kernel"],
            "cffi call of the kernel (16 elements: the call, GIL release, checks)":
                t["update kernel, 16 elements"],
            "the kernel's arithmetic over the other 4,794 elements":
                t["update kernel"] - t["update kernel, 16 elements"],
        },
        "roofline": {
            "total": t["roofline wrapper"],
            "3 ffi.from_buffer requests and the wrapper's lines":
                t["roofline wrapper"] - t["roofline kernel"],
            "cffi call of the kernel (16 elements)": t["roofline kernel, 16 elements"],
            "the kernel's arithmetic over the other 4,794 elements":
                t["roofline kernel"] - t["roofline kernel, 16 elements"],
        },
    }


SPIN = r"""
import sys, time
import bench_small_models as bench
step = bench.make_step(sys.argv[1])[0]
end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    step()
"""


def line_profile(path: str, total: float, seconds: float = 10.0,
                 top: int = 14) -> dict[str, float] | None:
    """Microseconds per source line of one step of ``path`` that takes ``total`` us: py-spy
    samples a process that runs the step in a loop (sampling does not slow the lines it
    measures, as a tracing profiler would); each sample counts for the line it was in (a C call
    counts for the line that made it), and the shares of the step's samples are scaled to
    ``total``. None without py-spy on PATH."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("py-spy") is None:
        return None
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
        if path not in best:
            continue
        lines = line_profile(path, best[path] * 1e6)
        if lines is None:
            print("\n(py-spy is not on PATH: no time per line)")
            break
        print(f"\n{path}: {lines.pop('total'):.2f} us per step (the interleaved best above), "
              f"by line (shares of py-spy samples)")
        for line, us in lines.items():
            print(f"    {us:6.2f} us  {line}")


if __name__ == "__main__":
    main()
