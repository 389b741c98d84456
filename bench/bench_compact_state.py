"""Compact state speed: blockwise8 / bfloat16 state against the float32 step and their rooflines.

Plain variant, bytes per element (read p, g, s; write p, s): float32 everything 20; float32 p
and g with blockwise8 s 4+4+1+4+1 + 8/256 = 14.03; bfloat16 p and g with blockwise8 s
2+2+1+2+1 + 8/256 = 8.03. Each step is timed with its roofline (the same streams, trivial
arithmetic, csrc/compact_state.h) round-robin in one process (bench/targets.py), so the ratios
are robust to the load of a shared machine. Targets of issue 15: float32 p + blockwise8 s
>= 1.3x the float32 step, bfloat16 p and g + blockwise8 s >= 2.2x, each >= 0.85 of its roofline.

    python bench/bench_compact_state.py [--n 10000000] [--threads 2] [--rounds 30] [--numba]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from targets import cpu_model, interleaved_best, pin_threads  # noqa: E402

import fastrms  # noqa: E402
from fastrms import backends  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


def setups(n: int, momentum: bool, with_numba: bool):
    rng = np.random.default_rng(0)
    c = backends.load("c")
    compact = backends.compact_module(c)
    options = dict(lr=1e-3, alpha=0.99, eps=1e-8, momentum=0.9 if momentum else 0.0)

    def arrays(param_dtype, state):
        p = rng.standard_normal(n).astype(F32).astype(param_dtype)
        g = (rng.standard_normal(n) * 0.1).astype(F32).astype(param_dtype)
        if state == "blockwise8":
            s = fastrms.Blockwise8.from_float32(np.abs(g.astype(F32)) ** 2)
            b = fastrms.Blockwise8.zeros(n, signed=True) if momentum else None
        else:
            s = (g.astype(F32) ** 2).astype(state)
            b = np.zeros(n, state) if momentum else None
        return p, g, s, b

    steps = {}

    def add(name, param_dtype, state, backend="c"):
        p, g, s, b = arrays(param_dtype, state)
        steps[name] = lambda: fastrms.rmsprop_update(p, g, s, momentum_buffer=b,
                                                     backend=backend, **options)
        rp, rg, rs, rb = arrays(param_dtype, state)
        flags = 32 if momentum else 0
        if state == F32 and param_dtype == F32:
            steps[f"roofline {name}"] = lambda: c.roofline(flags, rp, rg, rs, rb)
        elif backend == "c":
            steps[f"roofline {name}"] = lambda: compact.roofline_compact(flags, rp, rg, rs, rb)

    add("float32", F32, F32)
    add("float32 p + blockwise8 s", F32, "blockwise8")
    add("bfloat16 p,g + blockwise8 s", BF16, "blockwise8")
    add("bfloat16 p,g + bfloat16 s", BF16, BF16)
    if with_numba:
        p, g, s, b = arrays(BF16, "blockwise8")
        steps["numba bfloat16 p,g + blockwise8 s"] = lambda: fastrms.rmsprop_update(
            p, g, s, momentum_buffer=b, backend="numba", **options)
        p2, g2, s2, b2 = arrays(F32, "blockwise8")
        steps["numba float32 p + blockwise8 s"] = lambda: fastrms.rmsprop_update(
            p2, g2, s2, momentum_buffer=b2, backend="numba", **options)
    for step in steps.values():  # compile, warm
        step()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--momentum", action="store_true")
    parser.add_argument("--numba", action="store_true")
    args = parser.parse_args()
    settings = pin_threads(args.threads)
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    steps = setups(args.n, args.momentum, args.numba)
    best = interleaved_best(steps, rounds=args.rounds, batch_seconds=0.05)
    base = best["float32"]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"CPU: {cpu_model()}; n = {args.n}; threads: {settings}; "
          f"{'momentum' if args.momentum else 'plain'}; load average (1 / 5 / 15 min) before "
          f"{load_before}, after {load}")
    print("| step | ms | speed-up vs float32 | fraction of its roofline |")
    print("|---|---|---|---|")
    for name, seconds in best.items():
        if name.startswith("roofline"):
            continue
        roof = best.get(f"roofline {name}")
        fraction = f"{roof / seconds:.2f}" if roof else ""
        print(f"| {name} | {seconds * 1e3:.2f} | {base / seconds:.2f}x | {fraction} |")
    for name, seconds in best.items():
        if name.startswith("roofline"):
            print(f"| {name} | {seconds * 1e3:.2f} | {base / seconds:.2f}x | 1 |")


if __name__ == "__main__":
    main()
