"""ShardedRMSprop on MPI: memory per rank and step time, measured in one run.

Run as ``mpiexec -n 2 python bench/bench_distributed.py`` (options: ``--size``, ``--rounds``,
``--bucket-bytes``, ``--sweep`` for a bucket-size sweep, ``--json PATH``). fastrms runs one
thread per rank. Over a FlatParams of ``--size`` float32 parameters (default 10^7) it measures

(a) memory: the resident set (VmRSS) a rank gains by building the optimizer and taking one
    step, for the unsharded ``fastrms.RMSprop(flat)`` and for ``ShardedRMSprop(flat)``, beside
    the bytes of the state buffers themselves;
(b) time, every variant in turn in each round (interleaved, so all see the same phases of a
    noisy machine), one call per variant per round, a barrier on each side of each call:
    - ``sharded step``: ``ShardedRMSprop.step()``;
    - ``its collectives alone``: the same bucketed reduce-scatter and all-gather with the update
      left out (target: the step takes at most 1.15x this);
    - ``MPI reduce-scatter + all-gather``: MPI's own blocking ``Reduce_scatter`` and in-place
      ``Allgatherv`` of the whole buffers (the textbook pair, for reference);
    - ``replicated``: ``Allreduce`` of the gradients, then ``fastrms.RMSprop`` updates every
      parameter on every rank (target: the sharded step is faster).
    After the timing, with 2 ranks, the sharded and replicated parameters must be equal bit for
    bit (both took the same steps; a sum of two gradients is the same in any order).

Under pytest (this file is collected from bench/), ``test_distributed_benchmark`` launches the
script: with ``--benchmark-disable`` a small smoke run (correctness and the report's shape
only); otherwise the full size, with the ratios in ``extra_info`` and the targets checked.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N = 10**7
TARGET_OVER_COLLECTIVES = 1.15  # sharded step / its collectives alone, at most
TARGET_OVER_REPLICATED = 1.0    # sharded step / replicated pattern, at most


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_flat(n: int, seed: int = 0):
    import fastrms

    rng = np.random.default_rng(seed)
    # a few arrays of uneven sizes, as a model has
    sizes = [n // 2 + 3, n // 3, n - (n // 2 + 3) - n // 3]
    flat = fastrms.FlatParams([rng.standard_normal(s).astype(np.float32) for s in sizes])
    return flat


def fill_grads(flat, rank: int) -> None:
    rng = np.random.default_rng(100 + rank)
    for view in flat.grads:
        view[...] = rng.standard_normal(view.shape).astype(np.float32)


def state_bytes(buffers) -> int:
    return sum(b.nbytes for entry in buffers for k, b in entry.items()
               if k in ("square_avg", "momentum_buffer", "grad_avg") and b is not None)


def large_allocations_are_mapped() -> None:
    """Make glibc serve every allocation of 64 KiB or more with its own mapping, returned to the
    system when freed (by default the threshold grows after the first large free, and freed
    buffers stay resident and are reused, which hides what an allocation costs)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the measurement is what it is
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)


def measure_memory(comm, n: int, bucket_bytes: int) -> dict:
    import fastrms
    from fastrms.distributed import ShardedRMSprop

    flat = make_flat(n)
    fill_grads(flat, comm.rank)  # every page of the buffers resident before measuring
    # MPI sets up its own buffers on the first collectives of each kind and size: not ours.
    warm = make_flat(min(n, 1 << 22), seed=1)
    ShardedRMSprop(warm, comm, lr=1e-4, bucket_bytes=bucket_bytes).step()
    del warm
    gc.collect()
    comm.Barrier()
    before = rss_bytes()
    opt = fastrms.RMSprop(flat, lr=1e-4)
    opt.step(grad_scale=comm.size)
    unsharded = {"rss_growth": rss_bytes() - before, "state_bytes": state_bytes(opt.flat_state())}
    del opt
    gc.collect()
    comm.Barrier()
    before = rss_bytes()
    opt = ShardedRMSprop(flat, comm, lr=1e-4, bucket_bytes=bucket_bytes)
    opt.step()
    staging = sum(slot.nbytes for slots in opt._slots for slot in slots)
    sharded = {"rss_growth": rss_bytes() - before, "state_bytes": state_bytes(opt.flat_state()),
               "staging_bytes": staging}
    del opt, flat
    gc.collect()
    return {"unsharded": unsharded, "sharded": sharded}


def measure_time(comm, n: int, rounds: int, bucket_bytes: int) -> dict:
    import fastrms
    from fastrms.distributed import ShardedRMSprop

    MPI = _mpi()
    world, rank = comm.size, comm.rank
    flat = make_flat(n)
    fill_grads(flat, rank)
    opt = ShardedRMSprop(flat, comm, lr=1e-4, bucket_bytes=bucket_bytes)

    replica = make_flat(n)
    fill_grads(replica, rank)
    local = {d: b.copy() for d, b in replica.grad_buffers.items()}
    replicated_opt = fastrms.RMSprop(replica, lr=1e-4)

    def replicated():
        for dtype, buffer in replica.grad_buffers.items():
            comm.Allreduce(local[dtype], buffer, op=MPI.SUM)
        replicated_opt.step(grad_scale=world)

    buffer = flat.grad_buffers[np.dtype(np.float32)]
    params = flat.param_buffers[np.dtype(np.float32)]
    bounds = opt.bounds[0]
    counts = [hi - lo for lo, hi in bounds]
    displs = [lo for lo, _ in bounds]
    shard = np.empty(counts[rank], np.float32)
    mpi_pair_params = params.copy()

    def mpi_pair():
        comm.Reduce_scatter(buffer, shard, counts, op=MPI.SUM)
        comm.Allgatherv(MPI.IN_PLACE, [mpi_pair_params, (counts, displs), MPI.FLOAT])

    variants = {"sharded step": opt.step, "its collectives alone": opt._exchange,
                "MPI reduce-scatter + all-gather": mpi_pair, "replicated": replicated}
    times = {name: [] for name in variants}
    for name, call in variants.items():  # warm up (first touches, MPI connections)
        call()
    for _ in range(rounds):
        for name, call in variants.items():
            comm.Barrier()
            start = time.perf_counter()
            call()
            comm.Barrier()
            times[name].append(time.perf_counter() - start)
    same = None
    if world == 2:  # both took rounds + 1 steps from the same parameters and gradients
        same = all(np.array_equal(a.view(np.uint32), b.view(np.uint32))
                   for a, b in zip(flat.params, replica.params))
    summary = {name: {"best_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3}
               for name, t in times.items()}
    med = {name: s["median_ms"] for name, s in summary.items()}
    best = {name: s["best_ms"] for name, s in summary.items()}
    ratios = {}
    for what, other in (("over its collectives alone", "its collectives alone"),
                        ("over MPI reduce-scatter + all-gather", "MPI reduce-scatter + all-gather"),
                        ("over replicated", "replicated")):
        ratios[f"sharded step {what} (medians)"] = med["sharded step"] / med[other]
        ratios[f"sharded step {what} (bests)"] = best["sharded step"] / best[other]
    return {"times": summary, "ratios": ratios, "buckets": len(opt._buckets),
            "sharded_equals_replicated": same}


def sweep(comm, n: int, rounds: int) -> dict:
    """Step time for several bucket sizes, interleaved."""
    from fastrms.distributed import ShardedRMSprop

    flat = make_flat(n)
    fill_grads(flat, comm.rank)
    sizes = [1 << k for k in range(16, 27, 1)]
    opts = {size: ShardedRMSprop(flat, comm, lr=1e-4, bucket_bytes=size) for size in sizes}
    times = {size: [] for size in sizes}
    for opt in opts.values():
        opt.step()
    for _ in range(rounds):
        for size, opt in opts.items():
            comm.Barrier()
            start = time.perf_counter()
            opt.step()
            comm.Barrier()
            times[size].append(time.perf_counter() - start)
    return {str(size): statistics.median(t) * 1e3 for size, t in times.items()}


def _mpi():
    from mpi4py import MPI

    return MPI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=N)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--bucket-bytes", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="also sweep bucket sizes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import fastrms
    from fastrms.distributed import DEFAULT_BUCKET_BYTES

    MPI = _mpi()
    comm = MPI.COMM_WORLD
    fastrms.set_num_threads(1)
    large_allocations_are_mapped()
    bucket_bytes = args.bucket_bytes or DEFAULT_BUCKET_BYTES
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "ranks": comm.size,
              "threads_per_rank": fastrms.get_num_threads(), "size": args.size,
              "dtype": "float32", "bucket_bytes": bucket_bytes,
              "mpi": MPI.Get_library_version().splitlines()[0].strip()}
    report["memory"] = comm.gather(measure_memory(comm, args.size, bucket_bytes))
    report["timing"] = measure_time(comm, args.size, args.rounds, bucket_bytes)
    if args.sweep:
        report["sweep_median_ms"] = sweep(comm, args.size, max(5, args.rounds // 3))
    if comm.rank == 0:
        print(format_report(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2))
    return 0


def format_report(report: dict) -> str:
    mib = 1 << 20
    lines = [f"ShardedRMSprop, {report['ranks']} ranks x {report['threads_per_rank']} thread, "
             f"{report['size']:.3g} {report['dtype']} parameters, bucket {report['bucket_bytes']} "
             f"bytes; {report['cpu']} ({report['cores']} cores); {report['mpi']}",
             "memory per rank (RSS growth from building the optimizer and one step; state "
             "buffers):"]
    for rank, memory in enumerate(report["memory"]):
        u, s = memory["unsharded"], memory["sharded"]
        lines.append(f"  rank {rank}: unsharded {u['rss_growth'] / mib:7.1f} MiB (state "
                     f"{u['state_bytes'] / mib:.1f}); sharded {s['rss_growth'] / mib:7.1f} MiB "
                     f"(state {s['state_bytes'] / mib:.1f} + staging "
                     f"{s['staging_bytes'] / mib:.1f}); ratio "
                     f"{s['rss_growth'] / max(u['rss_growth'], 1):.3f}")
    timing = report["timing"]
    lines.append(f"time per call ({timing['buckets']} buckets):")
    for name, t in timing["times"].items():
        lines.append(f"  {name:34s} median {t['median_ms']:7.2f} ms   best {t['best_ms']:7.2f} ms")
    for name, ratio in timing["ratios"].items():
        lines.append(f"  {name:58s} {ratio:5.2f}")
    if timing["sharded_equals_replicated"] is not None:
        lines.append(f"  sharded parameters equal the replicated ones bit for bit: "
                     f"{timing['sharded_equals_replicated']}")
    if "sweep_median_ms" in report:
        lines.append("bucket sweep (median step ms): " + ", ".join(
            f"{int(k) >> 10} KiB {v:.2f}" for k, v in report["sweep_median_ms"].items()))
    return "\n".join(lines)


# -- under pytest ------------------------------------------------------------------------------

def _launch(tmp_path, size: int, rounds: int, timeout: float) -> dict:
    import pytest

    mpiexec = shutil.which("mpiexec")
    try:
        import importlib.util

        have_mpi4py = importlib.util.find_spec("mpi4py") is not None
    except ImportError:  # pragma: no cover
        have_mpi4py = False
    if mpiexec is None or not have_mpi4py:
        pytest.skip("needs mpi4py and mpiexec (pip install 'fastrms[mpi]')")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    command = [mpiexec, "-n", "2", sys.executable, str(Path(__file__).resolve()), "--size",
               str(size), "--rounds", str(rounds), "--json", str(out)]
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the benchmark ran past {timeout} s and was killed:\n{output}")
    assert proc.returncode == 0 and out.exists(), output
    print("\n" + output)
    return json.loads(out.read_text())


def _check_report(report: dict) -> None:
    assert report["timing"]["sharded_equals_replicated"] is True
    for memory in report["memory"]:
        # the state itself is split exactly: each rank holds its shard's square_avg
        assert memory["sharded"]["state_bytes"] * 2 <= memory["unsharded"]["state_bytes"] + 4096


def test_distributed_benchmark(benchmark, request, tmp_path):
    """A smoke run with --benchmark-disable; otherwise the full run and its targets."""
    if request.config.getoption("benchmark_disable", False):
        _check_report(_launch(tmp_path, 200_003, 3, timeout=120))
        return
    from targets import check_targets

    def ratios():
        report = _launch(tmp_path, N, 30, timeout=600)
        _check_report(report)
        timing, memory = report["timing"], report["memory"][0]
        benchmark.extra_info.update({"cpu": report["cpu"], "times_ms": timing["times"],
                                     "memory": report["memory"]})
        measured = timing["ratios"]
        where = "2 ranks x 1 thread, 1e7 float32 (medians)"
        return [
            (f"sharded step / its collectives alone, {where}",
             measured["sharded step over its collectives alone (medians)"],
             TARGET_OVER_COLLECTIVES, True),
            (f"sharded step / replicated pattern, {where}",
             measured["sharded step over replicated (medians)"], TARGET_OVER_REPLICATED, True),
            (f"sharded step / MPI Reduce_scatter + Allgatherv (reported), {where}",
             measured["sharded step over MPI reduce-scatter + all-gather (medians)"],
             float("inf"), True),
            ("RSS growth, sharded / unsharded optimizer, rank 0 (reported)",
             memory["sharded"]["rss_growth"] / memory["unsharded"]["rss_growth"],
             float("inf"), True),
        ]

    check_targets(benchmark, request, ratios)


if __name__ == "__main__":
    sys.exit(main())
