"""What a fastrms call costs right after a parallel torch op, with one or two OpenMP runtimes.

    python bench/check_omp_handoff.py               # this process, as it is
    python bench/check_omp_handoff.py --compare     # the cases below, each in a subprocess

torch ships its own ``libgomp.so.1``. Which copies a process holds depends on their sonames:
torch's CPU wheel names its copy ``libgomp.so.1``, the soname of the system's, so the dynamic
linker loads whichever comes first and binds everybody to it (one runtime, one thread pool,
shared by torch, fastrms and Numba's "omp" layer). A copy renamed by ``auditwheel repair``
(``libgomp-<hash>.so.1``, as wheels bundle it) is a second runtime with a second pool.

For each size the script times one ``fastrms.rmsprop_update`` call (automatic backend,
float32, plain) in these situations, one after another in every round, and prints medians:

- ``alone``: right after an untimed call of itself;
- ``after torch op``: right after ``torch.add`` over 2^21 float32 elements (a parallel region
  in torch's pool; 25 MB through the caches);
- ``after numpy op``: right after the same addition by NumPy (one thread, the same bytes): the
  cache effect alone, without a thread pool;
- ``after small torch op``: ``torch.add`` over 2^16 elements (parallel, 0.8 MB: little cache
  effect), and ``after small numpy op``, its serial twin.

It also times the hand-off between the pools (a parallel fastrms call right after a parallel
torch op, and the reverse, 2^18 elements each) and counts, in a 200 ms sleep right after a
parallel region, the CPU time of each thread: the workers that spin (GOMP_SPINCOUNT, 300,000
iterations by default, about 5 ms of a core here) before they sleep.

``--compare`` runs it with the default environment, with ``OMP_WAIT_POLICY=PASSIVE`` (no
spinning anywhere), and in a copy of fastrms whose extension is re-linked to a renamed libgomp.
That copy is a second runtime only if fastrms's extension is loaded before torch is imported:
torch puts its libgomp in the global symbol scope (``LD_DEBUG=bindings`` shows fastrms's
``GOMP_parallel`` bound to torch's copy otherwise). With two runtimes in use it tries the
prototype fixes: fastrms's own copy passive or spinning briefly (``GOMP_SPINCOUNT`` in the
environment while that copy loads, removed before torch's loads), and ``libgomp.so.1`` loaded
into the global scope before fastrms's extension, so that the extension binds to it and
everybody shares one runtime again. The copy lives under /tmp and needs ``patchelf``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
CASES = ("alone", "after torch op", "after numpy op", "after small torch op",
         "after small numpy op")


def gomp_copies() -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if "gomp" in line.split()[-1]})


def measure(sizes=SIZES, rounds: int = 101, own_spincount: int | None = None,
            fastrms_first: bool = False, share_loaded_gomp: bool = False) -> dict:
    """Median seconds of one fastrms call in each situation, per size.

    ``fastrms_first`` loads fastrms's C extension (and so its libgomp) before torch is
    imported. It matters: torch puts its libgomp in the process's global symbol scope, so an
    extension loaded after it binds its OpenMP calls to torch's copy even if it brings its own.
    Two prototype fixes, with ``fastrms_first``: ``own_spincount`` sets GOMP_SPINCOUNT for
    the load of fastrms's copy only (0: passive; torch's copy, loaded later, reads the restored
    environment); ``share_loaded_gomp`` first loads the process's ``libgomp.so.1`` (the
    system's, or torch's if torch came first) into the global symbol scope, so that the
    extension binds to it and its own copy stays unused: one runtime again.
    """
    import numpy as np

    def load_fastrms():
        import fastrms

        fastrms.rmsprop_update(np.ones(10**5, np.float32), np.ones(10**5, np.float32),
                               np.ones(10**5, np.float32), lr=1e-3)  # loads the C extension
        return fastrms

    if fastrms_first:
        if share_loaded_gomp:
            import ctypes

            ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
        if own_spincount is not None:
            os.environ["GOMP_SPINCOUNT"] = str(own_spincount)
        fastrms = load_fastrms()
        if own_spincount is not None:
            del os.environ["GOMP_SPINCOUNT"]
        import torch
    else:
        import torch

        fastrms = load_fastrms()
    threads = len(os.sched_getaffinity(0))
    fastrms.set_num_threads(threads)
    torch.set_num_threads(threads)
    big = [torch.rand(2**21) for _ in range(3)]
    small = [torch.rand(2**16) for _ in range(3)]
    before = {
        "after torch op": lambda: torch.add(big[0], big[1], out=big[2]),
        "after numpy op": (lambda x, y, z: lambda: np.add(x, y, out=z))(
            *(t.numpy() for t in big)),
        "after small torch op": lambda: torch.add(small[0], small[1], out=small[2]),
        "after small numpy op": (lambda x, y, z: lambda: np.add(x, y, out=z))(
            *(t.numpy() for t in small)),
    }
    result = {"gomp": gomp_copies(), "threads": threads, "sizes": {},
              "ping_pong": _ping_pong(fastrms, torch, np, rounds),
              "spin": _spin(fastrms, torch, np)}
    for n in sizes:
        rng = np.random.default_rng(0)
        p, g = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
        s = rng.random(n, dtype=np.float32) + np.float32(0.5)

        def step():
            fastrms.rmsprop_update(p, g, s, lr=1e-3, alpha=0.99, eps=1e-8)
        count = max(15, min(rounds, int(rounds * 1e5 / n)))
        samples = {case: [] for case in CASES}
        for _ in range(count):
            for case in CASES:
                before.get(case, step)()
                start = time.perf_counter_ns()
                step()
                samples[case].append(time.perf_counter_ns() - start)
        result["sizes"][n] = {case: statistics.median(v) * 1e-9 for case, v in samples.items()}
    return result


def _ping_pong(fastrms, torch, np, rounds: int) -> dict:
    """Median seconds of a parallel fastrms call (2^18 elements) right after a parallel torch
    op (2^18 elements), and of that torch op right after the fastrms call: the hand-off between
    the pools in a training loop, without the cache effects of big arrays."""
    n = 2**18
    p, g = np.ones(n, np.float32), np.ones(n, np.float32)
    s = np.full(n, 2.0, np.float32)
    x, y, z = (torch.rand(n) for _ in range(3))

    def ours():
        fastrms.rmsprop_update(p, g, s, lr=1e-3, alpha=0.99, eps=1e-8)

    def theirs():
        torch.add(x, y, out=z)
    out = {"fastrms after fastrms": [], "fastrms after torch": [], "torch after torch": [],
           "torch after fastrms": []}
    for _ in range(rounds):
        for label, first, second in (("fastrms after fastrms", ours, ours),
                                     ("fastrms after torch", theirs, ours),
                                     ("torch after torch", theirs, theirs),
                                     ("torch after fastrms", ours, theirs)):
            first()
            start = time.perf_counter_ns()
            second()
            out[label].append(time.perf_counter_ns() - start)
    return {label: statistics.median(v) * 1e-9 for label, v in out.items()}


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process (Linux /proc/self/task/*/schedstat, whose
    first field is the time on a CPU in nanoseconds: /stat counts only whole clock ticks)."""
    out = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                out[task] = int(f.read().split()[0]) * 1e-9
        except (OSError, ValueError, IndexError):
            continue
    return out


def _spin(fastrms, torch, np) -> dict:
    """During a 200 ms sleep right after a parallel region: the CPU seconds the process burns
    and how many threads burn more than a millisecond (workers spinning, GOMP_SPINCOUNT,
    before they sleep). Robust to other processes' noise: it counts CPU time, not wall time."""
    def cpu():
        return _thread_cpu()
    n = 2**18
    p, g, s = np.ones(n, np.float32), np.ones(n, np.float32), np.full(n, 2.0, np.float32)
    x, y, z = (torch.rand(n) for _ in range(3))
    cases = {"after fastrms": lambda: fastrms.rmsprop_update(p, g, s, lr=1e-3),
             "after torch": lambda: torch.add(x, y, out=z)}
    cases["after torch then fastrms"] = lambda: (cases["after torch"](), cases["after fastrms"]())
    out = {}
    for label, run in cases.items():
        burnt, spinning = [], []
        for _ in range(5):
            run()
            start = cpu()
            time.sleep(0.2)
            end = cpu()
            per_thread = [end[t] - start.get(t, 0.0) for t in end]
            burnt.append(sum(per_thread))
            spinning.append(sum(1 for x in per_thread if x > 1e-3))
        out[label] = (statistics.median(burnt), statistics.median(spinning))
    return out


def _relinked_copy(source: Path, where: Path) -> Path:
    """A copy of the fastrms package whose C extension needs ``libgomp-fastrms.so.1``, a renamed
    copy of the system's libgomp beside it: what ``auditwheel repair`` would ship."""
    package = where / "fastrms"
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__"))
    extension = next(package.glob("_fastrms_c*.so"))
    needed = subprocess.run(["patchelf", "--print-needed", str(extension)], check=True,
                            capture_output=True, text=True).stdout.split()
    gomp = next(name for name in needed if name.startswith("libgomp"))
    system = subprocess.run(["gcc", "-print-file-name=libgomp.so.1"], check=True,
                            capture_output=True, text=True).stdout.strip()
    renamed = package / "libgomp-fastrms.so.1"
    shutil.copy(os.path.realpath(system), renamed)
    subprocess.run(["patchelf", "--set-soname", renamed.name, str(renamed)], check=True)
    subprocess.run(["patchelf", "--replace-needed", gomp, renamed.name, str(extension)],
                   check=True)
    subprocess.run(["patchelf", "--set-rpath", "$ORIGIN", str(extension)], check=True)
    return where


def compare(sizes, rounds: int) -> None:
    here = Path(__file__).resolve()
    package = Path(__import__("fastrms").__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        relinked = _relinked_copy(package, Path(tmp))
        runs = [  # label, environment, package path, options, --fastrms-first
            ("one runtime, default", {}, package.parent, [], False),
            ("one runtime, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"},
             package.parent, [], False),
            ("two copies mapped, torch first: fastrms bound to torch's", {}, relinked, [],
             False),
            ("two runtimes in use (fastrms first), default", {}, relinked, [], True),
            ("two runtimes, fastrms's copy passive (GOMP_SPINCOUNT=0 at its load)", {},
             relinked, ["--own-spincount", "0"], True),
            ("two runtimes, fastrms's copy spinning briefly (GOMP_SPINCOUNT=10000)", {},
             relinked, ["--own-spincount", "10000"], True),
            ("two runtimes, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"},
             relinked, [], True),
            ("fix: libgomp.so.1 loaded RTLD_GLOBAL before fastrms's extension", {}, relinked,
             ["--share-loaded-gomp"], True),
        ]
        for label, extra_env, path, options, first in runs:
            env = dict(os.environ, **extra_env)
            env["PYTHONPATH"] = f"{path}{os.pathsep}{env.get('PYTHONPATH', '')}"
            args = [sys.executable, str(here), "--json", "--rounds", str(rounds),
                    "--sizes", ",".join(str(n) for n in sizes)]
            args += options
            if first:
                args.append("--fastrms-first")
            out = subprocess.run(args, env=env, cwd=tmp, capture_output=True, text=True,
                                 timeout=900)
            if out.returncode:
                print(f"{label}: failed\n{out.stderr[-2000:]}")
                continue
            report(label, json.loads(out.stdout.splitlines()[-1]))


def report(label: str, result: dict) -> None:
    print(f"\n== {label}: libgomp loaded: {', '.join(result['gomp'])}")
    print("   in a 200 ms sleep right after a parallel region, CPU ms burnt (threads spinning): "
          + ", ".join(f"{k} {v[0] * 1e3:.1f} ({v[1]:.0f})" for k, v in result["spin"].items()))
    print("   hand-off, 2^18 elements each (median us): "
          + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in result["ping_pong"].items()))
    print(f"   {'n':>6}  " + "  ".join(f"{case:>20}" for case in CASES) + "   (median us)")
    for n, cases in result["sizes"].items():
        print(f"   {float(n):6.0e}  " + "  ".join(f"{cases[c] * 1e6:20.2f}" for c in CASES),
              flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES))
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--own-spincount", type=int, default=None,
                        help="GOMP_SPINCOUNT while fastrms's extension (its libgomp) loads")
    parser.add_argument("--share-loaded-gomp", action="store_true",
                        help="load libgomp.so.1 RTLD_GLOBAL before fastrms's extension")
    parser.add_argument("--fastrms-first", action="store_true",
                        help="load fastrms's C extension before importing torch")
    args = parser.parse_args(argv)
    sizes = [int(float(n)) for n in args.sizes.split(",")]
    if args.compare:
        compare(sizes, args.rounds)
        return
    result = measure(sizes, args.rounds, args.own_spincount, args.fastrms_first,
                     args.share_loaded_gomp)
    if args.json:
        print(json.dumps(result))
    else:
        import torch

        print(torch.__config__.parallel_info())
        report("this process", result)


if __name__ == "__main__":
    main()
