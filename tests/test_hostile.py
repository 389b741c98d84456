"""Hostile-input property tests ("Hardening").

Hypothesis throws random shapes, strides (negative too), dtypes, sizes (0 and 1 included),
overlapping and interleaved views of shared base buffers, misaligned views and hostile
hyperparameters at every backend through :func:`fastrms.rmsprop_update`, and at
:class:`fastrms.RMSprop` (construction and ``step``). Every call must either

(a) succeed, match the NumPy reference bit for bit (NaN == NaN) -- ``reference_step`` on copies
    for ``rmsprop_update``, ``RMSprop(..., backend="numpy")`` on copies for the optimizer -- and
    write no byte outside its output arrays (every buffer has guard bytes around it); or
(b) raise ``TypeError`` / ``ValueError`` with every array, and every base buffer of every view,
    bit for bit untouched (and, for the optimizer, its state and step count unchanged).

Any other exception fails, and so does any warning: calls run under
``warnings.simplefilter("error")``. An independent oracle also says which calls must succeed
(everything valid) and which must fail (wrong type, dtype or shape, overlap, read-only output,
invalid hyperparameter, ...); a few inputs are "either" (numpy bools as flags, 0-d arrays and
Decimals as numbers).

The bugs this suite found (B1..B4 below, all fixed) are pinned by the ``test_bug_*`` tests at
the end. Their inputs are kept out of the property tests' pools (huge Python ints and
Fractions, np.matrix / MaskedArray, self-overlapping outputs); B2 (a float32 coefficient that
overflows, now a ValueError) is predicted by the oracle and tolerated there, as "either".

Outcome counts per test and backend are printed at the end of the module (run with ``-s``) and
reported as Hypothesis events (``--hypothesis-show-statistics``).

Determinism: ``derandomize=True``, and no NaN is ever a Hypothesis *choice* (NaN inside an
``hnp.arrays`` elements strategy makes Hypothesis's generation depend on NaN's identity hash,
so two runs differ); NaNs come from drawn masks and from index draws of ``sampled_from``.
"""
from __future__ import annotations

import collections
import decimal
import fractions
import math
import numbers
import textwrap
import warnings

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings

import fastrms
from fastrms import _coefficients
from fastrms._codecs import LOW_PRECISION_DTYPES
from fastrms.backends.numpy_reference import reference_step, reference_step_low_precision
from fastrms.presets import PRESETS

from rms_helpers import BACKENDS, assert_bits_equal, require_backend, run_python, special_values

HYPOTHESIS = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), print_blob=True)
HYPOTHESIS_OPT = settings(HYPOTHESIS, max_examples=120)

F4, F8 = np.dtype(np.float32), np.dtype(np.float64)
F4_META = np.dtype(np.float32, metadata={"hostile": 1})  # == float32, not the same object
F8_META = np.dtype(np.float64, metadata={"hostile": 2})
FLOATS = (F4, F8)
NUMERIC = ("lr", "alpha", "eps", "weight_decay", "momentum")
FLAGS = ("centered", "maximize", "eps_in_sqrt", "lr_in_momentum", "nesterov",
         "decoupled_weight_decay")
DEFAULTS = dict(alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                maximize=False, eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
                decoupled_weight_decay=False)
OPT_KEYS = NUMERIC + FLAGS + ("initial_square_avg",)
MISSING = object()
VALID, EITHER, INVALID = 0, 1, 2
ACCEPTED = (TypeError, ValueError)
CAST_OVERFLOW = "overflow encountered in cast"
MAX_SIDE = 4
MAX_COUNT = MAX_SIDE ** 3
SHARED_BYTES = MAX_COUNT * 6 * 8 + 64


class _Sub(np.ndarray):
    """A do-nothing ndarray subclass: accepted by the package, must behave as an ndarray."""


# ------------------------------------------------------------------------------------------
# outcome counting

OUTCOMES: dict = collections.defaultdict(collections.Counter)


def record(test: str, backend, outcome: str) -> None:
    OUTCOMES[(test, str(backend))][outcome] += 1
    event(outcome)


@pytest.fixture(scope="module", autouse=True)
def _print_outcome_table():
    yield
    if not OUTCOMES:
        return
    names = ("success", "TypeError", "ValueError")
    lines = ["", "hostile-input outcomes (one count per call):"]
    total = collections.Counter()
    for (test, backend), counts in sorted(OUTCOMES.items()):
        total.update(counts)
        lines.append(f"  {test:<36} {backend:<6} calls={sum(counts.values()):5d}  "
                     + "  ".join(f"{n}={counts[n]}" for n in names)
                     + "".join(f"  {k}={v}" for k, v in sorted(counts.items()) if k not in names))
    lines.append(f"  {'TOTAL':<43} calls={sum(total.values()):5d}  "
                 + "  ".join(f"{n}={total[n]}" for n in names)
                 + "".join(f"  {k}={v}" for k, v in sorted(total.items()) if k not in names))
    print("\n".join(lines))


@pytest.fixture(autouse=True)
def _fresh_coefficient_cache():
    _coefficients._cached.cache_clear()
    yield
    _coefficients._cached.cache_clear()


# ------------------------------------------------------------------------------------------
# guarded calls


def guarded(fn, ignore_cast_overflow=False):
    """Run fn with every warning an error; return the TypeError/ValueError it raised, or None.
    Anything else propagates and fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if ignore_cast_overflow:  # known bug B2, predicted exactly by the oracle
            warnings.filterwarnings("ignore", message=CAST_OVERFLOW, category=RuntimeWarning)
        try:
            fn()
        except ACCEPTED as exc:
            return exc
    return None


def quiet(fn):
    """Run an oracle computation: no FP warnings, no cast warnings."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn()


def outcome_name(exc) -> str:
    return "TypeError" if isinstance(exc, TypeError) else "ValueError"


SPECIALS = {F4: quiet(lambda: special_values(F4)), F8: quiet(lambda: special_values(F8))}

# ------------------------------------------------------------------------------------------
# hyperparameters: pools and the oracle

VALID_NUMBER = {
    "lr": st.one_of(st.floats(0, 10), st.sampled_from(
        [0.0, -0.0, 5e-324, 1e-310, 1e-3, 1e-2, 1e38, 3.5e38, 1e300, 1.7976931348623157e308])),
    "alpha": st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from(
        [0.0, -0.0, 5e-324, 0.9, 0.99, 0.9999999, 0.9999999999999999])),
    "eps": st.one_of(st.floats(0, 1), st.sampled_from([0.0, 5e-324, 1e-45, 1e-8, 1e40, 1e300])),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0, 10),
                              st.sampled_from([-0.0, 5e-324, 1e20, 1e300])),
    "momentum": st.one_of(st.just(0.0), st.floats(0, 1.5),
                          st.sampled_from([5e-324, 1e-300, 0.9, 1e39, 1e300])),
    "initial_square_avg": st.one_of(st.floats(0, 2), st.sampled_from(
        [0.0, -0.0, 1.0, 5e-324, 1e39, 1e300])),
}

# Every kind of hostile number except the ones that hit bug B1 (Python ints and Fractions too
# large for a float: OverflowError), which test_bug_huge_* pins.
HOSTILE_NUMBERS = [
    -1.0, -1e-300, -5e-324, -np.inf, np.inf, np.nan, -np.nan, 1e300, 1.7976931348623157e308,
    5e-324, 1e-310, 0.0, -0.0, 1.0, 0.9999999999999999, 2.0, 3.5e38,
    True, False, np.bool_(True), np.bool_(False),
    "0.1", "", b"0.1", None, [0.1], (0.1,), {0.1}, {"lr": 0.1}, object(), 0.1j,
    np.float16(0.5), np.float16(np.inf), np.float16(6e-8), np.float32(0.1), np.float32(np.nan),
    np.float32(3e38), np.float64(0.1), np.float64(-1.0), np.float64(1e300), np.longdouble("0.1"),
    np.longdouble("1e4000"), np.longdouble(-1),
    np.int8(-1), np.int64(3), np.int64(0), np.uint64(2 ** 64 - 1), np.uint8(0), np.uint8(200),
    np.array(0.1), np.array(np.nan), np.array([0.1]), np.array(0.1, dtype=">f8"),
    np.array(True), np.array(3), np.zeros((0,)),
    1, 0, -1, 2 ** 53 + 1, 10 ** 30, 10 ** 300,
    complex(0.1, 0), np.complex128(0.1), np.complex64(1j),
    fractions.Fraction(1, 10), fractions.Fraction(-1, 3), fractions.Fraction(10 ** 30, 7),
    decimal.Decimal("0.1"), decimal.Decimal("NaN"), decimal.Decimal("-1"),
]
HOSTILE_FLAGS = [np.bool_(True), np.bool_(False), 0, 1, 0.0, 1.0, None, "True", "",
                 np.int64(1), np.array(True), [True], (), np.float64(1.0)]


def float_overflows(value) -> bool:
    try:
        float(value)
    except OverflowError:
        return True
    except Exception:
        return False
    return False


assert not any(isinstance(v, numbers.Real) and float_overflows(v) for v in HOSTILE_NUMBERS)


def number_status(value, upper=None):
    """(VALID | EITHER | INVALID, float value or None) for one numeric hyperparameter."""
    if isinstance(value, (bool, np.bool_)):
        return INVALID, None
    if isinstance(value, numbers.Real):
        f = float(value)
        ok = math.isfinite(f) and f >= 0 and (upper is None or f < upper)
        return (VALID if ok else INVALID), f
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        status, f = number_status(value.item(), upper)
        return (EITHER if status == VALID else INVALID), f
    if isinstance(value, decimal.Decimal) and value.is_finite():
        ok = value >= 0 and (upper is None or value < upper)
        return (EITHER if ok else INVALID), float(value)
    return INVALID, None


def flag_status(value) -> int:
    if isinstance(value, bool):
        return VALID
    if isinstance(value, np.bool_):
        return EITHER  # "bool flags must be bool"; the package accepts numpy bools
    return INVALID


def coefficient_overflow(values, dtype=F4) -> bool:
    """True when a kernel coefficient is not finite once rounded to ``dtype`` (B2: the package
    now rejects such hyperparameters with a ValueError)."""
    values = np.array(values, dtype=np.float64)
    rounded = quiet(lambda: values.astype(dtype))
    return bool(np.any(~np.isfinite(rounded)))


class Hyper:
    """The oracle's reading of one set of rmsprop_update hyperparameters (defaults filled)."""

    def __init__(self, values: dict):
        self.values = values
        self.status = VALID
        self.floats = {}
        if values.get("lr", MISSING) is MISSING:
            self.status = INVALID
        for name in NUMERIC:
            value = values.get(name, MISSING)
            if value is MISSING:
                self.floats[name] = None
                continue
            status, f = number_status(value, 1.0 if name == "alpha" else None)
            self.status = max(self.status, status)
            self.floats[name] = f
        for name in FLAGS:
            self.status = max(self.status, flag_status(values[name]))
        momentum = self.floats["momentum"]
        self.uses_momentum = momentum is not None and momentum != 0.0
        self.centered = flag_status(values["centered"]) < INVALID and bool(values["centered"])
        if (self.status < INVALID and flag_status(values["nesterov"]) < INVALID
                and bool(values["nesterov"]) and momentum == 0.0):
            self.status = INVALID

    def cast_overflow(self, dtype) -> bool:
        """B2: valid finite hyperparameters whose coefficient in ``dtype`` is not finite."""
        if np.dtype(dtype) in LOW_PRECISION_DTYPES:  # their coefficients are float32
            dtype = F4
        if np.dtype(dtype) not in (F4, np.dtype(np.float64)) or self.status == INVALID:
            return False
        f = self.floats
        lr, alpha, eps, wd, mom = (f[k] for k in NUMERIC)
        return coefficient_overflow([alpha, 1.0 - alpha, eps, -lr, lr, wd, mom, 1.0 - lr * wd],
                                    dtype)

    def kwargs(self) -> dict:
        return {k: v for k, v in self.values.items() if v is not MISSING}


NESTEROV_VALID = st.sampled_from([False] * 5 + [True])


@st.composite
def hyperparameters(draw, n_hostile=st.just(0)):
    """(keyword arguments as given, the same with defaults filled in). ``n_hostile`` keys get
    a value from the hostile pools (or lr goes missing); the rest are valid or omitted."""
    count = draw(n_hostile)
    hostile = draw(st.permutations(NUMERIC + FLAGS))[:count]
    values = {}
    for name in NUMERIC:
        if name in hostile:
            if name == "lr" and draw(st.integers(0, 9)) == 0:
                values[name] = MISSING  # lr is required
            else:
                values[name] = draw(st.sampled_from(HOSTILE_NUMBERS))
        elif name != "lr" and draw(st.integers(0, 3)) == 0:
            values[name] = MISSING
        else:
            values[name] = draw(VALID_NUMBER[name])
    # momentum > 0 about half the time, so the momentum paths get exercised
    if "momentum" not in hostile and values["momentum"] in (MISSING, 0.0) and draw(st.booleans()):
        values["momentum"] = draw(st.sampled_from([0.9, 0.5, 5e-324, 1.2]))
    for name in FLAGS:
        if name in hostile:
            values[name] = draw(st.sampled_from(HOSTILE_FLAGS))
        elif draw(st.integers(0, 3)) == 0:
            values[name] = MISSING
        else:
            values[name] = draw(NESTEROV_VALID if name == "nesterov" else st.booleans())
    full = {k: (DEFAULTS[k] if v is MISSING and k in DEFAULTS else v) for k, v in values.items()}
    return values, full


# ------------------------------------------------------------------------------------------
# memory: byte owners with guard bytes, views into them, snapshots


def _values(rng, n, dtype):
    dtype = np.dtype(dtype.str)
    normal = quiet(lambda: (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype))
    pick = rng.random(n) < 0.25
    normal[pick] = rng.choice(SPECIALS[dtype], size=int(pick.sum()))
    return normal


class Arena:
    """Every buffer an example allocates: bytearray-backed byte owners (with 16 guard bytes
    each side) and object arrays. Snapshots compare them byte for byte."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.raws = []
        self.objects = []

    def owner(self, nbytes: int, fill_dtype=None) -> np.ndarray:
        raw = np.frombuffer(bytearray(nbytes + 48), np.uint8)
        assert raw.flags.writeable
        shift = (-raw.ctypes.data) % 16 + 16  # 16-byte aligned start after the guard bytes
        own = raw[shift:shift + nbytes]
        self.raws.append(raw)
        raw[:] = self.rng.integers(0, 256, raw.size, dtype=np.uint8)
        if fill_dtype is not None and np.dtype(fill_dtype) in FLOATS:
            dtype = np.dtype(np.dtype(fill_dtype).str)  # without metadata
            n = nbytes // dtype.itemsize
            own[:n * dtype.itemsize].view(dtype)[:] = _values(self.rng, n, dtype)
        return own

    def add_array(self, array):
        """Track a C-contiguous array made elsewhere (hnp.arrays) as an owner."""
        self.raws.append(array.reshape(-1).view(np.uint8))

    def object_array(self, shape):
        a = np.empty(shape, dtype=object)
        for index in np.ndindex(*shape):
            a[index] = float(self.rng.standard_normal())
        self.objects.append((a, [id(x) for x in a.flat]))
        return a

    def array(self, shape, dtype, layout=None):
        """A fresh view of its own owner, laid out per ``layout`` (default: plain C order)."""
        dtype = np.dtype(dtype)
        if dtype == np.dtype(object):
            return self.object_array(shape)
        count = int(np.prod(shape))
        own = self.owner((count * 3 + 8) * dtype.itemsize + 8, dtype)
        return make_view(own, dtype, shape, layout or PLAIN, rng=self.rng)

    def snapshot(self):
        return ([raw.tobytes() for raw in self.raws],
                [[id(x) for x in a.flat] for a, _ in self.objects])

    def assert_untouched(self, snapshot, label):
        raws, objects = snapshot
        for k, (raw, before) in enumerate(zip(self.raws, raws)):
            if raw.tobytes() != before:
                changed = np.flatnonzero(np.frombuffer(before, np.uint8) != raw)
                raise AssertionError(f"{label}: buffer {k} changed at bytes {changed[:10]}")
        for (a, _), before in zip(self.objects, objects):
            assert [id(x) for x in a.flat] == before, f"{label}: an object array changed"

    def assert_written_only(self, snapshot, outputs, label):
        """No byte outside the output arrays' elements changed (guard bytes included)."""
        raws, _ = snapshot
        addresses = [byte_addresses(a) for a in outputs if isinstance(a, np.ndarray)]
        for k, (raw, before) in enumerate(zip(self.raws, raws)):
            lo = raw.ctypes.data
            mask = np.zeros(raw.size, bool)
            for addr in addresses:
                mask[addr[(addr >= lo) & (addr < lo + raw.size)] - lo] = True
            stray = (np.frombuffer(before, np.uint8) != raw) & ~mask
            assert not stray.any(), f"{label}: stray write in buffer {k} at {np.flatnonzero(stray)[:10]}"


def byte_addresses(a) -> np.ndarray:
    """The address of every byte of every element of ``a`` (any strides)."""
    a = np.asarray(a)
    if a.size == 0:
        return np.empty(0, np.int64)
    start = a.__array_interface__["data"][0]
    if a.ndim == 0:
        offsets = np.array([start], np.int64)
    else:
        index = np.indices(a.shape, dtype=np.int64).reshape(a.ndim, -1)
        offsets = start + (np.array(a.strides, np.int64)[:, None] * index).sum(0)
    return (offsets[:, None] + np.arange(a.itemsize, dtype=np.int64)).ravel()


PLAIN = dict(misalign=0, step=1, start=0.0, order="C", perm=False, readonly=False,
             subclass=False)

LAYOUT = st.fixed_dictionaries({
    "misalign": st.sampled_from([0] * 6 + [1, 2, 3, 4]),  # bytes; 4 misaligns float64 only
    "step": st.sampled_from([1, 1, 1, 2, 3, -1, -1, -2, -3]),
    "start": st.floats(0, 1),
    "order": st.sampled_from("CCCF"),
    "perm": st.booleans(),  # a random transpose, undone by the view's shape
    "readonly": st.just(False),
    "subclass": st.sampled_from([False] * 9 + [True]),
})


def make_view(own, dtype, shape, layout, slot=0, n_slots=1, mode="random", common_misalign=0,
              rng=None):
    """A view of ``dtype`` and ``shape`` into the byte owner ``own``.

    mode "random": the layout's own misalignment, step (negative too) and start (with
    ``anchor``: the middle element, so that two anchored views surely overlap);
    "interleave": slot j of n_slots takes elements j, j+n, j+2n, ... (from the end when the step
    is negative), so interleaved views never share a byte; "same": every slot the same elements.
    """
    dtype = np.dtype(dtype)
    size = dtype.itemsize
    off = layout["misalign"] if mode == "random" else common_misalign
    avail = (own.size - off) // size
    flat = own[off:off + avail * size].view(dtype)
    count = int(np.prod(shape))
    step = layout["step"]
    if mode == "interleave":
        step = n_slots if step > 0 else -n_slots
    elif mode == "same":
        step = 1
    span = (count - 1) * abs(step)
    if count and span >= avail:
        assert mode == "random", "shared owner too small for an interleave"
        step = 1 if step > 0 else -1
        span = count - 1
    if count == 0:
        selection = flat[:0]
    else:
        if mode == "interleave":
            start = slot if step > 0 else avail - 1 - slot
        elif mode == "same":
            start = 0
        elif layout.get("anchor"):  # the middle element: views from here overlap
            start = avail // 2
            assert start + span < avail and start - span >= 0
        else:
            start = int(layout["start"] * (avail - 1 - span)) + (span if step < 0 else 0)
        selection = flat[start::step][:count]
        assert selection.size == count
    ndim = len(shape)
    perm = list(range(ndim))
    if layout["perm"] and ndim > 1 and rng is not None:
        perm = [int(i) for i in rng.permutation(ndim)]
    pshape = tuple(shape[i] for i in perm)
    view = selection.reshape(pshape, order=layout["order"]).transpose(np.argsort(perm))
    assert view.shape == tuple(shape)
    assert count == 0 or np.shares_memory(view, own)  # a view, never a copy
    if layout["subclass"]:
        view = view.view(_Sub)
    if layout["readonly"]:
        view.flags.writeable = False
    return view


def readonly_view(array):
    view = array.view()
    view.flags.writeable = False
    return view


SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=MAX_SIDE)
HOSTILE_DTYPES = [np.dtype(x) for x in (
    np.float16, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.complex64, np.complex128,
    np.bool_, ">f4", ">f8", [("a", "<f4")], [("a", "<f8")], [("a", "<f4"), ("b", "<f4")], "V4",
    "S4", "U1", "m8[s]", "M8[s]", object, np.longdouble)]
#: For a parameter: float16 is a parameter dtype (16-bit parameters, float32 state), and only
#: wrong as a gradient or state dtype of a float32 / float64 parameter.
PARAM_HOSTILE_DTYPES = [d for d in HOSTILE_DTYPES if d != np.float16]


def other_float(dtype):
    return F8 if np.dtype(dtype) == F4 else F4


NON_ARRAY_KINDS = ["list", "float", "none", "tensor", "memoryview", "npscalar", "str", "dict"]


def non_array(kind, like):
    """Something that is not an ndarray, shaped like ``like`` where it can be."""
    base = np.array(like) if isinstance(like, np.ndarray) else np.zeros(3)
    if kind == "list":
        return base.tolist()
    if kind == "float":
        return 0.5
    if kind == "none":
        return None
    if kind == "tensor":
        import torch
        return torch.from_numpy(np.ascontiguousarray(base.astype(np.float32)))
    if kind == "memoryview":
        return memoryview(np.ascontiguousarray(base))
    if kind == "npscalar":
        return np.float32(1.0)
    if kind == "str":
        return "param"
    if kind == "dict":
        return {"data": base}
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------
# rmsprop_update: the array oracle, the success check, one guarded call


def array_status(P, G, S, B, A, hyper: Hyper) -> int:
    """INVALID if the arrays break the contract, VALID otherwise (given the hyperparameters).
    A float16 / bfloat16 param takes a gradient of its dtype or float32 and float32 state."""
    low = isinstance(P, np.ndarray) and P.dtype in LOW_PRECISION_DTYPES
    if not isinstance(P, np.ndarray) or (P.dtype not in FLOATS and not low):
        return INVALID
    grad_dtypes = (P.dtype, F4) if low else (P.dtype,)
    state_dtype = F4 if low else P.dtype
    if not isinstance(G, np.ndarray) or G.dtype not in grad_dtypes or G.shape != P.shape:
        return INVALID
    if not isinstance(S, np.ndarray) or S.dtype != state_dtype or S.shape != P.shape:
        return INVALID
    for X, needed in ((B, hyper.uses_momentum), (A, hyper.centered)):
        if needed != (X is not None):
            return INVALID
        if X is not None and (not isinstance(X, np.ndarray) or X.dtype != state_dtype
                              or X.shape != P.shape):
            return INVALID
    for X in (P, S, B, A):
        if X is not None and not X.flags.writeable:
            return INVALID
    present = [X for X in (P, G, S, B, A) if X is not None and X.size]
    for i, X in enumerate(present):
        for Y in present[i + 1:]:
            if np.shares_memory(X, Y):
                return INVALID
    return VALID


def copies(*arrays):
    return [np.array(x, copy=True) if isinstance(x, np.ndarray) else None for x in arrays]


def check_update_success(label, hyper, P, G, S, B, A, before):
    P0, G0, S0, B0, A0 = before
    coeffs = quiet(lambda: fastrms.kernel_coefficients(P0.dtype, **{
        k: v for k, v in hyper.values.items() if k in NUMERIC + FLAGS and v is not MISSING}))
    if P0.dtype in LOW_PRECISION_DTYPES:
        p, s, b, a, _ = quiet(lambda: reference_step_low_precision(coeffs, P0, G0, S0, B0, A0))
    else:
        p, s, b, a = quiet(lambda: reference_step(coeffs, P0, G0, S0, B0, A0))
    assert_bits_equal(P, p, f"{label}: param")
    assert_bits_equal(S, s, f"{label}: square_avg")
    if b is not None:
        assert_bits_equal(B, b, f"{label}: momentum_buffer")
    if a is not None:
        assert_bits_equal(A, a, f"{label}: grad_avg")
    assert np.array(G).tobytes() == G0.tobytes(), f"{label}: grad was written"


def run_update(test, backend, hyper: Hyper, arrays, arena, expected, label, via="kwarg",
               extra=None):
    """One guarded rmsprop_update call, checked against the oracle and the reference.
    ``arrays``: (P, G, S, B, A); B / A are passed when not None."""
    P, G, S, B, A = arrays
    kwargs = hyper.kwargs()
    kwargs.update(extra or {})
    if B is not None:
        kwargs["momentum_buffer"] = B
    if A is not None:
        kwargs["grad_avg"] = A
    before = copies(P, G, S, B, A)
    snapshot = arena.snapshot()
    ignore = isinstance(P, np.ndarray) and hyper.cast_overflow(P.dtype)
    if ignore and expected != INVALID:
        expected = EITHER
        event("known bug B2 (float32 coefficient overflow warning) tolerated")

    def call():
        if via == "context":
            with fastrms.use_backend(backend):
                fastrms.rmsprop_update(P, G, S, **kwargs)
        elif via == "backend-argument":
            fastrms.rmsprop_update(P, G, S, **kwargs)  # kwargs holds a hostile backend
        else:
            fastrms.rmsprop_update(P, G, S, backend=backend, **kwargs)

    exc = guarded(call, ignore_cast_overflow=ignore)
    if exc is not None:
        record(test, backend, outcome_name(exc))
        assert expected != VALID, f"{label}: a valid call raised {type(exc).__name__}: {exc}"
        arena.assert_untouched(snapshot, f"{label}: after {type(exc).__name__}: {exc}")
        return
    record(test, backend, "success")
    assert expected != INVALID, f"{label}: an invalid call succeeded"
    check_update_success(label, hyper, P, G, S, B, A, before)
    arena.assert_written_only(snapshot, [P, S, B, A], label)


# ------------------------------------------------------------------------------------------
# rmsprop_update: views of shared buffers, strides, misalignment, mutations

STREAMS = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")


@HYPOTHESIS
@given(data=st.data())
def test_update_hostile_views(backend, data):
    """param, grad and state as views of one base buffer -- overlapping, interleaved (sharing
    no element) or identical -- or of private buffers, with random steps (negative too),
    transposes, Fortran order, misalignment (1..4 bytes), sizes 0 and 1, 0-d arrays, a benign
    subclass, broadcast (zero-stride) gradients and NaN/inf/subnormal values; in some examples
    faults: a read-only output, a hostile dtype, a wrong shape, a non-array, a missing or
    unexpected optional buffer, or one hostile hyperparameter."""
    test = "test_update_hostile_views"
    arena = Arena(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    n_faults = data.draw(st.sampled_from([0, 0, 0, 1, 1, 2]), label="n_faults")
    faults = data.draw(st.permutations(["overlap", "readonly", "dtype", "shape", "nonarray",
                                        "buffers", "hyper"]), label="faults")[:n_faults]
    values, full = data.draw(hyperparameters(st.just(1 if "hyper" in faults else 0)))
    hyper = Hyper(full)
    dtype = data.draw(st.sampled_from([F4, F4, F8, F8, F4_META, F8_META]), label="dtype")
    shape = data.draw(SHAPES, label="shape")
    layouts = [data.draw(LAYOUT, label=f"layout_{name}") for name in STREAMS]
    if "overlap" in faults:
        # two streams surely share memory (unless empty): the same view, or views from the
        # same start with their own steps, orders, transposes and misalignments
        mode = data.draw(st.sampled_from(["random", "random", "same"]), label="mode")
        owners = data.draw(st.lists(st.sampled_from(["private", "shared"]),
                                    min_size=5, max_size=5), label="owners")
        pair = data.draw(st.permutations(range(5)), label="overlapping pair")[:2]
        for k in pair:
            owners[k] = "shared"
        if mode == "random":  # both start at the middle element, each with its own step
            shift = data.draw(st.sampled_from([0, 0, 1, 2]), label="misalign shift")
            layouts[pair[0]] = dict(layouts[pair[0]], anchor=True)
            layouts[pair[1]] = dict(layouts[pair[1]], anchor=True,
                                    misalign=layouts[pair[0]]["misalign"] + shift)
    else:
        mode = "interleave"
        owners = data.draw(st.lists(st.sampled_from(["private", "shared"]), min_size=5,
                                    max_size=5), label="owners")
    common_misalign = data.draw(st.sampled_from([0, 0, 0, 1, 3]), label="common_misalign")
    shared = arena.owner(SHARED_BYTES, dtype)
    slots = [k for k in range(5) if owners[k] == "shared"]
    streams = []
    for k, name in enumerate(STREAMS):
        layout = layouts[k]
        if owners[k] == "shared":
            view = make_view(shared, dtype, shape, layout, slots.index(k), len(slots), mode,
                             common_misalign, arena.rng)
        else:
            view = arena.array(shape, dtype, layout)
        if name == "grad":
            how = data.draw(st.sampled_from(["as-is"] * 6 + ["broadcast", "readonly"]))
            if how == "broadcast":
                small = tuple(1 if data.draw(st.booleans()) else d for d in shape)
                view = np.broadcast_to(arena.array(small, dtype, layout), shape)
            elif how == "readonly":
                view = readonly_view(view)
        streams.append(view)
    targets = st.sampled_from([0, 1, 2, 3, 4])
    if "readonly" in faults:
        k = data.draw(st.sampled_from([0, 2, 3, 4]), label="readonly target")
        streams[k] = readonly_view(streams[k])
    if "dtype" in faults:
        k = data.draw(targets, label="dtype target")
        bad = data.draw(st.sampled_from((PARAM_HOSTILE_DTYPES if k == 0 else HOSTILE_DTYPES)
                                        + [other_float(dtype)]), label="bad dtype")
        streams[k] = arena.array(shape, bad, data.draw(LAYOUT) if bad.kind != "O" else None)
    if "shape" in faults:
        k = data.draw(targets, label="shape target")
        other = data.draw(SHAPES, label="bad shape")
        streams[k] = arena.array(other if other != shape else shape + (1,), dtype,
                                 data.draw(LAYOUT))
    if "nonarray" in faults:
        k = data.draw(targets, label="nonarray target")
        streams[k] = non_array(data.draw(st.sampled_from(NON_ARRAY_KINDS)), streams[k])
    P, G, S, B, A = streams
    pass_b, pass_a = hyper.uses_momentum, hyper.centered
    if "buffers" in faults:
        if data.draw(st.booleans()):
            pass_b = not pass_b
        else:
            pass_a = not pass_a
    B = B if pass_b else None
    A = A if pass_a else None
    expected = hyper.status
    if expected != INVALID:
        expected = max(expected, array_status(P, G, S, B, A, hyper))
    via = data.draw(st.sampled_from(["kwarg", "kwarg", "context"]), label="via")
    run_update(test, backend, hyper, (P, G, S, B, A), arena, expected,
               f"{backend} {dtype} {shape} mode={mode} faults={faults}", via=via)


# ------------------------------------------------------------------------------------------
# rmsprop_update: hostile hyperparameters


def float_elements(dtype):
    # No NaN here: a NaN anywhere in an hnp.arrays elements strategy makes Hypothesis's
    # generation depend on NaN's identity-based hash, and derandomized runs stop repeating.
    # float_arrays() puts NaNs in afterwards through a drawn mask.
    width = 32 if np.dtype(dtype) == F4 else 64
    specials = SPECIALS[np.dtype(dtype)]
    return st.one_of(st.floats(width=width, allow_nan=False),
                     st.sampled_from(list(specials[~np.isnan(specials)])))


@st.composite
def float_arrays(draw, dtype, shape):
    """hnp.arrays of float32/float64: normal, huge, subnormal, +-0, +-inf, and NaN (of either
    sign) where a drawn mask says."""
    array = draw(hnp.arrays(dtype, shape, elements=float_elements(dtype)))
    if array.size and draw(st.integers(0, 2)) == 0:
        mask = draw(hnp.arrays(np.bool_, shape))
        array[mask] = -np.nan if draw(st.booleans()) else np.nan
    return array


@HYPOTHESIS
@given(data=st.data())
def test_update_hostile_hyperparameters(backend, data):
    """Zero, negative, NaN, inf, huge (1e300, 1e308, 10**300), subnormal, bool, string,
    bytes, container, numpy-scalar (float16 .. longdouble, ints, uint64 max), 0-d-array,
    complex, Fraction and Decimal hyperparameters, hostile flags (ints, None, strings, numpy
    bools, 0-d arrays), a missing lr, an unknown keyword and hostile backend names; arrays from
    hypothesis.extra.numpy with NaN/inf values."""
    test = "test_update_hostile_hyperparameters"
    arena = Arena(0)
    values, full = data.draw(hyperparameters(st.sampled_from([0, 1, 1, 1, 1, 2, 3])))
    hyper = Hyper(full)
    dtype = data.draw(st.sampled_from([F4, F8]), label="dtype")
    shape = data.draw(SHAPES, label="shape")
    P, G, S, B, A = (data.draw(float_arrays(dtype, shape), label=name) for name in STREAMS)
    for X in (P, G, S, B, A):
        arena.add_array(X)
    B = B if hyper.uses_momentum else None
    A = A if hyper.centered else None
    expected = hyper.status
    extra = {}
    via = data.draw(st.sampled_from(["kwarg"] * 8 + ["context", "unknown-keyword",
                                                     "backend-argument"]), label="via")
    if via == "unknown-keyword":
        extra = {"rho": 0.9}
        expected = INVALID
        via = "kwarg"
    elif via == "backend-argument":
        bad = data.draw(st.sampled_from(["bogus", "C", "", " c", 3, None, []]), label="backend")
        extra = {"backend": bad}
        if bad is not None:
            expected = INVALID
    if expected != INVALID:
        expected = max(expected, array_status(P, G, S, B, A, hyper))
    run_update(test, backend, hyper, (P, G, S, B, A), arena, expected,
               f"{backend} {dtype} {shape} {values!r} {extra!r}", via=via, extra=extra)


# ------------------------------------------------------------------------------------------
# rmsprop_update: hostile dtypes and shapes (hypothesis.extra.numpy arrays)

ANY_DTYPE = st.one_of(
    st.sampled_from([F4, F8]),
    hnp.floating_dtypes(endianness=">", sizes=(32, 64)),
    hnp.floating_dtypes(sizes=(16,)),
    hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.complex_number_dtypes(),
    hnp.boolean_dtypes(), st.just(np.dtype(object)), hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(), hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=2),
    hnp.array_dtypes(subtype_strategy=st.sampled_from([F4, F8]), min_size=1, max_size=2),
    st.sampled_from([F4_META, np.dtype(np.longdouble)]),
)
PARAM_DTYPE = st.one_of(st.sampled_from([F4, F8]), ANY_DTYPE)


@st.composite
def any_array(draw, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype == np.dtype(object):
        return draw(hnp.arrays(object, shape, elements=st.floats(allow_nan=False)))
    if dtype in FLOATS:
        array = draw(float_arrays(dtype, shape))
    elif dtype.kind in "fc":
        array = draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype, allow_nan=False)))
    else:
        array = draw(hnp.arrays(dtype, shape))
    how = draw(st.sampled_from(["as-is", "as-is", "flip", "fortran", "transpose"]))
    if how == "flip" and array.ndim:
        array = np.flip(array, draw(st.integers(0, array.ndim - 1)))  # negative strides
    elif how == "fortran":
        array = np.asfortranarray(array)
    elif how == "transpose" and array.ndim > 1:
        array = np.ascontiguousarray(array.T).T  # same shape, transposed strides
    return array


@HYPOTHESIS
@given(data=st.data())
def test_update_hostile_dtypes_and_shapes(backend, data):
    """Every array drawn with hypothesis.extra.numpy: float16, integers, complex, bool, object,
    datetime/timedelta, bytes/str, big-endian '>f4'/'>f8', structured dtypes, longdouble, a
    float32 with metadata; shapes equal or not; sizes 0 and 1; flipped (negative strides),
    Fortran-ordered and transposed layouts."""
    test = "test_update_hostile_dtypes_and_shapes"
    values, full = data.draw(hyperparameters())
    hyper = Hyper(full)
    pdtype = data.draw(PARAM_DTYPE, label="param dtype")
    shape = data.draw(SHAPES, label="shape")
    arrays = []
    for name in STREAMS:
        dtype = pdtype if name == "param" or data.draw(st.integers(0, 7)) else data.draw(ANY_DTYPE)
        ashape = shape if name == "param" or data.draw(st.integers(0, 7)) else data.draw(SHAPES)
        arrays.append(data.draw(any_array(dtype, ashape), label=name))
    P, G, S, B, A = arrays
    plain = [X for X in arrays if X.dtype != np.dtype(object)]
    objects = [X for X in arrays if X.dtype == np.dtype(object)]
    B = B if hyper.uses_momentum != (data.draw(st.integers(0, 9)) == 0) else None
    A = A if hyper.centered != (data.draw(st.integers(0, 9)) == 0) else None
    expected = hyper.status
    if expected != INVALID:
        expected = max(expected, array_status(P, G, S, B, A, hyper))
    ignore = (P.dtype in FLOATS or P.dtype in LOW_PRECISION_DTYPES) and hyper.cast_overflow(P.dtype)
    if ignore and expected != INVALID:
        expected = EITHER
    kwargs = hyper.kwargs()
    if B is not None:
        kwargs["momentum_buffer"] = B
    if A is not None:
        kwargs["grad_avg"] = A
    before = copies(P, G, S, B, A)
    snapshot = ([X.tobytes() for X in plain], [[id(x) for x in X.flat] for X in objects])
    exc = guarded(lambda: fastrms.rmsprop_update(P, G, S, backend=backend, **kwargs),
                  ignore_cast_overflow=ignore)
    label = f"{backend} dtypes {[x.dtype for x in arrays]} shapes {[x.shape for x in arrays]}"
    if exc is not None:
        record(test, backend, outcome_name(exc))
        assert expected != VALID, f"{label}: valid call raised {exc!r}"
        for X, b in zip(plain, snapshot[0]):
            assert X.tobytes() == b, f"{label}: an array changed after {exc!r}"
        for X, ids in zip(objects, snapshot[1]):
            assert [id(x) for x in X.flat] == ids, f"{label}: an object array changed"
        return
    record(test, backend, "success")
    assert expected != INVALID, f"{label}: invalid call succeeded"
    check_update_success(label, hyper, P, G, S, B, A, before)


# ------------------------------------------------------------------------------------------
# the optimizer: oracle helpers


def opt_group_status(hyper: dict, dtypes) -> tuple[int, bool]:
    """(status, cast overflow predicted) for one group's effective hyperparameters at
    construction (an lr schedule is checked at step time)."""
    values = {k: hyper.get(k, MISSING) for k in NUMERIC + FLAGS}
    if callable(values["lr"]):
        values["lr"] = 0.0
    h = Hyper(values)
    initial = hyper.get("initial_square_avg", MISSING)
    istatus, ifloat = number_status(initial) if initial is not MISSING else (INVALID, None)
    status = max(h.status, istatus)
    # Construction checks the hyperparameters in float64 and initial_square_avg per dtype.
    overflow = status != INVALID and (
        (any(np.dtype(d) == F4 for d in dtypes) and ifloat is not None
         and coefficient_overflow([ifloat]))
        or h.cast_overflow(F8) or any(h.cast_overflow(d) for d in dtypes))
    return status, overflow


def step_group_status(group: dict, step_number: int, dtypes) -> tuple[int, bool]:
    """The same at step time: lr may be a schedule; initial_square_avg is not re-read."""
    values = {k: group[k] for k in NUMERIC + FLAGS}
    if callable(values["lr"]):
        values["lr"] = values["lr"](step_number)
    h = Hyper(values)
    overflow = h.status != INVALID and any(h.cast_overflow(d) for d in dtypes)
    return h.status, overflow


def effective_hyper(preset, top: dict, group: dict) -> dict:
    out = dict(PRESETS[preset or "torch"].defaults())
    out.update(top)
    out.update(group)
    return out


def params_disjoint(params) -> bool:
    present = [p for p in params if p.size]
    return not any(np.shares_memory(a, b) for i, a in enumerate(present) for b in present[i + 1:])


def state_snapshot(opt):
    return [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
            for entry in opt.state]


def assert_optimizers_equal(opt, ref, params, ref_params, label):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_bits_equal(np.asarray(p), q, f"{label}: param {i}")
    got, want = opt.state, ref.state
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"{label}: state {i} keys {set(g)} != {set(w)}"
        assert g["step"] == w["step"], f"{label}: state {i} step"
        for name in ("square_avg", "momentum_buffer", "grad_avg"):
            if name in w:
                assert_bits_equal(g[name], w[name], f"{label}: state {i} {name}")


def draw_opt_value(data, name, hostile=False):
    if hostile:
        return data.draw(st.sampled_from(HOSTILE_FLAGS if name in FLAGS else HOSTILE_NUMBERS),
                         label=f"hostile {name}")
    if name in FLAGS:
        return data.draw(NESTEROV_VALID if name == "nesterov" else st.booleans(), label=name)
    return data.draw(VALID_NUMBER[name], label=name)


def draw_valid_options(data, where):
    """A few valid hyperparameters (each key present with probability 1/4)."""
    out = {}
    for name in OPT_KEYS:
        if data.draw(st.integers(0, 3), label=f"{where} has {name}") == 0:
            out[name] = draw_opt_value(data, name)
    if out.get("nesterov") and not out.get("momentum"):
        out["momentum"] = 0.9
    return out


def draw_params(data, arena, count, mode):
    """Parameters as views, each private or on one shared owner: mode "interleave" (disjoint),
    "random" or "same" (overlapping, mostly)."""
    common = data.draw(st.sampled_from([0, 0, 1]), label="common misalign")
    shared_dtype = data.draw(st.sampled_from([F4, F8]), label="shared dtype")
    shared = arena.owner(SHARED_BYTES, shared_dtype)
    specs = []
    for k in range(count):
        dtype = data.draw(st.sampled_from([F4, F4, F8, F4_META]), label=f"p{k} dtype")
        shape = data.draw(SHAPES, label=f"p{k} shape")
        layout = data.draw(LAYOUT, label=f"p{k} layout")
        on_shared = data.draw(st.booleans(), label=f"p{k} shared")
        specs.append((dtype, shape, layout, on_shared))
    if mode != "interleave" and sum(s[3] for s in specs) < 2 and count >= 2:
        specs = [(d, s, l, True) for d, s, l, _ in specs]
    slots = [k for k, s in enumerate(specs) if s[3]]
    params = []
    for k, (dtype, shape, layout, on_shared) in enumerate(specs):
        if on_shared:  # interleave / same need one element size on the shared buffer
            params.append(make_view(shared, dtype if mode == "random" else shared_dtype, shape,
                                    layout, slots.index(k), len(slots), mode, common, arena.rng))
        else:
            params.append(arena.array(shape, dtype, layout))
    return params


def draw_grad(data, arena, p):
    """A valid gradient for p: fresh, strided, misaligned, broadcast, read-only, a subclass,
    with NaN/inf values."""
    layout = data.draw(LAYOUT, label="grad layout")
    how = data.draw(st.sampled_from(["fresh"] * 5 + ["broadcast", "readonly", "nan"]),
                    label="grad kind")
    if how == "broadcast":
        small = tuple(1 if data.draw(st.booleans()) else d for d in p.shape)
        return np.broadcast_to(arena.array(small, p.dtype, layout), p.shape)
    g = arena.array(p.shape, p.dtype, layout)
    if how == "readonly":
        return readonly_view(g)
    if how == "nan" and g.size:
        where = np.unravel_index(data.draw(st.integers(0, g.size - 1)), g.shape)
        g[where] = [np.nan, np.inf, -np.inf][data.draw(st.integers(0, 2))]
    return g


def build_structure(kind, params, groups_spec):
    """The ``params`` argument of RMSprop for a structure kind, over these param arrays."""
    if kind == "list":
        return list(params)
    if kind == "tuple":
        return tuple(params)
    if kind == "generator":
        return (p for p in params)
    if kind == "groups":
        out = []
        for indices, overrides, form in groups_spec:
            members = [params[i] for i in indices]
            if form == "single" and len(members) == 1 and isinstance(members[0], np.ndarray):
                value = members[0]
            elif form == "tuple":
                value = tuple(members)
            else:
                value = members
            out.append(dict(overrides, params=value))
        return out
    raise AssertionError(kind)


HOSTILE_STRUCTURES = {
    "ndarray": lambda params: params[0],
    "dict": lambda params: {"params": params},
    "none": lambda params: None,
    "int": lambda params: 3,
    "empty": lambda params: [],
    "mixed": lambda params: [params[0], {"params": params[1:]}],
    "string": lambda params: "params",
    "group-without-params": lambda params: [{"lr": 0.1}],
    "group-params-int": lambda params: [{"params": 3}],
    "nested-list": lambda params: [list(params)],
}

CONSTRUCTION_FAULTS = ["overlap", "param-dtype", "param-nonarray", "param-readonly",
                       "hyper-top", "hyper-group", "preset", "backend", "unknown-key",
                       "structure", "lr-missing"]


@HYPOTHESIS_OPT
@given(data=st.data())
def test_optimizer_construction_hostile(backend, data):
    """RMSprop construction with hostile params (views sharing elements, hostile dtypes,
    non-arrays, read-only, empty lists), hostile hyperparameters (top level and per group),
    hostile presets, backends, unknown keys and structures; every valid construction (params
    interleaved in one buffer, strided, misaligned, 0-d, empty, mixed dtypes) is then stepped
    and must match RMSprop(backend="numpy") on copies."""
    test = "test_optimizer_construction_hostile"
    arena = Arena(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    n_faults = data.draw(st.sampled_from([0, 0, 0, 1, 1, 2]), label="n_faults")
    faults = data.draw(st.permutations(CONSTRUCTION_FAULTS), label="faults")[:n_faults]
    count = data.draw(st.integers(2 if "overlap" in faults else 1, 4), label="count")
    mode = (data.draw(st.sampled_from(["random", "same"])) if "overlap" in faults
            else "interleave")
    params = draw_params(data, arena, count, mode)
    if "param-dtype" in faults:
        k = data.draw(st.integers(0, count - 1))
        params[k] = arena.array(params[k].shape,
                                data.draw(st.sampled_from(PARAM_HOSTILE_DTYPES)))
    if "param-nonarray" in faults:
        k = data.draw(st.integers(0, count - 1))
        params[k] = non_array(data.draw(st.sampled_from(NON_ARRAY_KINDS)), params[k])
    if "param-readonly" in faults:
        k = data.draw(st.integers(0, count - 1))
        if isinstance(params[k], np.ndarray):
            params[k] = readonly_view(params[k])

    if "preset" in faults:
        preset = data.draw(st.sampled_from(["TORCH", "", "pytorch", 5, [], b"torch"]))
    else:
        preset = data.draw(st.sampled_from([None, None, "torch", "keras", "tf1", "optax"]))
    top = draw_valid_options(data, "top")
    if preset in ("tf1", "optax") and "lr-missing" not in faults and "lr" not in top:
        top["lr"] = draw_opt_value(data, "lr")
    if "lr-missing" in faults:
        preset = data.draw(st.sampled_from(["tf1", "optax"]))
        top.pop("lr", None)
    if "hyper-top" in faults:
        name = data.draw(st.sampled_from(OPT_KEYS))
        top[name] = draw_opt_value(data, name, hostile=True)
    if "unknown-key" in faults and data.draw(st.booleans()):
        top["rho"] = 0.9  # an unknown keyword argument
        faults = [f for f in faults if f != "unknown-key"] + ["unknown-keyword"]

    if "structure" in faults:
        kind = data.draw(st.sampled_from(sorted(HOSTILE_STRUCTURES)), label="structure")
    elif "hyper-group" in faults or "unknown-key" in faults:
        kind = "groups"
    else:
        kind = data.draw(st.sampled_from(["list", "tuple", "generator", "groups", "groups"]),
                         label="structure")
    groups_spec = None
    if kind == "groups":
        n_groups = data.draw(st.integers(1, 3))
        assignment = [data.draw(st.integers(0, n_groups - 1)) for _ in params]
        groups_spec = []
        for g in range(n_groups):
            overrides = draw_valid_options(data, f"group {g}")
            form = data.draw(st.sampled_from(["list", "tuple", "single"]))
            groups_spec.append(([i for i, a in enumerate(assignment) if a == g], overrides, form))
        target = data.draw(st.integers(0, n_groups - 1))
        if "hyper-group" in faults:
            name = data.draw(st.sampled_from(OPT_KEYS))
            groups_spec[target][1][name] = draw_opt_value(data, name, hostile=True)
        if "unknown-key" in faults:
            groups_spec[target][1]["rho"] = 0.9
        group_members = [spec[0] for spec in groups_spec]
        group_overrides = [spec[1] for spec in groups_spec]
    else:
        group_members = [list(range(count))]
        group_overrides = [{}]
    if kind in HOSTILE_STRUCTURES:
        structure = HOSTILE_STRUCTURES[kind](params)
    else:
        structure = build_structure(kind, params, groups_spec)
    backend_arg = backend
    if "backend" in faults:
        backend_arg = data.draw(st.sampled_from(["bogus", "", "C", 7, []]))

    # the oracle
    expected = VALID
    ignore = False
    if (kind in HOSTILE_STRUCTURES or "backend" in faults or "unknown-key" in faults
            or "unknown-keyword" in faults
            or not (preset is None or (isinstance(preset, str) and preset in PRESETS))):
        expected = INVALID
    else:
        for p in params:
            if not isinstance(p, np.ndarray) or p.dtype not in FLOATS or not p.flags.writeable:
                expected = INVALID
        if expected != INVALID and not params_disjoint(params):
            expected = INVALID
        if expected != INVALID:
            for members, overrides in zip(group_members, group_overrides):
                eff = effective_hyper(preset, top, overrides)
                if "lr" not in eff:
                    expected = INVALID
                    break
                status, overflow = opt_group_status(eff, [params[i].dtype for i in members])
                expected = max(expected, status)
                ignore = ignore or overflow
        if expected != INVALID and ignore:
            expected = EITHER
    snapshot = arena.snapshot()
    holder = {}

    def construct():
        holder["opt"] = fastrms.RMSprop(structure, **top, preset=preset, backend=backend_arg)

    exc = guarded(construct, ignore_cast_overflow=ignore)
    label = f"{backend} kind={kind} preset={preset!r} faults={faults} top={top!r}"
    if exc is not None:
        record(test, backend, outcome_name(exc))
        assert expected != VALID, f"{label}: valid construction raised {exc!r}"
        arena.assert_untouched(snapshot, f"{label}: {exc}")
        return
    record(test, backend, "success")
    assert expected != INVALID, f"{label}: invalid construction succeeded"
    arena.assert_untouched(snapshot, f"{label}: construction wrote memory")
    opt = holder["opt"]
    ref_params = [np.array(p, copy=True) for p in params]
    ref = quiet(lambda: fastrms.RMSprop(build_structure(kind, ref_params, groups_spec), **top,
                                        preset=preset, backend="numpy"))
    order = [i for members in group_members for i in members]
    ordered = [params[i] for i in order]
    ordered_ref = [ref_params[i] for i in order]
    step_ignore = ignore or any(  # B2 at step time: float32 coefficients that overflow
        step_group_status(effective_hyper(preset, top, overrides), 1,
                          [params[i].dtype for i in members])[1]
        for members, overrides in zip(group_members, group_overrides))
    for step_index in range(data.draw(st.integers(1, 2), label="steps")):
        grads = [draw_grad(data, arena, p) for p in ordered]
        grad_copies = [np.array(g, copy=True) for g in grads]
        ref_before = [np.array(p, copy=True) for p in ordered_ref]
        snapshot = arena.snapshot()
        exc = guarded(lambda: opt.step(grads), ignore_cast_overflow=step_ignore)
        if exc is not None:
            record(test, backend, "step " + outcome_name(exc))
            assert step_ignore, f"{label}: valid step raised {exc!r}"
            arena.assert_untouched(snapshot, f"{label}: step {exc}")
            return
        record(test, backend, "step success")
        quiet(lambda: ref.step(grad_copies))
        assert_optimizers_equal(opt, ref, ordered, ordered_ref, f"{label} step {step_index}")
        arena.assert_written_only(snapshot, ordered, label)
        if step_index == 0 and preset != "tf1":
            check_first_step_against_reference(
                ref, preset, top, group_members, group_overrides, order, ref_before,
                grad_copies, label)


def check_first_step_against_reference(ref, preset, top, group_members, group_overrides, order,
                                       params0, grads0, label):
    """The oracle optimizer itself, checked once against reference_step: after the first step
    from fresh state (square_avg = initial_square_avg, zero buffers), per parameter."""
    state = ref.state
    for members, overrides in zip(group_members, group_overrides):
        eff = effective_hyper(preset, top, overrides)
        for i in members:
            pos = order.index(i)
            p0, g0 = params0[pos], grads0[pos]
            coeffs = quiet(lambda: fastrms.kernel_coefficients(
                p0.dtype, **{k: eff[k] for k in NUMERIC + FLAGS}))
            s0 = quiet(lambda: np.full(p0.shape, float(eff["initial_square_avg"]), p0.dtype))
            b0 = np.zeros_like(p0) if coeffs.uses_momentum else None
            a0 = np.zeros_like(p0) if coeffs.centered else None
            p, s, b, a = quiet(lambda: reference_step(coeffs, p0, g0, s0, b0, a0))
            assert_bits_equal(np.asarray(state_param(ref, pos)), p,
                              f"{label}: reference param {pos}")
            assert_bits_equal(state[pos]["square_avg"], s, f"{label}: reference square_avg {pos}")
            if b is not None:
                assert_bits_equal(state[pos]["momentum_buffer"], b, f"{label}: reference buffer")
            if a is not None:
                assert_bits_equal(state[pos]["grad_avg"], a, f"{label}: reference grad_avg")


def state_param(opt, pos):
    return [p for group in opt.param_groups for p in group["params"]][pos]


STEP_FAULTS = ["grad-overlaps-param", "grad-overlaps-state", "grad-is-param", "grad-dtype",
               "grad-shape", "grad-nonarray", "container", "count", "hyper"]


@HYPOTHESIS_OPT
@given(data=st.data())
def test_optimizer_step_hostile(backend, data):
    """A valid optimizer over hostile-but-valid params (views of one buffer that interleave,
    negative strides, transposes, misaligned, Fortran, 0-d, empty, mixed dtypes, 1-2 groups,
    every preset), stepped 1-3 times with hostile gradients (wrong counts and containers,
    dtypes, shapes, non-arrays, views overlapping params or optimizer state, the param itself)
    and hostile or valid group changes between steps (lr schedules included); every step is
    compared with RMSprop(backend="numpy") on copies."""
    test = "test_optimizer_step_hostile"
    arena = Arena(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    count = data.draw(st.integers(1, 4), label="count")
    params = draw_params(data, arena, count, "interleave")
    preset = data.draw(st.sampled_from([None, None, "keras", "tf1", "optax"]), label="preset")
    top = draw_valid_options(data, "top")
    top["lr"] = data.draw(VALID_NUMBER["lr"], label="lr")
    n_groups = data.draw(st.integers(1, 2), label="groups")
    assignment = [data.draw(st.integers(0, n_groups - 1)) for _ in params]
    groups_spec = [([i for i, a in enumerate(assignment) if a == g],
                    draw_valid_options(data, f"group {g}") if g else {}, "list")
                   for g in range(n_groups)]
    group_dtypes = [[params[i].dtype for i in members] for members, _, _ in groups_spec]
    build_status, build_overflow = VALID, False
    for (_, overrides, _), dtypes in zip(groups_spec, group_dtypes):
        status, overflow = opt_group_status(effective_hyper(preset, top, overrides), dtypes)
        build_status, build_overflow = max(build_status, status), build_overflow or overflow
    built = {}
    exc = guarded(lambda: built.setdefault("opt", fastrms.RMSprop(
        build_structure("groups", params, groups_spec), **top, preset=preset, backend=backend)),
        ignore_cast_overflow=build_overflow)
    if exc is not None:  # e.g. nesterov from the top level with a group's momentum 0
        record(test, backend, "construction " + outcome_name(exc))
        assert build_status == INVALID or build_overflow, f"valid optimizer raised {exc!r}"
        return
    assert build_status != INVALID, "invalid optimizer constructed"
    opt = built["opt"]
    ref_params = [np.array(p, copy=True) for p in params]
    ref = quiet(lambda: fastrms.RMSprop(build_structure("groups", ref_params, groups_spec), **top,
                                        preset=preset, backend="numpy"))
    order = [i for members, _, _ in groups_spec for i in members]
    ordered = [params[i] for i in order]
    ordered_ref = [ref_params[i] for i in order]
    steps_done = 0

    for step_index in range(data.draw(st.integers(1, 3), label="steps")):
        n_faults = data.draw(st.sampled_from([0, 0, 0, 1, 1, 2]), label="n_faults")
        faults = data.draw(st.permutations(STEP_FAULTS), label="faults")[:n_faults]
        # a change to one group's hyperparameters: valid, or hostile when "hyper" is a fault
        mutated = None
        if "hyper" in faults or data.draw(st.integers(0, 3)) == 0:
            g = data.draw(st.integers(0, n_groups - 1), label="mutated group")
            name = data.draw(st.sampled_from(NUMERIC + FLAGS + ("lr-schedule",)), label="key")
            value = draw_opt_value(data, "lr" if name == "lr-schedule" else name,
                                   hostile="hyper" in faults)
            if name == "lr-schedule":
                name = "lr"
                if isinstance(value, float) and math.isfinite(value) and data.draw(st.booleans()):
                    value = (lambda t, v=value: v / t)
                else:
                    value = (lambda t, v=value: v)
            mutated = (g, name, opt.param_groups[g][name])
            opt.param_groups[g][name] = value
            ref.param_groups[g][name] = value
        # gradients
        written = list(ordered) + [b for fs in opt.flat_state()
                                   for b in (fs["square_avg"], fs["momentum_buffer"],
                                             fs["grad_avg"]) if b is not None]
        grads = [draw_grad(data, arena, p) for p in ordered]
        k = data.draw(st.integers(0, count - 1), label="faulty grad")
        p = ordered[k]
        if "grad-overlaps-param" in faults and p.size:
            j = data.draw(st.integers(0, count - 1), label="overlapped param")
            q = np.asarray(ordered[j])
            if q.size >= p.size and q.dtype == p.dtype and q.flags.c_contiguous:
                # a window of another param (or of p itself), reshaped: a view
                grads[k] = q.reshape(-1)[:p.size].reshape(p.shape)
            else:
                grads[k] = readonly_view(np.asarray(p))
        if "grad-overlaps-state" in faults:
            entry = opt.state[k]
            names = [n for n in ("square_avg", "momentum_buffer", "grad_avg") if n in entry]
            grads[k] = entry[data.draw(st.sampled_from(names), label="state name")]
        if "grad-is-param" in faults:
            grads[k] = p
        if "grad-dtype" in faults:
            bad = data.draw(st.sampled_from(HOSTILE_DTYPES + [other_float(p.dtype)]))
            grads[k] = arena.array(p.shape, bad)
        if "grad-shape" in faults:
            other = data.draw(SHAPES, label="bad shape")
            grads[k] = arena.array(other if other != p.shape else p.shape + (1,), p.dtype)
        if "grad-nonarray" in faults:
            grads[k] = non_array(data.draw(st.sampled_from(NON_ARRAY_KINDS)), p)
        if "container" in faults:
            container = data.draw(st.sampled_from(["ndarray", "none", "int", "dict", "string"]))
        elif "count" in faults:
            container = data.draw(st.sampled_from(["fewer", "more", "empty"]))
        else:
            container = data.draw(st.sampled_from(["list", "list", "tuple", "generator"]))
        argument = {
            "list": lambda: list(grads), "tuple": lambda: tuple(grads),
            "generator": lambda: (x for x in grads), "ndarray": lambda: np.zeros(len(grads)),
            "none": lambda: None, "int": lambda: len(grads), "string": lambda: "g" * len(grads),
            "dict": lambda: {i: x for i, x in enumerate(grads)},
            "fewer": lambda: grads[:-1], "more": lambda: grads + [grads[-1]], "empty": lambda: [],
        }[container]()
        # the oracle
        expected = VALID
        ignore = False
        if container not in ("list", "tuple", "generator"):
            expected = INVALID
        for g, q in zip(grads, ordered):
            if not isinstance(g, np.ndarray) or g.dtype != q.dtype or g.shape != q.shape:
                expected = INVALID
            elif g.size and any(np.shares_memory(g, w) for w in written if w.size):
                expected = INVALID
        for gi, group in enumerate(opt.param_groups):
            if group_dtypes[gi]:
                status, overflow = step_group_status(group, steps_done + 1, group_dtypes[gi])
                expected = max(expected, status)
                ignore = ignore or (overflow and status != INVALID)
        if ignore and expected != INVALID:
            expected = EITHER
        grad_copies = [np.array(g, copy=True) if isinstance(g, np.ndarray) else None
                       for g in grads]
        snapshot = arena.snapshot()
        state_before = state_snapshot(opt)
        label = (f"{backend} step {step_index} container={container} faults={faults} "
                 f"mutated={mutated!r}")
        exc = guarded(lambda: opt.step(argument), ignore_cast_overflow=ignore)
        if exc is not None:
            record(test, backend, outcome_name(exc))
            assert expected != VALID, f"{label}: valid step raised {exc!r}"
            arena.assert_untouched(snapshot, f"{label}: {exc}")
            assert state_snapshot(opt) == state_before, f"{label}: state changed after {exc!r}"
            if mutated is not None:  # undo the change, so that later steps can run
                g, name, old = mutated
                opt.param_groups[g][name] = old
                ref.param_groups[g][name] = old
            continue
        record(test, backend, "success")
        assert expected != INVALID, f"{label}: invalid step succeeded"
        steps_done += 1
        quiet(lambda: ref.step(grad_copies))
        assert_optimizers_equal(opt, ref, ordered, ordered_ref, label)
        arena.assert_written_only(snapshot, ordered, label)


# ------------------------------------------------------------------------------------------
# Bugs this suite found, now fixed; each test keeps the contract: TypeError/ValueError with
# nothing written, or success with the reference's bits, and no warning.


def accepted_or_reference(call, P, G, S, hyper_kwargs, label, B=None, A=None):
    before = copies(P, G, S, B, A)
    exc = guarded(call)
    if exc is not None:
        for x, x0 in zip((P, G, S, B, A), before):
            if x is not None:
                assert np.array(x).tobytes() == x0.tobytes(), f"{label}: written before {exc!r}"
        return
    full = dict(DEFAULTS, **hyper_kwargs)
    check_update_success(label, Hyper(full), P, G, S, B, A, before)


# B1: _coefficients._check_real calls float(value) on any numbers.Real, and
# optimizer._check_hyperparameters calls math.isfinite(initial_square_avg): a Python int or
# Fraction beyond float range (lr=10**400) escapes as OverflowError.
B1 = "B1: int/Fraction beyond float range -> OverflowError, not TypeError/ValueError"


@pytest.mark.parametrize("value", [10 ** 400, fractions.Fraction(10 ** 400, 3)],
                         ids=["int-10**400", "Fraction"])
@pytest.mark.parametrize("name", NUMERIC)
def test_bug_huge_int_hyperparameter_update(backend, name, value):
    kwargs = {"lr": 0.01, name: value}
    P, G, S = (np.ones(4, np.float32) for _ in range(3))
    accepted_or_reference(lambda: fastrms.rmsprop_update(P, G, S, backend=backend, **kwargs),
                          P, G, S, kwargs, name)


@pytest.mark.parametrize("name", ["lr", "initial_square_avg"])
def test_bug_huge_int_hyperparameter_optimizer(backend, name):
    P = np.ones(4, np.float32)
    before = P.tobytes()
    guarded(lambda: fastrms.RMSprop([P], backend=backend, **{name: 10 ** 400}))
    assert P.tobytes() == before


# B2: a valid, finite hyperparameter whose float32 coefficient overflows (lr, eps,
# weight_decay, momentum > 3.4e38, or 1 - lr*weight_decay < -3.4e38) makes
# _coefficients._compute's astype(float32) emit "RuntimeWarning: overflow encountered in cast";
# so does np.full in _Bucket.allocate for initial_square_avg > 3.4e38 with float32 params. By
# default the call then succeeds with inf coefficients; under -W error it raises RuntimeWarning.
B2 = "B2: float32 coefficient overflow -> 'RuntimeWarning: overflow encountered in cast'"


@pytest.mark.parametrize("kwargs", [{"lr": 1e300}, {"lr": 0.01, "eps": 1e39},
                                    {"lr": 0.01, "momentum": 1e300},
                                    {"lr": 0.01, "weight_decay": 1e39},
                                    {"lr": 1e20, "weight_decay": 1e20}],
                         ids=["lr", "eps", "momentum", "weight_decay", "decay-product"])
def test_bug_float32_coefficient_overflow_warning_update(backend, kwargs):
    P, G, S = np.ones(4, np.float32), np.full(4, 0.5, np.float32), np.zeros(4, np.float32)
    B = np.zeros(4, np.float32) if kwargs.get("momentum") else None
    extra = {"momentum_buffer": B} if B is not None else {}
    accepted_or_reference(
        lambda: fastrms.rmsprop_update(P, G, S, backend=backend, **kwargs, **extra),
        P, G, S, kwargs, str(kwargs), B=B)


@pytest.mark.parametrize("where", ["initial_square_avg", "lr-at-step"])
def test_bug_float32_coefficient_overflow_warning_optimizer(backend, where):
    P = np.ones(4, np.float32)
    if where == "initial_square_avg":
        guarded(lambda: fastrms.RMSprop([P], initial_square_avg=1e300, backend=backend))
    else:
        opt = fastrms.RMSprop([P], lr=1e300, backend=backend)
        guarded(lambda: opt.step([np.full(4, 0.5, np.float32)]))


# B3: ndarray subclasses pass every check (isinstance), but only the C backend treats them as
# plain memory. The numpy backend runs reference_step on the subclass itself: np.matrix's `*`
# is a matrix product and MaskedArray arithmetic keeps masked data, so its results differ from
# the C backend's and the reference's. The numba backend raises numba's TypingError for
# np.matrix (reshape(-1) keeps it 2-D), and NumbaTypeError for a MaskedArray in a fresh process
# (neither is a TypeError); once any ndarray subclass has been typed, numba's typecode cache
# lets MaskedArrays through, so the MaskedArray case runs in a fresh interpreter.
B3 = "B3: ndarray subclass (np.matrix / MaskedArray) wrong results (numpy) or numba errors"


def _b3_cases():
    return [pytest.param(name, id=name) for name in BACKENDS]


def _matrix(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(a)


_MASKED_CODE = textwrap.dedent("""
    import warnings
    import numpy as np
    import fastrms
    from fastrms.backends.numpy_reference import reference_step
    warnings.simplefilter("error")
    base = (np.arange(9, dtype=np.float32).reshape(3, 3) - 4) / 3
    P, S = base.copy(), np.ones((3, 3), np.float32)
    G = np.ma.array(base * 2, mask=np.eye(3, dtype=bool))
    P0, G0, S0 = np.array(P), np.array(G), np.array(S)
    try:
        fastrms.rmsprop_update(P, G, S, lr=0.1, backend=BACKEND)
    except (TypeError, ValueError):
        assert P.tobytes() == P0.tobytes() and S.tobytes() == S0.tobytes()
    else:
        p, s, _, _ = reference_step(fastrms.kernel_coefficients(np.float32, lr=0.1), P0, G0, S0)
        assert P.tobytes() == p.tobytes() and S.tobytes() == s.tobytes(), (P, p)
""")


@pytest.mark.parametrize("name", _b3_cases())
@pytest.mark.parametrize("kind", ["matrix", "masked-grad"])
def test_bug_ndarray_subclass_update(name, kind):
    require_backend(name)
    if kind == "masked-grad":
        run_python(_MASKED_CODE.replace("BACKEND", repr(name)), timeout=120)
        return
    base = (np.arange(9, dtype=np.float32).reshape(3, 3) - 4) / 3
    P, G, S = _matrix(base.copy()), _matrix(base * 2), _matrix(np.ones((3, 3), np.float32))
    accepted_or_reference(lambda: fastrms.rmsprop_update(P, G, S, lr=0.1, backend=name),
                          P, G, S, {"lr": 0.1}, f"{name} {kind}")


@pytest.mark.parametrize("name", _b3_cases())
def test_bug_ndarray_subclass_optimizer(name):
    require_backend(name)
    base = (np.arange(9, dtype=np.float32).reshape(3, 3) - 4) / 3
    P, G = _matrix(base.copy()), _matrix(base * 2)
    ref_p = base.copy()
    ref = fastrms.RMSprop([ref_p], lr=0.1, backend="numpy")
    ref.step([np.array(G)])
    opt = fastrms.RMSprop([P], lr=0.1, backend=name)
    before = np.array(P)
    exc = guarded(lambda: opt.step([G]))
    if exc is None:
        assert_bits_equal(np.asarray(P), ref_p, f"{name} matrix param")
    else:
        assert np.asarray(P).tobytes() == before.tobytes()


# B4: an output that overlaps itself (a writeable zero-stride view, made with
# np.lib.stride_tricks.as_strided(..., writeable=True)) is accepted: check_no_overlap and
# _check_params_disjoint compare different arrays only. The update runs on a gathered copy and
# the scatter back keeps the last element's value, so the call succeeds with results no
# reference gives (it should raise ValueError).
B4 = "B4: self-overlapping (zero-stride) output accepted; silently wrong results"


def _zero_stride(n=5):
    buf = np.zeros(8, np.float32)
    return np.lib.stride_tricks.as_strided(buf, shape=(n,), strides=(0,), writeable=True)


@pytest.mark.parametrize("which", ["param", "square_avg"])
def test_bug_self_overlapping_output_update(backend, which):
    alias = _zero_stride()
    G = np.arange(5, dtype=np.float32)
    P = alias if which == "param" else np.zeros(5, np.float32)
    S = alias if which == "square_avg" else np.zeros(5, np.float32)
    accepted_or_reference(lambda: fastrms.rmsprop_update(P, G, S, lr=0.1, backend=backend),
                          P, G, S, {"lr": 0.1}, which)


def test_bug_self_overlapping_param_optimizer(backend):
    P = _zero_stride()
    G = np.arange(5, dtype=np.float32)
    ref_p = np.array(P)
    ref = fastrms.RMSprop([ref_p], lr=0.1, backend="numpy")
    ref.step([G.copy()])
    holder = {}
    if guarded(lambda: holder.setdefault("opt", fastrms.RMSprop([P], lr=0.1, backend=backend))):
        return  # rejected at construction: fixed
    if guarded(lambda: holder["opt"].step([G])) is None:
        assert_bits_equal(np.array(P), ref_p, "zero-stride param")
