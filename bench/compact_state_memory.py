"""Peak memory of ``fastrms.RMSprop``'s state per parameter, by ``state_format``: float32 vs
bfloat16 vs blockwise8 (issue 15: about 1.02 bytes per buffer for blockwise8 against 4).

Each measurement runs in a fresh subprocess (peak RSS is a per-process high-water mark): it
allocates and touches the parameters and one gradient (10^8 float32 elements by default), loads
the backend (one step of a tiny optimizer), reads the peak RSS, builds the optimizer, takes one step (which touches every state page), and reads
the peak RSS again. The difference over the element count is the state's bytes per parameter;
divided by the number of buffers (``square_avg`` alone, or with ``momentum_buffer``) it is the
bytes per buffer. Needs Linux (``/proc/self/status``, VmHWM).

    python bench/compact_state_memory.py                 # 10^8 parameters, C backend
    python bench/compact_state_memory.py --n 10000000 --params 10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

FORMATS = ("float32", "bfloat16", "blockwise8")

CHILD = r"""
import json, sys
import numpy as np
import fastrms

def peak_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

n, count, state_format, momentum, backend = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                             float(sys.argv[4]), sys.argv[5])
sizes = [n // count + (1 if k < n % count else 0) for k in range(count)]
params = [np.ones(size, np.float32) for size in sizes]
grads = [np.full(size, 0.5, np.float32) for size in sizes]
# Load the backend and its compact path first: their code pages are not the state's.
warm = [np.ones(300, np.float32)]
fastrms.RMSprop(warm, momentum=momentum, state_format=state_format,
                backend=backend).step([np.ones(300, np.float32)])
before = peak_bytes()
opt = fastrms.RMSprop(params, lr=1e-3, momentum=momentum, state_format=state_format,
                      backend=backend)
opt.step(grads)
after = peak_bytes()
print(json.dumps({"before": before, "after": after}))
"""


def measure(n: int, count: int, state_format: str, momentum: float, backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(count), state_format,
                          str(momentum), backend], capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10 ** 8, help="parameters (elements)")
    parser.add_argument("--params", type=int, default=1, help="arrays they are split into")
    parser.add_argument("--backend", default="c")
    args = parser.parse_args()
    print(f"{args.n:.0e} float32 parameters in {args.params} array(s), backend {args.backend}; "
          f"peak RSS (VmHWM) increase over the parameters and gradients")
    print(f"{'state_format':>12} {'buffers':>8} {'state MiB':>10} {'bytes/param':>12} "
          f"{'bytes/param/buffer':>19}")
    for momentum, buffers in ((0.0, 1), (0.9, 2)):
        for state_format in FORMATS:
            got = measure(args.n, args.params, state_format, momentum, args.backend)
            state = got["after"] - got["before"]
            print(f"{state_format:>12} {buffers:>8} {state / 2 ** 20:>10.1f} "
                  f"{state / args.n:>12.3f} {state / args.n / buffers:>19.3f}")


if __name__ == "__main__":
    main()
