"""The C backend's fused compact-state loops (csrc/compact_fused.h): float32 or bfloat16
params and grads with a blockwise8 square_avg (and momentum_buffer), not centered. They must
give the NumPy reference's bits at every SIMD level (the baseline level runs the generic block
driver, AVX2 and AVX-512 the fused loops), for every uncentered option, across block
boundaries, partial last blocks and vector tails, all-zero blocks, huge / tiny / non-finite
values, and 1 or 2 threads; fastrms_compact_fused says which path a call takes.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrms
from fastrms import _coefficients, backends

from rms_helpers import ALL_COMBOS, LARGE, make_options, require_backend

BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
LEVELS = ("sse2", "avx2", "avx512")
UNCENTERED = [combo for combo in ALL_COMBOS if not combo[1]["centered"]]
#: Whole blocks, partial last blocks, tails that are not a multiple of 8 or 16.
SIZES = (256, 512, 255, 257, 768 + 7, 1000, 2048, 256 * 5 + 129)


@pytest.fixture
def lib():
    require_backend("c")
    return backends.load("c").lib


def flags_of(options):
    hyper = [options[k] for k in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered",
                                  "maximize", "eps_in_sqrt", "lr_in_momentum", "nesterov",
                                  "decoupled_weight_decay")]
    return _coefficients.coefficients_for_call(F32, *hyper, None).flags


def fused_level(c):
    """True if the active SIMD level runs the fused loops (AVX2 or AVX-512 active)."""
    return c.simd_level() in ("avx2", "avx512")


def problem(rng, n, param_dtype, momentum, scale=1.0):
    p = (rng.standard_normal(n) * scale).astype(F32).astype(param_dtype)
    grads = [(rng.standard_normal(n) * rng.choice([1e-4, 1.0, 10.0], n) * scale)
             .astype(F32).astype(param_dtype) for _ in range(2)]
    s = fastrms.Blockwise8.from_float32((0.01 + np.abs(rng.standard_normal(n)) * 0.1)
                                        .astype(F32))
    b = (fastrms.Blockwise8.from_float32((rng.standard_normal(n) * 0.1).astype(F32),
                                         signed=True) if momentum else None)
    return p, grads, s, b


def bits(state):
    return None if state is None else state.codes.tobytes() + state.scales.tobytes()


def steps(backend, p, grads, s, b, options):
    p, s = p.copy(), s.copy()
    b = None if b is None else b.copy()
    for g in grads:
        fastrms.rmsprop_update(p, g, s, momentum_buffer=b, backend=backend, **options)
    return p, s, b


def check(p, grads, s, b, options, label):
    want = steps("numpy", p, grads, s, b, options)
    got = steps("c", p, grads, s, b, options)
    assert got[0].tobytes() == want[0].tobytes(), f"{label}: param"
    assert bits(got[1]) == bits(want[1]), f"{label}: square_avg"
    assert bits(got[2]) == bits(want[2]), f"{label}: momentum_buffer"


@pytest.mark.parametrize("level", LEVELS)
def test_fastrms_compact_fused_names_the_path(lib, level, restore_simd):
    c = backends.load("c")
    c.set_simd_level(level)
    fused = fused_level(c)
    b8 = lib.FASTRMS_SQUARE_AVG_B8
    for ident, options in UNCENTERED:
        flags = flags_of(options)
        momentum = lib.FASTRMS_MOMENTUM_BUFFER_B8 if options["momentum"] else 0
        for param in (lib.FASTRMS_PARAM_F32, lib.FASTRMS_PARAM_BF16):
            assert lib.fastrms_compact_fused(flags, param | b8 | momentum) == fused, ident
    plain = flags_of(make_options())
    with_momentum = flags_of(make_options(momentum_form="torch"))
    centered = flags_of(make_options(centered=True))
    generic = [  # (flags, formats) that keep the generic block driver
        (centered, lib.FASTRMS_PARAM_F32 | b8 | lib.FASTRMS_GRAD_AVG_B8),
        (plain | lib.FASTRMS_GRAD_SCALE, lib.FASTRMS_PARAM_F32 | b8),
        (plain, lib.FASTRMS_PARAM_F32 | lib.FASTRMS_SQUARE_AVG_BF16),
        (plain, 0 | b8),  # float16 params
        (plain, lib.FASTRMS_PARAM_BF16 | lib.FASTRMS_GRAD_F32 | b8),
        (plain, lib.FASTRMS_PARAM_BF16 | lib.FASTRMS_STOCHASTIC | b8),
        (plain, lib.FASTRMS_PARAM_BF16 | lib.FASTRMS_MASTER | b8),
        (with_momentum, lib.FASTRMS_PARAM_F32 | b8 | lib.FASTRMS_MOMENTUM_BUFFER_BF16),
        (with_momentum, lib.FASTRMS_PARAM_F32 | b8),  # float32 momentum_buffer
    ]
    for flags, formats in generic:
        assert lib.fastrms_compact_fused(flags, formats) == 0, (flags, formats)


@pytest.mark.parametrize("param_dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("level", LEVELS)
def test_every_uncentered_option_at_every_level(level, param_dtype, rng, restore_simd):
    require_backend("c")
    backends.load("c").set_simd_level(level)
    for k, (ident, options) in enumerate(UNCENTERED):
        n = SIZES[k % len(SIZES)]
        p, grads, s, b = problem(rng, n, param_dtype, options["momentum"] != 0)
        check(p, grads, s, b, options, f"{level} {param_dtype} {ident} n={n}")


SPECIAL_OPTIONS = [make_options(), make_options(momentum_form="torch"),
                   make_options(momentum_form="lrin-nest", decay_form="coupled"),
                   make_options(True, False, True, "torch-nest", "decoupled")]


@pytest.mark.parametrize("param_dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("level", LEVELS)
def test_zero_huge_tiny_and_nonfinite_blocks(level, param_dtype, rng, restore_simd):
    """One block each: all zero; gradients whose square overflows (the block's scale turns NaN);
    tiny and subnormal gradients; a NaN gradient and an infinite parameter; magnitudes from
    1e-20 to 1e20; then a partial block."""
    require_backend("c")
    backends.load("c").set_simd_level(level)
    n = 256 * 6 + 9
    for k, options in enumerate(SPECIAL_OPTIONS):
        momentum = options["momentum"] != 0
        p, grads, s, b = problem(rng, n, param_dtype, momentum)
        g = grads[0].astype(F32)
        g[:256] = 0.0
        s.codes[:256], s.scales[0] = 0, 0.0
        if momentum:
            b.codes[:256], b.scales[0] = 0, 0.0
        g[256:512] = rng.standard_normal(256) * 1e30
        g[512:768] = rng.standard_normal(256) * np.where(rng.random(256) < 0.5, 1e-30, 1e-40)
        g[800], g[801] = np.nan, -np.inf
        p32 = p.astype(F32)
        p32[805] = np.inf
        p32[806] = -np.nan
        g[1024:1280] = rng.standard_normal(256) * 10.0 ** rng.uniform(-20, 20, 256)
        p = p32.astype(param_dtype)
        check(p, [g.astype(param_dtype)], s, b, options, f"{level} {param_dtype} special {k}")
        _, got, _ = steps("c", p, [g.astype(param_dtype)], s, b, options)
        if options["weight_decay"] == 0 or options["decoupled_weight_decay"]:
            assert got.scales[0] == 0  # zero gradients on zero state: the block stays zero
        assert np.isnan(got.scales[1]) and np.isnan(got.scales[3])


@pytest.mark.parametrize("param_dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("momentum_form", ["nomom", "torch", "lrin"])
def test_thread_counts(param_dtype, momentum_form, rng, restore_threads):
    require_backend("c")
    usable = len(os.sched_getaffinity(0))
    options = make_options(momentum_form=momentum_form)
    for threads in (1, 2):
        fastrms.set_num_threads(threads)
        backends.load("c").set_num_threads(threads)
        assert fastrms.get_num_threads() == min(threads, usable)
        for n in (LARGE, LARGE + 251):
            p, grads, s, b = problem(rng, n, param_dtype, momentum_form != "nomom")
            check(p, grads, s, b, options, f"{threads} threads n={n}")


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 3000), bf16=st.booleans(), combo=st.sampled_from(UNCENTERED),
       level=st.sampled_from(LEVELS), scale=st.sampled_from([1e-12, 1.0, 1e6]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_property_fused_equals_reference(n, bf16, combo, level, scale, seed):
    require_backend("c")
    c = backends.load("c")
    before = c.simd_level()
    try:
        c.set_simd_level(level)
        rng = np.random.default_rng(seed)
        p, grads, s, b = problem(rng, n, BF16 if bf16 else F32, combo[1]["momentum"] != 0,
                                 scale)
        check(p, grads, s, b, combo[1], f"{level} {combo[0]} n={n} scale={scale}")
    finally:
        c.set_simd_level(before)
