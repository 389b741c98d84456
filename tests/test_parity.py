"""Every backend in the registry gives the NumPy reference's bits (SPEC.md, "Consequences").

Bits are compared as unsigned integers; the only freedom allowed is NaN payload and sign (any NaN
equals any NaN). Every valid option combination is run for float32 and float64 over several
steps with varying gradients at sizes that hit the scalar, vector-remainder and vector paths, on
special values (signed zeros, subnormals, extremes, infinities, NaN), and a representative set of
combinations above the kernels' parallel threshold. Then layouts (strided, Fortran, 0-d, n-d,
broadcast, read-only, interleaved), misaligned buffers, thread counts and SIMD levels, and a
Hypothesis property test over random shapes, values and hyperparameters.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastrms
from fastrms import backends

from rms_helpers import (ALL_COMBOS, BACKENDS, DTYPES, LARGE, LARGE_COMBOS, STATE_NAMES,
                         assert_bits_equal, backend_update, bit_mismatches, check_steps, copy_state, make_options,
                         make_problem, reference_update, require_backend)

SMALL_SIZES = (0, 1, 7, 15, 16, 17, 33, 1000)
DTYPE_IDS = [np.dtype(d).name for d in DTYPES]
STEPS = 3


def test_parallel_threshold_is_what_the_large_size_exceeds():
    """LARGE must really exercise the threaded paths of both compiled kernels."""
    if fastrms.backends.availability("c")[0]:
        from fastrms.backends import c_backend

        assert LARGE > c_backend.lib.fastrms_parallel_threshold()
    if fastrms.backends.availability("numba")[0]:
        from fastrms.backends import numba_backend

        assert LARGE > numba_backend.PARALLEL_THRESHOLD


def test_combination_table_is_complete():
    """192 = maximize x centered x eps_in_sqrt x 6 momentum forms x 4 decay forms, all valid."""
    assert len(ALL_COMBOS) == 192
    assert len({ident for ident, _ in ALL_COMBOS}) == 192
    flags = set()
    for _, options in ALL_COMBOS:
        flags.add(fastrms.kernel_coefficients(np.float32, **options).flags)
    # 2 * 2 * 2 * (none, torch, torch+nesterov, lr-in, lr-in+nesterov) * (none, coupled, decoupled)
    assert len(flags) == 120


# --------------------------------------------------------------------------------------------
# every combination, both dtypes, small sizes and special values


@pytest.mark.parametrize("options", [c[1] for c in ALL_COMBOS], ids=[c[0] for c in ALL_COMBOS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_combination_matches_reference(backend, dtype, options, rng):
    for size in SMALL_SIZES:
        state, grads = make_problem(rng, dtype, (size,), options, STEPS)
        check_steps(backend, options, state, grads, f"size {size}")
    state, grads = make_problem(rng, dtype, (41,), options, STEPS, special=True)
    check_steps(backend, options, state, grads, "special values")


@pytest.mark.parametrize("options", [c[1] for c in LARGE_COMBOS], ids=[c[0] for c in LARGE_COMBOS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_above_parallel_threshold_matches_reference(backend, dtype, options, rng):
    state, grads = make_problem(rng, dtype, (LARGE,), options, STEPS)
    # A few special values in the tail slice too (the last thread's remainder loop).
    state["param"][-3:] = [np.inf, np.nan, -0.0]
    grads[0][-5:] = [0.0, -0.0, np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal, np.nan]
    check_steps(backend, options, state, grads, f"size {LARGE}")


# --------------------------------------------------------------------------------------------
# layouts: non-contiguous, n-d, 0-d, broadcast, read-only, interleaved

LAYOUT_VARIANTS = (
    ("plain", make_options()),
    ("all-options", make_options(True, True, True, "lrin-nest", "coupled")),
    ("torch-momentum-centered-decoupled", make_options(False, True, False, "torch-nest",
                                                       "decoupled")),
)
SENTINEL = 777.0


class Layout:
    """Places each array of a problem in a given memory layout, and remembers the parent
    buffers so the test can check that the elements between the views were not written."""

    def __init__(self, name):
        self.name = name
        self.parents = []  # (base, mask of elements that belong to views)
        self._shared = None

    def shape(self):
        return {"strided": (23,), "reversed": (23,), "fortran": (7, 5), "c-2d": (7, 5),
                "c-3d": (3, 4, 5), "strided-3d": (3, 4, 5), "transposed-3d": (3, 4, 5),
                "0-d": (), "1x1": (1, 1), "empty-2d": (0, 3), "broadcast-grad": (6, 5),
                "readonly-grad": (37,), "mixed": (6, 5), "interleaved": (29,),
                "interleaved-2d": (4, 6), "strided-large": (LARGE,)}[self.name]

    def _in_parent(self, values, parent_shape, index):
        base = np.full(parent_shape, SENTINEL, dtype=values.dtype)
        mask = np.zeros(parent_shape, dtype=bool)
        view = base[index]
        assert view.shape == values.shape
        view[...] = values
        mask[index] = True
        self.parents.append((base, mask))
        return view

    def place(self, role, values):
        name = self.name
        n = values.size
        if name in ("strided", "strided-large"):
            return self._in_parent(values, (3 * n + 2,), np.s_[1:3 * n + 1:3])
        if name == "reversed":
            return self._in_parent(values, (n,), np.s_[::-1])
        if name == "fortran":
            return np.asfortranarray(values)
        if name == "strided-3d":
            return self._in_parent(values, (3, 9, 5), np.s_[:, 1::2, :])
        if name == "transposed-3d":
            out = np.empty(values.shape[::-1], values.dtype).transpose(2, 1, 0)
            out[...] = values
            return out
        if name == "broadcast-grad" and role == "grad":
            return np.broadcast_to(values[:1, :], values.shape)
        if name == "readonly-grad" and role == "grad":
            out = values.copy()
            out.flags.writeable = False
            return out
        if name == "mixed":
            if role == "param":
                return np.asfortranarray(values)
            if role == "grad":
                return self._in_parent(values, (12, 5), np.s_[::2, :])
            if role in ("momentum_buffer", "grad_avg"):
                return self._in_parent(values, values.shape, np.s_[::-1, ::-1])
            return values.copy()
        if name in ("interleaved", "interleaved-2d"):
            # Every stream is one column of a single buffer: strided views of one allocation
            # that do not share any element, which must be accepted.
            column = STATE_NAMES.index(role) if role != "grad" else 4
            if self._shared is None:
                self._shared = np.full(values.shape + (6,), SENTINEL, dtype=values.dtype)
                self.parents.append((self._shared, np.zeros(self._shared.shape, bool)))
            view = self._shared[..., column]
            view[...] = values
            self.parents[0][1][..., column] = True
            return view
        return values.copy()  # C-contiguous n-d, 0-d, 1x1, empty, the other streams


LAYOUT_NAMES = ("strided", "reversed", "fortran", "c-2d", "c-3d", "strided-3d", "transposed-3d",
                "0-d", "1x1", "empty-2d", "broadcast-grad", "readonly-grad", "mixed",
                "interleaved", "interleaved-2d", "strided-large")


@pytest.mark.parametrize("options", [v[1] for v in LAYOUT_VARIANTS], ids=[v[0] for v in LAYOUT_VARIANTS])
@pytest.mark.parametrize("layout_name", LAYOUT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layouts_match_reference(backend, dtype, layout_name, options, rng):
    layout = Layout(layout_name)
    shape = layout.shape()
    state, grads = make_problem(rng, dtype, shape, options, STEPS)
    if layout_name == "broadcast-grad":  # the logical gradient really is broadcast
        grads = [np.broadcast_to(g[:1, :], g.shape).copy() for g in grads]
    placed = {k: (None if v is None else layout.place(k, v)) for k, v in state.items()}
    if layout_name in ("strided", "reversed", "fortran", "strided-3d", "transposed-3d", "mixed",
                       "interleaved", "interleaved-2d", "strided-large"):
        assert not placed["param"].flags.c_contiguous or placed["param"].size <= 1
    reference = copy_state(state)
    for step, grad in enumerate(grads):
        # Placed per step: in the interleaved layouts every gradient lives in the same column.
        placed_grad = layout.place("grad", grad)
        reference = reference_update(options, reference, grad)
        backend_update(backend, options, placed, placed_grad)
        for name in STATE_NAMES:
            if reference[name] is not None:
                assert placed[name].shape == shape
                assert_bits_equal(placed[name], reference[name], f"{layout_name} step {step} {name}")
    for base, mask in layout.parents:
        untouched = base[~mask]
        assert np.array_equal(untouched, np.full_like(untouched, SENTINEL)), \
            "elements between the strided views were written"


def test_interleaved_views_are_accepted_by_every_backend(backend):
    """p = x[::2], g = x[1::2] share a buffer but no element: accepted, and correct."""
    x = np.arange(40, dtype=np.float64) / 7.0
    p, g = x[::2], x[1::2]
    s = np.ones(20)
    expected = reference_update(make_options(), {"param": p.copy(), "square_avg": s.copy(),
                                                 "momentum_buffer": None, "grad_avg": None}, g)
    fastrms.rmsprop_update(p, g, s, lr=0.01, alpha=0.9, eps=1e-8, backend=backend)
    assert_bits_equal(p, expected["param"], "param")
    assert_bits_equal(s, expected["square_avg"], "square_avg")


# --------------------------------------------------------------------------------------------
# misaligned buffers


def misaligned(values, offset=2):
    """A writeable copy of ``values`` at a byte offset that breaks the dtype's alignment."""
    buffer = bytearray(values.nbytes + offset)
    out = np.frombuffer(buffer, dtype=values.dtype, count=values.size, offset=offset)
    out = out.reshape(values.shape)
    out[...] = values
    assert out.flags.writeable and not out.flags.aligned
    return out


MISALIGNED_CASES = [(size, which) for size in (1, 17, 1000)
                    for which in ("all", "grad", "param", "buffers")] + [(LARGE, "all")]


@pytest.mark.parametrize(("size", "which"), MISALIGNED_CASES,
                         ids=[f"{size}-{which}" for size, which in MISALIGNED_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_arrays_match_reference(backend, dtype, size, which, rng):
    options = make_options(True, True, False, "torch", "coupled")
    state, grads = make_problem(rng, dtype, (size,), options, STEPS)
    roles = {"all": STATE_NAMES + ("grad",), "grad": ("grad",), "param": ("param",),
             "buffers": ("momentum_buffer", "grad_avg")}[which]
    placed = {k: (misaligned(v) if k in roles else v.copy()) for k, v in state.items()}
    placed_grads = [misaligned(g) if "grad" in roles else g for g in grads]
    reference = copy_state(state)
    for step, (grad, placed_grad) in enumerate(zip(grads, placed_grads)):
        reference = reference_update(options, reference, grad)
        backend_update(backend, options, placed, placed_grad)
        for name in STATE_NAMES:
            assert_bits_equal(placed[name], reference[name], f"step {step} {name}")


# --------------------------------------------------------------------------------------------
# threads and SIMD levels


@pytest.mark.parametrize("options", [c[1] for c in LARGE_COMBOS[:4]], ids=[c[0] for c in LARGE_COMBOS[:4]])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_thread_count_does_not_change_bits(backend, dtype, options, rng, restore_threads):
    """1, 2 and 3 threads (3 > cores: uneven slices) give the reference's bits, hence each other's.
    fastrms.set_num_threads stops at the usable cores, so the third count goes to the backend
    module itself."""
    state, grads = make_problem(rng, dtype, (LARGE,), options, 2)
    usable = len(os.sched_getaffinity(0))
    results = []
    for threads in (1, 2, 3):
        fastrms.set_num_threads(threads)
        assert fastrms.get_num_threads() == min(threads, usable)
        backends.load(backend).set_num_threads(threads)
        run = copy_state(state)
        check_steps(backend, options, run, grads, f"{threads} threads")
        results.append(run)
    for run in results[1:]:
        for name in STATE_NAMES:
            if run[name] is not None:
                assert_bits_equal(run[name], results[0][name], f"{name}: threads vs 1 thread")


@pytest.fixture(params=["sse2", "avx2", "avx512"])
def simd_level(request, c_backend, restore_simd):
    names = c_backend.SIMD_NAMES
    best = c_backend.describe()["simd_level_max"]
    got = c_backend.set_simd_level(request.param)
    expected = names[min(names.index(request.param), names.index(best))]
    assert got == expected == c_backend.simd_level()
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_c_simd_levels_give_identical_bits(simd_level, dtype, rng):
    for ident, options in ALL_COMBOS:
        for size in SMALL_SIZES:
            state, grads = make_problem(rng, dtype, (size,), options, STEPS)
            check_steps("c", options, state, grads, f"{simd_level} {ident} size {size}")
        state, grads = make_problem(rng, dtype, (41,), options, STEPS, special=True)
        check_steps("c", options, state, grads, f"{simd_level} {ident} special values")
    for ident, options in LARGE_COMBOS:
        state, grads = make_problem(rng, dtype, (LARGE,), options, 2)
        check_steps("c", options, state, grads, f"{simd_level} {ident} size {LARGE}")


def test_unknown_simd_level_rejected(c_backend, restore_simd):
    with pytest.raises(ValueError, match="SIMD"):
        c_backend.set_simd_level("neon")
    assert c_backend.simd_level() == restore_simd


# --------------------------------------------------------------------------------------------
# property test


def _elements(dtype):
    width = np.dtype(dtype).itemsize * 8
    return st.one_of(
        st.floats(width=width),  # anything: huge, tiny, subnormal, zero, inf, nan
        st.floats(-10.0, 10.0, width=width),
        st.sampled_from([0.0, -0.0, 1.0, float(np.finfo(dtype).max), float(np.finfo(dtype).tiny),
                         float(np.finfo(dtype).smallest_subnormal)]),
    )


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8))
    elements = _elements(dtype)

    def array():
        return draw(hnp.arrays(dtype, shape, elements=elements))

    momentum = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    options = dict(
        lr=draw(st.one_of(st.floats(0.0, 10.0), st.sampled_from([0.0, 1e-3, 1e-40]))),
        alpha=draw(st.floats(0.0, 1.0, exclude_max=True)),
        eps=draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-8, 1e-45]))),
        weight_decay=draw(st.one_of(st.just(0.0), st.floats(0.0, 10.0))),
        momentum=momentum,
        centered=draw(st.booleans()),
        maximize=draw(st.booleans()),
        eps_in_sqrt=draw(st.booleans()),
        lr_in_momentum=draw(st.booleans()),
        nesterov=draw(st.booleans()) if momentum > 0 else False,
        decoupled_weight_decay=draw(st.booleans()),
    )
    state = {"param": array(), "square_avg": array(),
             "momentum_buffer": array() if momentum > 0 else None,
             "grad_avg": array() if options["centered"] else None}
    grads = [array() for _ in range(draw(st.integers(1, 3)))]
    return options, state, grads


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=problems())
def test_property_backend_matches_reference(backend_name, problem):
    require_backend(backend_name)
    options, state, grads = problem
    check_steps(backend_name, options, state, grads, f"{options}")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_gets_identical_bits(c_backend):
    """GNU OpenMP's pool does not survive fork(); the C backend must still run (serially) in a
    child of a process whose pool is started, and give the same bits."""
    import os

    options = make_options(momentum_form="torch", centered=True)
    rng = np.random.default_rng(5)
    state, grads = make_problem(rng, np.float32, (LARGE,), options, 1)
    expected = reference_update(options, copy_state(state), grads[0])
    backend_update("c", options, copy_state(state), grads[0])  # start the thread pool here
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            child = copy_state(state)
            backend_update("c", options, child, grads[0])
            same = all(not bit_mismatches(child[k], expected[k]).any()
                       for k in ("param", "square_avg", "momentum_buffer", "grad_avg"))
            code = 0 if same else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# --------------------------------------------------------------------------------------------
# the parallel threshold's edges, and concurrent callers

THRESHOLD_SIZES = (65535, 65536, 65537, 65536 + 15, 65536 + 16, 3 * 65536 + 1)


@pytest.mark.parametrize("options", [c[1] for c in LARGE_COMBOS[:4]], ids=[c[0] for c in LARGE_COMBOS[:4]])
def test_sizes_around_the_parallel_threshold(backend, options, rng, restore_threads):
    """Just below, at and just above the threshold, and slice-alignment edges, with the default
    thread count and with 3 threads (uneven slices on this 2-core machine)."""
    for threads in (None, 3):
        if threads:
            fastrms.set_num_threads(threads)
        for size in THRESHOLD_SIZES:
            dtype = np.float32 if size % 2 else np.float64
            state, grads = make_problem(rng, dtype, (size,), options, 1)
            check_steps(backend, options, state, grads, f"size {size}, threads {threads}")


def test_concurrent_calls_from_python_threads(backend):
    """The compiled kernels release the GIL; callers in several Python threads at once (each with
    its own arrays, above the threshold so each call starts a thread team) get the reference's
    bits."""
    import threading

    options = make_options(momentum_form="torch", centered=True, decay_form="coupled")
    rng = np.random.default_rng(11)
    problems = [make_problem(rng, np.float32, (LARGE,), options, 2) for _ in range(3)]
    errors = []

    def work(k):
        try:
            state, grads = problems[k]
            for _ in range(2):
                check_steps(backend, options, copy_state(state), grads, f"thread {k}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(problems))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
