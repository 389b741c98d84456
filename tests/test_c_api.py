"""The C API for other compiled extensions: ``fastrms.get_include()`` and ``fastrms._C_API``.

A small extension is built at test time against fastrms/include/fastrms/fastrms_api.h (cffi,
in a temporary directory, in a subprocess under a timeout). It gets the table with
``fastrms_import_api()`` and runs training steps in a C loop through it, with no Python in
between: the bits must be the NumPy reference's. Its header-only coefficient function must give
``fastrms.kernel_coefficients``' bits, flags and refusals on every input Hypothesis draws
(it is compiled with the compiler's default floating-point contraction and, where the CPU has
it, FMA, so a fused ``1 - lr * weight_decay`` would show). Bad input through the table
(overlap, misalignment, bad flags, NULL buffers) returns the documented codes and writes
nothing. The table itself is read with ctypes too: its version, size and every address.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrms
from fastrms import _c_api, _coefficients

from rms_helpers import (ALL_COMBOS, assert_state_bits_equal, copy_state, make_problem,
                         reference_update, require_backend, run_python)

HEADER = f"{fastrms.get_include()}/fastrms/fastrms_api.h"

EXTENSION_SOURCE = r"""
#include <Python.h>
#include <string.h>
#include "fastrms/fastrms_api.h"

static const struct fastrms_api *api;
static char import_error[512];

int load_api(void) {
    PyGILState_STATE gil = PyGILState_Ensure();
    api = fastrms_import_api();
    if (api == NULL) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        const char *utf8 = text ? PyUnicode_AsUTF8(text) : "unknown error";
        strncpy(import_error, utf8 ? utf8 : "?", sizeof(import_error) - 1);
        Py_XDECREF(text); Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(traceback);
    }
    PyGILState_Release(gil);
    return api ? 0 : -1;
}
const char *load_error(void) { return import_error; }
unsigned table_version(void) { return api->version; }
unsigned table_size(void) { return api->size; }
size_t header_table_size(void) { return sizeof(struct fastrms_api); }
int header_version(void) { return FASTRMS_API_VERSION; }
int has_last_entry(void) { return FASTRMS_API_HAS(api, parallel_threshold); }
const void *entry(size_t k) { return ((void *const *)((const char *)api + 2 * sizeof(unsigned)))[k]; }

int coefficients_f32(const struct fastrms_hyperparameters *h, float out[10], unsigned *flags) {
    struct fastrms_coeffs_f32 c;
    const int status = fastrms_api_coefficients_f32(h, &c, flags);
    if (status == FASTRMS_OK) memcpy(out, &c, sizeof c);
    return status;
}
int coefficients_f64(const struct fastrms_hyperparameters *h, double out[10], unsigned *flags) {
    struct fastrms_coeffs_f64 c;
    const int status = fastrms_api_coefficients_f64(h, &c, flags);
    if (status == FASTRMS_OK) memcpy(out, &c, sizeof c);
    return status;
}

/* A training loop in C: `steps` gradients, one after another, n elements each. */
int train_f32(const struct fastrms_hyperparameters *h, float *param, const float *grads,
              size_t steps, float *square_avg, float *momentum_buffer, float *grad_avg,
              size_t n) {
    struct fastrms_coeffs_f32 c;
    unsigned flags;
    int status = fastrms_api_coefficients_f32(h, &c, &flags);
    for (size_t k = 0; k < steps && status == FASTRMS_OK; ++k)
        status = api->update_f32(&c, flags, param, grads + k * n, square_avg, momentum_buffer,
                                 grad_avg, n);
    return status;
}
int train_f64(const struct fastrms_hyperparameters *h, double *param, const double *grads,
              size_t steps, double *square_avg, double *momentum_buffer, double *grad_avg,
              size_t n) {
    struct fastrms_coeffs_f64 c;
    unsigned flags;
    int status = fastrms_api_coefficients_f64(h, &c, &flags);
    for (size_t k = 0; k < steps && status == FASTRMS_OK; ++k)
        status = api->update_f64(&c, flags, param, grads + k * n, square_avg, momentum_buffer,
                                 grad_avg, n);
    return status;
}
int update_f32(const struct fastrms_coeffs_f32 *c, unsigned flags, float *p, const float *g,
               float *s, float *b, float *a, size_t n) {
    return api->update_f32(c, flags, p, g, s, b, a, n);
}
int update_multi_f64(const struct fastrms_coeffs_f64 *c, unsigned flags, double **p,
                     double **g, double **s, size_t *lengths, size_t count) {
    return api->update_multi_f64(c, flags, p, g, s, NULL, NULL, lengths, count);
}
int all_finite_f32(const float *g, size_t n, float scale) { return api->all_finite_f32(g, n, scale); }
int simd_level(void) { return api->simd_level(); }
int get_num_threads(void) { return api->get_num_threads(); }
size_t parallel_threshold(void) { return api->parallel_threshold(); }
"""

EXTENSION_CDEF = r"""
struct fastrms_hyperparameters {
    double lr, alpha, eps, weight_decay, momentum, grad_scale;
    int centered, maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay;
};
struct fastrms_coeffs_f32 { float alpha, one_minus_alpha, eps, neg_lr, lr, weight_decay, momentum,
    decay, grad_scale, grad_scale_inverse; };
struct fastrms_coeffs_f64 { double alpha, one_minus_alpha, eps, neg_lr, lr, weight_decay, momentum,
    decay, grad_scale, grad_scale_inverse; };
int load_api(void);
const char *load_error(void);
unsigned table_version(void);
unsigned table_size(void);
size_t header_table_size(void);
int header_version(void);
int has_last_entry(void);
const void *entry(size_t k);
int coefficients_f32(const struct fastrms_hyperparameters *h, float out[10], unsigned *flags);
int coefficients_f64(const struct fastrms_hyperparameters *h, double out[10], unsigned *flags);
int train_f32(const struct fastrms_hyperparameters *h, float *param, const float *grads,
              size_t steps, float *square_avg, float *momentum_buffer, float *grad_avg, size_t n);
int train_f64(const struct fastrms_hyperparameters *h, double *param, const double *grads,
              size_t steps, double *square_avg, double *momentum_buffer, double *grad_avg,
              size_t n);
int update_f32(const struct fastrms_coeffs_f32 *c, unsigned flags, float *p, const float *g,
               float *s, float *b, float *a, size_t n);
int update_multi_f64(const struct fastrms_coeffs_f64 *c, unsigned flags, double **p,
                     double **g, double **s, size_t *lengths, size_t count);
int all_finite_f32(const float *g, size_t n, float scale);
int simd_level(void);
int get_num_threads(void);
size_t parallel_threshold(void);
#define FASTRMS_BAD_LR ...
#define FASTRMS_BAD_ALPHA ...
#define FASTRMS_BAD_EPS ...
#define FASTRMS_BAD_WEIGHT_DECAY ...
#define FASTRMS_BAD_MOMENTUM ...
#define FASTRMS_BAD_NESTEROV ...
#define FASTRMS_BAD_GRAD_SCALE ...
#define FASTRMS_COEFFICIENT_OVERFLOW ...
#define FASTRMS_BAD_FLAGS ...
#define FASTRMS_NULL_BUFFER ...
#define FASTRMS_OVERLAP ...
#define FASTRMS_MISALIGNED ...
#define FASTRMS_BAD_SCALE ...
#define FASTRMS_API_VERSION ...
"""

BUILD_SCRIPT = r"""
import sys, cffi
out_dir, include, cdef, source, fma = sys.argv[1:6]
builder = cffi.FFI()
builder.cdef(open(cdef).read())
# The compiler's default contraction (GCC: fused where it can), plus FMA where the CPU has it.
builder.set_source("fastrms_api_user", open(source).read(), include_dirs=[include],
                   extra_compile_args=["-O2"] + (["-mfma"] if fma == "1" else []))
print(builder.compile(tmpdir=out_dir))
"""


def _cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " fma " in cpuinfo.read()
    except OSError:
        return False


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """The test extension, built once against the header and imported here."""
    require_backend("c")
    pytest.importorskip("cffi")
    build = tmp_path_factory.mktemp("c_api_extension")
    (build / "cdef.h").write_text(EXTENSION_CDEF)
    (build / "source.c").write_text(EXTENSION_SOURCE)
    proc = run_python(None, args=("-c", BUILD_SCRIPT, str(build), fastrms.get_include(),
                                  str(build / "cdef.h"), str(build / "source.c"),
                                  "1" if _cpu_has_fma() else "0"), timeout=600)
    library = proc.stdout.strip().splitlines()[-1]
    spec = importlib.util.spec_from_file_location("fastrms_api_user", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.lib.load_api() == 0, module.ffi.string(module.lib.load_error()).decode()
    return module


# --------------------------------------------------------------------------------------------
# the table


def test_get_include_holds_the_headers():
    assert HEADER.startswith(fastrms.get_include())
    with open(HEADER) as header:
        assert "struct fastrms_api" in header.read()
    with open(f"{fastrms.get_include()}/fastrms/fastrms.h") as kernel_header:
        assert "fastrms_update_f32" in kernel_header.read()


def test_header_declares_the_entries_in_the_table_order():
    text = open(HEADER).read()
    body = text[text.index("struct fastrms_api {"):text.index("};", text.index("struct fastrms_api {"))]
    assert re.findall(r"\(\*(\w+)\)\(", body) == list(_c_api.ENTRIES)
    assert re.search(r"#define FASTRMS_API_VERSION (\d+)", text).group(1) == str(_c_api.API_VERSION)
    assert re.search(r'#define FASTRMS_API_CAPSULE "([^"]+)"', text).group(1) == \
        _c_api.CAPSULE_NAME.decode()


def test_capsule_holds_the_c_backend_addresses():
    require_backend("c")
    from fastrms.backends import c_backend

    capsule = fastrms._C_API
    assert fastrms._C_API is capsule
    assert type(capsule).__name__ == "PyCapsule"
    table = _c_api._Table.from_address(_c_api.table_address(capsule))
    assert table.version == _c_api.API_VERSION and table.size == ctypes.sizeof(_c_api._Table)
    ffi, lib = c_backend.ffi, c_backend.lib
    for name in _c_api.ENTRIES:
        expected = int(ffi.cast("uintptr_t", ffi.addressof(lib, f"fastrms_{name}")))
        assert getattr(table, name) == expected, name


def test_import_fastrms_makes_no_capsule_and_an_unavailable_c_backend_says_why():
    code = r"""
import sys
import fastrms
assert "_C_API" not in vars(fastrms) and "fastrms.backends.c_backend" not in sys.modules
from fastrms import backends
backends._load_errors["c"] = "ImportError: pretend the extension was not built"
try:
    fastrms._C_API
except ImportError as exc:
    print("ImportError:", exc)
"""
    out = run_python(code, timeout=120).stdout
    assert "ImportError: fastrms._C_API needs fastrms's C backend" in out
    assert "pretend the extension was not built" in out


def test_extension_sees_the_table(extension):
    lib = extension.lib
    assert lib.table_version() == lib.header_version() == _c_api.API_VERSION
    assert lib.table_size() == lib.header_table_size() == ctypes.sizeof(_c_api._Table)
    assert lib.has_last_entry()
    table = _c_api._Table.from_address(_c_api.table_address(fastrms._C_API))
    for k, name in enumerate(_c_api.ENTRIES):
        assert int(extension.ffi.cast("uintptr_t", lib.entry(k))) == getattr(table, name), name
    from fastrms.backends import c_backend

    assert lib.simd_level() == c_backend.lib.fastrms_simd_level()
    assert lib.get_num_threads() == c_backend.lib.fastrms_get_num_threads()
    assert lib.parallel_threshold() == c_backend.lib.fastrms_parallel_threshold()


COEFFICIENT_CODES = ("FASTRMS_BAD_LR", "FASTRMS_BAD_ALPHA", "FASTRMS_BAD_EPS",
                     "FASTRMS_BAD_WEIGHT_DECAY", "FASTRMS_BAD_MOMENTUM", "FASTRMS_BAD_NESTEROV",
                     "FASTRMS_BAD_GRAD_SCALE", "FASTRMS_COEFFICIENT_OVERFLOW")


def test_status_codes_match_the_kernel_header(extension):
    """The kernel's codes are csrc/fastrms.h's; the header's own are distinct from them."""
    from fastrms.backends import c_backend

    for name in ("FASTRMS_BAD_FLAGS", "FASTRMS_NULL_BUFFER", "FASTRMS_OVERLAP",
                 "FASTRMS_MISALIGNED", "FASTRMS_BAD_SCALE"):
        assert getattr(extension.lib, name) == getattr(c_backend.lib, name)
    coefficient_codes = {getattr(extension.lib, name) for name in COEFFICIENT_CODES}
    kernel_codes = {value for name in dir(c_backend.lib) if name.startswith("FASTRMS_")
                    for value in [getattr(c_backend.lib, name)]
                    if isinstance(value, int) and value < 0}
    assert len(coefficient_codes) == len(COEFFICIENT_CODES)
    assert all(code < 0 for code in coefficient_codes) and not coefficient_codes & kernel_codes


# --------------------------------------------------------------------------------------------
# the header's coefficient function against fastrms/_coefficients.py

_CODE_FOR = {"lr": "FASTRMS_BAD_LR", "alpha": "FASTRMS_BAD_ALPHA", "eps": "FASTRMS_BAD_EPS",
             "weight_decay": "FASTRMS_BAD_WEIGHT_DECAY", "momentum": "FASTRMS_BAD_MOMENTUM",
             "nesterov": "FASTRMS_BAD_NESTEROV", "grad_scale": "FASTRMS_BAD_GRAD_SCALE"}


def _expected_status(lib, message: str) -> int:
    """The code the C function must return for Python's ValueError message."""
    if "too large for" in message:
        return lib.FASTRMS_COEFFICIENT_OVERFLOW
    first_word = message.split()[0]
    return getattr(lib, _CODE_FOR[first_word])


def _check_coefficients(extension, float32, hyper: dict, flags: dict):
    ffi, lib = extension.ffi, extension.lib
    dtype = np.float32 if float32 else np.float64
    grad_scale = hyper["grad_scale"]
    try:
        expected = fastrms.kernel_coefficients(dtype, **{k: v for k, v in hyper.items()
                                                         if k != "grad_scale"},
                                               grad_scale=grad_scale, **flags)
    except ValueError as exc:
        expected = exc
    h = ffi.new("struct fastrms_hyperparameters *", dict(
        hyper, grad_scale=1.0 if grad_scale is None else grad_scale,
        **{k: int(v) for k, v in flags.items()}))
    out = ffi.new("float[10]" if float32 else "double[10]")
    got_flags = ffi.new("unsigned *")
    status = (lib.coefficients_f32 if float32 else lib.coefficients_f64)(h, out, got_flags)
    if isinstance(expected, ValueError):
        assert status == _expected_status(lib, str(expected)), (status, str(expected))
        return
    assert status == 0, (status, expected)
    got = np.frombuffer(ffi.buffer(out), dtype)
    assert got.tobytes() == np.array(expected.values, dtype).tobytes(), (got, expected)
    assert got_flags[0] == expected.flags


_reals = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1.0, 2.0),
                   st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.0 ** -149, 2.0 ** -1074, 1e-45, 3.4e38,
                                    3.5e38, 1e39, 1e300, 1.7976931348623157e308]))
_bools = st.booleans()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(float32=_bools, lr=_reals, alpha=_reals, eps=_reals, weight_decay=_reals,
       momentum=st.one_of(st.just(0.0), _reals), grad_scale=st.one_of(st.none(), _reals),
       centered=_bools, maximize=_bools, eps_in_sqrt=_bools, lr_in_momentum=_bools,
       nesterov=_bools, decoupled_weight_decay=_bools)
def test_header_coefficients_are_kernel_coefficients(extension, float32, lr, alpha, eps,
                                                     weight_decay, momentum, grad_scale,
                                                     **flags):
    _check_coefficients(extension, float32, dict(lr=lr, alpha=alpha, eps=eps,
                                                 weight_decay=weight_decay, momentum=momentum,
                                                 grad_scale=grad_scale), flags)


def test_header_coefficients_on_a_grid_of_typical_values(extension):
    """Learning rates, decays and loss scales people use, every flag combination's shape."""
    for float32 in (True, False):
        for lr in (0.0, 1e-5, 3e-4, 1e-3, 0.01, 0.1, 1.0, 7.5):
            for alpha in (0.0, 0.9, 0.99, 0.999, 0.9999999):
                for weight_decay in (0.0, 1e-4, 0.01, 0.1):
                    for grad_scale in (None, 1.0, 65536.0, 3.0, 2.0 ** -20, 1e-40):
                        for _, options in ALL_COMBOS[::11]:
                            hyper = dict(lr=lr, alpha=alpha, eps=options["eps"],
                                         weight_decay=weight_decay,
                                         momentum=options["momentum"], grad_scale=grad_scale)
                            flags = {k: options[k] for k in (
                                "centered", "maximize", "eps_in_sqrt", "lr_in_momentum",
                                "nesterov", "decoupled_weight_decay")}
                            _check_coefficients(extension, float32, hyper, flags)


# --------------------------------------------------------------------------------------------
# training steps through the table


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("combo", ALL_COMBOS[::9], ids=[c[0] for c in ALL_COMBOS[::9]])
def test_training_loop_in_c_gives_the_reference_bits(extension, rng, dtype, combo):
    label, options = combo
    ffi, lib = extension.ffi, extension.lib
    for n in (1, 37, 70001):  # the last above the kernel's parallel threshold
        state, grads = make_problem(rng, dtype, (n,), options, steps=4)
        reference = copy_state(state)
        for grad in grads:
            reference = reference_update(options, reference, grad)
        stacked = np.ascontiguousarray(np.stack(grads))
        ctype = "float *" if dtype == np.float32 else "double *"

        def pointer(array):
            return ffi.NULL if array is None else ffi.cast(ctype, array.ctypes.data)

        h = ffi.new("struct fastrms_hyperparameters *", dict(
            lr=options["lr"], alpha=options["alpha"], eps=options["eps"],
            weight_decay=options["weight_decay"], momentum=options["momentum"], grad_scale=1.0,
            **{k: int(options[k]) for k in ("centered", "maximize", "eps_in_sqrt",
                                            "lr_in_momentum", "nesterov",
                                            "decoupled_weight_decay")}))
        train = lib.train_f32 if dtype == np.float32 else lib.train_f64
        status = train(h, pointer(state["param"]), pointer(stacked), len(grads),
                       pointer(state["square_avg"]), pointer(state["momentum_buffer"]),
                       pointer(state["grad_avg"]), n)
        assert status == 0
        assert_state_bits_equal(state, reference, f"{label} n={n}")


def test_multi_tensor_entry_through_the_table(extension, rng):
    ffi, lib = extension.ffi, extension.lib
    options = dict(lr=0.01, alpha=0.9)
    coeffs = fastrms.kernel_coefficients(np.float64, **options)
    params = [rng.standard_normal(n) for n in (3, 1000, 17)]
    grads = [rng.standard_normal(p.size) for p in params]
    squares = [np.abs(rng.standard_normal(p.size)) for p in params]
    expected = [reference_update(options, {"param": p, "square_avg": s, "momentum_buffer": None,
                                           "grad_avg": None}, g) for p, g, s in
                zip(params, grads, squares)]

    def pointers(arrays):
        return ffi.new("double *[]", [ffi.cast("double *", a.ctypes.data) for a in arrays])

    c = ffi.new("struct fastrms_coeffs_f64 *", coeffs.values)
    status = lib.update_multi_f64(c, coeffs.flags, pointers(params), pointers(grads),
                                  pointers(squares), ffi.new("size_t[]", [p.size for p in params]),
                                  len(params))
    assert status == 0
    for p, s, e in zip(params, squares, expected):
        assert p.tobytes() == e["param"].tobytes() and s.tobytes() == e["square_avg"].tobytes()


# --------------------------------------------------------------------------------------------
# bad input through the table: documented codes, nothing written


def _raw_call(extension, flags, param, grad, square, momentum=None, grad_avg=None, n=None,
              shift=(0, 0, 0)):
    ffi, lib = extension.ffi, extension.lib
    coeffs = fastrms.kernel_coefficients(np.float32, lr=0.01)
    c = ffi.new("struct fastrms_coeffs_f32 *", coeffs.values)

    def pointer(array, offset=0):
        return ffi.NULL if array is None else ffi.cast("float *", array.ctypes.data + offset)

    return lib.update_f32(c, flags, pointer(param, shift[0]), pointer(grad, shift[1]),
                          pointer(square, shift[2]), pointer(momentum), pointer(grad_avg),
                          param.size - 1 if n is None else n)


@pytest.mark.parametrize("case", ["param-is-grad", "square-inside-param", "momentum-is-grad",
                                  "misaligned-param", "misaligned-square", "both-decays",
                                  "nesterov-without-momentum", "unknown-flag",
                                  "null-square", "null-momentum-buffer", "null-grad-avg"])
def test_bad_calls_return_the_documented_code_and_write_nothing(extension, case):
    lib = extension.lib
    buffer = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    p, g, s = buffer[:16], buffer[16:32], buffer[32:48]
    a = np.linspace(0, 1, 16, dtype=np.float32)  # buffer[48:] stays untouched as well
    before = buffer.tobytes(), a.tobytes()
    momentum, centered = _coefficients.MOMENTUM, _coefficients.CENTERED
    expected, call = {
        "param-is-grad": (lib.FASTRMS_OVERLAP, lambda: _raw_call(extension, 0, p, p, s)),
        "square-inside-param": (lib.FASTRMS_OVERLAP,
                                lambda: _raw_call(extension, 0, buffer[:32], g, buffer[8:40])),
        "momentum-is-grad": (lib.FASTRMS_OVERLAP,
                             lambda: _raw_call(extension, momentum, p, g, s, momentum=g)),
        "misaligned-param": (lib.FASTRMS_MISALIGNED,
                             lambda: _raw_call(extension, 0, p, g, s, shift=(1, 0, 0))),
        "misaligned-square": (lib.FASTRMS_MISALIGNED,
                              lambda: _raw_call(extension, 0, p, g, s, shift=(0, 0, 2))),
        "both-decays": (lib.FASTRMS_BAD_FLAGS, lambda: _raw_call(
            extension, _coefficients.WD_COUPLED | _coefficients.WD_DECOUPLED, p, g, s)),
        "nesterov-without-momentum": (lib.FASTRMS_BAD_FLAGS, lambda: _raw_call(
            extension, _coefficients.NESTEROV, p, g, s)),
        "unknown-flag": (lib.FASTRMS_BAD_FLAGS, lambda: _raw_call(extension, 1 << 20, p, g, s)),
        "null-square": (lib.FASTRMS_NULL_BUFFER, lambda: _null_square(extension, p, g)),
        "null-momentum-buffer": (lib.FASTRMS_NULL_BUFFER,
                                 lambda: _raw_call(extension, momentum, p, g, s)),
        "null-grad-avg": (lib.FASTRMS_NULL_BUFFER,
                          lambda: _raw_call(extension, centered, p, g, s)),
    }[case]
    assert call() == expected
    assert (buffer.tobytes(), a.tobytes()) == before


def _null_square(extension, p, g):
    ffi, lib = extension.ffi, extension.lib
    coeffs = fastrms.kernel_coefficients(np.float32, lr=0.01)
    c = ffi.new("struct fastrms_coeffs_f32 *", coeffs.values)
    return lib.update_f32(c, 0, ffi.cast("float *", p.ctypes.data),
                          ffi.cast("float *", g.ctypes.data), ffi.NULL, ffi.NULL, ffi.NULL, p.size)


def test_all_finite_through_the_table(extension):
    ffi, lib = extension.ffi, extension.lib
    g = np.ones(100, np.float32)
    pointer = ffi.cast("float *", g.ctypes.data)
    assert lib.all_finite_f32(pointer, g.size, 1.0) == 1
    g[37] = np.inf
    assert lib.all_finite_f32(pointer, g.size, 1.0) == 0
    assert lib.all_finite_f32(pointer, g.size, 0.0) == lib.FASTRMS_BAD_SCALE


@pytest.mark.parametrize("language,compiler,standard", [("c", "cc", "-std=c99"),
                                                        ("c++", "c++", "-std=c++11")])
def test_header_compiles_cleanly_as_c_and_cxx(language, compiler, standard):
    """The header is for C, C++ (pybind11, nanobind) and Cython extensions alike."""
    import shutil
    import subprocess
    import sysconfig

    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler} on PATH")
    proc = subprocess.run([compiler, "-fsyntax-only", "-x", language, standard, "-Wall", "-Wextra",
                           "-Werror", "-I", fastrms.get_include(), "-I",
                           sysconfig.get_paths()["include"], "-include", "Python.h", HEADER],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
