"""What a reader needs to judge a figure: the machine, its load, and the memory left.

:func:`machine_info` (CPU model, cores, caches, memory, SIMD level, threads and library
versions) and :class:`CpuMeter` (how busy other processes kept the cores) go into every report;
:func:`memory_available` lets the report skip a size that does not fit.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def loaded(module: str):
    """The module if this process imported it (None if not, or if an import was blocked)."""
    return sys.modules.get(module)


class CpuMeter:
    """How many cores *other* processes kept busy between start and stop (Linux: /proc/stat
    minus this process's own CPU time); None where that cannot be read.

    On a shared machine this is the noise that matters most: a thread team (OpenMP in fastrms,
    numba, torch) whose member was descheduled waits a whole scheduler time slice (several ms)
    at its barrier, so with another process holding a core a 50 us parallel step can take 8 ms.
    """

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal
        busy = sum(int(x) for k, x in enumerate(fields[1:9]) if k not in (3, 4))
        own = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def others(self):
        end = self._read()
        if end is None or self._start is None:
            return None
        elapsed = end[0] - self._start[0]
        if elapsed <= 0:
            return None
        return max(0.0, ((end[1] - self._start[1]) - (end[2] - self._start[2])) / elapsed)


def memory_available() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU model, cores, caches, memory, SIMD level, threads and library versions."""
    import fastrms

    info = fastrms.info()
    machine = {
        "cpu_model": _cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "caches": _caches(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "simd_level": info["simd_level"],
        "automatic_choice": info["automatic_choice"]["plain"]["backend"],
        "threads": {"fastrms": fastrms.get_num_threads()},
        "versions": {"python": platform.python_version(), "fastrms": fastrms.__version__,
                     "numpy": np.__version__},
    }
    for module in ("numba", "torch", "numexpr", "jax", "optax", "matplotlib", "sklearn"):
        version = _version_if_imported(module)
        if version is not None:
            machine["versions"][module] = version
    for module in ("torch", "numexpr", "numba"):
        if loaded(module) is not None:
            machine["threads"][module] = loaded(module).get_num_threads()
    if loaded("jax") is not None:
        machine["threads"]["jax"] = "XLA's own pool (not set)"
    return machine


def _version_if_imported(module: str):
    """The version of a library the run used (imported), without importing new ones."""
    found = loaded(module)
    if found is None:
        try:
            from importlib.metadata import version

            return version({"sklearn": "scikit-learn"}.get(module, module)) + " (not loaded)"
        except Exception:
            return None
    return getattr(found, "__version__", "?")


def _cpuinfo_field(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _caches() -> dict:
    caches = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
    return caches


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None
