"""Peak resident memory of one step on 10^8 elements: nothing proportional to the array size.

tests/test_processes.py::test_a_step_allocates_nothing_proportional_to_the_size shows it with
tracemalloc at 10^7 elements; tracemalloc sees only allocations made through Python's / NumPy's
allocators. Here the whole process is measured: the peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh interpreter before and after one step on
float32 arrays of 10^8 elements (400 MB a stream). A temporary copy of any stream, made in C,
in Numba, by NumPy or by the OS, would raise the peak by about 400 MB; the bound is 64 MiB.

Each case runs in its own subprocess, so the peak belongs to that case alone:

1. the backend is warmed on small problems of the same kind (one above the compiled kernels'
   parallel threshold), so Numba's compilation or cache loading, the C library's loading and the
   OpenMP thread pool's start-up happen before the measurement;
2. every stream is allocated and written in full (np.empty + fill: every page resident), so
   the first touch of a page by the step cannot count against it;
3. peak RSS is read, one step runs, peak RSS is read again.

Cases, for every compiled backend of the registry (unavailable ones are skipped with the reason):
``plain`` (param, grad, square_avg: 1.2 GB), ``centered-momentum`` (the five streams: 2 GB)
through :func:`fastrms.rmsprop_update`, and ``flat``: one ``fastrms.RMSprop(flat).step()`` with
torch's defaults over a :class:`fastrms.FlatParams` of four float32 arrays holding 10^8
elements in all (parameter and gradient buffers, square_avg: 1.2 GB). A control case runs the
same measurement around a step that copies its gradient first, and must see one stream's worth
of growth: the method can see what it is meant to rule out.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastrms import backends
from fastrms.report.bench import _memory_available as memory_available

from rms_helpers import clean_env, require_backend

#: The registry minus the NumPy reference, as in tests/test_processes.py.
COMPILED = [name for name in backends.BACKEND_NAMES if name != "numpy"]
N = 10**8
ITEMSIZE = 4  # float32
STREAMS = {"plain": 3, "centered-momentum": 5, "flat": 3}
LIMIT = 64 * 2**20

SCRIPT = r"""
import json, resource, sys, time
import numpy as np
import fastrms

BACKEND, VARIANT, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
SCALE = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
WARM = 200_003  # above both compiled backends' parallel threshold (1 << 16)


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * SCALE


def filled(n, value):
    array = np.empty(n, np.float32)
    array.fill(value)  # writes every page: all of it is resident before the measured step
    return array


def make(n):
    '''One step's worth of arrays of n elements in all, and a function taking the step.'''
    if VARIANT == "flat":
        sizes = [n // 2, n // 4, n - n // 2 - n // 4 - 7, 7]
        # Broadcast inputs: FlatParams copies them into its buffer, nothing else is allocated.
        flat = fastrms.FlatParams([np.broadcast_to(np.float32(0.5), (s,)) for s in sizes])
        opt = fastrms.RMSprop(flat, backend=BACKEND)  # torch's defaults
        for grad in flat.grads:
            grad[...] = 0.25
        buffer = flat.param_buffers[np.dtype(np.float32)]
        return opt.step, buffer
    param, grad, square_avg = filled(n, 0.5), filled(n, 0.25), filled(n, 0.125)
    options = {"lr": 1e-3}
    if VARIANT == "centered-momentum":
        options.update(momentum=0.9, centered=True, momentum_buffer=filled(n, 0.0),
                       grad_avg=filled(n, 0.0))
    if VARIANT == "copying-control":  # what a step with one temporary stream would look like
        return (lambda: fastrms.rmsprop_update(param, grad.copy(), square_avg, backend=BACKEND,
                                               **options), param)
    return (lambda: fastrms.rmsprop_update(param, grad, square_avg, backend=BACKEND, **options),
            param)


for size in (WARM, 1000):  # compile / load / start threads: not measured
    step, _ = make(size)
    step()
    step()
del step
step, param = make(N)
before = peak()
start = time.perf_counter()
step()
seconds = time.perf_counter() - start
after = peak()
print(json.dumps({"before": before, "after": after, "seconds": seconds,
                  "first": float(param[0]), "last": float(param[-1])}))
"""


def _measure(name: str, variant: str, streams: int) -> tuple[dict, str]:
    require_backend(name)
    pytest.importorskip("resource", reason="peak RSS comes from resource.getrusage (POSIX)")
    arrays = streams * N * ITEMSIZE
    available = memory_available()
    if available is not None and available < arrays + 2**30:
        pytest.skip(f"needs {arrays / 2**30:.1f} GiB + 1 GiB free memory, "
                    f"{available / 2**30:.1f} GiB available")
    result = subprocess.run([sys.executable, "-c", SCRIPT, name, variant, str(N)],
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    numbers["growth"] = numbers["after"] - numbers["before"]
    report = (f"{name} {variant}: peak RSS {numbers['before'] / 2**20:.1f} MiB before the step, "
              f"{numbers['after'] / 2**20:.1f} MiB after (+{numbers['growth'] / 2**20:.2f} MiB; "
              f"one stream is {N * ITEMSIZE / 2**20:.0f} MiB), step {numbers['seconds']:.2f} s")
    print(report)
    assert numbers["before"] >= 0.95 * arrays, (
        f"{report}: the {streams} streams ({arrays / 2**20:.0f} MiB) were not resident "
        f"before the step, so the measurement proves nothing")
    assert numbers["first"] != 0.5 and numbers["last"] != 0.5, f"{report}: no update happened"
    return numbers, report


@pytest.mark.parametrize("variant", list(STREAMS))
@pytest.mark.parametrize("name", COMPILED)
def test_a_step_on_1e8_elements_leaves_peak_rss_unchanged(name, variant):
    """Peak RSS grows by less than 64 MiB over one step on 10^8 float32 elements (a stream is
    400 MB). The arrays' own pages must already be counted in the peak before the step (else
    the measurement would prove nothing), and the step must have updated the parameters."""
    numbers, report = _measure(name, variant, STREAMS[variant])
    assert numbers["growth"] < LIMIT, (
        f"{report}: the step raised the peak by {numbers['growth']} bytes")


def test_the_measurement_sees_one_temporary_stream():
    """Control: the same measurement around a step that copies its gradient first (one
    temporary 400 MB stream, as an implementation that gathered or converted its input would
    make) sees the peak rise by about one stream, far above the 64 MiB bound."""
    name = next((n for n in COMPILED if backends.availability(n)[0]), None)
    if name is None:
        pytest.skip("no compiled backend available")
    numbers, report = _measure(name, "copying-control", 3)
    assert numbers["growth"] > 0.9 * N * ITEMSIZE, report
