"""``fastrms bench``: the command line of the benchmark report, and its files.

The timing is :mod:`fastrms.report.timing` (:func:`run` returns the report as a dict), the text
:mod:`fastrms.report.tables`, the figure :mod:`fastrms.report.plots`. ``--out DIR`` writes
``bench.json`` (every figure, the machine and the method) and ``bench.png`` (GB/s against size,
one line per implementation, the roofline dashed black).

Every argument is checked before anything is timed: a bad one gets a one-line error and exit
status 2 (:class:`OneLineErrorParser`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from . import registry
from .machine import CpuMeter, machine_info
from .machine import memory_available as _memory_available  # noqa: F401  (tests/test_memory.py)
from .tables import format_markdown, format_tables
from .timing import DEFAULT_SIZES, DTYPES, FULL_SIZES, METHOD, run, set_threads, time_interleaved
from .workload import STATE_FORMATS, VARIANTS

__all__ = ["CpuMeter", "DESCRIPTION", "METHOD", "OneLineErrorParser", "add_arguments",
           "format_markdown", "format_tables", "machine_info", "main", "run", "run_command",
           "set_threads", "time_interleaved", "write_outputs"]

#: ``fastrms bench --help``: plain text.
DESCRIPTION = """\
Time one RMSprop step of every implementation (NumPy baselines, each fastrms backend, the
roofline kernel, and the peers installed here: torch, numexpr, optax) at 10^3 to 10^7
elements, float32 and float64 (bfloat16 and float16 on request), plain, momentum and centered. The implementations are
interleaved: each repetition times every row once, round-robin, in one process, and the
report gives the median per row. Progress goes to stderr, the tables to stdout."""

EXTRA_HINT = 'pip install "fastrms[bench]"'


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr and exit status 2, without the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: each raises ArgumentTypeError with the reason ---------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number")
    return value


def size_list(text: str) -> list[int]:
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a size (e.g. 1e3 or 5000)") from None
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not a whole number of elements >= 1")
        sizes.append(int(value))
    if not sizes:
        raise argparse.ArgumentTypeError("no size given")
    return sizes


def _choices(kind: str, allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if part not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {part!r}; choose from {', '.join(allowed)}")
            if part not in chosen:
                chosen.append(part)
        if not chosen:
            raise argparse.ArgumentTypeError(f"no {kind} given")
        return chosen
    parse.__name__ = kind  # argparse names the type in its own messages
    return parse


dtype_list = _choices("dtype", registry.ALL_DTYPES)
variant_list = _choices("variant", tuple(VARIANTS))
implementation_list = _choices("implementation", tuple(registry.BY_NAME))
state_format_list = _choices("state format", STATE_FORMATS)


def output_folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="also 10^8 elements (several GB, minutes), and more repetitions")
    parser.add_argument("--sizes", type=size_list, default=None, metavar="N,N,...",
                        help="comma-separated sizes, e.g. 1e3,1e5 (default 1e3 to 1e7)")
    parser.add_argument("--dtypes", type=dtype_list, default=list(DTYPES), metavar="DTYPE,...",
                        help=f"comma-separated, of {', '.join(registry.ALL_DTYPES)} (default: "
                             f"{','.join(DTYPES)}; the 16-bit ones have 16-bit params and "
                             f"grads with float32 state, timed for fastrms, the roofline and "
                             f"torch)")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        metavar="VARIANT,...",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--state-formats", type=state_format_list, default=["float32"],
                        metavar="FORMAT,...",
                        help=f"comma-separated, of {', '.join(STATE_FORMATS)} (default: "
                             f"float32): also time fastrms and its roofline with compact "
                             f"optimizer state (float32, bfloat16 and float16 problems)")
    parser.add_argument("--only", type=implementation_list, default=None, metavar="NAME,...",
                        help=f"comma-separated implementations, of {', '.join(registry.BY_NAME)} "
                             f"(default: all)")
    parser.add_argument("--budget", type=positive_float, default=None, metavar="SECONDS",
                        help="seconds of timing per (dtype, variant, size) (default 0.7; 3 with "
                             "--full)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="threads for fastrms, torch and numexpr (default: each library's "
                             "own default, all cores)")
    parser.add_argument("--out", type=output_folder, default=None, metavar="DIR",
                        help="write bench.json and bench.png into DIR (created if needed)")
    parser.add_argument("--markdown", action="store_true",
                        help="also print a Markdown summary (the tables of docs/performance.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def write_outputs(report: dict, out_dir: str | Path) -> dict[str, str | None]:
    """Write bench.json and (when matplotlib is installed) bench.png; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str | None] = {"json": str(out / "bench.json")}
    with open(out / "bench.json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    try:
        from . import plots
    except ImportError as exc:
        written["png"] = None
        written["png_skipped"] = (f"bench.png skipped: matplotlib is not installed ({exc}; "
                                  f"{EXTRA_HINT})")
    else:
        written["png"] = str(plots.plot_bandwidth(report, out / "bench.png"))
    return written


def run_command(args: argparse.Namespace) -> int:
    sizes = args.sizes or (FULL_SIZES if args.full else DEFAULT_SIZES)
    budget = args.budget if args.budget is not None else (3.0 if args.full else 0.7)
    report = run(sizes, args.dtypes, args.variants, args.only,
                 budget=budget, min_repeats=5 if args.full else 3,
                 min_time=5e-3 if args.full else 2e-3, threads=args.threads,
                 progress=None if args.quiet else sys.stderr, state_formats=args.state_formats)
    print(format_tables(report))
    if args.markdown:
        print("\n" + format_markdown(report))
    if args.out:
        try:
            written = write_outputs(report, args.out)
        except OSError as exc:
            print(f"fastrms bench: error: cannot write into {str(args.out)!r}: {exc}",
                  file=sys.stderr)
            return 1
        print(f"\nwrote {written['json']}" + (f" and {written['png']}" if written["png"] else
                                               f" ({written['png_skipped']})"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m fastrms.report.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
