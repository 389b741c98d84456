"""``fastrms.rmsprop_update`` called from users' ``@njit`` code (fastrms/_numba_overload.py).

- Bits: every option combination, both dtypes, several sizes and layouts, special values and
  loss scales give the NumPy reference's bits, step after step, and so does a caller compiled
  with ``fastmath=True`` (the overload must not inherit it).
- Coefficients: the compiled checks and arithmetic agree with ``fastrms.kernel_coefficients``
  on every hyperparameter set Hypothesis draws, valid or not (the same bits, the same flags,
  refused exactly when Python raises).
- Bad input: every case of tests/test_validation.py, called from compiled code, raises the
  Python path's exception (same type, same message) and writes nothing.
- Registration: ``import fastrms`` stays free of Numba, ``init`` registers the overload, the
  ``numba_extensions`` entry point names it, and a caller cached by Numba loads in a fresh
  process and gives the same bits.
"""
from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrms
from fastrms import backends

from rms_helpers import (ALL_COMBOS, DTYPES, LARGE, assert_state_bits_equal, clean_env, copy_state,
                         make_problem, reference_update, run_python)

pytestmark = pytest.mark.skipif(not backends.availability("numba")[0],
                                reason=f"numba unavailable: {backends.availability('numba')[1]}")

if backends.availability("numba")[0]:
    import numba

    backends.load("numba")  # registers the overload (as Numba's entry point would)
    from fastrms import _numba_entry

OPTION_NAMES = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
                "eps_in_sqrt", "lr_in_momentum", "nesterov", "decoupled_weight_decay")
_callers: dict = {}


def compiled_caller(keywords: tuple[str, ...], **jit_options):
    """An @njit function ``caller(p, g, s, *values)`` that calls
    ``fastrms.rmsprop_update(p, g, s, keyword=value, ...)`` for these keywords."""
    key = (keywords, tuple(sorted(jit_options.items())))
    if key not in _callers:
        names = [f"v{i}" for i in range(len(keywords))]
        source = (f"def caller(p, g, s, {', '.join(names)}):\n"
                  f"    fastrms.rmsprop_update(p, g, s, "
                  f"{', '.join(f'{k}={v}' for k, v in zip(keywords, names))})\n")
        namespace = {"fastrms": fastrms}
        exec(source, namespace)
        _callers[key] = numba.njit(**jit_options)(namespace["caller"])
    return _callers[key]


def compiled_update(options: dict, state: dict, grad, grad_scale=1.0, **jit_options) -> None:
    """One step from compiled code, every option passed (1.0: no loss scale)."""
    keywords = OPTION_NAMES + ("momentum_buffer", "grad_avg", "grad_scale")
    values = [options[name] for name in OPTION_NAMES]
    values += [state["momentum_buffer"], state["grad_avg"], grad_scale]
    with np.errstate(all="ignore"):
        compiled_caller(keywords, **jit_options)(state["param"], grad, state["square_avg"],
                                                 *values)


def check_compiled_steps(options, state, grads, label, grad_scale=1.0, **jit_options):
    reference = copy_state(state)
    scaled = dict(options, grad_scale=grad_scale)
    for step, grad in enumerate(grads):
        reference = reference_update(scaled, reference, grad)
        compiled_update(options, state, grad, grad_scale, **jit_options)
        assert_state_bits_equal(state, reference, f"{label}, step {step}")


# --------------------------------------------------------------------------------------------
# bits


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_combination_gives_the_reference_bits(dtype, rng):
    for label, options in ALL_COMBOS:
        for shape in ((1,), (17,), (1000,), (6, 7)):
            state, grads = make_problem(rng, dtype, shape, options)
            check_compiled_steps(options, state, grads, f"{label} {shape}")
        state, grads = make_problem(rng, dtype, (64,), options, special=True)
        check_compiled_steps(options, state, grads, f"{label} special values")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("grad_scale", [1.0, 1024.0, 3.0, 2.0 ** -140, 1e-30])
def test_loss_scales_give_the_reference_bits(dtype, grad_scale, rng):
    label, options = ALL_COMBOS[-1]  # every stream
    state, grads = make_problem(rng, dtype, (LARGE,), options)
    check_compiled_steps(options, state, grads, f"{label} grad_scale={grad_scale}", grad_scale)


def test_fastmath_caller_still_gives_the_reference_bits(rng):
    """Numba hands a caller's fastmath to callees that do not set it: ours all do."""
    for label, options in ALL_COMBOS[::7]:
        state, grads = make_problem(rng, np.float32, (1000,), options)
        check_compiled_steps(options, state, grads, label, fastmath=True)


@pytest.mark.parametrize("layout", ["strided", "fortran", "reversed", "interleaved", "0-d",
                                    "3-d"])
def test_layouts_are_gathered_and_scattered(layout, rng):
    """Arrays that are not C-contiguous are updated through copies, with the same bits; views
    of one buffer that share no element are accepted."""
    label, options = ALL_COMBOS[-1]
    base, grads = make_problem(rng, np.float64, (8, 12), options)
    if layout == "strided":
        state = {k: v[:, ::3] for k, v in base.items()}
        grads = [g[:, ::3] for g in grads]
    elif layout == "fortran":
        state = {k: np.asfortranarray(v) for k, v in base.items()}
    elif layout == "reversed":
        state = {k: v[::-1, ::-1] for k, v in base.items()}
    elif layout == "interleaved":
        buffer = np.empty((8, 12 * 4))
        state = {}
        for k, name in enumerate(("param", "square_avg", "momentum_buffer", "grad_avg")):
            state[name] = buffer[:, k::4]
            state[name][...] = base[name]
    elif layout == "0-d":
        state = {k: np.array(v[0, 0]) for k, v in base.items()}
        grads = [np.array(g[0, 0]) for g in grads]
    else:
        state = {k: v.reshape(2, 4, 12) for k, v in base.items()}
        grads = [g.reshape(2, 4, 12) for g in grads]
    check_compiled_steps(options, state, grads, layout)


# --------------------------------------------------------------------------------------------
# coefficients: the compiled checks and arithmetic against fastrms.kernel_coefficients

_reals = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(-1.0, 2.0), st.sampled_from([0.0, -0.0, 1.0, 1e-45, 1e39, 3.4e38,
                                                          2.0 ** -149, 2.0 ** -1074, 1e300]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float32=st.booleans(), lr=_reals, alpha=_reals, eps=_reals, weight_decay=_reals,
       momentum=st.one_of(st.just(0.0), _reals), flags=st.lists(st.booleans(), min_size=6,
                                                                  max_size=6),
       grad_scale=st.one_of(st.none(), _reals))
def test_compiled_coefficients_are_kernel_coefficients(float32, lr, alpha, eps, weight_decay,
                                                       momentum, flags, grad_scale):
    dtype = np.float32 if float32 else np.float64
    try:
        expected = fastrms.kernel_coefficients(dtype, lr, alpha, eps, weight_decay, momentum,
                                               *flags, grad_scale=grad_scale)
    except ValueError:
        expected = None
    ok, values, got_flags = _numba_entry._checked_coefficients(
        float32, lr, alpha, eps, weight_decay, momentum, *flags, grad_scale)
    assert ok == (expected is not None)
    if ok:
        assert np.array(values).view(np.uint64).tolist() == \
            np.array(expected.values).view(np.uint64).tolist()
        assert got_flags == expected.flags


# --------------------------------------------------------------------------------------------
# bad input: tests/test_validation.py's cases, from compiled code

from test_validation import CASES, _all_arrays  # noqa: E402

#: Arguments Numba itself cannot pass to a compiled function (it refuses them at the call,
#: before fastrms runs): non-native byte order, object, float16 and float128 arrays.
NUMBA_REFUSES = {"dtype-grad-big-endian", "dtype-param-big-endian", "nonfloat-param-object",
                 "nonfloat-grad-object", "nonfloat-param-float128", "nonfloat-grad-float128",
                 "nonfloat-param-float16", "nonfloat-grad-float16", "nonfloat-square_avg-float16"}


def _python_exception(args, kwargs):
    """The Python path's exception for the case (it writes nothing: tests/test_validation.py)."""
    try:
        fastrms.rmsprop_update(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return exc
    raise AssertionError("the Python path accepted a case of tests/test_validation.py")


@pytest.mark.parametrize("name", sorted(set(CASES) - NUMBA_REFUSES - {"missing-lr"}))
def test_bad_input_raises_the_python_exception_and_writes_nothing(name):
    args, kwargs, exc_type, names = CASES[name]()
    kwargs = dict(kwargs)
    kwargs.setdefault("lr", 0.01)
    everything = list(args) + list(kwargs.values())
    watched = _all_arrays(everything)
    snapshots = [a.tobytes() for a in watched]
    others = [(o, copy.deepcopy(o)) for o in everything if isinstance(o, (list, tuple))]
    expected = _python_exception(args, kwargs)
    caller = compiled_caller(tuple(kwargs))
    with pytest.raises((TypeError, ValueError)) as info:
        caller(*args, *kwargs.values())
    assert type(info.value) is type(expected) and str(info.value) == str(expected), \
        f"compiled: {info.value!r}\nPython:   {expected!r}"
    for array, before in zip(watched, snapshots):
        assert array.tobytes() == before, "an array was written by a call that raised"
    for obj, before in others:
        assert obj == before


@pytest.mark.parametrize("name", sorted(NUMBA_REFUSES))
def test_arguments_numba_cannot_pass_are_refused_before_fastrms_runs(name):
    """A fresh caller each time: Numba 0.68's dispatcher, once it holds many compiled
    signatures, has been seen to run a native float32 one on a big-endian array (found by this
    test when it reused one caller), which no code inside the compiled function can detect."""
    args, kwargs, _, _ = CASES[name]()
    kwargs = dict(kwargs, lr=0.01)
    snapshots = [a.tobytes() for a in _all_arrays(list(args))]
    _callers.pop((tuple(kwargs), ()), None)
    with pytest.raises(Exception) as info:
        compiled_caller(tuple(kwargs))(*args, *kwargs.values())
    assert isinstance(info.value, (numba.core.errors.NumbaError, ValueError, TypeError,
                                   NotImplementedError)), repr(info.value)
    assert [a.tobytes() for a in _all_arrays(list(args))] == snapshots


def test_missing_lr_is_a_typing_error_naming_it():
    """Python's TypeError for a missing keyword happens while Numba types the call."""
    p, g, s = (np.ones(4) for _ in range(3))

    @numba.njit
    def caller(p, g, s):
        fastrms.rmsprop_update(p, g, s)

    with pytest.raises(numba.core.errors.TypingError, match="lr"):
        caller(p, g, s)


def test_positional_lr_is_refused_as_in_python():
    @numba.njit
    def caller(p, g, s):
        fastrms.rmsprop_update(p, g, s, 0.01)

    with pytest.raises(numba.core.errors.TypingError):
        caller(*(np.ones(4) for _ in range(3)))


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_other_backends_are_refused_in_compiled_code(backend):
    p, g, s = (np.ones(4) for _ in range(3))
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run in compiled code"):
        compiled_caller(("lr", "backend"))(p, g, s, 0.01, backend)
    assert (p == 1).all()


def test_backend_numba_and_none_are_accepted():
    for backend in ("numba", None):
        p, g, s = np.ones(4), np.full(4, 0.5), np.zeros(4)
        compiled_caller(("lr", "backend"))(p, g, s, 0.01, backend)
        assert (p < 1).all()


def test_float32_coefficient_overflow_names_the_hyperparameter():
    p, g, s = (np.ones(4, np.float32) for _ in range(3))
    kwargs = dict(lr=1e20, weight_decay=1e20)
    expected = _python_exception((p, g, s), kwargs)
    with pytest.raises(ValueError) as info:
        compiled_caller(tuple(kwargs))(p, g, s, *kwargs.values())
    assert str(info.value) == str(expected) and "lr * weight_decay" in str(expected)


# --------------------------------------------------------------------------------------------
# registration, caching, the entry point


def _env(**extra) -> dict:
    """A fresh interpreter's environment that imports this fastrms."""
    return clean_env(PYTHONPATH=str(pathlib.Path(fastrms.__file__).parent.parent), **extra)


def test_import_fastrms_does_not_import_numba_and_init_registers():
    code = r"""
import sys
import numpy as np
import fastrms
assert "numba" not in sys.modules, "import fastrms imported numba"
from fastrms import _numba_overload
_numba_overload.init()
_numba_overload.init()  # idempotent
import numba
assert "fastrms.backends.numba_backend" not in sys.modules

@numba.njit
def step(p, g, s):
    fastrms.rmsprop_update(p, g, s, lr=0.01, alpha=0.9, eps_in_sqrt=True)

p = np.array([0.2, 0.4, 0.6]); s = np.zeros(3)
step(p, np.array([-0.5, 0.3, 0.24]), s)
print(repr(p.tolist()))
"""
    out = run_python(code, env=_env(), timeout=600).stdout
    expected = np.array([0.2, 0.4, 0.6])
    fastrms.rmsprop_update(expected, np.array([-0.5, 0.3, 0.24]), np.zeros(3), lr=0.01,
                           alpha=0.9, eps_in_sqrt=True, backend="numpy")
    assert eval(out.strip().splitlines()[-1]) == expected.tolist()


def test_entry_point_names_the_registration_function():
    """pyproject.toml's numba_extensions entry point, as the installed metadata has it."""
    from importlib import metadata

    try:
        distribution = metadata.distribution("fastrms")
    except metadata.PackageNotFoundError:
        pytest.skip("fastrms is not installed (no metadata to read)")
    points = [ep for ep in distribution.entry_points if ep.group == "numba_extensions"]
    if not points:
        pytest.skip(f"the installed metadata ({distribution.locate_file('')}) predates the "
                    f"numba_extensions entry point: reinstall with pip install -e .")
    assert [(ep.name, ep.value) for ep in points] == [("init", "fastrms._numba_overload:init")]
    assert points[0].load() is fastrms._numba_overload.init


def test_pyproject_declares_the_entry_point():
    import tomllib

    pyproject = pathlib.Path(fastrms.__file__).parent.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source tree")
    project = tomllib.loads(pyproject.read_text())["project"]
    assert project["entry-points"]["numba_extensions"] == {"init": "fastrms._numba_overload:init"}


CACHED_CALLER = r"""
import json, sys
import numpy as np
import numba
import fastrms
from fastrms import _numba_overload
_numba_overload.init()

@numba.njit(cache=True)
def train(p, g, s, b, steps):
    for k in range(steps):
        fastrms.rmsprop_update(p, g, s, lr=0.01, momentum=0.9, momentum_buffer=b)

rng = np.random.default_rng(0)
p, g, s, b = (rng.standard_normal(1000) for _ in range(4))
s = np.abs(s)
train(p, g, s, b, 3)
stats = train.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "p": p.tobytes().hex()}))
"""


def test_a_cached_caller_loads_in_a_fresh_process(tmp_path):
    """A user's cache=True function that calls rmsprop_update: the second process loads it
    (no Numba-internal symbol is left unresolved, which would abort it) with the same bits."""
    script = tmp_path / "cached_caller.py"
    script.write_text(CACHED_CALLER)
    env = _env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first = json.loads(run_python(None, env=env, args=(str(script),), timeout=900)
                       .stdout.strip().splitlines()[-1])
    second = json.loads(run_python(None, env=env, args=(str(script),), timeout=900)
                        .stdout.strip().splitlines()[-1])
    assert first["misses"] == 1 and second["hits"] == 1 and second["misses"] == 0
    assert first["p"] == second["p"]
    rng = np.random.default_rng(0)
    p, g, s, b = (rng.standard_normal(1000) for _ in range(4))
    s = np.abs(s)
    for _ in range(3):
        fastrms.rmsprop_update(p, g, s, lr=0.01, momentum=0.9, momentum_buffer=b,
                               backend="numpy")
    assert p.tobytes().hex() == second["p"]
