"""Processes, threads and memory: what long training runs embedding fastrms rely on.

- A process forked or spawned after the kernels ran in the parent can still run them, with the
  same bits. GNU OpenMP's thread pool does not survive fork(): the C backend runs a forked child
  on one thread, and Numba, whose "omp" layer kills a forked child that launches a parallel
  region, runs the serial kernel there. Each run is a subprocess with a time limit, so a
  regression fails instead of hanging.
- The compiled backends release the GIL: two Python threads on separate buffers run at the same
  time (their calls overlap), and many threads at once give the bits of running them in turn.
- A step allocates nothing proportional to the array size.
- Thread counts: until set explicitly, they follow OpenMP's setting, so threadpoolctl's limits
  govern fastrms like the other OpenMP libraries in the process; and they never exceed the
  usable cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import fastrms
from fastrms import backends

from rms_helpers import require_backend

COMPILED = [name for name in backends.BACKEND_NAMES if name != "numpy"]
ABOVE_THRESHOLD = 200_003  # above both compiled backends' parallel threshold

PROCESS_SCRIPT = """
import hashlib, json, multiprocessing, sys
import numpy as np
import fastrms

BACKEND, METHOD, N = sys.argv[1], sys.argv[2], int(sys.argv[3])

def step(seed):
    rng = np.random.default_rng(seed)
    p, g = rng.standard_normal((2, N)).astype(np.float32)
    s = np.abs(rng.standard_normal(N)).astype(np.float32)
    b = np.zeros(N, np.float32)
    fastrms.rmsprop_update(p, g, s, lr=1e-2, momentum=0.9, momentum_buffer=b, backend=BACKEND)
    return hashlib.sha256(p.tobytes() + s.tobytes() + b.tobytes()).hexdigest()

if __name__ == "__main__":
    parent = [step(seed) for seed in range(2)]  # the parallel kernels run in the parent first
    with multiprocessing.get_context(METHOD).Pool(2) as pool:
        children = pool.map(step, range(2))
    reference = []
    with fastrms.use_backend("numpy"):
        reference = [step(seed) for seed in range(2)]
    print(json.dumps({"parent": parent, "children": children, "reference": reference}))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("name", COMPILED)
def test_kernels_run_in_child_processes_after_running_in_the_parent(name, method, tmp_path):
    require_backend(name)
    script = tmp_path / "children.py"
    script.write_text(PROCESS_SCRIPT)
    result = subprocess.run([sys.executable, str(script), name, method, str(ABOVE_THRESHOLD)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    assert runs["parent"] == runs["reference"]
    assert runs["children"] == runs["reference"]


def _problem(seed: int, n: int):
    rng = np.random.default_rng(seed)
    p, g = rng.standard_normal((2, n)).astype(np.float32)
    return p, g, np.abs(rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("name", COMPILED)
def test_calls_from_two_threads_overlap_in_time(name, restore_threads):
    """Each thread records when its calls start and end; with the GIL released, some call in
    one thread starts before a call in the other has ended. This is an observation of
    concurrency, not a timing target: it holds on a loaded machine too."""
    require_backend(name)
    fastrms.set_num_threads(1)  # one kernel thread per caller, so the two run side by side
    problems = [_problem(seed, 4_000_000) for seed in range(2)]
    for p, g, s in problems:  # compile / warm up before the threads start
        fastrms.rmsprop_update(p, g, s, lr=1e-3, backend=name)
    intervals: list[list[tuple[float, float]]] = [[], []]
    start = threading.Barrier(2)

    def work(k):
        p, g, s = problems[k]
        start.wait()
        for _ in range(6):
            t0 = time.perf_counter()
            fastrms.rmsprop_update(p, g, s, lr=1e-3, backend=name)
            intervals[k].append((t0, time.perf_counter()))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    overlapping = sum(a0 < b1 and b0 < a1 for a0, a1 in intervals[0] for b0, b1 in intervals[1])
    assert overlapping > 0, intervals


@pytest.mark.parametrize("name", backends.BACKEND_NAMES)
def test_many_threads_at_once_give_the_bits_of_running_in_turn(name):
    require_backend(name)
    sizes = [7, 1000, ABOVE_THRESHOLD, 33, 70_001, 5]
    sequential = [_problem(seed, n) for seed, n in enumerate(sizes)]
    concurrent = [tuple(a.copy() for a in problem) for problem in sequential]
    for _ in range(3):
        for p, g, s in sequential:
            fastrms.rmsprop_update(p, g, s, lr=1e-2, centered=False, backend=name)
    barrier = threading.Barrier(len(sizes))

    def work(k):
        p, g, s = concurrent[k]
        barrier.wait()
        for _ in range(3):
            fastrms.rmsprop_update(p, g, s, lr=1e-2, backend=name)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sizes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (p1, _, s1), (p2, _, s2) in zip(sequential, concurrent):
        assert p1.tobytes() == p2.tobytes() and s1.tobytes() == s2.tobytes()


@pytest.mark.parametrize("variant", ["plain", "momentum", "centered"])
@pytest.mark.parametrize("name", COMPILED)
def test_a_step_allocates_nothing_proportional_to_the_size(name, variant):
    """tracemalloc sees NumPy's allocations; a step on 10^7 float32 elements (40 MB a stream)
    must not allocate even 1 MB."""
    require_backend(name)
    n = 10**7
    p, g, s = _problem(0, n)
    options = {"plain": {}, "momentum": {"momentum": 0.9, "momentum_buffer": np.zeros(n, np.float32)},
               "centered": {"centered": True, "grad_avg": np.zeros(n, np.float32)}}[variant]
    fastrms.rmsprop_update(p, g, s, lr=1e-3, backend=name, **options)  # compile, load, cache
    tracemalloc.start()
    try:
        fastrms.rmsprop_update(p, g, s, lr=1e-3, backend=name, **options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{name} {variant}: a step allocated {peak} bytes at its peak"


@pytest.fixture
def threads_follow_openmp(restore_threads):
    fastrms.set_num_threads(None)
    yield
    fastrms.set_num_threads(None)


def _effective_threads() -> dict:
    counts = {"fastrms": fastrms.get_num_threads()}
    loaded = backends.loaded_backends()
    if "numba" in loaded:
        counts["numba"] = loaded["numba"]._thread_count()
    return counts


def test_threadpoolctl_limits_govern_the_compiled_backends(threads_follow_openmp):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for name in COMPILED:
        require_backend(name)
        backends.load(name)
    p, g, s = _problem(0, ABOVE_THRESHOLD)
    fastrms.rmsprop_update(p, g, s, lr=1e-3)  # the OpenMP runtime is loaded and has run
    before = _effective_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert set(_effective_threads().values()) == {1}
        expected = [a.copy() for a in (p, g, s)]
        fastrms.rmsprop_update(p, g, s, lr=1e-3)
    assert _effective_threads() == before
    with fastrms.use_backend("numpy"):
        fastrms.rmsprop_update(*expected, lr=1e-3)
    assert p.tobytes() == expected[0].tobytes()


def test_thread_count_never_exceeds_the_usable_cores(threads_follow_openmp):
    usable = len(os.sched_getaffinity(0))
    fastrms.set_num_threads(usable + 7)
    assert fastrms.get_num_threads() == usable
    assert all(count <= usable for count in _effective_threads().values())

