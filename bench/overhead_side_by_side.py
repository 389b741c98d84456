"""Per-step cost of the optimizer front ends, for comparing two checkouts side by side.

Run from a checkout's root (``python bench/overhead_side_by_side.py [threads]``); prints one JSON line of
best-of timings in microseconds per step for: fastrms.RMSprop on 200 x 5000 float32 arrays as a
list and as FlatParams, fastrms.torch.RMSprop on 400 small tensors and on 20 x 5e5 tensors.
Alternate runs of two checkouts (``for i in 1 2 3; do (cd a && python ...); (cd b && ...); done``)
to compare them on a noisy machine.
"""
import json
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import fastrms  # noqa: E402


def best(fn, seconds=1.5, batch=5):
    fn()
    best_time = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        best_time = min(best_time, (time.perf_counter() - t0) / batch)
    return best_time * 1e6


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    if threads:
        fastrms.set_num_threads(threads)
    out = {"fastrms": fastrms.__file__, "threads": fastrms.get_num_threads()}
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(5000).astype(np.float32) for _ in range(200)]
    grads = [rng.standard_normal(5000).astype(np.float32) for _ in range(200)]
    listed = fastrms.RMSprop([a.copy() for a in arrays], lr=1e-4)
    out["numpy_list_200x5000"] = best(lambda: listed.step(grads))
    flat = fastrms.FlatParams(arrays)
    for view, g in zip(flat.grads, grads):
        view[...] = g
    flat_opt = fastrms.RMSprop(flat, lr=1e-4)
    out["numpy_flat_200x5000"] = best(flat_opt.step)
    try:
        import torch
        import fastrms.torch as fastrms_torch
    except ImportError:
        print(json.dumps(out))
        return
    torch.manual_seed(0)
    for label, count, size in (("torch_400_small", 400, 250), ("torch_20x5e5", 20, 500_000)):
        params = [torch.nn.Parameter(torch.randn(size)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn(size)
        opt = fastrms_torch.RMSprop(params, lr=1e-4)
        out[label] = best(opt.step, batch=5 if size < 1000 else 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
