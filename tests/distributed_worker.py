"""The checks of fastrms.distributed, run on every rank under ``mpiexec`` by
tests/test_distributed.py (``mpiexec -n N python distributed_worker.py WORLD OUT_DIR``).

Each check is collective: every rank runs it, compares what it holds with an unsharded
``fastrms.RMSprop`` on the same FlatParams layout, stepping with the gradients summed in rank
order (``(g0 + g1) + g2``, the order the sharded optimizer promises), and records "ok" or its
traceback in ``OUT_DIR/rank<r>.json``. Sub-communicators give worlds of 1 and 2 inside a launch
of 3, so a few launches cover every world size and the move of a checkpoint between them. A
watchdog (faulthandler) ends a rank that hangs, with its traceback, before pytest's own
timeout kills the launch.

Importing this module imports neither mpi4py nor MPI: pytest reads :data:`CHECKS` from it.
"""
from __future__ import annotations

import doctest
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np

import fastrms

#: name -> (function(comm), launches (world sizes) that run it)
CHECKS: dict = {}
#: A rank still inside one check after this long dumps its traceback and exits.
WATCHDOG_SECONDS = 60

#: (dtype, shape) of each array; uneven sizes, so that shards end mid-block and buckets
#: mid-shard.
DTYPE_KINDS = {
    "float32": [(np.float32, (37, 29)), (np.float32, (513,)), (np.float32, (5,))],
    "float64": [(np.float64, (257, 3)), (np.float64, (11,))],
    "mixed": [(np.float32, (30, 17)), (np.float64, (3,)), (np.float32, (1000,)),
              (np.float64, (700,)), (np.float32, (1,))],
}
OPTION_SETS = [
    {},
    {"momentum": 0.9},
    {"centered": True},
    {"centered": True, "momentum": 0.5, "weight_decay": 0.01},
    {"maximize": True, "weight_decay": 0.05},
    {"decoupled_weight_decay": True, "weight_decay": 0.1, "momentum": 0.8},
    {"eps_in_sqrt": True, "lr_in_momentum": True, "momentum": 0.9, "alpha": 0.9},
    {"eps_in_sqrt": True, "lr_in_momentum": True, "momentum": 0.9, "nesterov": True},
    {"initial_square_avg": 1.0, "eps": 1e-3},
    {"preset": "keras", "momentum": 0.5},
    {"preset": "tf1", "lr": 0.01},
    {"preset": "optax", "lr": 0.01, "nesterov": True, "momentum": 0.9},
]


def check(*worlds):
    def register(function):
        CHECKS[function.__name__] = (function, worlds)
        return function
    return register


# -- helpers -----------------------------------------------------------------------------------

def make_arrays(kind: str, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for dtype, shape in DTYPE_KINDS[kind]]


def local_grads(flat, rank: int, t: int, kind: str = "normal") -> list[np.ndarray]:
    """Rank ``rank``'s gradients at step ``t`` (any rank can compute any rank's)."""
    rng = np.random.default_rng(1000 * t + rank + 1)
    out = []
    for p in flat.params:
        if kind == "integers":  # small integers times powers of two: every sum is exact
            g = rng.integers(-64, 65, p.shape) * 2.0 ** rng.integers(-8, 4, p.shape)
        else:
            g = rng.standard_normal(p.shape)
        out.append(g.astype(p.dtype))
    return out


def rank_order_sum(flat, world: int, t: int, kind: str = "normal", ranks=None):
    total = None
    for q in (range(world) if ranks is None else ranks):
        grads = local_grads(flat, q, t, kind)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return total


def fill(flat, grads) -> None:
    for view, g in zip(flat.grads, grads):
        view[...] = g


def bits(array: np.ndarray) -> np.ndarray:
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def assert_same_array(a, b, where: str) -> None:
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
    assert a.dtype == b.dtype and a.shape == b.shape, \
        f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert np.array_equal(bits(np.ascontiguousarray(a)), bits(np.ascontiguousarray(b))), \
        f"{where}: bits differ"


def assert_same_arrays(arrays, others, where: str) -> None:
    assert len(arrays) == len(others), where
    for i, (a, b) in enumerate(zip(arrays, others)):
        assert_same_array(a, b, f"{where}: params[{i}]")


def assert_same_params(flat, ref, where: str) -> None:
    assert_same_arrays(flat.params, ref.params, where)


def assert_same_state_dict(a: dict, b: dict, where: str) -> None:
    assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
    assert a["param_groups"] == b["param_groups"], \
        f"{where}: param_groups {a['param_groups']} vs {b['param_groups']}"
    assert list(a["state"]) == list(b["state"]), f"{where}: state ids differ"
    for i in a["state"]:
        ea, eb = a["state"][i], b["state"][i]
        assert list(ea) == list(eb), f"{where}: state[{i}] keys {list(ea)} vs {list(eb)}"
        assert ea["step"] == eb["step"] and type(ea["step"]) is type(eb["step"]), where
        for name in ea:
            if name != "step":
                assert_same_array(ea[name], eb[name], f"{where}: state[{i}][{name!r}]")


def assert_shard_state(opt, ref_opt, where: str) -> None:
    """The rank's shard of every state buffer holds the reference's elements."""
    reference = {entry["dtype"]: entry for entry in ref_opt.flat_state()}
    for entry in opt.flat_state():
        lo, hi = entry["bounds"]
        for name in ("square_avg", "momentum_buffer", "grad_avg"):
            ours, theirs = entry[name], reference[entry["dtype"]][name]
            assert (ours is None) == (theirs is None), f"{where}: {name} presence"
            if ours is not None:
                assert_same_array(ours, theirs[lo:hi], f"{where}: shard {name}")


def raises(exception, function, *args, **kwargs) -> BaseException:
    try:
        function(*args, **kwargs)
    except exception as exc:
        return exc
    raise AssertionError(f"{getattr(function, '__name__', function)} did not raise "
                         f"{exception.__name__}")


def all_agree(comm, value) -> bool:
    values = comm.allgather(value)
    return all(v == values[0] for v in values)


class Pair:
    """A ShardedRMSprop and the unsharded RMSprop it must match, on equal FlatParams."""

    def __init__(self, comm, kind="mixed", options=None, *, average=True, bucket_bytes=None,
                 grads="normal", seed=0, ref_options=None):
        from fastrms.distributed import ShardedRMSprop

        options = dict(options or {})
        if options.get("preset") in (None, "torch"):
            options.setdefault("lr", 1e-2)
        self.comm, self.world, self.rank = comm, comm.size, comm.rank
        self.kind, self.grads, self.average = kind, grads, average
        self.flat = fastrms.FlatParams(make_arrays(kind, seed))
        self.ref = fastrms.FlatParams(make_arrays(kind, seed))
        extra = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
        self.opt = ShardedRMSprop(self.flat, comm, average=average, **extra, **options)
        self.ref_opt = fastrms.RMSprop(self.ref, **(options if ref_options is None
                                                    else ref_options))
        self.t = 0

    def step(self, grad_scale=None, expect=True):
        fill(self.flat, local_grads(self.flat, self.rank, self.t, self.grads))
        fill(self.ref, rank_order_sum(self.ref, self.world, self.t, self.grads))
        scale = 1.0 if grad_scale is None else float(grad_scale)
        ref_scale = scale * self.world if self.average else scale
        stepped = self.opt.step(grad_scale=grad_scale)
        ref_stepped = self.ref_opt.step(grad_scale=None if ref_scale == 1.0 else ref_scale)
        assert stepped is ref_stepped is expect, (stepped, ref_stepped, expect)
        self.t += 1

    def verify(self, where: str) -> None:
        assert_same_params(self.flat, self.ref, where)
        assert_shard_state(self.opt, self.ref_opt, where)
        full = self.opt.consolidated_state_dict(root=self.world - 1)
        if self.rank == self.world - 1:
            assert_same_state_dict(full, self.ref_opt.state_dict(), where)
        else:
            assert full is None


def sub_world(comm, size: int):
    """A communicator of the first ``size`` ranks (None on the others)."""
    from mpi4py import MPI

    sub = comm.Split(0 if comm.rank < size else MPI.UNDEFINED, comm.rank)
    return None if sub == MPI.COMM_NULL else sub


# -- bit-identity ------------------------------------------------------------------------------

@check(2, 3)
def bit_identical_for_every_option_and_dtype(comm):
    for kind in DTYPE_KINDS:
        for options in OPTION_SETS:
            pair = Pair(comm, kind, options, bucket_bytes=2048)
            for _ in range(3):
                pair.step()
            pair.verify(f"{kind} {options}")


@check(2, 3)
def sixteen_bit_parameters_sum_in_float32(comm):
    """bfloat16 / float16 parameters and gradients: the pieces are widened and summed in
    float32, so the reference is fastrms.RMSprop over the same arrays stepped with the float32
    rank-order sums; checkpoints of both forms hold float32 state (and the master copy)."""
    import ml_dtypes
    from fastrms.distributed import ShardedRMSprop

    layout = [(ml_dtypes.bfloat16, (37, 29)), (np.float16, (513,)), (np.float32, (300,)),
              (ml_dtypes.bfloat16, (5,))]
    rng = np.random.default_rng(7)
    start = [rng.standard_normal(shape).astype(dtype) for dtype, shape in layout]
    world, rank = comm.size, comm.rank
    for options in ({}, {"momentum": 0.9, "centered": True},
                    {"master_weights": True, "momentum": 0.5, "weight_decay": 0.01},
                    {"state_format": "bfloat16", "momentum": 0.9, "centered": True},
                    {"state_format": "bfloat16", "master_weights": True}):
        where = f"16-bit {options}"
        flat = fastrms.FlatParams([a.copy() for a in start])
        opt = ShardedRMSprop(flat, comm, bucket_bytes=2048, lr=1e-2, **options)
        ref_params = [a.copy() for a in start]
        ref = fastrms.RMSprop(ref_params, lr=1e-2, **options)
        for t in range(3):
            fill(flat, local_grads(flat, rank, t))
            sums = None
            for q in range(world):
                wide = [g.astype(np.float32) for g in local_grads(flat, q, t)]
                sums = wide if sums is None else [a + b for a, b in zip(sums, wide)]
            assert opt.step()
            assert ref.step(sums, grad_scale=float(world))
            if t == 1:  # resume from this rank's shard form: the run goes on unchanged
                saved = opt.state_dict()
                opt = ShardedRMSprop(flat, comm, bucket_bytes=2048, lr=1e-2, **options)
                opt.load_state_dict(saved)
        assert_same_arrays(flat.params, ref_params, where)
        full = opt.consolidated_state_dict(root=world - 1)
        if rank == world - 1:
            assert_same_state_dict(full, ref.state_dict(), where)
        # The full form loads on every rank (each keeps its slice) and gives this state back.
        full = comm.bcast(full, root=world - 1)
        again = ShardedRMSprop(flat, comm, bucket_bytes=2048, lr=1e-2, **options)
        again.load_state_dict(full)
        mine = again.consolidated_state_dict(root=0)
        if rank == 0:
            assert_same_state_dict(mine, full, f"{where}, reloaded")
    exc = raises(ValueError, ShardedRMSprop, fastrms.FlatParams([a.copy() for a in start]),
                 comm, lr=1e-2, param_rounding="stochastic")
    assert "param_rounding='stochastic'" in str(exc), exc


@check(2, 3)
def bfloat16_state_of_float32_parameters(comm):
    """state_format="bfloat16": the shards keep bfloat16 state, with fastrms.RMSprop's bits."""
    for options in ({"state_format": "bfloat16"},
                    {"state_format": "bfloat16", "momentum": 0.9, "centered": True}):
        pair = Pair(comm, "float32", options, bucket_bytes=2048)
        for _ in range(3):
            pair.step()
        pair.verify(f"float32 {options}")
        assert all(entry["square_avg"].dtype.name == "bfloat16"
                   for entry in pair.opt.flat_state())


@check(2, 3)
def bit_identical_with_default_buckets_and_single_bucket(comm):
    for bucket_bytes in (None, 1 << 30, 1):
        pair = Pair(comm, "mixed", {"momentum": 0.9, "centered": True},
                    bucket_bytes=bucket_bytes)
        for _ in range(2):
            pair.step()
        pair.verify(f"bucket_bytes={bucket_bytes}")


@check(2, 3)
def exact_sums_match_any_reduction_order(comm):
    """With gradients whose sums are exact, the reference may add them in any order."""
    pair = Pair(comm, "mixed", {"momentum": 0.9}, grads="integers", bucket_bytes=4096)
    for t in range(3):
        fill(pair.flat, local_grads(pair.flat, pair.rank, t, "integers"))
        fill(pair.ref, rank_order_sum(pair.ref, pair.world, t, "integers",
                                      ranks=reversed(range(pair.world))))
        assert pair.opt.step()
        assert pair.ref_opt.step(grad_scale=pair.world)
    assert_same_params(pair.flat, pair.ref, "integers, reversed order")


@check(2, 3)
def sum_or_average_and_grad_scale(comm):
    for average in (True, False):
        for grad_scale in (None, 1024.0, 1000.0, 0.75):
            pair = Pair(comm, "mixed", {"momentum": 0.5}, average=average, bucket_bytes=2048)
            for _ in range(2):
                pair.step(grad_scale=grad_scale)
            pair.verify(f"average={average} grad_scale={grad_scale}")
    bad = Pair(comm, "float32")
    for value, error in ((0.0, ValueError), (-1.0, ValueError), ("2", TypeError),
                         (float("inf"), ValueError)):
        exc = raises(error, bad.opt.step, grad_scale=value)
        assert "grad_scale" in str(exc), exc
    bad.verify("after rejected grad_scale")


@check(2)
def backends_from_the_registry(comm):
    from fastrms.backends import availability

    for name in fastrms.BACKEND_NAMES:
        if not availability(name)[0]:
            continue
        pair = Pair(comm, "mixed", {"momentum": 0.9, "centered": True, "backend": name},
                    bucket_bytes=2048)
        for _ in range(2):
            pair.step()
        pair.verify(f"backend {name}")


@check(2, 3)
def world_of_one(comm):
    sub = comm.Split(comm.rank, 0)
    for options in ({}, {"momentum": 0.9, "centered": True}, {"skip_nonfinite": True}):
        pair = Pair(sub, "mixed", options, bucket_bytes=2048)
        for _ in range(2):
            pair.step()
        pair.verify(f"world of one {options}")
    sub.Free()


@check(3)
def empty_and_uneven_shards(comm):
    from fastrms.distributed import ShardedRMSprop

    # float64: 2 elements, one block, for 3 ranks (ranks 1, 2 empty); float32: 300 elements,
    # two blocks (rank 2 empty); 1000 more float32 elements make the last shard uneven.
    DTYPE_KINDS["tiny"] = [(np.float64, (2,)), (np.float32, (300,))]
    DTYPE_KINDS["uneven"] = [(np.float32, (1300,)), (np.float64, (2,))]
    try:
        for kind in ("tiny", "uneven"):
            for options in ({}, {"momentum": 0.9, "centered": True}, {"skip_nonfinite": True}):
                pair = Pair(comm, kind, options, bucket_bytes=1)
                for _ in range(3):
                    pair.step()
                pair.verify(f"{kind} {options}")
                saved = pair.opt.state_dict()
                assert [e["square_avg"].shape for e in saved["state"].values()] == [
                    (hi - lo,) for lo, hi in pair.opt.shard]
        opt = ShardedRMSprop(fastrms.FlatParams(make_arrays("tiny")), comm)
        shards = comm.allgather(opt.shard)
        assert shards == [((0, 2), (0, 256)), ((2, 2), (256, 300)), ((2, 2), (300, 300))], shards
    finally:
        del DTYPE_KINDS["tiny"], DTYPE_KINDS["uneven"]


# -- skip_nonfinite ----------------------------------------------------------------------------

@check(2, 3)
def skip_nonfinite_when_one_rank_has_an_infinity(comm):
    world, rank = comm.size, comm.rank
    for bad_value in (np.inf, np.nan, "overflow"):
        pair = Pair(comm, "mixed", {"skip_nonfinite": True, "momentum": 0.9}, bucket_bytes=2048)
        pair.step()
        before = [p.copy() for p in pair.flat.params]
        state_before = pair.opt.state_dict()
        # The last rank alone puts a bad value in one element: after the reduce-scatter only
        # the element's owner (rank 0 of 2, rank 1 of 3) sees it.
        fill(pair.flat, local_grads(pair.flat, rank, pair.t))
        target = pair.flat.grads[2].reshape(-1)
        if bad_value == "overflow":  # finite on every rank; the sum overflows
            target[5] = np.float32(3e38)
        elif rank == world - 1:
            target[5] = bad_value
        stepped = pair.opt.step()
        assert stepped is False, f"{bad_value}: rank {rank} stepped"
        assert_same_arrays(pair.flat.params, before, f"{bad_value} skip")
        assert_same_state_dict(pair.opt.state_dict(), state_before, f"{bad_value} state")
        assert pair.opt.state_dict()["state"][0]["step"] == 1
        # The unsharded optimizer skips the same summed gradients.
        with np.errstate(over="ignore", invalid="ignore"):
            fill(pair.ref, [sum(parts) for parts in zip(*comm.allgather(
                [g.copy() for g in pair.flat.grads]))])
        assert pair.ref_opt.step(grad_scale=world) is False
        pair.t += 1
        pair.step()
        pair.verify(f"after skipping {bad_value}")


# -- schedules ---------------------------------------------------------------------------------

@check(2, 3)
def schedules(comm):
    pair = Pair(comm, "mixed", {"momentum": 0.9}, bucket_bytes=2048)
    for lr in (1e-2, 3e-3, 5e-4):
        pair.opt.param_groups[0]["lr"] = lr
        pair.ref_opt.param_groups[0]["lr"] = lr
        pair.step()
    pair.opt.param_groups[0]["momentum"] = 0.0  # options too may change between steps
    pair.ref_opt.param_groups[0]["momentum"] = 0.0
    pair.opt.param_groups[0]["centered"] = True  # a buffer switched on later starts at zero
    pair.ref_opt.param_groups[0]["centered"] = True
    pair.step()
    pair.verify("lr changes")

    calls = []

    def schedule(t):
        calls.append(t)
        return 1e-2 / t

    pair = Pair(comm, "mixed", {"lr": schedule, "skip_nonfinite": True}, bucket_bytes=2048,
                ref_options={"lr": lambda t: 1e-2 / t, "skip_nonfinite": True})
    for _ in range(3):
        pair.step()
    pair.verify("callable lr")
    assert calls == [1, 2, 3], calls
    saved = pair.opt.consolidated_state_dict(root=0)
    if comm.rank == 0:
        assert saved["param_groups"][0]["lr"] is None


# -- checkpoints -------------------------------------------------------------------------------

@check(2, 3)
def checkpoint_shard_form_round_trip(comm):
    from fastrms.distributed import ShardedRMSprop, state_dict_from_arrays, state_dict_to_arrays

    options = {"momentum": 0.9, "centered": True}
    pair = Pair(comm, "mixed", options, bucket_bytes=2048)
    for _ in range(2):
        pair.step()
    saved = pair.opt.state_dict()
    directory = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    path = os.path.join(directory, f"rank{comm.rank}.npz")
    np.savez(path, **state_dict_to_arrays(saved))
    # A fresh optimizer (as after a restart) loads the file this rank wrote and continues.
    fresh = ShardedRMSprop(pair.flat, comm, bucket_bytes=2048, lr=1e-2, **options)
    with np.load(path, allow_pickle=False) as arrays:
        loaded = state_dict_from_arrays(arrays)
    assert_same_state_dict({k: loaded[k] for k in ("state", "param_groups")},
                           {k: saved[k] for k in ("state", "param_groups")}, "npz round trip")
    assert loaded["shard"] == saved["shard"]
    fresh.load_state_dict(loaded)
    pair.opt = fresh
    pair.step()
    pair.verify("after loading the shard form")
    # The shard form of another rank or world size is refused, on every rank.
    other = comm.allgather(saved)[(comm.rank + 1) % comm.size]
    exc = raises(ValueError, fresh.load_state_dict, other)
    assert "state_dict['shard']['rank']" in str(exc), exc
    wrong = dict(saved, shard=dict(saved["shard"], world_size=comm.size + 1))
    exc = raises(ValueError, fresh.load_state_dict, wrong)
    assert "world_size" in str(exc) and "consolidated" in str(exc), exc
    pair.step()
    pair.verify("after refused loads")


@check(2, 3)
def checkpoint_full_form_round_trip(comm):
    from fastrms.distributed import ShardedRMSprop

    options = {"momentum": 0.9, "centered": True, "weight_decay": 0.01}
    pair = Pair(comm, "mixed", options, bucket_bytes=2048)
    for _ in range(2):
        pair.step()
    full = comm.bcast(pair.opt.consolidated_state_dict(root=0), root=0)
    assert_same_state_dict(full, pair.ref_opt.state_dict(), "consolidated")
    fresh = ShardedRMSprop(pair.flat, comm, bucket_bytes=4096, lr=1e-2, **options)
    fresh.load_state_dict(full)
    pair.opt = fresh
    pair.step()
    pair.verify("after loading the full form")
    # The unsharded optimizer's own state dict loads too, and the consolidated form loads
    # into an unsharded optimizer.
    fresh = ShardedRMSprop(pair.flat, comm, lr=1e-2, **options)
    fresh.load_state_dict(pair.ref_opt.state_dict())
    pair.opt = fresh
    pair.step()
    pair.verify("after loading RMSprop's state dict")
    unsharded = fastrms.RMSprop(pair.ref, lr=1e-2, **options)
    unsharded.load_state_dict(comm.bcast(pair.opt.consolidated_state_dict(root=0), root=0))
    assert_same_state_dict(unsharded.state_dict(), pair.ref_opt.state_dict(), "into RMSprop")


@check(3)
def checkpoint_moves_between_world_sizes(comm):
    """2 ranks save (consolidated), 3 ranks continue; then 3 save and 1 continues."""
    from fastrms.distributed import ShardedRMSprop, state_dict_from_arrays, state_dict_to_arrays

    options = {"momentum": 0.9, "centered": True}
    reference = fastrms.FlatParams(make_arrays("mixed"))
    ref_opt = fastrms.RMSprop(reference, lr=1e-2, **options)
    flat = fastrms.FlatParams(make_arrays("mixed"))
    pair_world = sub_world(comm, 2)
    saved_path = None
    if pair_world is not None:
        two = ShardedRMSprop(flat, pair_world, bucket_bytes=2048, lr=1e-2, **options)
        for t in range(2):
            fill(flat, local_grads(flat, pair_world.rank, t))
            assert two.step()
        full = two.consolidated_state_dict(root=0)
        if pair_world.rank == 0:
            saved_path = os.path.join(tempfile.mkdtemp(), "full.npz")
            np.savez(saved_path, **state_dict_to_arrays(full))
        pair_world.Free()
    for t in range(2):
        fill(reference, rank_order_sum(reference, 2, t))
        assert ref_opt.step(grad_scale=2)
    saved_path = comm.bcast(saved_path, root=0)
    parameters = comm.bcast([p.copy() for p in flat.params] if comm.rank == 0 else None)
    for view, value in zip(flat.params, parameters):
        view[...] = value
    three = ShardedRMSprop(flat, comm, bucket_bytes=2048, lr=1e-2, **options)
    with np.load(saved_path, allow_pickle=False) as arrays:
        three.load_state_dict(state_dict_from_arrays(arrays))
    for t in range(2, 4):
        fill(flat, local_grads(flat, comm.rank, t))
        fill(reference, rank_order_sum(reference, 3, t))
        assert three.step()
        assert ref_opt.step(grad_scale=3)
    assert_same_params(flat, reference, "2 -> 3 ranks")
    assert_shard_state(three, ref_opt, "2 -> 3 ranks")
    full = comm.bcast(three.consolidated_state_dict(root=1), root=1)
    assert_same_state_dict(full, ref_opt.state_dict(), "3 ranks, consolidated")
    one = ShardedRMSprop(flat, comm.Split(comm.rank, 0), lr=1e-2, **options)
    one.load_state_dict(full)
    fill(flat, local_grads(flat, 0, 9))
    fill(reference, local_grads(reference, 0, 9))
    assert one.step() and ref_opt.step()
    assert_same_params(flat, reference, "3 -> 1 rank")


@check(2, 3)
def checkpoint_errors_are_caught_before_any_write(comm):
    from fastrms.distributed import RankError

    pair = Pair(comm, "mixed", {"momentum": 0.9}, bucket_bytes=2048)
    pair.step()
    before = pair.opt.state_dict()
    full = comm.bcast(pair.opt.consolidated_state_dict(root=0), root=0)

    def edited(change):
        copy = {"state": {i: dict(e) for i, e in full["state"].items()},
                "param_groups": [dict(full["param_groups"][0])]}
        change(copy)
        return copy

    cases = [
        (lambda sd: sd["state"][3].__setitem__("square_avg", np.zeros(5, np.float64)),
         ValueError, "state_dict['state'][3]['square_avg'] has shape"),
        (lambda sd: sd["state"][2].__setitem__("square_avg",
                                               sd["state"][2]["square_avg"].astype(np.float64)),
         TypeError, "state_dict['state'][2]['square_avg'] has dtype"),
        (lambda sd: sd["state"][4].__setitem__("step", 7),
         ValueError, "state_dict['state'][4] has step 7"),
        (lambda sd: sd["state"][1].pop("momentum_buffer"),
         ValueError, "state_dict['state'][1] is missing 'momentum_buffer'"),
        (lambda sd: sd["param_groups"][0].__setitem__("alpha", 1.5),
         ValueError, "state_dict['param_groups'][0]: alpha"),
        (lambda sd: sd["state"].pop(0), ValueError, "missing ids [0]"),
        (lambda sd: sd["state"][0].__setitem__("extra", 1), ValueError, "unexpected keys"),
    ]
    for change, error, text in cases:
        exc = raises(error, pair.opt.load_state_dict, edited(change))
        assert text in str(exc), (text, str(exc))
    # A problem on one rank only: that rank raises its own error, every other a RankError.
    bad_rank = comm.size - 1
    mine = edited(cases[0][0]) if comm.rank == bad_rank else full
    exc = raises(Exception, pair.opt.load_state_dict, mine)
    if comm.rank == bad_rank:
        assert isinstance(exc, ValueError) and cases[0][2] in str(exc), exc
    else:
        assert isinstance(exc, RankError) and f"rank {bad_rank}" in str(exc), exc
    # Ranks loading different steps disagree: refused on every rank.
    mine = edited(lambda sd: [e.__setitem__("step", 5) for e in sd["state"].values()]) \
        if comm.rank == 0 else full
    exc = raises(ValueError, pair.opt.load_state_dict, mine)
    assert "disagree on the step" in str(exc), exc
    raises(TypeError, pair.opt.load_state_dict, [1, 2])
    assert_same_state_dict(pair.opt.state_dict(), before, "after the refused loads")
    pair.step()
    pair.verify("after the refused loads")


# -- construction and step errors --------------------------------------------------------------

@check(2, 3)
def ranks_that_disagree_are_refused_at_construction(comm):
    from fastrms.distributed import RankError, ShardedRMSprop

    last = comm.rank == comm.size - 1
    arrays = make_arrays("mixed")
    layouts = [arrays[:-1] if last else arrays,                        # one array fewer
               [a.reshape(-1) if last else a for a in arrays],         # another shape
               [a.astype(np.float64) if last else a for a in arrays]]  # another dtype
    for mine in layouts:
        exc = raises(ValueError, ShardedRMSprop, fastrms.FlatParams(mine), comm)
        assert "disagree on the parameter layout" in str(exc), exc
        assert all_agree(comm, str(exc)), "every rank gets the same message"
    flat = fastrms.FlatParams(arrays)
    for mine in ({"lr": 0.02 if last else 0.01}, {"momentum": 0.9} if last else {},
                 {"preset": "keras"} if last else {}):
        exc = raises(ValueError, ShardedRMSprop, flat, comm, **mine)
        assert "disagree on the options" in str(exc), exc
    exc = raises(ValueError, ShardedRMSprop, flat, comm, average=not last)
    assert "'average'" in str(exc), exc
    # A rank whose own arguments are invalid raises its error; the others a RankError.
    exc = raises(Exception, ShardedRMSprop, flat, comm, lr=-1.0 if last else 0.01)
    if last:
        assert isinstance(exc, ValueError) and "lr must be >= 0" in str(exc), exc
    else:
        assert isinstance(exc, RankError) and f"rank {comm.size - 1}" in str(exc), exc
    exc = raises(Exception, ShardedRMSprop, arrays if last else flat, comm)
    assert isinstance(exc, TypeError if last else RankError), exc
    raises(TypeError, ShardedRMSprop, flat, "COMM_WORLD")
    for bad, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        raises(error, ShardedRMSprop, flat, comm, bucket_bytes=bad)
    raises(TypeError, ShardedRMSprop, flat, comm, average=1)
    # The communicator still works: a good optimizer steps after all of this.
    pair = Pair(comm, "mixed")
    pair.step()
    pair.verify("after refused constructions")


@check(2, 3)
def ranks_that_disagree_are_refused_at_step(comm):
    from fastrms.distributed import RankError

    last = comm.rank == comm.size - 1
    pair = Pair(comm, "mixed", {"momentum": 0.9}, bucket_bytes=2048)
    pair.step()
    before = pair.opt.state_dict()
    params = [p.copy() for p in pair.flat.params]
    pair.opt.param_groups[0]["lr"] = 0.02 if last else 0.01
    exc = raises(ValueError, pair.opt.step)
    assert "disagree on the kernel coefficients" in str(exc), exc
    pair.opt.param_groups[0]["lr"] = -1.0 if last else 0.01
    exc = raises(Exception, pair.opt.step)
    if last:
        assert isinstance(exc, ValueError) and "lr must be >= 0" in str(exc), exc
    else:
        assert isinstance(exc, RankError), exc
    pair.opt.param_groups[0]["lr"] = 0.01
    assert_same_state_dict(pair.opt.state_dict(), before, "after refused steps")
    assert_same_arrays(pair.flat.params, params, "after refused steps")
    pair.step()
    pair.verify("after refused steps")


@check(2)
def docstring_examples(comm):
    import fastrms.distributed

    failures, _ = doctest.testmod(fastrms.distributed, optionflags=doctest.ELLIPSIS)
    assert failures == 0


# -- main --------------------------------------------------------------------------------------

def main() -> int:
    world_name, out_dir = int(sys.argv[1]), sys.argv[2]
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with open(os.path.join(out_dir, f"pid{comm.rank}"), "w") as f:
        f.write(str(os.getpid()))
    fastrms.set_num_threads(1)  # the ranks share the machine's cores
    results, timings = {}, {}
    for name, (function, worlds) in CHECKS.items():
        if world_name not in worlds:
            continue
        faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
        start = time.perf_counter()
        try:
            function(comm)
            results[name] = "ok"
            timings[name] = time.perf_counter() - start
        except Exception:
            results[name] = traceback.format_exc()
        comm.Barrier()
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
        json.dump({"results": results, "seconds": timings}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
