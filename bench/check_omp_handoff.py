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

``--compare`` runs it with the default environment, with ``OMP_WAIT_POLICY=PASSIVE`` (no
spinning anywhere), and in a copy of fastrms whose extension is re-linked to a renamed libgomp
(two runtimes), with and without the prototype fix: fastrms's own copy made passive
(``GOMP_SPINCOUNT=0`` read by that copy alone, at its load, after torch's copy has read the
environment). The copy lives under /tmp and needs ``patchelf``.
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


def measure(sizes=SIZES, rounds: int = 101, passive_own_copy: bool = False) -> dict:
    """Median seconds of one fastrms call in each situation, per size."""
    import numpy as np
    import torch

    if passive_own_copy:  # the prototype fix: torch's copy has read the environment already
        torch.add(torch.ones(1), 1)
        os.environ["GOMP_SPINCOUNT"] = "0"
    import fastrms

    fastrms.rmsprop_update(np.ones(10**5, np.float32), np.ones(10**5, np.float32),
                           np.ones(10**5, np.float32), lr=1e-3)  # loads the C extension, its libgomp
    if passive_own_copy:
        del os.environ["GOMP_SPINCOUNT"]
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
    result = {"gomp": gomp_copies(), "threads": threads, "sizes": {}}
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
        runs = [
            ("one runtime, default", {}, package.parent, False),
            ("one runtime, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"},
             package.parent, False),
            ("two runtimes, default", {}, relinked, False),
            ("two runtimes, fastrms's copy passive (fix)", {}, relinked, True),
            ("two runtimes, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, relinked,
             False),
        ]
        for label, extra_env, path, passive in runs:
            env = dict(os.environ, **extra_env)
            env["PYTHONPATH"] = f"{path}{os.pathsep}{env.get('PYTHONPATH', '')}"
            args = [sys.executable, str(here), "--json", "--rounds", str(rounds),
                    "--sizes", ",".join(str(n) for n in sizes)]
            if passive:
                args.append("--passive-own-copy")
            out = subprocess.run(args, env=env, cwd=tmp, capture_output=True, text=True,
                                 timeout=900)
            if out.returncode:
                print(f"{label}: failed\n{out.stderr[-2000:]}")
                continue
            report(label, json.loads(out.stdout.splitlines()[-1]))


def report(label: str, result: dict) -> None:
    print(f"\n== {label}: libgomp loaded: {', '.join(result['gomp'])}")
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
    parser.add_argument("--passive-own-copy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(float(n)) for n in args.sizes.split(",")]
    if args.compare:
        compare(sizes, args.rounds)
        return
    result = measure(sizes, args.rounds, args.passive_own_copy)
    if args.json:
        print(json.dumps(result))
    else:
        import torch

        print(torch.__config__.parallel_info())
        report("this process", result)


if __name__ == "__main__":
    main()
