"""fastrms's C API for other compiled extensions: the header directory, and ``fastrms._C_API``,
a PyCapsule holding a versioned table of the C kernel's entry points (NumPy's C API and SciPy's
``cython_blas`` do the same). fastrms/include/fastrms/fastrms_api.h declares the table and says
how to use it; this module fills it from the cffi extension's own function addresses, so the
C kernel itself is unchanged.

>>> import os, fastrms
>>> os.path.isfile(os.path.join(fastrms.get_include(), "fastrms", "fastrms_api.h"))
True
"""
from __future__ import annotations

import ctypes
import os
import threading

#: The table's version: fastrms_api.h's FASTRMS_API_VERSION (a test pins them together).
API_VERSION = 1
CAPSULE_NAME = b"fastrms._C_API"
#: The entries after (version, size), in the order of struct fastrms_api; entry ``name`` holds
#: the address of ``fastrms_<name>`` in csrc/fastrms.h. Later versions append, never reorder.
ENTRIES = ("update_f32", "update_f64", "update_multi_f32", "update_multi_f64",
           "all_finite_f32", "all_finite_f64", "all_finite_multi_f32", "all_finite_multi_f64",
           "roofline_f32", "roofline_f64", "simd_level", "max_simd_level", "set_simd_level",
           "set_num_threads", "get_num_threads", "openmp_enabled", "parallel_threshold")


def get_include() -> str:
    """The directory to add to an extension's include path for ``#include
    "fastrms/fastrms_api.h"`` (the table of ``fastrms._C_API`` and how to use it)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


class _Table(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("size", ctypes.c_uint)] + [
        (name, ctypes.c_void_p) for name in ENTRIES]


_lock = threading.Lock()
_capsule = None
#: What the capsule points at, kept for the life of the process (the capsule has no destructor).
_kept: list = []


def capsule():
    """The ``fastrms._C_API`` capsule, made on first use. Raises ImportError (what a C
    extension's import expects) when the C backend cannot be loaded."""
    global _capsule
    with _lock:
        if _capsule is None:
            _capsule = _make_capsule()
        return _capsule


def _make_capsule():
    from . import backends

    try:
        c_backend = backends.load("c")
    except RuntimeError as exc:
        raise ImportError(f"fastrms._C_API needs fastrms's C backend, which is unavailable "
                          f"({exc})") from exc
    ffi, lib = c_backend.ffi, c_backend.lib
    addresses = [int(ffi.cast("uintptr_t", ffi.addressof(lib, f"fastrms_{name}")))
                 for name in ENTRIES]
    table = _Table(API_VERSION, ctypes.sizeof(_Table), *addresses)
    name = ctypes.create_string_buffer(CAPSULE_NAME)
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    made = new_capsule(ctypes.addressof(table), ctypes.addressof(name), None)
    _kept.extend((table, name))
    return made


def table_address(capsule_object) -> int:
    """The address of the table a ``fastrms._C_API`` capsule holds (for tests and ctypes)."""
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = (ctypes.py_object, ctypes.c_char_p)
    return get_pointer(capsule_object, CAPSULE_NAME)
