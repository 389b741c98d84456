"""``fastrms`` / ``python -m fastrms``: ``info`` prints :func:`fastrms.info` as JSON; ``bench``
and ``demo`` are the main job (:mod:`fastrms.report`)."""
from __future__ import annotations

import argparse
import json
import sys

#: ``fastrms --help``: plain text.
DESCRIPTION = """\
fastrms: the fused RMSProp update for CPU training.

  fastrms info    what is installed: backends (and why one is missing), SIMD level, threads,
                  and what automatic choice picks
  fastrms bench   time the update against NumPy, torch, numexpr and optax
  fastrms demo    train a small MLP on scikit-learn's digits with fastrms.RMSprop, and draw
                  optimizer paths

Each command has its own --help."""


def main(argv: list[str] | None = None) -> int:
    from .report import bench, demo  # light: NumPy only; the peers load when they run

    parser = bench.OneLineErrorParser(prog="fastrms", description=DESCRIPTION,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info_parser = commands.add_parser(
        "info", help="show backends, SIMD level, threads and choices",
        description="Print fastrms.info() as JSON: each backend (available or not, and why), "
                    "the SIMD level, threads, and what automatic choice picks.")
    info_parser.add_argument("--size", type=bench.positive_int, default=10**6, metavar="N",
                             help="the array size automatic choice is asked about "
                                  "(default %(default)s)")
    info_parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                             help="the dtype automatic choice is asked about (default "
                                  "%(default)s)")
    info_parser.add_argument("--load-numba", action="store_true",
                             help="load the Numba backend and run one parallel region first, "
                                  "so that Numba's threading layer is chosen and reported")
    bench.add_arguments(commands.add_parser(
        "bench", help="time the update against NumPy, torch, numexpr and optax",
        description=bench.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    demo.add_arguments(commands.add_parser(
        "demo", help="train an MLP on digits with fastrms.RMSprop; draw optimizer paths",
        description=demo.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)

    if args.command == "bench":
        return bench.run_command(args)
    if args.command == "demo":
        return demo.run_command(args)
    return _info(args)


def _info(args: argparse.Namespace) -> int:
    import fastrms

    if args.load_numba:
        try:
            _start_numba()
        except RuntimeError as exc:  # numba missing or broken: the report says why
            print(f"fastrms info: {exc}", file=sys.stderr)
    json.dump(fastrms.info(args.size, args.dtype), sys.stdout, indent=2)
    print()
    return 0


def _start_numba() -> None:
    """Load the Numba backend and run one parallel region: Numba picks its threading layer
    (omp, tbb or workqueue) only when a parallel region first runs."""
    import numpy as np

    from . import backends

    numba_backend = backends.load("numba")
    arrays = [np.zeros(4096, np.float32) for _ in range(3)]
    numba_backend.roofline(0, *arrays)  # always a prange, whatever the thread count


if __name__ == "__main__":
    sys.exit(main())
