"""Fixtures shared by the fastrms tests. Plain helpers live in rms_helpers.py."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import fastrms
from fastrms import _dispatch

from rms_helpers import BACKENDS, require_backend


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend in the registry; unavailable ones are skipped with the reason."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def restore_threads():
    """Restore the thread count the test found, whatever the test sets."""
    before = fastrms.get_num_threads()
    yield before
    fastrms.set_num_threads(before)


@pytest.fixture
def c_backend():
    require_backend("c")
    from fastrms.backends import c_backend as module

    return module


@pytest.fixture
def restore_simd(c_backend):
    """Restore the C kernel's SIMD level the test found."""
    before = c_backend.simd_level()
    yield before
    c_backend.set_simd_level(before)


@pytest.fixture(autouse=True)
def _reset_dispatch_state():
    """No test leaks a process-wide backend choice into the next one."""
    before = _dispatch._global_choice
    yield
    _dispatch._global_choice = before


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so each test has its own reproducible data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
