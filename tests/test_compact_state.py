"""Compact optimizer state: the blockwise8 format (fastrms/_blockwise.py), fastrms.Blockwise8,
and rmsprop_update with bfloat16 / blockwise8 state on every backend, equal to the NumPy
reference bit for bit (options, param dtypes, thread counts, SIMD levels, partial and zero
blocks); bad input raises naming the argument and writes nothing.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrms
from fastrms import _blockwise, backends
from fastrms.backends import numpy_reference

from rms_helpers import ALL_COMBOS, BACKENDS, LARGE, LARGE_COMBOS, require_backend

BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
PARAM_DTYPES = (F32, BF16, F16)
STATE_KINDS = ("float32", "bfloat16", "blockwise8")
SEED, STEP = 99, 3


def compact_module(name):
    require_backend(name)
    return backends.compact_module(backends.load(name))


def u32(x):
    return np.asarray(x, F32).view(np.uint32)


# --------------------------------------------------------------------------------------------
# the format


def test_code_tables():
    codes = np.arange(256, dtype=np.uint8)
    unsigned = _blockwise.code_values(codes, False)
    signed = _blockwise.code_values(codes, True)
    assert unsigned[0] == 0 and unsigned[240] == 1.0 and unsigned[1] == 2.0 ** -15 * (17 / 16)
    assert (np.diff(unsigned[1:241]) > 0).all()
    assert signed[120] == 1.0 and signed[0] == 0 and signed[1] == 2.0 ** -15 * (9 / 8)
    assert (signed[128:] == -signed[:128]).all() and np.signbit(signed[128])
    for value, code in ((1.0, 240), (0.5, 224), (0.75, 232), (2.0 ** -15, 1)):
        assert _blockwise.encode(np.array([1.0, value], F32), False)[0][1] == code


def test_ties_round_to_even_and_positives_never_reach_zero():
    # Halfway between codes 224 (0.5) and 225 (0.53125), and 225 and 226: to the even one.
    x = np.array([1.0, 0.515625, 0.546875, 1e-30, 2.0 ** -16, -0.0, 0.0], F32)
    codes, scales = _blockwise.encode(x, False)
    assert list(codes) == [240, 224, 226, 1, 1, 0, 0] and scales[0] == 1.0
    # signed: halfway between 0.5 (m 112) and 0.5625 (m 113): to m 112; tiny values flush
    y = np.array([-1.0, 0.53125, -0.59375, 1e-30, -1e-30], F32)
    codes, _ = _blockwise.encode(y, True)
    assert list(codes) == [128 | 120, 112, 128 | 114, 0, 0]


def test_scales_zero_nonfinite_and_partial_blocks():
    x = np.zeros(256 * 3 + 7, F32)
    x[256 + 5] = np.nan
    x[512 + 1] = np.inf
    x[768 + 6] = -3.0
    for signed in (False, True):
        codes, scales = _blockwise.encode(x, signed)
        assert codes.size == x.size and scales.size == 4
        assert scales[0] == 0 and np.isnan(scales[1]) and np.isnan(scales[2])
        assert scales[3] == 3.0
        assert (codes[:768] == 0).all()
    assert _blockwise.encode(x, True)[0][768 + 6] == 128 | 120
    assert _blockwise.encode(x, False)[0][768 + 6] == 0  # unsigned: x <= 0 is code 0


def _special_values(rng, n):
    magnitudes = rng.choice([1e-38, 1e-20, 1e-7, 1e-3, 1.0, 1e3, 1e30], n)
    values = (rng.standard_normal(n) * magnitudes).astype(F32)
    values[rng.random(n) < 0.05] = 0.0
    return values


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("signed", [False, True])
def test_codecs_equal_the_reference(name, signed, rng, restore_simd):
    module = compact_module(name)
    levels = ["default"] + (["sse2", "avx2", "avx512"] if name == "c" else [])
    for level in levels:
        if level != "default":
            backends.load("c").set_simd_level(level)
        for n in (1, 255, 256, 257, 1000):
            x = _special_values(rng, n)
            if not signed:
                x = np.abs(x)
            want = _blockwise.encode(x, signed)
            if hasattr(module, "encode_blockwise8"):
                got = module.encode_blockwise8(x, signed)
                assert (got[0] == want[0]).all() and (u32(got[1]) == u32(want[1])).all()
                codes = rng.integers(0, 256, n).astype(np.uint8)
                assert (u32(module.decode_blockwise8(codes, want[1], signed))
                        == u32(_blockwise.decode(codes, want[1], signed))).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, width=32), min_size=1, max_size=600),
       st.booleans())
def test_round_trip_error_is_bounded(values, signed):
    x = np.array(values, F32)
    if not signed:
        x = np.abs(x)
    codes, scales = _blockwise.encode(x, signed)
    decoded = _blockwise.decode(codes, scales, signed)
    scale = np.repeat(scales, 256)[:x.size]
    floor = 2.0 ** -15 * scale * 1.07
    error = np.abs(decoded.astype(np.float64) - x)
    relative = 1 / 32 if not signed else 1 / 16
    assert (error <= np.maximum(relative * np.abs(x) * 1.0001, floor)).all()
    if not signed:
        assert (decoded[x > 0] > 0).all()


# --------------------------------------------------------------------------------------------
# Blockwise8


def test_blockwise8_api():
    b = fastrms.Blockwise8.zeros(513, signed=True)
    assert len(b) == b.size == 513 and b.shape == (513,) and b.scales.shape == (3,)
    assert b.codes.dtype == np.uint8 and b.scales.dtype == np.float32 and b.signed
    assert b.nbytes == 513 + 12 and (b.to_float32() == 0).all()
    x = np.linspace(-2, 2, 700, dtype=F32)
    c = fastrms.Blockwise8.from_float32(x, signed=True)
    assert np.allclose(c.to_float32(), x, rtol=1 / 16, atol=2 ** -14)
    with pytest.raises(ValueError, match="signed=True"):
        fastrms.Blockwise8.from_float32(x)
    with pytest.raises(TypeError, match="float32"):
        fastrms.Blockwise8.from_float32(x.astype(np.float64))
    with pytest.raises(ValueError, match="non-finite"):
        fastrms.Blockwise8.from_float32(np.array([np.nan], F32))
    with pytest.raises(ValueError, match="scales has 1 entries"):
        fastrms.Blockwise8(np.zeros(300, np.uint8), np.zeros(1, F32))
    with pytest.raises(TypeError, match="codes must be a 1-D uint8"):
        fastrms.Blockwise8(np.zeros(3, np.int8), np.zeros(1, F32))


# --------------------------------------------------------------------------------------------
# the update: every backend equals the reference


def make_state(kind, values, signed):
    if kind == "float32":
        return values.astype(F32)
    if kind == "bfloat16":
        return values.astype(BF16)
    return fastrms.Blockwise8.from_float32(values.astype(F32).reshape(-1), signed=signed)


def copy_state(state):
    return None if state is None else state.copy()


def state_bits(state):
    if state is None:
        return None
    if isinstance(state, fastrms.Blockwise8):
        return state.codes.tobytes() + state.scales.tobytes()
    return state.tobytes()


def make_problem(rng, n, param_dtype, kinds, options, grad32=False):
    p = rng.standard_normal(n).astype(F32).astype(param_dtype)
    grads = [(rng.standard_normal(n) * rng.choice([1e-4, 1.0, 10.0], n)).astype(F32)
             for _ in range(3)]
    grads = [g if grad32 else g.astype(param_dtype) for g in grads]
    s = make_state(kinds[0], 0.01 + np.abs(rng.standard_normal(n)) * 0.1, False)
    b = make_state(kinds[1], rng.standard_normal(n) * 0.1, True) if options["momentum"] else None
    a = make_state(kinds[2], rng.standard_normal(n) * 0.01, True) if options["centered"] else None
    return p, grads, (s, b, a)


def run_steps(backend, p, grads, states, options, mode="nearest", grad_scale=None):
    p = p.copy()
    states = [copy_state(s) for s in states]
    master = p.astype(F32) if mode == "master" else None
    extra = {}
    if mode == "stochastic":
        extra = dict(param_rounding="stochastic", seed=SEED, step=STEP)
    for g in grads:
        fastrms.rmsprop_update(p, g, states[0], momentum_buffer=states[1], grad_avg=states[2],
                               backend=backend, master_param=master, grad_scale=grad_scale,
                               **options, **extra)
    return p, states, master


def check_against_reference(backend, p, grads, states, options, label, **kwargs):
    want = run_steps("numpy", p, grads, states, options, **kwargs)
    got = run_steps(backend, p, grads, states, options, **kwargs)
    assert got[0].tobytes() == want[0].tobytes(), f"{label}: param"
    for name, x, y in zip(("square_avg", "momentum_buffer", "grad_avg"), got[1], want[1]):
        assert state_bits(x) == state_bits(y), f"{label}: {name}"
    if want[2] is not None:
        assert got[2].tobytes() == want[2].tobytes(), f"{label}: master_param"


def test_reference_is_decode_update_encode(rng):
    """The reference's definition, spelled out: decode, float32 step, encode."""
    n = 600
    p = rng.standard_normal(n).astype(F32)
    g = rng.standard_normal(n).astype(F32)
    s = fastrms.Blockwise8.from_float32(np.abs(rng.standard_normal(n)).astype(F32))
    s32 = s.to_float32()
    p32 = p.copy()
    fastrms.rmsprop_update(p32, g, s32, lr=0.01)
    fastrms.rmsprop_update(p, g, s, lr=0.01, backend="numpy")
    assert p.tobytes() == p32.tobytes()
    codes, scales = _blockwise.encode(s32, False)
    assert (s.codes == codes).all() and (u32(s.scales) == u32(scales)).all()


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_every_option_and_state_format(backend, param_dtype, rng):
    require_backend(backend)
    for k, (ident, options) in enumerate(ALL_COMBOS[::3]):
        kinds = tuple(STATE_KINDS[(k + j) % 3] for j in range(3))
        if "blockwise8" not in kinds and "bfloat16" not in kinds:
            kinds = ("blockwise8", "bfloat16", "blockwise8")
        n = (1, 255, 256, 257, 700)[k % 5]
        p, grads, states = make_problem(rng, n, param_dtype, kinds, options)
        check_against_reference(backend, p, grads, states, options, f"{ident} {kinds} n={n}")


@pytest.mark.parametrize("mode", ["stochastic", "master"])
@pytest.mark.parametrize("grad_scale", [None, 3.0, 1024.0])
def test_16_bit_params_rounding_modes_and_loss_scale(backend, mode, grad_scale, rng):
    require_backend(backend)
    options = LARGE_COMBOS[3][1]
    for param_dtype in (BF16, F16):
        p, grads, states = make_problem(rng, 777, param_dtype, ("blockwise8",) * 3, options,
                                        grad32=grad_scale == 3.0)
        check_against_reference(backend, p, grads, states, options, f"{mode} {param_dtype}",
                                mode=mode, grad_scale=grad_scale)


def test_zero_and_nonfinite_blocks(backend, rng):
    require_backend(backend)
    options = LARGE_COMBOS[1][1]
    p, grads, states = make_problem(rng, 600, F32, ("blockwise8",) * 3, options)
    for g in grads:
        g[:256] = 0.0  # block 0 of square_avg and momentum_buffer decays from zero: stays 0
    states[0].codes[:256] = 0
    states[0].scales[0] = 0.0
    states[1].codes[:256] = 0
    states[1].scales[0] = 0.0
    grads[1][300] = np.nan
    check_against_reference(backend, p, grads[:2], states, options, "zero / nan blocks")
    _, got, _ = run_steps(backend, p, grads[:2], states, options)
    assert got[0].scales[0] == 0 and np.isnan(got[0].scales[1])
    with pytest.raises(ValueError, match=r"square_avg.scales\[1\] is nan"):
        fastrms.rmsprop_update(p.copy(), grads[2], got[0], momentum_buffer=got[1], **options)


@pytest.mark.parametrize("options", [c[1] for c in LARGE_COMBOS[:4]],
                         ids=[c[0] for c in LARGE_COMBOS[:4]])
def test_thread_counts_give_the_reference_bits(backend, options, rng, restore_threads):
    require_backend(backend)
    usable = len(os.sched_getaffinity(0))
    for threads in (1, 2):
        fastrms.set_num_threads(threads)
        assert fastrms.get_num_threads() == min(threads, usable)
        backends.load(backend).set_num_threads(threads)
        for param_dtype, kinds in ((F32, ("blockwise8",) * 3), (BF16, ("bfloat16", "blockwise8",
                                                                       "bfloat16"))):
            p, grads, states = make_problem(rng, LARGE, param_dtype, kinds, options)
            check_against_reference(backend, p, grads[:2], states, options,
                                    f"{threads} threads {param_dtype}")


@pytest.mark.parametrize("level", ["sse2", "avx2", "avx512"])
def test_c_every_simd_level(level, rng, restore_simd):
    require_backend("c")
    backends.load("c").set_simd_level(level)
    for k, (ident, options) in enumerate(ALL_COMBOS[::11]):
        p, grads, states = make_problem(rng, 1000, (F32, BF16)[k % 2],
                                        ("blockwise8", "blockwise8", "bfloat16"), options)
        check_against_reference("c", p, grads, states, options, f"{level} {ident}")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 1200), param=st.sampled_from(PARAM_DTYPES),
       kinds=st.tuples(*[st.sampled_from(STATE_KINDS)] * 3),
       combo=st.sampled_from(ALL_COMBOS), seed=st.integers(0, 2 ** 32 - 1))
def test_property_every_backend_equals_reference(n, param, kinds, combo, seed):
    rng = np.random.default_rng(seed)
    p, grads, states = make_problem(rng, n, param, kinds, combo[1])
    for backend in BACKENDS:
        if backends.availability(backend)[0]:
            check_against_reference(backend, p, grads[:2], states, combo[1],
                                    f"{backend} {combo[0]} {kinds} n={n}")


def test_strided_params_and_2d_shapes(backend, rng):
    require_backend(backend)
    options = LARGE_COMBOS[1][1]
    base = rng.standard_normal((40, 30)).astype(F32)
    p = base[:, ::2]
    g = rng.standard_normal(p.shape).astype(F32)
    s = fastrms.Blockwise8.zeros(p.size)
    b = np.zeros(p.shape, BF16)
    want_p, want_s, want_b = p.copy(), s.copy(), b.copy()
    fastrms.rmsprop_update(want_p, g, want_s, momentum_buffer=want_b, backend="numpy", **options)
    fastrms.rmsprop_update(p, g, s, momentum_buffer=b, backend=backend, **options)
    assert p.tobytes() == want_p.tobytes() and state_bits(s) == state_bits(want_s)
    assert b.tobytes() == want_b.tobytes()


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written


def _bad_cases():
    n = 300

    def b8(**kw):
        return fastrms.Blockwise8.zeros(n, **kw)

    def with_scales(scales, signed=False):
        state = b8(signed=signed)
        object.__setattr__(state, "scales", scales)
        return state

    wrong_codes = b8()
    wrong_codes.codes = np.zeros(n, np.int16)
    short_codes = b8()
    short_codes.codes = np.zeros(2 * n, np.uint8)
    negative = b8()
    negative.scales[1] = -1.0
    infinite = b8()
    infinite.scales[0] = np.inf
    return [
        ("square_avg.codes must be a 1-D uint8", dict(square_avg=wrong_codes)),
        ("square_avg.scales has 2 entries but 600 codes", dict(square_avg=short_codes)),
        ("square_avg has 299 elements", dict(square_avg=fastrms.Blockwise8.zeros(n - 1))),
        (r"square_avg.scales must be a 1-D float32",
         dict(square_avg=with_scales(np.zeros(2, np.float64)))),
        (r"square_avg.scales has 3 entries", dict(square_avg=with_scales(np.zeros(3, F32)))),
        (r"square_avg.scales\[1\] is -1.0", dict(square_avg=negative)),
        (r"square_avg.scales\[0\] is inf", dict(square_avg=infinite)),
        ("square_avg has 301 elements", dict(square_avg=fastrms.Blockwise8.zeros(n + 1))),
        ("square_avg must be a unsigned", dict(square_avg=b8(signed=True))),
        ("momentum_buffer must be a signed", dict(momentum_buffer=b8(), momentum=0.9)),
        ("grad_avg has shape", dict(grad_avg=np.zeros(n + 1, BF16), centered=True)),
        ("momentum_buffer has dtype float64",
         dict(momentum_buffer=np.zeros(n), momentum=0.9)),
        ("momentum_buffer is required", dict(momentum=0.9)),
        ("grad_avg was given", dict(grad_avg=b8(signed=True))),
        ("param has dtype float64", dict(param=np.zeros(n))),
        ("grad has dtype float16", dict(grad=np.zeros(n, F16))),
        ("master_param is only for", dict(master_param=np.zeros(n, F32))),
        ("square_avg.codes is read-only", dict(square_avg="readonly")),
    ]


@pytest.mark.parametrize("message,change", _bad_cases(), ids=lambda v: str(v)[:30])
def test_bad_input_names_the_argument_and_writes_nothing(backend, message, change):
    require_backend(backend)
    n = 300
    rng = np.random.default_rng(0)
    arguments = dict(param=rng.standard_normal(n).astype(F32),
                     grad=rng.standard_normal(n).astype(F32),
                     square_avg=fastrms.Blockwise8.from_float32(np.abs(rng.standard_normal(n))
                                                                .astype(F32)),
                     momentum_buffer=None, grad_avg=None, momentum=0.0, centered=False)
    arguments.update(change)
    if isinstance(arguments["square_avg"], str):
        state = fastrms.Blockwise8.zeros(n)
        state.codes.flags.writeable = False
        arguments["square_avg"] = state
    before = [state_bits(a) if not isinstance(a, np.ndarray) else a.tobytes()
              for a in arguments.values() if a is not None and not isinstance(a, (float, bool))]
    with pytest.raises((TypeError, ValueError), match=message):
        fastrms.rmsprop_update(lr=0.01, backend=backend, **arguments)
    after = [state_bits(a) if not isinstance(a, np.ndarray) else a.tobytes()
             for a in arguments.values() if a is not None and not isinstance(a, (float, bool))]
    assert before == after


def test_overlapping_state_buffers_are_refused(backend):
    require_backend(backend)
    n = 300
    p = np.ones(n, F32)
    shared = np.zeros(n, np.uint8)
    s = fastrms.Blockwise8(shared, np.zeros(2, F32))
    b = fastrms.Blockwise8(shared, np.zeros(2, F32), signed=True)
    with pytest.raises(ValueError, match="square_avg.codes and momentum_buffer.codes overlap"):
        fastrms.rmsprop_update(p, np.ones(n, F32), s, momentum_buffer=b, momentum=0.9,
                               lr=0.01, backend=backend)
    assert (p == 1).all() and (shared == 0).all()
