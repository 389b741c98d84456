"""fastrms.distributed: the shard plan and the engine pieces it steps with (here, no MPI), and
ShardedRMSprop under ``mpiexec``.

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
from hypothesis import given, settings, strategies as st

import fastrms
from fastrms import _shards
from fastrms._shards import BLOCK, buckets, piece_elements, shard_bounds
from fastrms.engine import Bucket, Engine, StepCounts

import distributed_worker
from rms_helpers import (BACKENDS, DTYPES, assert_bits_equal, clean_env, require_backend,
                         run_python)

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


# -- the engine pieces the sharded optimizer steps with -----------------------------------------

def _shard_engine(values, grads, group, backend):
    """An engine over one flat bucket, as ShardedRMSprop makes one per dtype."""
    counts = StepCounts(np.int64)
    param, grad = values.copy(), grads.copy()
    bucket = Bucket(0, param.dtype, [param], counts, [counts.new_slot()], param, grad)
    bucket.allocate_initial(group)
    return bucket, Engine([bucket], 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(size=st.integers(0, 3000), cuts=st.lists(st.integers(0, 3000), max_size=4),
       dtype=st.sampled_from(DTYPES), later=st.sampled_from(
           [{}, {"momentum": 0.9}, {"centered": True}, {"momentum": 0.5, "centered": True}]),
       seed=st.integers(0, 2 ** 16))
def test_a_flat_bucket_stepped_range_by_range_equals_one_run(backend, size, cuts, dtype, later,
                                                             seed):
    """Bucket.run_range over consecutive ranges (each with its own gradient array), with
    Engine.switch_on and Engine.advance, gives the bits and step counts of Engine.run over the
    whole bucket; buffers switched on after the first step start at zero in both."""
    require_backend(backend)
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(size).astype(dtype)
    group = dict(fastrms.presets.get(None).defaults(), lr=1e-2, initial_square_avg=0.5)
    bounds = [0, *sorted(min(c, size) for c in cuts), size]
    grads = [rng.standard_normal(size).astype(dtype) for _ in range(2)]
    whole, whole_engine = _shard_engine(values, grads[0], group, backend)
    pieces, pieces_engine = _shard_engine(values, grads[0], group, backend)
    for t, grad in enumerate(grads):
        if t == 1:
            group.update(later)
        whole.flat["grad"][...] = grad
        assert whole_engine.run([(*job, None, None) for job in whole_engine.plan([group])])
        plan = pieces_engine.plan([group])
        pieces_engine.switch_on(plan)
        (bucket, coeffs, module), = plan
        for lo, hi in zip(bounds, bounds[1:]):
            if lo < hi:
                bucket.run_range(coeffs, module, lo, hi, grad[lo:hi].copy())
        pieces_engine.advance(plan)
    for name in ("param", "square_avg", "momentum_buffer", "grad_avg"):
        assert (whole.flat[name] is None) == (pieces.flat[name] is None), name
        if whole.flat[name] is not None:
            assert_bits_equal(pieces.flat[name], whole.flat[name], f"{backend} {name}")
    assert pieces_engine.group_step(0) == whole_engine.group_step(0) == 2


def test_initial_state_comes_from_the_group_and_must_fit_the_dtype():
    group = dict(fastrms.presets.get(None).defaults(), lr=1e-2, initial_square_avg=2.0,
                 centered=True)
    counts = StepCounts(np.int64)
    param = np.ones(5, np.float32)
    bucket = Bucket(3, np.float32, [param], counts, [counts.new_slot()], param, param * 0)
    bucket.allocate_initial(group)
    assert np.array_equal(bucket.flat["square_avg"], np.full(5, 2.0, np.float32))
    assert bucket.flat["momentum_buffer"] is None
    assert np.array_equal(bucket.flat["grad_avg"], np.zeros(5, np.float32))
    bucket.allocate_initial(dict(group, centered=False), always_momentum=True)  # TF1
    assert np.array_equal(bucket.flat["momentum_buffer"], np.zeros(5, np.float32))
    fresh = Bucket(3, np.float32, [param], counts, [counts.new_slot()], param, param * 0)
    with pytest.raises(ValueError, match=r"param_groups\[3\]: initial_square_avg too large "
                                         r"for float32"):
        fresh.allocate_initial(dict(group, initial_square_avg=1e300))
    assert all(fresh.flat[name] is None for name in ("square_avg", "grad_avg"))
    with pytest.raises(ValueError, match="initial_square_avg too large for float32"):
        fastrms.RMSprop([np.ones(3, np.float32)], initial_square_avg=1e300)


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


@needs_mpi
def test_blockwise8_state_and_stochastic_rounding_are_refused_by_name():
    code = ("import numpy as np, ml_dtypes, fastrms\n"
            "from fastrms.distributed import ShardedRMSprop\n"
            "flat = fastrms.FlatParams([np.ones(300, ml_dtypes.bfloat16)])\n"
            "for options, words in (({'state_format': 'blockwise8'}, 'is not sharded'),\n"
            "                       ({'param_rounding': 'stochastic'}, 'a shard cuts arrays')):\n"
            "    try:\n"
            "        ShardedRMSprop(flat, lr=0.1, **options)\n"
            "    except ValueError as error:\n"
            "        assert words in str(error), error\n"
            "    else:\n"
            "        raise AssertionError(options)\n"
            "assert ShardedRMSprop(flat, lr=0.1, state_format='bfloat16').step()\n")
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
