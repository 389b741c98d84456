"""``python -m fastrms``: ``info`` prints :func:`fastrms.info`; ``bench`` and ``demo`` are the
main job (:mod:`fastrms.report`)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from .report import bench, demo  # light: NumPy only; the peers load when they run

    parser = argparse.ArgumentParser(prog="fastrms", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="show backends, SIMD level, threads and choices")
    info_parser.add_argument("--size", type=int, default=10**6, help="size for the automatic choice")
    info_parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    info_parser.add_argument("--load-numba", action="store_true",
                             help="load the Numba backend first, to report its threading layer")
    bench.add_arguments(commands.add_parser(
        "bench", help="time the update against NumPy, torch, numexpr and optax",
        description=bench.__doc__.split("\n\n")[0]))
    demo.add_arguments(commands.add_parser(
        "demo", help="train an MLP on digits with fastrms.RMSprop; draw optimizer paths",
        description=demo.__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)

    if args.command == "bench":
        return bench.run_command(args)
    if args.command == "demo":
        return demo.run_command(args)

    import fastrms

    if args.command == "info":
        if args.load_numba:
            fastrms.backends.load("numba")
        json.dump(fastrms.info(args.size, args.dtype), sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
