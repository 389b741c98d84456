"""A direct measurement of the ratios ``pytest bench --benchmark-only`` reports, to check them.

    python bench/check_ratios.py [--rounds 41] [--only roofline,formula,torch,compile]

It shares no code with the suite (not bench/targets.py, not fastrms.report.registry): its own
arrays, its own timing loop, and besides the C roofline an independent roofline compiled by
Numba. Each pair of steps is timed in alternation, A B then B A, every timed call preceded by an
untimed call of the same step, and the ratio of each round is one sample: the script prints the
median of those, their interquartile range and the ratio of the best times. It also prints the
CPU, the thread counts and how busy other processes kept the cores, since on a shared 2-core
machine that is most of the noise.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np

import fastrms
from fastrms import backends

LR, ALPHA, EPS, MOMENTUM = 1e-3, 0.99, 1e-8, 0.9
VARIANTS = {"plain": {}, "momentum": {"momentum": MOMENTUM}, "centered": {"centered": True}}
FLAGS = {"plain": 0, "momentum": 32, "centered": 2}  # fastrms._coefficients.MOMENTUM, CENTERED


def busy_cores_of_others():
    """A callable returning the cores other processes kept busy since this call (Linux)."""
    def read():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        own = os.times()
        return time.perf_counter(), sum(fields) - fields[3] - fields[4], own.user + own.system
    t0, busy0, own0 = read()
    tick = os.sysconf("SC_CLK_TCK")

    def since():
        t1, busy1, own1 = read()
        return max(0.0, ((busy1 - busy0) / tick - (own1 - own0)) / (t1 - t0))
    return since


def arrays(variant: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {"p": np.empty(n, np.float32), "g": np.empty(n, np.float32),
           "s": np.empty(n, np.float32)}
    out["p"][:] = rng.standard_normal(n, dtype=np.float32)
    out["g"][:] = rng.standard_normal(n, dtype=np.float32)
    out["s"][:] = rng.random(n, dtype=np.float32) + np.float32(0.5)
    if variant == "momentum":
        out["b"] = np.zeros(n, np.float32)
    if variant == "centered":
        out["a"] = np.zeros(n, np.float32)
    return out


def kernel(backend: str, variant: str, a: dict):
    p, g, s = a["p"], a["g"], a["s"]
    if variant == "momentum":
        b = a["b"]
        return lambda: fastrms.rmsprop_update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS,
                                              momentum=MOMENTUM, momentum_buffer=b,
                                              backend=backend)
    if variant == "centered":
        avg = a["a"]
        return lambda: fastrms.rmsprop_update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS,
                                              centered=True, grad_avg=avg, backend=backend)
    return lambda: fastrms.rmsprop_update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, backend=backend)


def c_roofline(variant: str, a: dict):
    roofline = backends.load("c").roofline
    args = (FLAGS[variant], a["p"], a["g"], a["s"], a.get("b"), a.get("a"))
    return lambda: roofline(*args)


@functools.lru_cache(maxsize=None)
def _numba_loops():
    import numba

    @numba.njit(parallel=True, nogil=True)
    def two(p, g, s):
        for i in numba.prange(p.size):
            s[i] += g[i]
            p[i] += s[i]

    @numba.njit(parallel=True, nogil=True)
    def three(p, g, s, x):
        for i in numba.prange(p.size):
            s[i] += g[i]
            x[i] += g[i]
            p[i] += s[i]
    return two, three


def numba_roofline(variant: str, a: dict):
    """The same streams in a loop compiled by Numba: a roofline that owes nothing to csrc/."""
    two, three = _numba_loops()
    extra = a.get("b", a.get("a"))
    if extra is None:
        two(a["p"], a["g"], a["s"])
        return lambda: two(a["p"], a["g"], a["s"])
    three(a["p"], a["g"], a["s"], extra)
    return lambda: three(a["p"], a["g"], a["s"], extra)


def pair(slower, faster, rounds: int, batch_seconds: float = 1e-3):
    """time(slower) / time(faster) per round: (median, q1, q3, best/best)."""
    def calls_for(step):
        step()
        start = time.perf_counter()
        step()
        return max(1, int(batch_seconds / max(time.perf_counter() - start, 1e-9)))
    counts = (calls_for(slower), calls_for(faster))
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        slower()
        faster()

    def timed(step, count):
        step()
        start = time.perf_counter_ns()
        for _ in range(count):
            step()
        return (time.perf_counter_ns() - start) / count
    ratios, best_s, best_f = [], float("inf"), float("inf")
    for r in range(rounds):
        if r % 2:
            f = timed(faster, counts[1])
            s = timed(slower, counts[0])
        else:
            s = timed(slower, counts[0])
            f = timed(faster, counts[1])
        ratios.append(s / f)
        best_s, best_f = min(best_s, s), min(best_f, f)
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3, best_s / best_f, best_f * 1e-9


def show(what: str, result) -> None:
    median, q1, q3, best, seconds = result
    print(f"  {what:<58} {median:6.3f}  IQR {q1:5.3f}-{q3:5.3f}  best/best {best:6.3f}"
          f"  ({seconds * 1e6:,.1f} us)", flush=True)


def roofline_fractions(n: int, rounds: int) -> None:
    print(f"fraction of the roofline at n={n:.0e} float32 (roofline / kernel; each on its own "
          "arrays)")
    for variant in VARIANTS:
        for backend in ("c", "numba"):
            if not backends.availability(backend)[0]:
                continue
            step = kernel(backend, variant, arrays(variant, n, 0))
            show(f"{variant}: C roofline / {backend}",
                 pair(c_roofline(variant, arrays(variant, n, 1)), step, rounds))
            show(f"{variant}: Numba roofline / {backend}",
                 pair(numba_roofline(variant, arrays(variant, n, 2)), step, rounds))


def formula(n: int, rounds: int) -> None:
    print(f"NumPy formula / fastrms automatic choice at n={n:.0e} float32")
    for variant, options in VARIANTS.items():
        a = arrays(variant, n, 0)
        p, g = a["p"], a["g"]
        state = dict(a)

        def by_formula():
            s = state["s"] = ALPHA * state["s"] + (1 - ALPHA) * g * g
            if "a" in state:
                avg = state["a"] = ALPHA * state["a"] + (1 - ALPHA) * g
                s = s - avg * avg
            if "b" in state:
                b = state["b"] = MOMENTUM * state["b"] + g / (np.sqrt(s) + EPS)
                p[...] -= LR * b
            else:
                p[...] -= LR * g / (np.sqrt(s) + EPS)
        with np.errstate(all="ignore"):
            show(f"{variant}: formula / auto",
                 pair(by_formula, kernel(None, variant, arrays(variant, n, 1)), rounds))


def torch_models(rounds: int) -> None:
    import torch

    from fastrms.torch import RMSprop

    shapes = [(990, 990), (990,)] * 10
    total = sum(int(np.prod(s)) for s in shapes)
    print(f"torch: {len(shapes)} tensors, {total:,} float32 elements, lr 1e-4")

    def params(seed):
        generator = torch.Generator().manual_seed(seed)
        out = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
        for p in out:
            p.grad = torch.randn(p.shape, generator=generator)
        return out
    roofline = backends.load("c").roofline
    per_tensor = [tuple(torch.randn(s).reshape(-1).numpy() for _ in range(3)) for s in shapes]
    for p, g, s in per_tensor:
        s[:] = np.abs(s) + 0.5

    def roofline_per_tensor():
        for p, g, s in per_tensor:
            roofline(0, p, g, s)
    flat = [torch.randn(total).numpy() for _ in range(3)]  # torch's allocator, as the tensors'
    flat[2][:] = np.abs(flat[2]) + 0.5

    def roofline_flat():
        roofline(0, *flat)
    drop_in = RMSprop(params(0), lr=1e-4).step
    flattened = RMSprop(params(1), lr=1e-4, flatten=True).step
    show("roofline (one call) / fastrms.torch.RMSprop", pair(roofline_flat, drop_in, rounds))
    show("roofline (one call) / fastrms.torch.RMSprop(flatten=True)",
         pair(roofline_flat, flattened, rounds))
    show("roofline (a call per tensor) / fastrms.torch.RMSprop",
         pair(roofline_per_tensor, drop_in, rounds))
    show("torch.optim.RMSprop / fastrms.torch.RMSprop",
         pair(torch.optim.RMSprop(params(2), lr=1e-4).step, drop_in, max(9, rounds // 3)))


def compiled(rounds: int) -> None:
    import torch

    print("torch.compile(torch.optim.RMSprop.step) / fastrms.rmsprop_update, float32 plain")
    for n in (10**3, 10**4, 10**5, 10**6, 10**7):
        a = arrays("plain", n, 0)
        p = torch.nn.Parameter(torch.from_numpy(a["p"]))
        p.grad = torch.from_numpy(a["g"])
        opt = torch.optim.RMSprop([p], lr=LR, alpha=ALPHA, eps=EPS)
        torch.compiler.reset()

        @torch.compile
        def step():
            opt.step()
        start = time.perf_counter()
        step()
        compile_seconds = time.perf_counter() - start
        show(f"n={n:.0e} (compiled in {compile_seconds:.1f} s)",
             pair(step, kernel(None, "plain", arrays("plain", n, 1)), rounds))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--n", type=float, default=1e7, help="size of the roofline fractions")
    parser.add_argument("--only", default="roofline,formula,torch,compile")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    fastrms.set_num_threads(threads)
    wanted = args.only.split(",")
    if "torch" in wanted or "compile" in wanted:
        import torch
        torch.set_num_threads(threads)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   "?")
    print(f"{cpu}, {os.cpu_count()} CPUs, threads {threads} (fastrms {fastrms.get_num_threads()})")
    others = busy_cores_of_others()
    if "roofline" in wanted:
        roofline_fractions(int(args.n), args.rounds)
    if "formula" in wanted:
        formula(10**3, args.rounds)
    if "torch" in wanted:
        torch_models(args.rounds)
    if "compile" in wanted:
        compiled(args.rounds)
    print(f"other processes kept {others():.2f} cores busy on average")


if __name__ == "__main__":
    main()
