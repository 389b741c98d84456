"""The report as text: one table per dtype and variant, and the Markdown summary for the docs.

A cell timed while other processes kept more than :data:`NOISY_CORES` cores busy is marked
(:data:`NOISY_MARK` in Markdown; a shaded band in the plot).
"""
from __future__ import annotations

from .workload import STREAMS, bytes_moved

NOISY_MARK, NOISY_CORES = "\N{DAGGER}", 0.25


def size_label(n: int) -> str:
    """``1e3`` for 1000; other sizes with thousands separators."""
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
             "GB/s = bytes moved (streams x itemsize x n, the state in the row's format) / median; "
             "'of roof' = median of the roofline with the row's state format / median; "
             "'vs numpy' and 'vs torch' = speedup over numpy-formula and torch-foreach."]
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
            streams = STREAMS[variant]
            lines += ["", f"== {dtype} {variant}: {streams} streams, "
                          f"{bytes_moved(variant, dtype, 1)} bytes per element ==", header]
            last_n = None
            for row in cell:
                label = size_label(row["n"]) if row["n"] != last_n else ""
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
                    f"n={size_label(n)} {value:.2f}" for n, value in busy.items()))
    return "\n".join(lines)


def format_markdown(report: dict, dtype: str = "float32", variant: str = "plain") -> str:
    """Two Markdown tables for docs/performance.md: every row at one dtype and variant (median
    per step and GB/s by size), and fastrms-auto's speedups over the NumPy formula and torch
    (foreach) for every dtype and variant."""
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
             "| implementation | " + " | ".join(f"n={size_label(n)}" for n in sizes) + " |",
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
              "| dtype, variant | " + " | ".join(f"n={size_label(n)}" for n in sizes) + " |",
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


def _noisy_mark(row: dict) -> str:
    busy = row.get("others_busy_cores")
    return NOISY_MARK if busy is not None and busy > NOISY_CORES else ""
