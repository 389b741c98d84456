"""The interleaved timing behind ``fastrms bench``, and :func:`run`, which returns the report.

For each dtype, variant and size, every available implementation in
:mod:`fastrms.report.registry` gets a step over one shared set of arrays, is warmed up (compiled)
and calibrated (``number`` consecutive steps make one sample of at least ``min_time``), and then
timed in **interleaved** repetitions: each repetition times every implementation once,
round-robin, starting one further along each time. The report gives the median per
implementation. These machines are noisy (other jobs share the cores), so ratios taken within
one repetition round are far steadier than absolute times, and interleaving makes noise hit every
row alike instead of whichever ran during the disturbance.

The number of repetitions adapts: as many rounds as fit in ``budget`` seconds per
(dtype, variant, size), at least ``min_repeats``, at most ``max_repeats``.
"""
from __future__ import annotations

import datetime
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np
from numpy.typing import DTypeLike

from . import machine, registry
from .machine import CpuMeter
from .registry import BASELINE, TORCH
from .tables import size_label
from .workload import (ALPHA, EPS, LR, MOMENTUM_VALUE, STREAMS, VARIANTS, StateGuard,
                       bytes_moved, make_state)

DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
FULL_SIZES = DEFAULT_SIZES + (10**8,)
DTYPES = ("float32", "float64")
METHOD = ("median of interleaved repetitions: each repetition times every implementation once, "
          "round-robin (starting one further along each time), on the same arrays, in one "
          "process; a sample is `number` consecutive steps lasting at least min_time. Other jobs "
          "on the machine add noise; ratios within one run are steadier than absolute times.")


def _time(step, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        step()
    return time.perf_counter() - start


def _calibrate(step, min_time: float, guard: StateGuard, resets) -> tuple[int, float]:
    """(number of steps per sample, seconds per step), a sample lasting at least min_time, or
    as many steps as the state guard allows."""
    number = 1
    while True:
        guard.before(number, resets)
        elapsed = _time(step, number)
        if elapsed >= min_time or number >= guard.cap(1 << 22):
            return number, elapsed / number
        guess = int(number * min_time / max(elapsed, 1e-9) * 1.2) + 1
        number = guard.cap(min(max(2 * number, guess), 1 << 22))


def _resets(steps: dict) -> list:
    """The reset hooks of the steps that keep state of their own."""
    return [step.reset for step in steps.values() if callable(getattr(step, "reset", None))]


def time_interleaved(steps: dict, *, min_time: float, budget: float, min_repeats: int,
                     max_repeats: int, guard: StateGuard | None = None) -> dict:
    """name -> {"samples": [seconds per step, one per repetition], "number": steps per sample}.

    Every step has been called once already (warm-up). Repetitions go round-robin over the
    implementations, the starting one rotating, so slow drifts of the machine hit all alike.
    ``guard`` keeps the shared state valid between samples (restoring it outside the timed
    region when it must; see :class:`~fastrms.report.workload.StateGuard`).
    """
    names = list(steps)
    guard = guard if guard is not None else StateGuard("plain", {})
    resets = _resets(steps)
    numbers, round_time = {}, 0.0
    for name in names:
        numbers[name], per_step = _calibrate(steps[name], min_time, guard, resets)
        round_time += numbers[name] * per_step
    repeats = int(min(max_repeats, max(min_repeats, budget // max(round_time, 1e-9))))
    samples = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        for r in range(repeats):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                guard.before(numbers[name], resets)
                samples[name].append(_time(steps[name], numbers[name]) / numbers[name])
            # A machine that turned busy after calibration makes rounds far longer than
            # planned: stop at 3x the budget once min_repeats are in.
            if r + 1 >= min_repeats and time.perf_counter() - started > 3 * budget:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"samples": samples[name], "number": numbers[name]} for name in names}


def run(sizes: Sequence[int] = DEFAULT_SIZES, dtypes: Sequence[DTypeLike] = DTYPES,
        variants: Sequence[str] = tuple(VARIANTS), names: Sequence[str] | None = None, *,
        min_time: float = 2e-3, budget: float = 0.7, min_repeats: int = 3, max_repeats: int = 21,
        threads: int | None = None, progress: TextIO | None = sys.stderr,
        state_formats: Sequence[str] = ("float32",)) -> dict:
    """Time every implementation (or those in ``names``) and return the report as a dict.

    ``threads`` sets the thread count of fastrms, torch, numexpr (jax keeps XLA's own);
    ``progress`` (a text stream, or None) gets one line per (dtype, variant, size);
    ``state_formats``: the rows of which state formats to time (``"float32"``, the plain
    rows; ``"bfloat16"``, ``"blockwise8"``: fastrms and its roofline with compact state),
    when ``names`` does not say.
    """
    chosen = ([impl for impl in registry.IMPLEMENTATIONS if impl.state_format in state_formats]
              if names is None else [registry.get(n) for n in names])
    implementations, usable = [], []
    for impl in chosen:
        available, reason = impl.availability()
        implementations.append({"name": impl.name, "kind": impl.kind,
                                "description": impl.description, "available": available,
                                "reason": reason})
        if available:
            usable.append(impl)
    if threads is not None:
        set_threads(threads)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": None,  # filled in at the end, once every library in use is loaded
        "method": METHOD,
        "settings": {"sizes": list(sizes), "dtypes": [np.dtype(d).name for d in dtypes],
                     "variants": list(variants), "min_time": min_time, "budget": budget,
                     "min_repeats": min_repeats, "max_repeats": max_repeats,
                     "threads": threads, "hyperparameters": {"lr": LR, "alpha": ALPHA, "eps": EPS,
                                         "momentum": MOMENTUM_VALUE},
                     "streams": dict(STREAMS)},
        "implementations": implementations,
        "results": [],
    }
    cells = [(np.dtype(d).name, v, int(n)) for d in dtypes for v in variants for n in sizes]
    started = time.perf_counter()
    meter = CpuMeter()
    for index, (dtype, variant, n) in enumerate(cells, 1):
        cell_start = time.perf_counter()
        rows = _run_cell(usable, dtype, variant, n, min_time=min_time, budget=budget,
                         min_repeats=min_repeats, max_repeats=max_repeats)
        report["results"].extend(rows)
        if progress is not None:
            repeats = max((r.get("repeats", 0) for r in rows), default=0)
            others = next((r["others_busy_cores"] for r in rows if "repeats" in r), None)
            busy = "" if others is None else f", other processes busy {others:.2f} cores"
            print(f"[{index:>{len(str(len(cells)))}}/{len(cells)}] {dtype} {variant:<8} "
                  f"n={size_label(n):<5} {len(rows)} implementations x {repeats} interleaved "
                  f"repetitions: {time.perf_counter() - cell_start:5.1f} s "
                  f"(total {time.perf_counter() - started:5.1f} s{busy})", file=progress,
                  flush=True)
    report["machine"] = machine.machine_info()
    report["others_busy_cores"] = meter.others()
    return report


def _run_cell(usable, dtype, variant, n, **timing) -> list[dict]:
    need, available = _memory_needed(variant, dtype, n), machine.memory_available()
    if available is not None and need > available:
        reason = (f"skipped: this size needs about {need / 2**30:.1f} GiB (the shared arrays, "
                  f"the copies of optax and the roofline, the formula's temporaries); "
                  f"{available / 2**30:.1f} GiB available")
        return [_row(impl.name, dtype, variant, n, error=reason) for impl in usable
                if impl.supports(dtype)]
    state = make_state(variant, dtype, n)
    guard = StateGuard(variant, state)
    steps, rows = {}, []
    for impl in [impl for impl in usable if impl.supports(dtype)]:
        try:
            step = impl.make(variant, state)
            guard.before(1, _resets({impl.name: step}))
            step()  # warm-up: compiles, allocates, touches every page
        except Exception as exc:  # e.g. out of memory at 10^8: report it, keep going
            rows.append(_row(impl.name, dtype, variant, n,
                             error=f"failed: {type(exc).__name__}: {exc}"))
            continue
        steps[impl.name] = step
    meter = CpuMeter()
    timings = time_interleaved(steps, guard=guard, **timing) if steps else {}
    others = meter.others()
    for name, timing in timings.items():
        samples = timing["samples"]
        rows.append(_row(name, dtype, variant, n, median_s=statistics.median(samples),
                         min_s=min(samples), max_s=max(samples), repeats=len(samples),
                         number=timing["number"], others_busy_cores=others,
                         state_restores=guard.restores))
    del steps, state
    gc.collect()
    by_name = {row["name"]: row for row in rows if "median_s" in row}
    base, torch = (by_name.get(k, {}).get("median_s") for k in (BASELINE, TORCH))
    for row in by_name.values():
        t = row["median_s"]
        # Each row against the roofline that moves its streams (its state format's).
        roof = by_name.get(registry.ROOFLINE_OF[row["state_format"]], {}).get("median_s")
        row["gb_per_s"] = row["bytes"] / t / 1e9
        row["fraction_of_roofline"] = roof / t if roof else None
        row["speedup_vs_numpy_formula"] = base / t if base else None
        row["speedup_vs_torch_foreach"] = torch / t if torch else None
    order = {impl.name: k for k, impl in enumerate(usable)}
    return sorted(rows, key=lambda row: order[row["name"]])


def _memory_needed(variant: str, dtype, n: int) -> int:
    """Bytes a cell may hold at once: 4x the state (shared arrays, optax's and the roofline's
    copies, the NumPy formula's temporaries), 5x for centered (the copy StateGuard restores)."""
    arrays = 3 if variant == "plain" else 4
    copies = 5 if variant == "centered" else 4
    return copies * arrays * np.dtype(dtype).itemsize * n


def _row(name, dtype, variant, n, **fields) -> dict:
    state_format = registry.get(name).state_format
    return {"name": name, "dtype": dtype, "variant": variant, "n": n,
            "state_format": state_format, "bytes": bytes_moved(variant, dtype, n, state_format),
            **fields}


def set_threads(n: int) -> None:
    """One thread count for fastrms and for the peers that take one (torch, numexpr)."""
    import fastrms

    fastrms.set_num_threads(n)
    for module in ("torch", "numexpr"):
        if machine.loaded(module) is not None:
            machine.loaded(module).set_num_threads(n)
