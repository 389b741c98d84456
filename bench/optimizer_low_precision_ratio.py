"""The bfloat16-parameter step against the float32 step, through the optimizers, at 10^7.

``fastrms.RMSprop`` (C backend) on one array of ``n`` elements: float32 params and grads, and
bfloat16 params and grads (float32 state) under nearest and stochastic rounding and with
master weights; and ``fastrms.torch.RMSprop`` on a float32 and a bfloat16 tensor. Best times
of interleaved rounds in one process (bench/targets.py ``interleaved_best``); the ratios are
float32 time / 16-bit time (ideal 20/14 = 1.43 for the plain variant; master weights move 20
bytes per element too). Not run in CI: ``python bench/optimizer_low_precision_ratio.py``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastrms  # noqa: E402
from targets import interleaved_best  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown")


def numpy_steps(n: int) -> dict:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    grad32 = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    steps = {}
    for name, dtype, options in (("float32", np.float32, {}),
                                 ("bfloat16 nearest", BF16, {}),
                                 ("bfloat16 stochastic", BF16, {"param_rounding": "stochastic"}),
                                 ("bfloat16 master", BF16, {"master_weights": True})):
        param = base.astype(dtype)
        grads = [grad32.astype(dtype)]
        opt = fastrms.RMSprop([param], lr=1e-3, backend="c", **options)
        steps[f"RMSprop {name}"] = lambda opt=opt, grads=grads: opt.step(grads)
    return steps


def torch_steps(n: int) -> dict:
    try:
        import torch

        import fastrms.torch
    except ImportError:
        return {}
    steps = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        p = torch.randn(n).to(dtype).requires_grad_()
        p.grad = (torch.randn(n) * 1e-3).to(dtype)
        opt = fastrms.torch.RMSprop([p], lr=1e-3, backend="c")
        steps[f"torch drop-in {name}"] = opt.step
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="fastrms threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        fastrms.set_num_threads(args.threads)
    n = int(args.n)
    steps = {**numpy_steps(n), **torch_steps(n)}
    for step in steps.values():
        step()  # warm-up: pages touched, state allocated
    best = interleaved_best(steps, rounds=args.rounds, batch_seconds=0.05)
    print(f"CPU: {cpu_model()}; n = {n:.0e}; threads: {fastrms.get_num_threads()}")
    for name, seconds in best.items():
        print(f"  {name:<28} {seconds * 1e3:8.2f} ms")
    base = best["RMSprop float32"]
    for name in ("bfloat16 nearest", "bfloat16 stochastic", "bfloat16 master"):
        print(f"  float32 / {name}: {base / best['RMSprop ' + name]:.2f}x")
    print(f"  stochastic / nearest: "
          f"{best['RMSprop bfloat16 stochastic'] / best['RMSprop bfloat16 nearest']:.3f}")
    if "torch drop-in float32" in best:
        print(f"  torch drop-in float32 / bfloat16: "
              f"{best['torch drop-in float32'] / best['torch drop-in bfloat16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
