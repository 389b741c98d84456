"""Loss scaling and non-finite gradients: ``grad_scale`` inside the fused pass, each backend's
finiteness check, and ``RMSprop(skip_nonfinite=True)``.

The contract: ``grad_scale=s`` gives the bits of passing ``grad / s`` (divided in the dtype) to
an unscaled step, on every backend; a checked step whose unscaled gradients hold a NaN or an
infinity anywhere changes nothing at all and returns False.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrms
from fastrms import backends
from fastrms._coefficients import GRAD_SCALE

from rms_helpers import (ALL_COMBOS, DTYPES, LARGE, LARGE_COMBOS, assert_state_bits_equal,
                         backend_update, copy_state, make_options, make_problem, reference_update,
                         special_values)

DTYPE_IDS = [np.dtype(d).name for d in DTYPES]
#: Scales with an exact reciprocal (powers of two: the kernels multiply) and without (they
#: divide), above and below 1.
EXACT_SCALES = (1024.0, 65536.0, 0.25, 2.0 ** -20)
INEXACT_SCALES = (3.0, 0.375 * 3, 1e-30, 12345.678)


def _unscaled(grad, scale, dtype):
    with np.errstate(all="ignore"):
        return grad / np.dtype(dtype).type(scale)


def _check_scaled_steps(backend, options, state, grads, scale, label):
    """Steps with grad_scale on ``backend`` against unscaled reference steps on grad / scale."""
    reference = copy_state(state)
    dtype = state["param"].dtype
    for step, grad in enumerate(grads):
        reference = reference_update(options, reference, _unscaled(grad, scale, dtype))
        backend_update(backend, dict(options, grad_scale=scale), state, grad)
        assert_state_bits_equal(state, reference, f"{label}, scale {scale}, step {step}")


@pytest.mark.parametrize("options", [c[1] for c in ALL_COMBOS], ids=[c[0] for c in ALL_COMBOS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_scale_gives_the_bits_of_dividing_first(backend, dtype, options, rng):
    # Two scales per combination, one of each kind, varied over the combinations; 4097
    # elements cross two of the C kernel's unscaling blocks (2048) and end one past them.
    k = int(rng.integers(len(EXACT_SCALES)))
    for scale in (EXACT_SCALES[k], INEXACT_SCALES[k]):
        for size in (1, 17, 4097):
            state, grads = make_problem(rng, dtype, (size,), options, 2)
            _check_scaled_steps(backend, options, state, grads, scale, f"size {size}")
        state, grads = make_problem(rng, dtype, (41,), options, 2, special=True)
        _check_scaled_steps(backend, options, state, grads, scale, "special values")


@pytest.mark.parametrize("options", [c[1] for c in LARGE_COMBOS], ids=[c[0] for c in LARGE_COMBOS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_scale_above_parallel_threshold(backend, dtype, options, rng):
    for scale in (4096.0, 3.0):
        state, grads = make_problem(rng, dtype, (LARGE,), options, 2)
        _check_scaled_steps(backend, options, state, grads, scale, f"size {LARGE}")


def test_grad_scale_on_strided_arrays_goes_through_copies(backend, rng):
    options = make_options(centered=True, momentum_form="torch")
    state, grads = make_problem(rng, np.float32, (40,), options, 2)
    strided = {k: np.repeat(v, 2)[::2] for k, v in state.items()}
    assert not strided["param"].flags.c_contiguous
    _check_scaled_steps(backend, options, strided, [np.repeat(g, 2)[::2] for g in grads], 3.0,
                        "strided")


def test_grad_scale_coefficients():
    plain = fastrms.kernel_coefficients(np.float32, 0.01)
    assert fastrms.kernel_coefficients(np.float32, 0.01, grad_scale=1.0).flags == plain.flags
    assert fastrms.kernel_coefficients(np.float32, 0.01, grad_scale=None).flags == plain.flags
    assert not plain.flags & GRAD_SCALE
    # Rounded to the dtype first: 1 + 2^-30 is 1 in float32 (no division) but not in float64.
    assert not fastrms.kernel_coefficients(np.float32, 0.01, grad_scale=1 + 2 ** -30).flags & GRAD_SCALE
    assert fastrms.kernel_coefficients(np.float64, 0.01, grad_scale=1 + 2 ** -30).flags & GRAD_SCALE
    for dtype, scale, inverse in ((np.float32, 1024.0, 2.0 ** -10), (np.float32, 2.0 ** 100, 2.0 ** -100),
                                  (np.float32, 2.0 ** 127, 2.0 ** -127),  # a subnormal, still exact
                                  (np.float32, 2.0 ** -140, 0.0),  # 2^140 overflows float32
                                  (np.float64, 2.0 ** -140, 2.0 ** 140), (np.float32, 3.0, 0.0),
                                  (np.float64, 0.1, 0.0)):
        coeffs = fastrms.kernel_coefficients(dtype, 0.01, grad_scale=scale)
        assert coeffs.flags & GRAD_SCALE
        assert coeffs.values[-1] == inverse, (dtype, scale)
        assert coeffs.values[-2] == float(np.dtype(dtype).type(scale))


@pytest.mark.parametrize("bad, error, dtype", [
    (0.0, ValueError, np.float64), (-2.0, ValueError, np.float64), (float("nan"), ValueError, np.float64),
    (float("inf"), ValueError, np.float64), (1e300, ValueError, np.float32),
    (1e-50, ValueError, np.float32), (True, TypeError, np.float64), ("2", TypeError, np.float64),
    (np.array(2.0), TypeError, np.float64), (10 ** 400, ValueError, np.float64),
])
def test_bad_grad_scale_is_rejected_and_nothing_written(backend, bad, error, dtype, rng):
    options = make_options(momentum_form="torch")
    state, grads = make_problem(rng, dtype, (50,), options, 1)
    before = copy_state(state)
    with pytest.raises(error, match="grad_scale"):
        backend_update(backend, dict(options, grad_scale=bad), state, grads[0])
    assert_state_bits_equal(state, before, "after a rejected grad_scale")


# --------------------------------------------------------------------------------------------
# the finiteness check of each backend

def _expected_finite(grads, scale, dtype) -> bool:
    return all(bool(np.isfinite(_unscaled(g, scale, dtype)).all()) for g in grads)


def _all_finite(backend, grads, scale, dtype) -> bool:
    coeffs = fastrms.kernel_coefficients(dtype, 0.01, grad_scale=scale)
    return backends.load(backend).all_finite(coeffs, grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", (1.0, 0.25, 0.3, 4.0, 2.0 ** -60))
def test_finiteness_check_at_the_overflow_threshold(backend, dtype, scale):
    """Below 1 a scale can overflow a finite gradient into inf: the values right around the
    threshold max * scale, at the start, middle and end of small and threaded arrays."""
    dtype = np.dtype(dtype)
    top = np.finfo(dtype).max
    threshold = dtype.type(top * scale) if scale <= 1 else top
    with np.errstate(over="ignore"):  # the step above max is inf, which belongs in the list
        near = [threshold, np.nextafter(threshold, dtype.type(np.inf)),
                np.nextafter(threshold, dtype.type(0)), top, -top, np.nextafter(top, dtype.type(0))]
    for size in (1, 33, LARGE):
        for position in sorted({0, size // 2, size - 1, min(size - 1, 65536 + 17)}):
            for value in near:
                for sign in (1, -1):
                    grad = np.full(size, 0.5, dtype)
                    grad[position] = sign * value
                    expected = _expected_finite([grad], scale, dtype)
                    assert _all_finite(backend, [grad], scale, dtype) == expected, (
                        size, position, value, sign)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_finiteness_check_matches_the_reference(backend, data):
    dtype = np.dtype(data.draw(st.sampled_from(DTYPES)))
    scale = data.draw(st.sampled_from((1.0,) + EXACT_SCALES + INEXACT_SCALES))
    pool = special_values(dtype)
    grads = []
    for _ in range(data.draw(st.integers(0, 4))):
        size = data.draw(st.sampled_from((0, 1, 7, 16, 100, 5000)))
        grad = np.full(size, 1.5, dtype)
        for _ in range(data.draw(st.integers(0, 3)) if size else 0):
            grad[data.draw(st.integers(0, size - 1))] = data.draw(st.sampled_from(list(pool)))
        grads.append(grad)
    assert _all_finite(backend, grads, scale, dtype) == _expected_finite(grads, scale, dtype)


def test_finiteness_check_over_many_arrays_in_one_call(backend):
    """The multi-array check spans the thread slices across array boundaries."""
    grads = [np.ones(n, np.float32) for n in (70000, 3, 0, 90001, 5)]
    assert _all_finite(backend, grads, 1.0, np.float32)
    for k, grad in enumerate(grads):
        for position in {0, grad.size // 2, grad.size - 1} if grad.size else ():
            grad[position] = np.nan
            assert not _all_finite(backend, grads, 1.0, np.float32), (k, position)
            grad[position] = 1.0


# --------------------------------------------------------------------------------------------
# the optimizer

def _model(rng, flat: bool):
    shapes = [((3, 4), np.float32), ((5,), np.float64), ((70000,), np.float32), ((2, 3), np.float64)]
    arrays = [np.asarray(rng.standard_normal(shape), dtype) for shape, dtype in shapes]
    if flat:
        return fastrms.FlatParams(arrays)
    return arrays


def _optimizer(params, backend, **extra):
    groups = ([{"params": params.params if hasattr(params, "params") else params}]
              if hasattr(params, "params") else
              [{"params": params[:2], "momentum": 0.9},
               {"params": params[2:], "centered": True, "lr": 3e-3}])
    if hasattr(params, "params"):
        return fastrms.RMSprop(params, lr=1e-2, momentum=0.9, centered=True, backend=backend,
                               **extra)
    return fastrms.RMSprop(groups, lr=1e-2, backend=backend, **extra)


def _grads(rng, shapes_dtypes):
    return [np.asarray(rng.standard_normal(shape), dtype) for shape, dtype in shapes_dtypes]


def _snapshot(opt) -> dict:
    saved = opt.state_dict()
    arrays = fastrms.state_dict_to_arrays(saved)
    params = [np.array(p, copy=True) for group in opt.param_groups for p in group["params"]]
    return {"arrays": {k: np.array(v, copy=True) for k, v in arrays.items()}, "params": params}


def _assert_same(a: dict, b: dict) -> None:
    assert a["arrays"].keys() == b["arrays"].keys()
    for key in a["arrays"]:
        assert a["arrays"][key].tobytes() == b["arrays"][key].tobytes(), key
    for x, y in zip(a["params"], b["params"]):
        assert x.tobytes() == y.tobytes()


def _step(opt, flat, grads, **kwargs):
    if flat is None:
        return opt.step(grads, **kwargs)
    for view, g in zip(flat.grads, grads):
        view[...] = g
    return opt.step(**kwargs)


@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
def test_skip_nonfinite_changes_nothing_and_later_steps_match_a_twin(backend, flat, rng):
    model, twin_model = _model(rng, flat), None
    twin_model = (fastrms.FlatParams([np.array(p) for p in model.params]) if flat
                  else [np.array(p) for p in model])
    opt = _optimizer(model, backend, skip_nonfinite=True)
    twin = _optimizer(twin_model, backend)
    params = model.params if flat else model
    layout = [(p.shape, p.dtype) for p in params]
    good = _grads(rng, layout)
    assert _step(opt, model if flat else None, good) is True
    assert _step(twin, twin_model if flat else None, good) is True
    for k, p in enumerate(params):
        for position in (0, p.size - 1):
            for bad in (np.nan, np.inf, -np.inf):
                before = _snapshot(opt)
                grads = _grads(rng, layout)
                grads[k].reshape(-1)[position] = bad
                assert _step(opt, model if flat else None, grads) is False
                _assert_same(_snapshot(opt), before)
    good = _grads(rng, layout)
    assert _step(opt, model if flat else None, good, grad_scale=2.0) is True
    assert _step(twin, twin_model if flat else None, good, grad_scale=2.0) is True
    _assert_same(_snapshot(opt), _snapshot(twin))


@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
def test_skip_nonfinite_sees_overflow_from_unscaling(backend, flat, rng):
    model = _model(rng, flat)
    opt = _optimizer(model, backend, skip_nonfinite=True)
    params = model.params if flat else model
    grads = _grads(rng, [(p.shape, p.dtype) for p in params])
    grads[2].reshape(-1)[-1] = np.finfo(np.float32).max / 2  # finite, but not once divided by 0.25
    before = _snapshot(opt)
    assert _step(opt, model if flat else None, grads, grad_scale=0.25) is False
    _assert_same(_snapshot(opt), before)
    assert _step(opt, model if flat else None, grads, grad_scale=1.0) is True


def test_without_skip_nonfinite_a_nan_step_is_applied_as_torch_does(backend, rng):
    params = [np.ones(10, np.float32)]
    opt = fastrms.RMSprop(params, backend=backend)
    grad = np.ones(10, np.float32)
    grad[3] = np.nan
    assert opt.step([grad]) is True
    assert np.isnan(params[0][3]) and np.isfinite(np.delete(params[0], 3)).all()


@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("scale", (1024.0, 3.0, 0.1))
def test_optimizer_grad_scale_gives_the_bits_of_dividing_first(backend, flat, scale, rng):
    model = _model(rng, flat)
    twin_model = (fastrms.FlatParams([np.array(p) for p in model.params]) if flat
                  else [np.array(p) for p in model])
    opt, twin = _optimizer(model, backend), _optimizer(twin_model, backend)
    params = model.params if flat else model
    layout = [(p.shape, p.dtype) for p in params]
    for _ in range(3):
        grads = _grads(rng, layout)
        _step(opt, model if flat else None, grads, grad_scale=scale)
        _step(twin, twin_model if flat else None, [_unscaled(g, scale, g.dtype) for g in grads])
    _assert_same(_snapshot(opt), _snapshot(twin))


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError), (np.nan, ValueError),
                                        (np.inf, ValueError), ("x", TypeError), (True, TypeError),
                                        (1e300, ValueError)])
def test_optimizer_rejects_a_bad_grad_scale_with_nothing_changed(backend, bad, error, rng):
    model = _model(rng, False)
    opt = _optimizer(model, backend, skip_nonfinite=True)
    grads = _grads(rng, [(p.shape, p.dtype) for p in model])
    opt.step(grads)
    before = _snapshot(opt)
    with pytest.raises(error, match="grad_scale"):
        opt.step(grads, grad_scale=bad)
    _assert_same(_snapshot(opt), before)


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fastrms.RMSprop([np.ones(3)], skip_nonfinite="yes")


def test_a_skipped_step_does_not_advance_the_step_count(backend):
    seen = []
    params = [np.ones(4)]
    opt = fastrms.RMSprop(params, lr=lambda t: seen.append(t) or 0.01, skip_nonfinite=True,
                          backend=backend)
    assert opt.step([np.full(4, np.inf)]) is False
    assert opt.step([np.ones(4)]) is True
    assert seen == [1, 1]  # the step taken is still step 1
    assert opt.state_dict()["state"][0]["step"] == 1
