"""Doctest collection for ``pytest --doctest-modules fastrms`` (the suite itself is tests/).

A module whose optional dependency is missing here is skipped, not failed: the torch drop-in
without torch, the figures without matplotlib, the Numba backend without Numba, the C backend
when its extension is not built.
"""
from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("torch") is None:
    collect_ignore.append("fastrms/torch.py")
if importlib.util.find_spec("matplotlib") is None:
    collect_ignore.append("fastrms/report/plots.py")
if importlib.util.find_spec("numba") is None:
    collect_ignore.append("fastrms/backends/numba_backend.py")
try:
    from fastrms import backends as _backends

    _c_available = _backends.availability("c")[0]
except ImportError:  # pragma: no cover - fastrms itself does not import
    _c_available = False
if not _c_available:
    collect_ignore.append("fastrms/backends/c_backend.py")
