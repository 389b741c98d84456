"""``python -m fastrms info``: print :func:`fastrms.info`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrms", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="show backends, SIMD level, threads and choices")
    info_parser.add_argument("--size", type=int, default=10**6, help="size for the automatic choice")
    info_parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    info_parser.add_argument("--load-numba", action="store_true",
                             help="load the Numba backend first, to report its threading layer")
    args = parser.parse_args(argv)

    import fastrms

    if args.command == "info":
        if args.load_numba:
            fastrms.backends.load("numba")
        json.dump(fastrms.info(args.size, args.dtype), sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
