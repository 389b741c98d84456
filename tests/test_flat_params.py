"""FlatParams and the optimizer over it: one buffer per dtype, write-through views, one fused
call per dtype, and the same bits as the list path and the NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrms import backends
from fastrms.flat import FlatParams
from fastrms.optimizer import RMSprop


def test_views_and_buffers():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4),
              np.full((), 7.0, np.float32), np.zeros((0, 3)), np.arange(3, dtype=np.float64)]
    originals = [a.copy() for a in arrays]
    flat = FlatParams(arrays)
    assert flat.dtypes == (np.dtype(np.float32), np.dtype(np.float64))
    assert flat.param_buffers[np.dtype(np.float32)].size == 7
    assert flat.param_buffers[np.dtype(np.float64)].size == 7
    for array, view, grad in zip(arrays, flat.params, flat.grads):
        assert view.shape == array.shape and view.dtype == array.dtype
        assert grad.shape == array.shape and grad.dtype == array.dtype
        assert view.tobytes() == array.tobytes()
        assert not np.shares_memory(view, array)
        assert np.all(grad == 0)
        if view.size:
            assert np.shares_memory(view, flat.param_buffers[view.dtype])
            assert np.shares_memory(grad, flat.grad_buffers[view.dtype])
    # Write-through, both ways.
    flat.params[1][2] = 42.0
    assert flat.param_buffers[np.dtype(np.float64)][2] == 42.0
    flat.param_buffers[np.dtype(np.float32)][0] = -1.0
    assert flat.params[0][0, 0] == -1.0
    # Input order inside each dtype's buffer, no padding.
    assert flat.param_buffers[np.dtype(np.float64)].tolist() == [1, 1, 42, 1, 0, 1, 2]
    assert all(a.tobytes() == o.tobytes() for a, o in zip(arrays, originals))  # only copied
    flat.grads[4][...] = 3.0
    flat.zero_grad()
    assert not flat.grad_buffers[np.dtype(np.float64)].any()
    assert len(flat) == 5 and "5 arrays" in repr(flat)
    with pytest.raises(TypeError):
        flat.grads[0] = np.ones((2, 3), np.float32)  # a tuple: views cannot be swapped out


@pytest.mark.parametrize("arrays,error", [
    (np.ones(3), TypeError),
    ([[1.0, 2.0]], TypeError),
    ([np.ones(3, np.int32)], TypeError),
    ([np.ones(3, ">f2")], TypeError),
])
def test_bad_input(arrays, error):
    with pytest.raises(error):
        FlatParams(arrays)


def test_one_fused_call_per_dtype(monkeypatch):
    name = next(n for n in backends.BACKEND_NAMES if backends.availability(n)[0])
    module = backends.load(name)
    calls = []
    for attribute in ("update", "update_if_ready", "update_many"):
        original = getattr(module, attribute)

        def spy(*args, _original=original, _name=attribute):
            calls.append((_name, args[1].size))
            return _original(*args)

        monkeypatch.setattr(module, attribute, spy)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(50).astype(np.float32) for _ in range(200)]
    arrays += [rng.standard_normal(7) for _ in range(30)]
    flat = FlatParams(arrays)
    opt = RMSprop(flat, momentum=0.9, backend=name)
    opt.step()
    kernels = [c for c in calls if c[0] != "update_if_ready"] if name != "c" else calls
    # One call per dtype, each over the whole flat buffer (the C backend's update_if_ready
    # does the work itself; the others decline it and run update).
    assert sorted(size for _, size in kernels) == [30 * 7, 200 * 50]
    assert "update_many" not in {c[0] for c in calls}


def test_step_reads_flat_grads_and_rejects_an_argument():
    flat = FlatParams([np.ones(3)])
    opt = RMSprop(flat, lr=0.1)
    opt.step()  # zero gradients: the parameter does not move
    assert np.all(flat.params[0] == 1.0)
    flat.grads[0][...] = 1.0
    opt.step()
    assert np.all(flat.params[0] < 1.0)
    with pytest.raises(TypeError, match="no argument"):
        opt.step([np.ones(3)])
    with pytest.raises(TypeError, match="whole params argument"):
        RMSprop([{"params": flat}])


def test_flat_state_lines_up_with_the_flat_buffers():
    arrays = [np.ones((2, 2), np.float32), np.ones(3), np.ones(5, np.float32)]
    flat = FlatParams(arrays)
    opt = RMSprop(flat, momentum=0.9, centered=True)
    buckets = opt.flat_state()
    assert [(b["dtype"], b["params"]) for b in buckets] == [(np.dtype(np.float32), [0, 2]),
                                                              (np.dtype(np.float64), [1])]
    for bucket in buckets:
        for name in ("square_avg", "momentum_buffer", "grad_avg"):
            assert bucket[name].shape == flat.param_buffers[bucket["dtype"]].shape
    views = opt.state
    assert np.shares_memory(views[2]["square_avg"], buckets[0]["square_avg"])
    assert views[2]["momentum_buffer"].shape == (5,)


def test_flat_state_dict_loads_into_a_list_optimizer():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(d) for s, d in
              [((3, 4), np.float32), ((5,), np.float64), ((2,), np.float32)]]
    flat = FlatParams(arrays)
    opt = RMSprop(flat, momentum=0.9)
    for _ in range(3):
        for g in flat.grads:
            g[...] = rng.standard_normal(g.shape)
        opt.step()
    listed = [p.copy() for p in flat.params]
    list_opt = RMSprop(listed, momentum=0.9)
    list_opt.load_state_dict(opt.state_dict())
    grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in listed]
    for view, g in zip(flat.grads, grads):
        view[...] = g
    opt.step()
    list_opt.step(grads)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(flat.params, listed))


OPTIONS = st.fixed_dictionaries({
    "momentum": st.sampled_from([0.0, 0.9]),
    "centered": st.booleans(),
    "maximize": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 0.01]),
    "eps_in_sqrt": st.booleans(),
    "decoupled_weight_decay": st.booleans(),
})
LAYOUT = st.lists(st.tuples(st.lists(st.integers(0, 4), max_size=3).map(tuple),
                            st.sampled_from([np.float32, np.float64])), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None)
@given(layout=LAYOUT, options=OPTIONS, seed=st.integers(0, 2**16))
def test_flat_list_and_reference_agree_bit_for_bit(layout, options, seed):
    rng = np.random.default_rng(seed)
    start = [np.asarray(rng.standard_normal(shape), dtype) for shape, dtype in layout]
    steps = [[np.asarray(rng.standard_normal(a.shape), a.dtype) for a in start] for _ in range(3)]
    reference = [a.copy() for a in start]
    ref_opt = RMSprop(reference, backend="numpy", **options)
    listed = [a.copy() for a in start]
    list_opt = RMSprop(listed, **options)
    flat = FlatParams(start)
    flat_opt = RMSprop(flat, **options)
    for grads in steps:
        ref_opt.step(grads)
        list_opt.step(grads)
        for view, g in zip(flat.grads, grads):
            view[...] = g
        flat_opt.step()
    for ref, a, b in zip(reference, listed, flat.params):
        assert a.tobytes() == ref.tobytes() and b.tobytes() == ref.tobytes()
    for ref_state, a, b in zip(ref_opt.state, list_opt.state, flat_opt.state):
        for name in ref_state:
            if name != "step":
                assert a[name].tobytes() == ref_state[name].tobytes()
                assert b[name].tobytes() == ref_state[name].tobytes()
