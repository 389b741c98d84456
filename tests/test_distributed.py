"""fastrms.distributed: the shard plan (here, no MPI) and ShardedRMSprop under ``mpiexec``.

The MPI checks live in tests/distributed_worker.py and run in two launches, ``mpiexec -n 2``
and ``mpiexec -n 3`` (uneven shards, a world size that is not a power of two, empty shards,
sub-communicators of 1 and 2 ranks), once per launch for every check of that world; each check
is reported here as its own test. Launches run on this machine only, under a hard time limit:
on expiry the launcher's whole process group and every rank are killed and the tests fail, so
a hung rank never hangs the run. Without mpi4py or ``mpiexec`` the MPI tests skip.
"""
from __future__ import annotations

import doctest
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fastrms import _shards
from fastrms._shards import BLOCK, buckets, piece_elements, shard_bounds

import distributed_worker
from rms_helpers import clean_env, run_python

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(distributed_worker.__file__).resolve()
#: Seconds a whole launch may take (about 10 s each on this 2-core machine).
LAUNCH_TIMEOUT = 240
MPIEXEC = shutil.which("mpiexec")
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec "
                                                    "(pip install 'fastrms[mpi]')")


# -- the shard plan ----------------------------------------------------------------------------

@given(size=st.integers(0, 20_000), world=st.integers(1, 40))
def test_shards_are_contiguous_block_aligned_and_balanced(size, world):
    bounds = shard_bounds(size, world)
    assert len(bounds) == world
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    for (_, hi), (lo, _) in zip(bounds, bounds[1:]):
        assert hi == lo  # contiguous, in rank order
    blocks = -(-size // BLOCK)
    for rank, (lo, hi) in enumerate(bounds):
        assert lo % BLOCK == 0 or lo == size
        assert hi % BLOCK == 0 or hi == size
        assert (lo == hi) == (rank >= blocks)  # empty only when ranks outnumber blocks
    whole = [-(-(hi - lo) // BLOCK) for lo, hi in bounds]
    assert max(whole) - min(whole) <= 1


@given(size=st.integers(0, 20_000), world=st.integers(1, 12), piece=st.integers(1, 8))
def test_buckets_cover_each_shard_once(size, world, piece):
    bounds = shard_bounds(size, world)
    plan = buckets(bounds, piece * BLOCK, dtype_index=1)
    for rank, (lo, hi) in enumerate(bounds):
        pieces = [b.pieces[rank] for b in plan]
        covered = [i for a, b in pieces for i in range(a, b)]
        assert covered == list(range(lo, hi))
        assert all(b - a <= piece * BLOCK for a, b in pieces)
        assert all(a % BLOCK == 0 or a == b for a, b in pieces)
    assert all(b.dtype_index == 1 for b in plan)


@given(bucket_bytes=st.integers(1, 1 << 26), world=st.integers(1, 2048),
       itemsize=st.sampled_from([2, 4, 8]))
def test_pieces_are_whole_blocks_of_at_least_64_bytes(bucket_bytes, world, itemsize):
    piece = piece_elements(bucket_bytes, world, itemsize)
    assert piece % BLOCK == 0 and piece >= BLOCK
    assert piece * itemsize % 64 == 0
    assert piece == BLOCK or piece * world * itemsize <= bucket_bytes


def test_shard_plan_docstring_examples():
    failures, tried = doctest.testmod(_shards)
    assert tried and not failures


def test_import_fastrms_does_not_import_mpi4py():
    code = ("import sys, fastrms, fastrms.distributed\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n")
    run_python(code, env=clean_env(PYTHONPATH=str(ROOT)), timeout=120)


def test_without_mpi4py_the_error_says_what_to_install():
    code = ("import sys\n"
            "sys.modules['mpi4py'] = None  # as if it were not installed\n"
            "import numpy as np, fastrms\n"
            "from fastrms.distributed import ShardedRMSprop\n"
            "try:\n"
            "    ShardedRMSprop(fastrms.FlatParams([np.ones(3, np.float32)]))\n"
            "except ImportError as exc:\n"
            "    assert \"pip install 'fastrms[mpi]'\" in str(exc), exc\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    run_python(code, env=clean_env(PYTHONPATH=str(ROOT)), timeout=120)


def test_shard_form_survives_savez_without_pickle(tmp_path):
    from fastrms.distributed import state_dict_from_arrays, state_dict_to_arrays

    shard = {"world_size": 3, "rank": 1, "dtypes": ["float32", "float64"], "sizes": [1000, 3],
             "bounds": [[512, 768], [3, 3]]}
    saved = {"state": {0: {"step": 4, "square_avg": np.arange(256, dtype=np.float32)},
                       1: {"step": 4, "square_avg": np.zeros(0, np.float64)}},
             "param_groups": [{"lr": None, "alpha": 0.9, "params": [0, 1]}], "shard": shard}
    np.savez(tmp_path / "rank1.npz", **state_dict_to_arrays(saved))
    with np.load(tmp_path / "rank1.npz", allow_pickle=False) as arrays:
        loaded = state_dict_from_arrays(arrays)
    assert loaded["shard"] == shard
    assert loaded["param_groups"] == saved["param_groups"]
    assert loaded["state"][0]["step"] == 4
    assert np.array_equal(loaded["state"][0]["square_avg"], saved["state"][0]["square_avg"])
    assert loaded["state"][1]["square_avg"].shape == (0,)


@needs_mpi
def test_docstring_examples_in_a_world_of_one():
    code = ("import doctest, fastrms.distributed as module\n"
            "failures, tried = doctest.testmod(module)\n"
            "assert tried and not failures, (failures, tried)\n")
    run_python(code, env=clean_env(PYTHONPATH=str(ROOT)), timeout=120)


# -- under mpiexec -----------------------------------------------------------------------------

def launch(world: int, out_dir: Path) -> dict:
    """Run every check of ``world`` under ``mpiexec -n world``; per check, the ranks' results."""
    env = clean_env(PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    command = [MPIEXEC, "-n", str(world), sys.executable, str(WORKER), str(world), str(out_dir)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill(proc, out_dir)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {world} ran past {LAUNCH_TIMEOUT} s and was killed:\n{output}")
    per_rank = []
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"mpiexec -n {world}: rank {rank} wrote no results "
                        f"(exit status {proc.returncode}):\n{output}")
        per_rank.append(json.loads(path.read_text())["results"])
    return {"ranks": per_rank, "output": output}


def _kill(proc, out_dir: Path) -> None:
    """The launcher's process group, then every rank that recorded its pid (MPI launchers may
    start ranks in sessions of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid_file in out_dir.glob("pid*"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """world -> that launch's results; each world is launched once, by its first test."""
    launches: dict[int, dict] = {}

    def results(world: int) -> dict:
        if world not in launches:
            launches[world] = launch(world, tmp_path_factory.mktemp(f"world{world}"))
        return launches[world]
    return results


CASES = [(world, name) for world in (2, 3)
         for name, (_, worlds) in distributed_worker.CHECKS.items() if world in worlds]


@needs_mpi
@pytest.mark.parametrize("world, check", CASES, ids=[f"n{w}-{c}" for w, c in CASES])
def test_under_mpiexec(launched, world, check):
    run = launched(world)
    failures = [f"rank {rank}:\n{results.get(check, 'not run')}"
                for rank, results in enumerate(run["ranks"]) if results.get(check) != "ok"]
    assert not failures, "\n".join(failures) + "\n--- launch output ---\n" + run["output"][-4000:]
