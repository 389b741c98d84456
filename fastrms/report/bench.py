"""``python -m fastrms bench``: the fused update against NumPy, torch, numexpr and optax.

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

``--out DIR`` writes ``bench.json`` (every figure, the machine and the method) and ``bench.png``
(GB/s against size, one line per implementation, the roofline dashed black).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import registry
from .registry import BASELINE, ROOFLINE, TORCH, VARIANTS, bytes_moved

DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
FULL_SIZES = DEFAULT_SIZES + (10**8,)
DTYPES = ("float32", "float64")
METHOD = ("median of interleaved repetitions: each repetition times every implementation once, "
          "round-robin (starting one further along each time), on the same arrays, in one "
          "process; a sample is `number` consecutive steps lasting at least min_time. Other jobs "
          "on the machine add noise; ratios within one run are steadier than absolute times.")


# -- timing -------------------------------------------------------------------------------------

def _time(step, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        step()
    return time.perf_counter() - start


def _calibrate(step, min_time: float) -> tuple[int, float]:
    """(number of steps per sample, seconds per step), a sample lasting at least min_time."""
    number = 1
    while True:
        elapsed = _time(step, number)
        if elapsed >= min_time or number >= 1 << 22:
            return number, elapsed / number
        guess = int(number * min_time / max(elapsed, 1e-9) * 1.2) + 1
        number = min(max(2 * number, guess), 1 << 22)


def time_interleaved(steps: dict, *, min_time: float, budget: float, min_repeats: int,
                     max_repeats: int) -> dict:
    """name -> {"samples": [seconds per step, one per repetition], "number": steps per sample}.

    Every step has been called once already (warm-up). Repetitions go round-robin over the
    implementations, the starting one rotating, so slow drifts of the machine hit all alike.
    """
    names = list(steps)
    numbers, round_time = {}, 0.0
    for name in names:
        numbers[name], per_step = _calibrate(steps[name], min_time)
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
                samples[name].append(_time(steps[name], numbers[name]) / numbers[name])
            # A machine that turned busy after calibration makes rounds far longer than
            # planned: stop at 3x the budget once min_repeats are in.
            if r + 1 >= min_repeats and time.perf_counter() - started > 3 * budget:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"samples": samples[name], "number": numbers[name]} for name in names}


# -- the run ------------------------------------------------------------------------------------

def run(sizes=DEFAULT_SIZES, dtypes=DTYPES, variants=tuple(VARIANTS), names=None, *,
        min_time: float = 2e-3, budget: float = 0.7, min_repeats: int = 3, max_repeats: int = 21,
        threads: int | None = None, progress=sys.stderr) -> dict:
    """Time every implementation (or those in ``names``) and return the report as a dict.

    ``threads`` sets the thread count of fastrms, torch, numexpr (jax keeps XLA's own);
    ``progress`` (a text stream, or None) gets one line per (dtype, variant, size).
    """
    chosen = registry.IMPLEMENTATIONS if names is None else [registry.get(n) for n in names]
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
                     "threads": threads, "hyperparameters": {"lr": registry.LR, "alpha": registry.ALPHA,
                                         "eps": registry.EPS, "momentum": registry.MOMENTUM_VALUE},
                     "streams": dict(registry.STREAMS)},
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
                  f"n={_size_label(n):<5} {len(rows)} implementations x {repeats} interleaved "
                  f"repetitions: {time.perf_counter() - cell_start:5.1f} s "
                  f"(total {time.perf_counter() - started:5.1f} s{busy})", file=progress,
                  flush=True)
    report["machine"] = machine_info()
    report["others_busy_cores"] = meter.others()
    return report


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


def _run_cell(usable, dtype, variant, n, **timing) -> list[dict]:
    # Every row steps the same arrays with a fixed gradient, over and over: in the centered
    # variant the variance estimate s - a*a eventually rounds to zero or below and some
    # parameters become inf or NaN. That costs nothing on SIMD units (only subnormals would,
    # and none arise), so the warnings are silenced rather than the state reset.
    with np.errstate(all="ignore"):
        return _run_cell_quietly(usable, dtype, variant, n, **timing)


def _run_cell_quietly(usable, dtype, variant, n, **timing) -> list[dict]:
    need, available = _memory_needed(variant, dtype, n), _memory_available()
    if available is not None and need > available:
        reason = (f"skipped: this size needs about {need / 2**30:.1f} GiB (the shared arrays, "
                  f"the copies of optax and the roofline, the formula's temporaries); "
                  f"{available / 2**30:.1f} GiB available")
        return [_row(impl.name, dtype, variant, n, error=reason) for impl in usable]
    state = registry.make_state(variant, dtype, n)
    steps, rows = {}, []
    for impl in usable:
        try:
            step = impl.make(variant, state)
            step()  # warm-up: compiles, allocates, touches every page
        except Exception as exc:  # e.g. out of memory at 10^8: report it, keep going
            rows.append(_row(impl.name, dtype, variant, n,
                             error=f"failed: {type(exc).__name__}: {exc}"))
            continue
        steps[impl.name] = step
    meter = CpuMeter()
    timings = time_interleaved(steps, **timing) if steps else {}
    others = meter.others()
    for name, timing in timings.items():
        samples = timing["samples"]
        rows.append(_row(name, dtype, variant, n, median_s=statistics.median(samples),
                         min_s=min(samples), max_s=max(samples), repeats=len(samples),
                         number=timing["number"], others_busy_cores=others))
    del steps, state
    gc.collect()
    by_name = {row["name"]: row for row in rows if "median_s" in row}
    roof, base, torch = (by_name.get(k, {}).get("median_s") for k in (ROOFLINE, BASELINE, TORCH))
    for row in by_name.values():
        t = row["median_s"]
        row["gb_per_s"] = row["bytes"] / t / 1e9
        row["fraction_of_roofline"] = roof / t if roof else None
        row["speedup_vs_numpy_formula"] = base / t if base else None
        row["speedup_vs_torch_foreach"] = torch / t if torch else None
    order = {impl.name: k for k, impl in enumerate(usable)}
    return sorted(rows, key=lambda row: order[row["name"]])


def _memory_needed(variant: str, dtype, n: int) -> int:
    """Bytes a cell may hold at once: 4x the state (shared arrays, optax's and the roofline's
    copies, the NumPy formula's temporaries)."""
    arrays = 3 if variant == "plain" else 4
    return 4 * arrays * np.dtype(dtype).itemsize * n


def _memory_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _row(name, dtype, variant, n, **fields) -> dict:
    return {"name": name, "dtype": dtype, "variant": variant, "n": n,
            "bytes": bytes_moved(variant, dtype, n), **fields}


def set_threads(n: int) -> None:
    """One thread count for fastrms and for the peers that take one (torch, numexpr)."""
    import fastrms

    fastrms.set_num_threads(n)
    for module in ("torch", "numexpr"):
        if _loaded(module) is not None:
            _loaded(module).set_num_threads(n)


def _loaded(module: str):
    """The module if this process imported it (None if not, or if an import was blocked)."""
    return sys.modules.get(module)


# -- the machine --------------------------------------------------------------------------------

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
        if _loaded(module) is not None:
            machine["threads"][module] = _loaded(module).get_num_threads()
    if _loaded("jax") is not None:
        machine["threads"]["jax"] = "XLA's own pool (not set)"
    return machine


def _version_if_imported(module: str):
    """The version of a library the run used (imported), without importing new ones."""
    found = _loaded(module)
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


# -- output -------------------------------------------------------------------------------------

def _size_label(n: int) -> str:
    exponent = len(str(n)) - 1
    return f"1e{exponent}" if n == 10**exponent else f"{n:,}"


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:7.3g} {unit}"
    return f"{seconds / 1e-9:7.3g} ns"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_tables(report: dict) -> str:
    """One table per dtype and variant; rows are sizes x implementations."""
    results = report["results"]
    absent = [impl for impl in report["implementations"] if not impl["available"]]
    lines = [f"fastrms bench, {report['date']}, {report['machine']['cpu_model']}, "
             f"{report['machine']['cores_usable']} cores, SIMD {report['machine']['simd_level']}, "
             f"threads {report['machine']['threads']}",
             f"Method: {report['method']}",
             "GB/s = bytes moved (streams x itemsize x n) / median; 'of roof' = roofline median / "
             "median; 'vs numpy' and 'vs torch' = speedup over numpy-formula and torch-foreach."]
    for impl in absent:
        lines.append(f"absent: {impl['name']} ({impl['reason']})")
    others = report.get("others_busy_cores")
    if others is not None:
        lines.append(f"Other processes kept {others:.2f} of {report['machine']['cores_usable']} "
                     f"cores busy on average during this run"
                     + (" -- multi-threaded rows pay for that most (a thread team waits for "
                        "a descheduled member); compare with --threads 1."
                        if others > 0.25 else "."))
    width = max([len(impl["name"]) for impl in report["implementations"]] + [14])
    header = (f"{'n':>5}  {'implementation':<{width}}  {'median':>10}  {'GB/s':>7}  "
              f"{'of roof':>7}  {'vs numpy':>8}  {'vs torch':>8}  reps")
    for dtype in report["settings"]["dtypes"]:
        for variant in report["settings"]["variants"]:
            cell = [r for r in results if r["dtype"] == dtype and r["variant"] == variant]
            if not cell:
                continue
            streams = registry.STREAMS[variant]
            lines += ["", f"== {dtype} {variant}: {streams} streams, "
                          f"{streams * np.dtype(dtype).itemsize} bytes per element ==", header]
            last_n = None
            for row in cell:
                label = _size_label(row["n"]) if row["n"] != last_n else ""
                if row["n"] != last_n and last_n is not None:
                    lines.append("")
                last_n = row["n"]
                if "error" in row:
                    lines.append(f"{label:>5}  {row['name']:<{width}}  {row['error']}")
                    continue
                fraction = row["fraction_of_roofline"]
                lines.append(
                    f"{label:>5}  {row['name']:<{width}}  {_duration(row['median_s']):>10}  "
                    f"{row['gb_per_s']:7.2f}  {'-' if fraction is None else f'{fraction:.2f}':>7}  "
                    f"{_ratio(row['speedup_vs_numpy_formula']):>8}  "
                    f"{_ratio(row['speedup_vs_torch_foreach']):>8}  {row['repeats']:>4}")
            for impl in absent:
                lines.append(f"{'':>5}  {impl['name']:<{width}}  absent")
            busy = {}
            for row in cell:
                if row.get("others_busy_cores") is not None:
                    busy[row["n"]] = row["others_busy_cores"]
            if busy:
                lines.append("other processes' busy cores while timing: " + ", ".join(
                    f"n={_size_label(n)} {value:.2f}" for n, value in busy.items()))
    return "\n".join(lines)


def format_markdown(report: dict, dtype: str = "float32", variant: str = "plain") -> str:
    """Two Markdown tables for a README: every row at one dtype and variant (median per step
    and GB/s by size), and fastrms-auto's speedups over the NumPy formula and torch (foreach)
    for every dtype and variant."""
    results = report["results"]
    sizes = report["settings"]["sizes"]
    machine = report["machine"]
    others = report.get("others_busy_cores")
    lines = [f"Measured {report['date'][:16].replace('T', ' ')} UTC on {machine['cpu_model']}, "
             f"{machine['cores_usable']} cores, SIMD {machine['simd_level']}, fastrms threads "
             f"{machine['threads']['fastrms']}"
             + ("" if others is None else f"; other processes kept {others:.2f} cores busy")
             + ". Median of interleaved repetitions in one process.", "",
             f"{dtype}, {variant}: median time per step (GB/s)", "",
             "| implementation | " + " | ".join(f"n={_size_label(n)}" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    cell = {(r["name"], r["n"]): r for r in results
            if r["dtype"] == dtype and r["variant"] == variant}
    for impl in report["implementations"]:
        if not impl["available"]:
            lines.append(f"| {impl['name']} | " + " | ".join("absent" for _ in sizes) + " |")
            continue
        entries = []
        for n in sizes:
            row = cell.get((impl["name"], n))
            entries.append("-" if row is None or "median_s" not in row else
                           f"{_duration(row['median_s']).strip()} ({row['gb_per_s']:.1f})"
                           + _noisy_mark(row))
        lines.append(f"| {impl['name']} | " + " | ".join(entries) + " |")
    lines += ["", "fastrms-auto: speedup over numpy-formula / over torch-foreach", "",
              "| dtype, variant | " + " | ".join(f"n={_size_label(n)}" for n in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    auto = {(r["dtype"], r["variant"], r["n"]): r for r in results
            if r["name"] == "fastrms-auto" and "median_s" in r}
    for d in report["settings"]["dtypes"]:
        for v in report["settings"]["variants"]:
            entries = []
            for n in sizes:
                row = auto.get((d, v, n))
                entries.append("-" if row is None else
                               f"{_ratio(row['speedup_vs_numpy_formula'])} / "
                               f"{_ratio(row['speedup_vs_torch_foreach'])}" + _noisy_mark(row))
            lines.append(f"| {d}, {v} | " + " | ".join(entries) + " |")
    if any(_noisy_mark(r) for r in results):
        lines += ["", f"{NOISY_MARK} timed while other processes kept more than "
                      f"{NOISY_CORES} cores busy: thread teams stall, so multi-threaded rows "
                      f"(fastrms-c/numba/auto above 65,536 elements, the roofline, torch) are "
                      f"slowed most."]
    return "\n".join(lines)


NOISY_MARK, NOISY_CORES = "\N{DAGGER}", 0.25


def _noisy_mark(row: dict) -> str:
    busy = row.get("others_busy_cores")
    return NOISY_MARK if busy is not None and busy > NOISY_CORES else ""


def write_outputs(report: dict, out_dir) -> dict:
    """Write bench.json and (when matplotlib is installed) bench.png; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": str(out / "bench.json")}
    with open(out / "bench.json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    try:
        from . import plots

        written["png"] = str(plots.plot_bandwidth(report, out / "bench.png"))
    except ImportError as exc:
        written["png"] = None
        written["png_skipped"] = f"matplotlib is not installed ({exc}; pip install matplotlib)"
    return written


# -- command line -------------------------------------------------------------------------------

def _sizes(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="also 10^8 elements (several GB, minutes), and more repetitions")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="comma-separated sizes, e.g. 1e3,1e5 (default 1e3..1e7)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default float32,float64")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="default plain,momentum,centered")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated implementations (of {', '.join(registry.BY_NAME)})")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per (dtype, variant, size) (default 0.7; 3 with --full)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for fastrms, torch and numexpr (default: each library's "
                             "own default, all cores)")
    parser.add_argument("--out", default=None, help="write bench.json and bench.png into DIR")
    parser.add_argument("--markdown", action="store_true",
                        help="also print a Markdown summary (for a README)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_command(args) -> int:
    sizes = args.sizes or (FULL_SIZES if args.full else DEFAULT_SIZES)
    budget = args.budget if args.budget is not None else (3.0 if args.full else 0.7)
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    names = [n for n in args.only.split(",") if n] if args.only else None
    report = run(sizes, [d for d in args.dtypes.split(",") if d], variants, names,
                 budget=budget, min_repeats=5 if args.full else 3,
                 min_time=5e-3 if args.full else 2e-3, threads=args.threads,
                 progress=None if args.quiet else sys.stderr)
    print(format_tables(report))
    if args.markdown:
        print("\n" + format_markdown(report))
    if args.out:
        written = write_outputs(report, args.out)
        print(f"\nwrote {written['json']}" + (f" and {written['png']}" if written["png"] else
                                               f" ({written['png_skipped']})"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrms.report.bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
