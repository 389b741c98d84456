"""16-bit parameters (float16, bfloat16) with float32 state (SPEC.md, "Storage formats").

The NumPy definitions in fastrms/_codecs.py are the oracle: nearest rounding must equal
``astype`` (NumPy for float16, ml_dtypes for bfloat16) on every boundary case, and every
backend's codecs and updates must give the reference's bits, for every option, both 16-bit
types, both rounding modes, with and without master weights, any thread count, SIMD level and
set of conversion instructions. Stochastic rounding must stay between the two neighbouring
16-bit values, be reproducible, and be unbiased (a z-test, false-alarm rate stated below).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastrms
from fastrms import _codecs, backends
from fastrms.backends.numpy_reference import reference_step_low_precision

from rms_helpers import ALL_COMBOS, BACKENDS, LARGE, LARGE_COMBOS, make_options, require_backend

F16, BF16, F32 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
LOW = (F16, BF16)
LOW_IDS = ["float16", "bfloat16"]
MODES = ("nearest", "stochastic", "master")
SEED, STEP = 12345, 7
KEY = _codecs.stochastic_key(SEED, STEP)


def codec_backend(name):
    require_backend(name)
    return backends.load(name)


def same_bits(actual, expected) -> np.ndarray:
    """Exact bit equality (NaN payloads included), elementwise."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    uint = {2: np.uint16, 4: np.uint32}[actual.dtype.itemsize]
    return np.ascontiguousarray(actual).view(uint) == np.ascontiguousarray(expected).view(uint)


def assert_same_bits(actual, expected, label=""):
    same = same_bits(actual, expected)
    if not same.all():
        i = int(np.flatnonzero(~same.reshape(-1))[0])
        uint = {2: np.uint16, 4: np.uint32}[np.asarray(actual).dtype.itemsize]
        got = np.ascontiguousarray(actual).reshape(-1).view(uint)[i]
        want = np.ascontiguousarray(expected).reshape(-1).view(uint)[i]
        raise AssertionError(f"{label}: {int((~same).sum())} elements differ; first at {i}: "
                             f"0x{int(got):x}, expected 0x{int(want):x}")


def assert_bits_or_nan(actual, expected, label=""):
    """The update's outputs: exact bits, any NaN equal to any NaN (as tests/rms_helpers.py)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    same = same_bits(actual, expected)
    nan = np.isnan(actual.astype(np.float32)) & np.isnan(expected.astype(np.float32))
    if not (same | nan).all():
        assert_same_bits(np.where(nan, expected, actual), expected, label)


# --------------------------------------------------------------------------------------------
# boundary cases


def _with_low_bits(high_bits: np.ndarray, shift: int, lows) -> np.ndarray:
    return ((high_bits[:, None].astype(np.uint64) << np.uint64(shift))
            | np.array(lows, np.uint64)[None, :]).reshape(-1).astype(np.uint32)


def boundary_float32(dtype) -> np.ndarray:
    """float32 values at and around every rounding boundary of ``dtype``: exact values, ties
    (both parities), a float32 ulp either side, for every exponent and both signs, subnormal
    results, overflow to infinity, infinities, and NaNs with every kind of payload."""
    if np.dtype(dtype) == BF16:  # every bfloat16 pattern, with 6 patterns of the 16 dropped bits
        bits = _with_low_bits(np.arange(1 << 16, dtype=np.uint32), 16,
                              [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
        return bits.view(np.float32)
    # float16: the 13 dropped bits of the normal range, for every sign, exponent and kept bits
    parts = [_with_low_bits(np.arange(1 << 19, dtype=np.uint32), 13,
                            [0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF])]
    # the subnormal range: 126 - e dropped bits for float32 exponents e = 101 .. 112
    for e in range(100, 113):
        dropped = min(126 - e, 23)
        half = 1 << (dropped - 1)
        kept = 23 - dropped
        top = (np.uint32(e) << np.uint32(23)) | (np.arange(1 << kept, dtype=np.uint32)
                                                << np.uint32(dropped))
        for sign in (0, 0x80000000):
            parts.append(((top[:, None] | np.array([0, 1, half - 1, half, half + 1,
                                                    (1 << dropped) - 1], np.uint32))
                          | np.uint32(sign)).reshape(-1))
    # float32 subnormals and tiny normals (results 0 or the smallest float16 subnormal)
    parts.append(np.array([1, 0x7FFFFF, 0x800000, 0x33000000, 0x33000001, 0x337FFFFF,
                           0x80000001, 0xB3000000, 0xB3000001], np.uint32))
    return np.concatenate(parts).view(np.float32)


def neighbours(values: np.ndarray, dtype):
    """The 16-bit neighbours of each float32 value: toward zero and away from zero (equal when
    the value is exact; infinity above the largest finite value), as float64."""
    dtype = np.dtype(dtype)
    x = values.astype(np.float64)
    nearest = _codecs.encode_nearest(values, dtype)
    with np.errstate(invalid="ignore"):  # the step past an infinity is a NaN, never taken
        return _neighbours_of(x, nearest, dtype)


def _neighbours_of(x, nearest, dtype):
    bits = nearest.view(np.uint16).astype(np.int64)
    back = nearest.astype(np.float64)
    exact = back == x
    # sign-magnitude: one step of the magnitude is one step of the bits
    toward_bits = np.where(np.abs(back) > np.abs(x), bits - 1, bits)
    away_bits = np.where(np.abs(back) > np.abs(x), bits, bits + 1)
    toward = toward_bits.astype(np.uint16).view(dtype).astype(np.float64)
    away = away_bits.astype(np.uint16).view(dtype).astype(np.float64)
    toward = np.where(exact, back, toward)
    away = np.where(exact, back, away)
    return toward, away


# --------------------------------------------------------------------------------------------
# codecs: every backend, every boundary


@pytest.fixture(params=[None, ("sse2", True), ("sse2", False), ("avx2", True), ("avx2", False),
                        ("avx512", True), ("avx512", False)],
                ids=["default", "sse2", "sse2-portable", "avx2", "avx2-portable", "avx512",
                     "avx512-portable"])
def c_config(request, c_backend, restore_simd):
    """The C codecs at each SIMD level (capped at the machine's), with and without F16C /
    AVX512-BF16 instructions."""
    if request.param is not None:
        level, instructions = request.param
        c_backend.set_simd_level(level)
        c_backend.set_conversion_instructions(instructions)
    yield c_backend
    c_backend.set_conversion_instructions(True)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_decode_every_pattern_equals_astype(backend, dtype):
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    assert_same_bits(codec_backend(backend).decode_low_precision(patterns),
                     patterns.astype(np.float32), f"{backend} decode {dtype}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_nearest_equals_astype_on_boundaries(backend, dtype):
    values = boundary_float32(dtype)
    with np.errstate(all="ignore"):
        expected = values.astype(dtype)
    assert_same_bits(codec_backend(backend).encode_low_precision(values, dtype), expected,
                     f"{backend} nearest {dtype}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_c_codecs_at_every_level(c_config, dtype, rng):
    values = np.concatenate([boundary_float32(dtype),
                             rng.integers(0, 1 << 32, 200003, dtype=np.uint64)
                             .astype(np.uint32).view(np.float32)])
    with np.errstate(all="ignore"):
        assert_same_bits(c_config.encode_low_precision(values, dtype), values.astype(dtype),
                         "nearest")
    for first in (0, 1, 2**32 - 5, 2**33 - 3):  # odd starts, the counter's high word changing
        assert_same_bits(c_config.encode_low_precision(values[:5003], dtype, KEY, first),
                         _codecs.encode_stochastic(values[:5003], dtype, KEY, first),
                         f"stochastic from {first}")
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    assert_same_bits(c_config.decode_low_precision(patterns), patterns.astype(np.float32),
                     "decode")


def test_the_machine_uses_f16c_where_it_has_it(c_backend, restore_simd):
    """The F16C path is the one tested on this machine (it has F16C); the AVX512-BF16 loop is
    compiled in but only runs, and is only tested, on a CPU that has the instructions."""
    import fastrms._fastrms_c as ext

    c_backend.set_simd_level("sse2")
    assert c_backend.conversion_instructions() == ()
    c_backend.set_simd_level(c_backend.describe()["simd_level_max"])
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    if " f16c" in flags and c_backend.simd_level() != "sse2":
        assert "f16c" in c_backend.conversion_instructions()
    assert ("avx512bf16" in c_backend.conversion_instructions()) == (
        " avx512_bf16" in flags and c_backend.simd_level() == "avx512")
    assert ext.lib.fastrms_set_conversion_instructions(0) == 0
    assert c_backend.conversion_instructions() == ()
    assert ext.lib.fastrms_set_conversion_instructions(1) == 1


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_stochastic_codecs_equal_reference(backend, dtype, rng):
    module = codec_backend(backend)
    values = np.concatenate([boundary_float32(dtype)[::7],
                             rng.standard_normal(10007).astype(np.float32)])
    for first in (0, 3, 2**32 - 2, 2**33 + 1):
        assert_same_bits(module.encode_low_precision(values, dtype, KEY, first),
                         _codecs.encode_stochastic(values, dtype, KEY, first),
                         f"{backend} first {first}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_stochastic_stays_between_the_neighbours(dtype, rng):
    values = np.concatenate([boundary_float32(dtype),
                             (rng.standard_normal(100000) * 10.0 ** rng.uniform(-40, 38, 100000))
                             .astype(np.float32)])
    for key in (KEY, _codecs.stochastic_key(1, 2)):
        rounded = _codecs.encode_stochastic(values, dtype, key)
        nan = np.isnan(values)
        assert np.isnan(rounded[nan].astype(np.float32)).all()
        assert_same_bits(rounded[nan], _codecs.encode_nearest(values[nan], dtype))
        toward, away = neighbours(values[~nan], dtype)
        got = rounded[~nan].astype(np.float64)
        assert ((got == toward) | (got == away)).all()
        # exact values (zeros and infinities among them) are kept as they are
        exact = toward == away
        assert_same_bits(rounded[~nan][exact], _codecs.encode_nearest(values[~nan][exact], dtype))


def test_stochastic_is_reproducible_and_varies_with_seed_step_and_index():
    values = np.full(4096, 1.0 + 2.0 ** -9, np.float32)  # a quarter of the way (bfloat16)
    a = _codecs.encode_stochastic(values, BF16, _codecs.stochastic_key(1, 2))
    assert_same_bits(a, _codecs.encode_stochastic(values, BF16, _codecs.stochastic_key(1, 2)))
    for other in (_codecs.stochastic_key(2, 2), _codecs.stochastic_key(1, 3),
                  _codecs.stochastic_key(1, 2, 1)):
        assert not same_bits(a, _codecs.encode_stochastic(values, BF16, other)).all()
    # the same element index gives the same bits wherever the array is cut
    assert_same_bits(a[1000:], _codecs.encode_stochastic(values[1000:], BF16,
                                                         _codecs.stochastic_key(1, 2), 1000))
    assert 0.15 < float(np.mean(a.astype(np.float32) > 1.0)) < 0.35
    assert [int(k) for k in _codecs.stochastic_keys(5, 9, 3)] == [
        _codecs.stochastic_key(5, 9, s) for s in range(3)]


#: z-score bound of the unbiasedness test: two-sided P(|Z| > 5.3) = 1.2e-7 per value for a
#: correct rounding with independent bits, so the false-alarm rate of the whole test (about 60
#: values) is below 1e-5.
Z_BOUND = 5.3


def _gap_above(value: float, dtype) -> float:
    """The 16-bit gap above a value exact in ``dtype``."""
    low = np.array([value], np.float32).astype(dtype)
    high = (low.view(np.uint16) + np.uint16(1)).view(dtype)
    return float(high.astype(np.float64)[0]) - float(low.astype(np.float64)[0])


def _unbiasedness_values(dtype):
    fi = ml_dtypes.finfo(dtype) if np.dtype(dtype) == BF16 else np.finfo(dtype)
    tiny, sub, big = float(fi.tiny), float(fi.smallest_subnormal), float(fi.max)
    points = []
    for base in (1.0, 3.0, 1000.0, tiny, 7 * sub, 300 * sub, big / 2, big):
        gap = _gap_above(base, dtype) if base != big else _gap_above(big / 2, dtype) * 2
        for fraction in (0.5, 0.25, 1 / 7, 0.99, 0.003):
            points.append(base + fraction * gap)
    if np.dtype(dtype) == F16:
        points += [2.0 ** -26, 2.0 ** -30, 3 * 2.0 ** -29]
    values = np.array(points, np.float64).astype(np.float32)
    return np.concatenate([values, -values])


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_stochastic_rounding_is_unbiased(dtype):
    """For each value, 40000 roundings (consecutive element indices under four keys): the
    fraction rounded away from zero must equal the distance to the neighbour toward zero in
    units of their gap, within Z_BOUND standard errors. Above the largest finite value the
    neighbour away from zero is infinity and the gap is the one infinity stands for (2^16 for
    float16, 2^128 for bfloat16, less the largest finite value)."""
    draws = 40000
    beyond = 2.0 ** 16 if np.dtype(dtype) == F16 else 2.0 ** 128
    tested = 0
    for value in _unbiasedness_values(dtype):
        toward, away = neighbours(np.array([value]), dtype)
        if toward[0] == away[0]:
            continue
        away_value = np.copysign(beyond, away[0]) if np.isinf(away[0]) else away[0]
        p = (abs(float(value)) - abs(toward[0])) / abs(away_value - toward[0])
        ups = 0
        for step in range(4):
            rounded = _codecs.encode_stochastic(np.full(draws // 4, value, np.float32), dtype,
                                                _codecs.stochastic_key(99, step))
            ups += int(np.sum(rounded.astype(np.float64) == away[0]))
        z = (ups / draws - p) / np.sqrt(p * (1 - p) / draws)
        assert abs(z) < Z_BOUND, (float(value), p, ups / draws, z)
        tested += 1
    assert tested >= 60


def test_stochastic_rounding_bias_on_a_sum():
    """The sum of many stochastically rounded small steps tracks the exact sum (nearest
    rounding loses every one of them): the situation of a small update to a large weight."""
    w = np.ones(20000, np.float32).astype(BF16)
    for step in range(50):
        w = _codecs.encode_stochastic(w.astype(np.float32) + np.float32(1e-3), BF16,
                                      _codecs.stochastic_key(3, step))
    mean = float(w.astype(np.float64).mean())
    assert abs(mean - 1.05) < 0.002
    nearest = np.ones(4, np.float32).astype(BF16)
    for _ in range(50):
        nearest = (nearest.astype(np.float32) + np.float32(1e-3)).astype(BF16)
    assert (nearest.astype(np.float32) == 1.0).all()


# --------------------------------------------------------------------------------------------
# the update


def make_low_problem(rng, dtype, shape, options, grad_dtype, master, steps=2, special=False):
    def values(scale):
        if special:
            pool = np.array([0.0, -0.0, 1.0, -2.5, 1e-7, -3e-5, 6e-8, 65504.0, 70000.0, 3e38,
                             np.inf, -np.inf, np.nan, 1e-40, 0.3333], np.float32)
            return rng.choice(pool, size=shape)
        return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-scale, scale, shape)
                ).astype(np.float32)

    p32 = values(1)
    with np.errstate(over="ignore", invalid="ignore"):  # special values overflow float16
        state = {
            "param": p32.astype(dtype),
            "square_avg": np.abs(values(1)).astype(np.float32),
            "momentum_buffer": values(1) if options["momentum"] else None,
            "grad_avg": values(1) if options["centered"] else None,
            "master_param": (p32 + values(1) * np.float32(1e-3)) if master else None,
        }
        grads = [values(3).astype(grad_dtype) for _ in range(steps)]
    return state, grads


def copy_low_state(state):
    return {k: None if v is None else v.copy() for k, v in state.items()}


def rounding_kwargs(mode, step):
    if mode == "stochastic":
        return {"param_rounding": "stochastic", "seed": SEED, "step": step}
    return {}


def reference_low_update(options, state, grad, mode, step, grad_scale=None):
    coeffs = fastrms.kernel_coefficients(state["param"].dtype, grad_scale=grad_scale, **options)
    key = _codecs.stochastic_key(SEED, step) if mode == "stochastic" else None
    p, s, b, a, m = reference_step_low_precision(
        coeffs, state["param"], grad, state["square_avg"], state["momentum_buffer"],
        state["grad_avg"], state["master_param"], key)
    return {"param": p, "square_avg": np.asarray(s, np.float32),
            "momentum_buffer": None if b is None else np.asarray(b, np.float32),
            "grad_avg": None if a is None else np.asarray(a, np.float32), "master_param": m}


def check_low_steps(backend, options, state, grads, mode, label, grad_scale=None):
    reference = copy_low_state(state)
    for step, grad in enumerate(grads):
        reference = reference_low_update(options, reference, grad, mode, step, grad_scale)
        with np.errstate(all="ignore"):
            fastrms.rmsprop_update(state["param"], grad, state["square_avg"],
                                   momentum_buffer=state["momentum_buffer"],
                                   grad_avg=state["grad_avg"], master_param=state["master_param"],
                                   grad_scale=grad_scale, backend=backend, **options,
                                   **rounding_kwargs(mode, step))
        for name, expected in reference.items():
            if expected is None:
                assert state[name] is None
            else:
                assert_bits_or_nan(state[name], expected, f"{label}, step {step}: {name}")
    return reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_every_combination_matches_reference(backend, dtype, mode, rng):
    for k, (ident, options) in enumerate(ALL_COMBOS):
        grad_dtype = dtype if k % 2 else F32
        size = (1, 17, 1000)[k % 3]
        state, grads = make_low_problem(rng, dtype, (size,), options, grad_dtype,
                                        mode == "master")
        check_low_steps(backend, options, state, grads, mode, f"{ident} size {size}")
        state, grads = make_low_problem(rng, dtype, (37,), options, grad_dtype,
                                        mode == "master", special=True)
        check_low_steps(backend, options, state, grads, mode, f"{ident} special")


@pytest.mark.parametrize("grad_scale", [1024.0, 3.0, 2.0 ** -20])
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_loss_scaled_16_bit_gradients(backend, dtype, grad_scale, rng):
    """grad_scale divides the widened gradient in float32 (the bits of passing it unscaled in
    float32), the power-of-two case through the exact reciprocal."""
    for mode in MODES:
        for options in (make_options(), make_options(momentum_form="torch", centered=True)):
            state, grads = make_low_problem(rng, dtype, (LARGE // 8,), options, dtype,
                                            mode == "master")
            with np.errstate(over="ignore"):
                grads = [(g.astype(np.float32) * np.float32(grad_scale)).astype(dtype)
                         for g in grads]
            check_low_steps(backend, options, state, grads, mode, f"scale {grad_scale}",
                            grad_scale=grad_scale)


@pytest.mark.parametrize("options", [c[1] for c in LARGE_COMBOS[:4]],
                         ids=[c[0] for c in LARGE_COMBOS[:4]])
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_thread_counts_give_the_reference_bits(backend, dtype, options, rng, restore_threads):
    """1, 2 and 3 threads above the parallel threshold (3 on a 2-core machine: uneven slices),
    each rounding mode: the bits do not depend on how the work is split."""
    usable = len(os.sched_getaffinity(0))
    for threads in (1, 2, 3):
        fastrms.set_num_threads(threads)
        assert fastrms.get_num_threads() == min(threads, usable)
        backends.load(backend).set_num_threads(threads)
        for mode in MODES:
            state, grads = make_low_problem(rng, dtype, (LARGE,), options, dtype,
                                            mode == "master")
            check_low_steps(backend, options, state, grads, mode, f"{threads} threads {mode}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_c_every_simd_level_and_conversion_path(c_config, dtype, rng):
    for k, (ident, options) in enumerate(ALL_COMBOS[::5]):
        for mode in MODES:
            state, grads = make_low_problem(rng, dtype, (1000 + k,), options,
                                            (dtype, F32)[k % 2], mode == "master")
            check_low_steps("c", options, state, grads, mode, f"{ident} {mode}")
    for ident, options in LARGE_COMBOS[:3]:
        for mode in MODES:
            state, grads = make_low_problem(rng, dtype, (LARGE,), options, dtype,
                                            mode == "master")
            check_low_steps("c", options, state, grads, mode, f"{ident} {mode} large")


def test_strided_and_misaligned_arrays(backend, rng):
    """Non-contiguous views are gathered in C order (the random bits follow that index)."""
    options = make_options(momentum_form="torch", centered=True, decay_form="coupled")
    for dtype in LOW:
        for mode in MODES:
            state, grads = make_low_problem(rng, dtype, (6, 9), options, dtype,
                                            mode == "master")
            placed = {k: None if v is None else np.asfortranarray(v) for k, v in state.items()}
            check_low_steps(backend, options, placed, [np.asfortranarray(g) for g in grads],
                            mode, f"fortran {mode}")
            flat, grads = make_low_problem(rng, dtype, (101,), options, F32, mode == "master")
            buffer = bytearray(flat["square_avg"].nbytes + 2)
            skew = np.frombuffer(buffer, np.float32, count=101, offset=2)
            skew[...] = flat["square_avg"]
            flat["square_avg"] = skew
            check_low_steps(backend, options, flat, grads, mode, f"misaligned {mode}")


def _elements(width):
    return st.one_of(st.floats(width=width), st.floats(-10.0, 10.0, width=width),
                     st.sampled_from([0.0, -0.0, 1.0, 65504.0, 1e-7, 6e-8]))


@st.composite
def low_problems(draw):
    dtype = draw(st.sampled_from(LOW))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=40))
    grad_dtype = draw(st.sampled_from([dtype, F32]))
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    options = dict(
        lr=draw(st.one_of(st.floats(0.0, 10.0), st.sampled_from([1e-3, 1e-40]))),
        alpha=draw(st.floats(0.0, 1.0, exclude_max=True)),
        eps=draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-8]))),
        weight_decay=draw(st.one_of(st.just(0.0), st.floats(0.0, 10.0))),
        momentum=momentum, centered=draw(st.booleans()), maximize=draw(st.booleans()),
        eps_in_sqrt=draw(st.booleans()), lr_in_momentum=draw(st.booleans()),
        nesterov=draw(st.booleans()) if momentum > 0 else False,
        decoupled_weight_decay=draw(st.booleans()))
    mode = draw(st.sampled_from(MODES))

    def f32():
        return draw(hnp.arrays(np.float32, shape, elements=_elements(32)))

    def narrowed(dtype):
        with np.errstate(over="ignore"):
            return f32().astype(dtype)

    state = {"param": narrowed(dtype), "square_avg": f32(),
             "momentum_buffer": f32() if momentum > 0 else None,
             "grad_avg": f32() if options["centered"] else None,
             "master_param": f32() if mode == "master" else None}
    grads = [narrowed(grad_dtype) for _ in range(draw(st.integers(1, 3)))]
    grad_scale = draw(st.sampled_from([None, 4.0, 0.3]))
    return options, state, grads, mode, grad_scale


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=low_problems())
def test_property_backends_match_reference(backend_name, problem):
    require_backend(backend_name)
    options, state, grads, mode, grad_scale = problem
    with np.errstate(all="ignore"):
        check_low_steps(backend_name, options, state, grads, mode, f"{options} {mode}",
                        grad_scale=grad_scale)


# --------------------------------------------------------------------------------------------
# the multi-tensor entry and the finiteness check


@pytest.mark.parametrize("mode", MODES)
def test_update_many_low_precision_matches_reference(backend, mode, rng):
    """One call for a list of arrays (per-array keys; a float32 gradient among 16-bit ones);
    a cache kept across calls with the same lists."""
    module = codec_backend(backend)
    options = make_options(momentum_form="torch")
    coeffs = fastrms.kernel_coefficients(BF16, **options)
    sizes = (5, 70000, 0, 1000)
    states = [make_low_problem(rng, BF16, (n,), options, F32 if k == 1 else BF16,
                               mode == "master", steps=2)
              for k, n in enumerate(sizes)]
    lists = {name: [st[name] for st, _ in states] for name in states[0][0]}
    cache = {}
    for step in range(2):
        keys = (_codecs.stochastic_keys(SEED, step, len(sizes)) if mode == "stochastic"
                else None)
        grads = [g[step] for _, g in states]
        expected = []
        for k, (state, _) in enumerate(states):
            coeffs_k = coeffs
            p, s, b, a, m = reference_step_low_precision(
                coeffs_k, state["param"], grads[k], state["square_avg"], state["momentum_buffer"],
                None, state["master_param"], None if keys is None else int(keys[k]))
            expected.append((p, s, b, m))
        module.update_many_low_precision(coeffs, lists["param"], grads, lists["square_avg"],
                                         lists["momentum_buffer"], None,
                                         lists["master_param"] if mode == "master" else None,
                                         keys, cache=cache)
        for k, (p, s, b, m) in enumerate(expected):
            assert_bits_or_nan(lists["param"][k], p, f"param {k}")
            assert_bits_or_nan(lists["square_avg"][k], s, f"square_avg {k}")
            assert_bits_or_nan(lists["momentum_buffer"][k], b, f"momentum_buffer {k}")
            if m is not None:
                assert_bits_or_nan(lists["master_param"][k], m, f"master_param {k}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_all_finite_of_16_bit_gradients(backend, dtype):
    module = codec_backend(backend)
    big = float(_codecs.decode(np.array([0x7F7F if dtype == BF16 else 0x7BFF], np.uint16)
                               .view(dtype))[0])
    cases = [(1.0, None, True), (1.0, np.inf, False), (1.0, np.nan, False),
             (1.0, -np.inf, False), (0.5, big, dtype == F16), (2.0 ** -120, big, False),
             (2.0 ** -120, 1.0, True)]
    for scale, special, finite in cases:
        coeffs = fastrms.kernel_coefficients(dtype, lr=0.01, grad_scale=scale)
        for n in (9, LARGE):
            grads = [np.ones(n, dtype), np.zeros(3, np.float32), np.ones(n, dtype)]
            if special is not None:
                grads[2][n // 2] = special
            assert module.all_finite(coeffs, grads) is finite, (scale, special, n)
            assert module.all_finite(coeffs, grads[::-1]) is finite
    f32 = fastrms.kernel_coefficients(np.float32, lr=0.01)
    assert module.all_finite(f32, [np.ones(5, np.float32)]) is True


def test_roofline_low_precision_runs(backend, rng):
    module = codec_backend(backend)
    if not hasattr(module, "roofline_low_precision"):
        pytest.skip("the reference has no roofline")
    n = LARGE
    p = rng.standard_normal(n).astype(BF16)
    g = rng.standard_normal(n).astype(BF16)
    s = np.zeros(n, np.float32)
    module.roofline_low_precision(0, p, g, s)
    assert np.array_equal(s, g.view(np.uint16).astype(np.float32))


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written


def _arrays(dtype=BF16, n=8):
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype),
            np.ones(n, np.float32))


BAD = [
    ("grad-float64", lambda p, g, s: ((p, g.astype(np.float64), s), {}), TypeError, "grad"),
    ("grad-other-16-bit", lambda p, g, s: ((p, g.astype(np.float16), s), {}), TypeError, "grad"),
    ("grad-shape", lambda p, g, s: ((p, g[:-1], s), {}), ValueError, "grad"),
    ("square_avg-float16", lambda p, g, s: ((p, g, s.astype(F16)), {}), TypeError, "square_avg"),
    ("square_avg-float64", lambda p, g, s: ((p, g, s.astype(np.float64)), {}), TypeError,
     "square_avg"),
    ("momentum_buffer-16-bit", lambda p, g, s: ((p, g, s), dict(
        momentum=0.9, momentum_buffer=np.zeros(8, F16))), TypeError, "momentum_buffer"),
    ("grad_avg-16-bit", lambda p, g, s: ((p, g, s), dict(
        centered=True, grad_avg=np.zeros(8, F16))), TypeError, "grad_avg"),
    ("momentum_buffer-missing", lambda p, g, s: ((p, g, s), dict(momentum=0.9)), ValueError,
     "momentum_buffer"),
    ("seed-missing", lambda p, g, s: ((p, g, s), dict(param_rounding="stochastic", step=1)),
     ValueError, "seed"),
    ("step-missing", lambda p, g, s: ((p, g, s), dict(param_rounding="stochastic", seed=1)),
     ValueError, "step"),
    ("seed-negative", lambda p, g, s: ((p, g, s), dict(param_rounding="stochastic", seed=-1,
                                                       step=1)), ValueError, "seed"),
    ("step-too-large", lambda p, g, s: ((p, g, s), dict(param_rounding="stochastic", seed=1,
                                                        step=2**64)), ValueError, "step"),
    ("seed-float", lambda p, g, s: ((p, g, s), dict(param_rounding="stochastic", seed=1.0,
                                                    step=1)), TypeError, "seed"),
    ("step-bool", lambda p, g, s: ((p, g, s), dict(param_rounding="stochastic", seed=1,
                                                   step=True)), TypeError, "step"),
    ("param_rounding-unknown", lambda p, g, s: ((p, g, s), dict(param_rounding="Nearest")),
     ValueError, "param_rounding"),
    ("param_rounding-none", lambda p, g, s: ((p, g, s), dict(param_rounding=None)), ValueError,
     "param_rounding"),
    ("master-float64", lambda p, g, s: ((p, g, s), dict(master_param=np.zeros(8))), TypeError,
     "master_param"),
    ("master-16-bit", lambda p, g, s: ((p, g, s), dict(master_param=np.zeros(8, BF16))),
     TypeError, "master_param"),
    ("master-shape", lambda p, g, s: ((p, g, s), dict(master_param=np.zeros(9, np.float32))),
     ValueError, "master_param"),
    ("master-list", lambda p, g, s: ((p, g, s), dict(master_param=[0.0] * 8)), TypeError,
     "master_param"),
    ("master-stochastic", lambda p, g, s: ((p, g, s), dict(
        master_param=np.zeros(8, np.float32), param_rounding="stochastic", seed=1, step=1)),
     ValueError, "master_param"),
    ("master-overlaps-square_avg", lambda p, g, s: ((p, g, s), dict(master_param=s)),
     ValueError, "master_param"),
    ("param-big-endian-16", lambda p, g, s: ((p.astype(">f2"), g, s), {}), TypeError, "param"),
    ("float32-with-master", lambda p, g, s: ((p.astype(np.float32), g.astype(np.float32), s),
                                             dict(master_param=np.zeros(8, np.float32))),
     ValueError, "master_param"),
    ("float32-stochastic", lambda p, g, s: ((p.astype(np.float32), g.astype(np.float32), s),
                                            dict(param_rounding="stochastic", seed=1, step=1)),
     ValueError, "param_rounding"),
    ("float32-rounding-unknown", lambda p, g, s: ((p.astype(np.float32), g.astype(np.float32),
                                                   s), dict(param_rounding="up")), ValueError,
     "param_rounding"),
]


def _readonly(array):
    view = array.view()
    view.flags.writeable = False
    return view


BAD += [
    ("master-read-only", lambda p, g, s: ((p, g, s), dict(
        master_param=_readonly(np.zeros(8, np.float32)))), ValueError, "master_param"),
    ("param-read-only", lambda p, g, s: ((_readonly(p), g, s), {}), ValueError, "param"),
]


@pytest.mark.parametrize(("make", "error", "name"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument_and_writes_nothing(backend, make, error, name):
    p, g, s = _arrays()
    (p, g, s), kwargs = make(p, g, s)
    arrays = [p, g, s] + [v for v in kwargs.values() if isinstance(v, np.ndarray)]
    before = [a.tobytes() for a in arrays]
    with pytest.raises(error, match=name):
        fastrms.rmsprop_update(p, g, s, lr=0.01, backend=backend, **kwargs)
    assert [a.tobytes() for a in arrays] == before


def test_seed_and_step_are_read_by_stochastic_rounding_only(backend):
    """An optimizer may pass its seed and step on every call: nearest rounding and float32 /
    float64 params ignore them (whatever they are), and give the bits of a call without."""
    for dtype in (BF16, F32):
        p, g, s = _arrays(dtype)
        p2, g2, s2 = _arrays(dtype)
        fastrms.rmsprop_update(p, g, s, lr=0.01, backend=backend, seed="unused", step=-1)
        fastrms.rmsprop_update(p2, g2, s2, lr=0.01, backend=backend)
        assert_same_bits(p, p2) and assert_same_bits(s, s2)


def test_16_bit_dtypes_take_float32_coefficients():
    for dtype in (F16, BF16, "float16", ml_dtypes.bfloat16):
        coeffs = fastrms.kernel_coefficients(dtype, lr=0.01, alpha=0.9, grad_scale=8.0)
        reference = fastrms.kernel_coefficients(np.float32, lr=0.01, alpha=0.9, grad_scale=8.0)
        assert coeffs.dtype == F32 and coeffs.values == reference.values
        assert coeffs.flags == reference.flags
    with pytest.raises(TypeError, match="dtype"):
        fastrms.kernel_coefficients(">f2", lr=0.01)


def test_seed_example_in_bfloat16_with_master_weights():
    """SPEC's seed example run on a float32 master copy gives SPEC's float32 values in it, and
    the bfloat16 param their nearest values."""
    theta = np.array([0.2, 0.4, 0.6], np.float32)
    grad = np.array([-0.5, 0.3, 0.24], np.float32)
    for backend in BACKENDS:
        if not backends.availability(backend)[0]:
            continue
        master, param, s = theta.copy(), theta.astype(BF16), np.zeros(3, np.float32)
        fastrms.rmsprop_update(param, grad, s, lr=0.01, alpha=0.9, eps_in_sqrt=True,
                               master_param=master, backend=backend)
        expected = theta.copy()
        fastrms.rmsprop_update(expected, grad, np.zeros(3, np.float32), lr=0.01, alpha=0.9,
                               eps_in_sqrt=True, backend="numpy")
        assert_same_bits(master, expected, backend)
        assert_same_bits(param, expected.astype(BF16), backend)
        np.testing.assert_allclose(master, [0.23162277, 0.36837724, 0.56837725], rtol=1e-6)


def test_numba_codecs_fingerprint():
    """numba_backend.CODECS_SOURCE_SHA256 names the codecs its cached kernels inline (Numba's
    cache does not see edits in another file): update it with _numba_codecs.py."""
    require_backend("numba")
    from fastrms.backends import numba_backend

    source = Path(numba_backend.__file__).with_name("_numba_codecs.py").read_bytes()
    assert numba_backend.CODECS_SOURCE_SHA256 == hashlib.sha256(source).hexdigest()[:16], \
        "update CODECS_SOURCE_SHA256 in fastrms/backends/numba_backend.py"


def test_flat_params_take_16_bit_arrays():
    arrays = [np.ones((2, 3), BF16), np.zeros(4, np.float32), np.full(5, 2.0, F16),
              np.ones(3, BF16)]
    flat = fastrms.FlatParams(arrays)
    assert flat.dtypes == (BF16, F32, F16)
    assert flat.param_buffers[BF16].size == 9 and flat.grad_buffers[BF16].dtype == BF16
    assert flat.params[3].dtype == BF16 and flat.params[2].dtype == F16
    s = np.zeros(9, np.float32)
    flat.grads[0][...] = 0.5
    fastrms.rmsprop_update(flat.param_buffers[BF16], flat.grad_buffers[BF16], s, lr=0.01)
    assert (flat.params[0] < 1).all() and (flat.params[3] == 1).all()
