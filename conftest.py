"""Doctest collection for ``pytest --doctest-modules fastrms`` (the suite itself is tests/).

A module whose optional dependency is missing here is skipped, not failed: the torch drop-in
without torch, the figures without matplotlib, the Numba backend without Numba, the C backend
when its extension does not load. Each check runs only when pytest reaches that file, so the
test suite's own runs import nothing here.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _missing(module: str):
    return lambda: importlib.util.find_spec(module) is None


def _c_unavailable() -> bool:
    from fastrms import backends

    return not backends.availability("c")[0]


#: module file -> a check that is true when it cannot be imported here.
OPTIONAL = {
    "fastrms/torch": _missing("torch"),
    "fastrms/report/plots.py": _missing("matplotlib"),
    "fastrms/backends/numba_backend.py": _missing("numba"),
    "fastrms/backends/c_backend.py": _c_unavailable,
}


def pytest_ignore_collect(collection_path: Path, config):
    try:
        relative = collection_path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return None
    check = OPTIONAL.get(relative)
    return True if check is not None and check() else None
