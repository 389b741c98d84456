"""fastrms.RMSprop: agreement with torch.optim.RMSprop, exact resume, validation, dispatch."""
from __future__ import annotations

import io
import itertools
import pickle

import numpy as np
import pytest

import fastrms
from fastrms import backends
from fastrms.flat import FlatParams
from fastrms.optimizer import (HYPERPARAMETERS, RMSprop, state_dict_from_arrays,
                               state_dict_to_arrays)

SHAPES = [(7, 5), (13,), (3, 2, 2), (), (0,)]


def available_backends():
    return [name for name in backends.BACKEND_NAMES if backends.availability(name)[0]]


def normwise_ulps(ours, ref) -> float:
    """max |ours - ref| in units of the spacing of ``ref``'s dtype at ref's largest magnitude.

    Elementwise ulps mean nothing where a value is near zero by cancellation (a parameter passing
    through 0, grad_avg and momentum_buffer of a zero-mean gradient), so the error is measured
    against the array's scale, as a normwise error bound is.
    """
    ref = np.asarray(ref)
    if ref.size == 0:
        return 0.0
    scale = np.spacing(ref.dtype.type(np.abs(ref).max()))
    return float(np.abs(np.asarray(ours, np.float64) - ref.astype(np.float64)).max() / scale)


def snapshot(opt, params):
    """Bytes of every parameter and state array, the hyperparameters and the step counts."""
    arrays = [p.tobytes() for p in params]
    for entry in opt.state:
        arrays.extend((name, value if name == "step" else value.tobytes())
                      for name, value in sorted(entry.items()))
    hyper = [{k: g[k] for k in HYPERPARAMETERS} for g in opt.param_groups]
    return arrays, hyper


def make_params(rng, dtypes=(np.float32, np.float64), shapes=SHAPES):
    return [np.asarray(rng.standard_normal(s), dtypes[i % len(dtypes)])
            for i, s in enumerate(shapes)]


def grads_like(rng, params, scale=1.0):
    return [np.asarray(rng.standard_normal(p.shape) * scale, p.dtype) for p in params]


# -- the SPEC seed example ---------------------------------------------------------------------

def test_seed_example_list_and_flat():
    expected = np.array([0.23162277, 0.36837724, 0.56837725])
    theta = np.array([0.2, 0.4, 0.6])
    RMSprop([theta], lr=0.01, alpha=0.9, eps=1e-8, eps_in_sqrt=True).step(
        [np.array([-0.5, 0.3, 0.24])])
    np.testing.assert_allclose(theta, expected, rtol=0, atol=5e-9)
    flat = FlatParams([np.array([0.2, 0.4, 0.6])])
    flat.grads[0][...] = [-0.5, 0.3, 0.24]
    RMSprop(flat, lr=0.01, alpha=0.9, eps=1e-8, eps_in_sqrt=True).step()
    assert flat.params[0].tobytes() == theta.tobytes()


# -- torch -------------------------------------------------------------------------------------

#: Measured worst case over 5 seeds x every combination below, every step of 30: 7 normwise
#: ulps (float32 and float64 alike; params 6, momentum_buffer 7, square_avg / grad_avg 4).
#: Per step the two differ by a rounding or two of the update (torch's float32 sqrt is 1 ulp off
#: on ~17% of elements; addcmul_/addcdiv_ fuse a multiply-add), fed back through square_avg and
#: momentum_buffer for 30 steps: 16 leaves a factor 2 of margin without hiding a real bug (a
#: wrong convention, such as eps inside the sqrt, is off by thousands).
TORCH_ULPS = 16


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("centered,momentum,weight_decay,maximize",
                         list(itertools.product([False, True], [0.0, 0.9], [0.0, 0.1],
                                                [False, True])))
def test_param_groups_match_torch(dtype, centered, momentum, weight_decay, maximize):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    shapes = [(7, 5), (13,), (3, 2, 2), (4,)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ours = [a.copy() for a in start]
    options = dict(momentum=momentum, weight_decay=weight_decay, centered=centered,
                   maximize=maximize)
    opt = RMSprop([{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-3, "alpha": 0.9}],
                  lr=1e-2, **options)
    theirs = [torch.tensor(a.copy()) for a in start]
    reference = torch.optim.RMSprop([{"params": theirs[:2]},
                                     {"params": theirs[2:], "lr": 3e-3, "alpha": 0.9}],
                                    lr=1e-2, **options)
    worst = 0.0
    for _ in range(30):
        grads = grads_like(rng, ours)
        opt.step(grads)
        for t, g in zip(theirs, grads):
            t.grad = torch.tensor(g)
        reference.step()
        for i, (p, t) in enumerate(zip(ours, theirs)):
            worst = max(worst, normwise_ulps(p, t.numpy()))
            torch_state = reference.state[t]
            for name in ("square_avg", "momentum_buffer", "grad_avg"):
                assert (name in opt.state[i]) == (name in torch_state), name
                if name in torch_state:
                    worst = max(worst, normwise_ulps(opt.state[i][name], torch_state[name].numpy()))
    assert worst <= TORCH_ULPS
    assert [s["step"] for s in opt.state] == [int(reference.state[t]["step"]) for t in theirs]


# -- every path and backend gives the reference's bits -----------------------------------------

OPTION_SETS = [
    dict(),
    dict(momentum=0.9, centered=True, weight_decay=0.1, maximize=True),
    dict(momentum=0.8, eps_in_sqrt=True, lr_in_momentum=True, nesterov=True),
    dict(weight_decay=0.05, decoupled_weight_decay=True, centered=True),
    dict(initial_square_avg=1.0, momentum=0.5, lr_in_momentum=True),
]


def run(params_or_flat, grads_per_step, *, flat=False, backend=None, **options):
    opt = RMSprop(params_or_flat, lr=1e-2, backend=backend, **options)
    for grads in grads_per_step:
        if flat:
            for view, g in zip(params_or_flat.grads, grads):
                view[...] = g
            opt.step()
        else:
            opt.step(grads)
    return opt


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_list_flat_and_reference_bit_identical(backend, options):
    rng = np.random.default_rng(3)
    start = make_params(rng)
    steps = [grads_like(rng, start) for _ in range(5)]
    reference = [a.copy() for a in start]
    ref_opt = run(reference, steps, backend="numpy", **options)
    listed = [a.copy() for a in start]
    list_opt = run(listed, steps, backend=backend, **options)
    flat = FlatParams(start)
    flat_opt = run(flat, steps, flat=True, backend=backend, **options)
    for i, ref in enumerate(reference):
        assert listed[i].tobytes() == ref.tobytes()
        assert flat.params[i].tobytes() == ref.tobytes()
        for name, value in ref_opt.state[i].items():
            if name == "step":
                continue
            assert list_opt.state[i][name].tobytes() == value.tobytes(), name
            assert flat_opt.state[i][name].tobytes() == value.tobytes(), name


def test_matches_rmsprop_update_per_array():
    """The optimizer is rmsprop_update over each array: same coefficients, same bits."""
    rng = np.random.default_rng(4)
    params = make_params(rng)
    copies = [p.copy() for p in params]
    opt = RMSprop(params, lr=3e-3, momentum=0.9, centered=True)
    buffers = [(np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)) for p in copies]
    for _ in range(4):
        grads = grads_like(rng, params)
        opt.step(grads)
        for p, g, (s, b, a) in zip(copies, grads, buffers):
            fastrms.rmsprop_update(p, g, s, lr=3e-3, momentum=0.9, centered=True,
                                   momentum_buffer=b, grad_avg=a)
    assert all(p.tobytes() == c.tobytes() for p, c in zip(params, copies))


# -- hyperparameters between steps -------------------------------------------------------------

def test_lr_changed_between_steps_like_a_scheduler():
    rng = np.random.default_rng(5)
    params = make_params(rng, dtypes=(np.float32,))
    copies = [p.copy() for p in params]
    squares = [np.zeros_like(p) for p in params]
    opt = RMSprop(params, lr=1e-2, alpha=0.9)
    for lr in (1e-2, 5e-3, 2.5e-3, 0.0):
        opt.param_groups[0]["lr"] = lr
        grads = grads_like(rng, params)
        opt.step(grads)
        for p, g, s in zip(copies, grads, squares):
            fastrms.rmsprop_update(p, g, s, lr=lr, alpha=0.9)
    assert all(p.tobytes() == c.tobytes() for p, c in zip(params, copies))


def test_lr_and_grad_scale_changes_do_not_recompile_numba():
    if not backends.availability("numba")[0]:
        pytest.skip("numba unavailable")
    from fastrms.backends import numba_backend

    params = [np.ones(100, np.float32)]
    opt = RMSprop(params, lr=1e-2, backend="numba")
    opt.step([np.ones(100, np.float32)])
    compiled = len(numba_backend._update_serial.signatures)
    for lr, scale in ((3e-3, None), (1e-3, 1024.0), (7e-4, 3.0)):
        opt.param_groups[0]["lr"] = lr
        opt.step([np.ones(100, np.float32)], grad_scale=scale)
    assert len(numba_backend._update_serial.signatures) == compiled


def test_callable_lr_is_called_with_the_one_based_step_number():
    calls = []

    def schedule(t):
        calls.append(t)
        return 0.01 / t

    rng = np.random.default_rng(6)
    params = [rng.standard_normal(10)]
    copy = params[0].copy()
    square = np.zeros(10)
    opt = RMSprop(params, lr=schedule)
    for t in (1, 2, 3):
        g = rng.standard_normal(10)
        opt.step([g])
        fastrms.rmsprop_update(copy, g, square, lr=0.01 / t)
    assert calls == [1, 2, 3]
    assert params[0].tobytes() == copy.tobytes()


def test_callable_lr_returning_garbage_writes_nothing():
    params = [np.ones(4)]
    opt = RMSprop(params, lr=lambda t: -1.0)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*lr"):
        opt.step([np.ones(4)])
    assert snapshot(opt, params) == before


def test_momentum_and_centered_switched_on_later_start_from_zero():
    rng = np.random.default_rng(8)
    params = [rng.standard_normal(6)]
    copy = params[0].copy()
    s, b, a = np.zeros(6), np.zeros(6), np.zeros(6)
    opt = RMSprop(params, lr=1e-2)
    assert "momentum_buffer" not in opt.state[0]
    for step in range(4):
        if step == 2:
            opt.param_groups[0].update(momentum=0.9, centered=True)
        g = rng.standard_normal(6)
        opt.step([g])
        if step < 2:
            fastrms.rmsprop_update(copy, g, s, lr=1e-2)
        else:
            fastrms.rmsprop_update(copy, g, s, lr=1e-2, momentum=0.9, centered=True,
                                   momentum_buffer=b, grad_avg=a)
    assert params[0].tobytes() == copy.tobytes()
    assert opt.state[0]["momentum_buffer"].tobytes() == b.tobytes()


def test_invalid_hyperparameter_set_between_steps_writes_nothing():
    params = [np.ones(4, np.float32), np.ones(3)]
    opt = RMSprop([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2)
    opt.step([np.ones(4, np.float32), np.ones(3)])
    opt.param_groups[1]["alpha"] = 1.5
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: alpha"):
        opt.step([np.ones(4, np.float32), np.ones(3)])
    assert snapshot(opt, params) == before


# -- construction ------------------------------------------------------------------------------

def test_state_is_initialised_like_torch():
    params = [np.ones(3, np.float32), np.ones((2, 2))]
    opt = RMSprop(params, momentum=0.9, centered=True, initial_square_avg=0.5)
    for p, entry in zip(params, opt.state):
        assert entry["step"] == 0
        assert entry["square_avg"].dtype == p.dtype and entry["square_avg"].shape == p.shape
        assert np.all(entry["square_avg"] == 0.5)
        assert np.all(entry["momentum_buffer"] == 0) and np.all(entry["grad_avg"] == 0)
    plain = RMSprop([np.ones(3)])
    assert set(plain.state[0]) == {"step", "square_avg"}
    assert plain.defaults["lr"] == 1e-2 and plain.defaults["alpha"] == 0.99


@pytest.mark.parametrize("params,error,match", [
    ([], ValueError, "empty"),
    (np.ones(3), TypeError, "list of arrays"),
    ([[1.0, 2.0]], TypeError, "numpy.ndarray"),
    ([np.ones(3, np.int64)], TypeError, "float32, float64, float16 or bfloat16"),
    ([np.ones(3), {"params": [np.ones(2)]}], TypeError, "mixes"),
    ([{"params": [np.ones(2)], "lrr": 1.0}], ValueError, "unknown keys"),
    ([{"lr": 1.0}], ValueError, "no 'params'"),
    ([{"params": [np.ones(2)], "lr": -1.0}], ValueError, r"param_groups\[0\]: lr"),
])
def test_bad_params_rejected(params, error, match):
    with pytest.raises(error, match=match):
        RMSprop(params)


def test_bad_hyperparameters_rejected():
    with pytest.raises(ValueError, match="alpha"):
        RMSprop([np.ones(2)], alpha=1.0)
    with pytest.raises(TypeError, match="centered"):
        RMSprop([np.ones(2)], centered=1)
    with pytest.raises(ValueError, match="nesterov"):
        RMSprop([np.ones(2)], nesterov=True)
    with pytest.raises(ValueError, match="initial_square_avg"):
        RMSprop([np.ones(2)], initial_square_avg=float("nan"))
    with pytest.raises(ValueError, match="unknown backend"):
        RMSprop([np.ones(2)], backend="cuda")


def test_read_only_and_overlapping_params_rejected():
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        RMSprop([frozen])
    base = np.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        RMSprop([base, np.ones(2), base])
    with pytest.raises(ValueError, match="share memory"):
        RMSprop([{"params": [base[:6]]}, {"params": [base[5:]]}])
    # Interleaved strided views have overlapping bounds but no common element: allowed.
    RMSprop([base[::2], base[1::2]])


# -- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make_grads,error,match", [
    (lambda: None, TypeError, "needs the gradients"),
    (lambda: [np.ones(4, np.float32)], ValueError, "1 gradients for 2"),
    (lambda: np.ones((2, 4)), TypeError, "list of arrays"),
    (lambda: [np.ones(4, np.float32), np.ones(3, np.float32)], TypeError, r"grads\[1\] has dtype"),
    (lambda: [np.ones(4, np.float32), np.ones(4)], ValueError, r"grads\[1\] has shape"),
    (lambda: [[1.0] * 4, np.ones(3)], TypeError, r"grads\[0\] must be a numpy.ndarray"),
    (lambda: [np.ones((4, 1), np.float32), np.ones(3)], ValueError, r"grads\[0\] has shape"),
])
def test_bad_grads_rejected_before_any_write(make_grads, error, match):
    params = [np.ones(4, np.float32), np.ones(3)]
    opt = RMSprop(params, momentum=0.9, centered=True)
    opt.step([np.full(4, 0.5, np.float32), np.full(3, 0.5)])
    before = snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.step(make_grads())
    assert snapshot(opt, params) == before


def test_grads_sharing_memory_with_params_or_state_rejected():
    params = [np.ones(4), np.ones(4), np.ones(6)]
    opt = RMSprop(params, momentum=0.9)
    opt.step([np.ones(4), np.ones(4), np.ones(6)])
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with parameter 0"):
        opt.step([np.ones(4), params[0], np.ones(6)])
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with the optimizer's "
                                         r"square_avg"):
        opt.step([opt.state[2]["square_avg"][:4], np.ones(4), np.ones(6)])
    with pytest.raises(ValueError, match=r"grads\[2\] shares memory with parameter 2"):
        opt.step([np.ones(4), np.ones(4), params[2][::-1]])  # strided: the copy path checks too
    assert snapshot(opt, params) == before
    # The same gradient array for two parameters is fine: gradients are only read.
    shared = np.full(4, 0.25)
    opt.step([shared, shared, np.ones(6)])


def test_reused_gradient_buffers_are_checked_again_when_they_change():
    """A step whose gradients sit where the last clean step's did reuses that verdict; any other
    addresses, and any new state buffer, are checked afresh."""
    params = [np.ones(4), np.ones(4), np.ones(6)]
    twin_params = [p.copy() for p in params]
    opt, twin = RMSprop(params), RMSprop(twin_params)
    grads = [np.full(4, 0.5), np.full(4, -0.25), np.full(6, 2.0)]
    for step in range(3):
        opt.step(grads)
        twin.step([g.copy() for g in grads])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, twin_params))
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with parameter 0"):
        opt.step([grads[0], params[0], grads[2]])
    assert snapshot(opt, params) == before
    opt.param_groups[0]["momentum"] = 0.9  # allocates a momentum buffer: new regions
    opt.step(grads)
    with pytest.raises(ValueError, match=r"grads\[2\] shares memory with the optimizer's "
                                         r"momentum_buffer"):
        opt.step([grads[0], grads[1], opt.state[2]["momentum_buffer"]])


class _GradSubclass(np.ndarray):
    pass


def test_strided_misaligned_and_subclass_grads_and_strided_params():
    """Layouts the kernels cannot take directly go through copies and give the same bits."""
    rng = np.random.default_rng(9)
    big = rng.standard_normal((6, 8)).astype(np.float32)
    other_columns = big[:, 1::2].copy()
    params = [big[:, ::2], rng.standard_normal(5), rng.standard_normal((2, 3))]
    contiguous = [np.ascontiguousarray(p) for p in params]
    raw = np.zeros(5 * 8 + 1, np.uint8)
    misaligned = raw[1:].view(np.float64)
    assert not misaligned.flags.aligned and not params[0].flags.c_contiguous
    opt = RMSprop(params, momentum=0.9)
    ref = RMSprop(contiguous, momentum=0.9)
    for _ in range(3):
        grads = grads_like(rng, contiguous)
        wide = np.zeros((6, 8), np.float32)
        wide[:, ::2] = grads[0]
        misaligned[...] = grads[1]
        odd = [wide[:, ::2], misaligned, np.asfortranarray(grads[2]).view(_GradSubclass)]
        opt.step(odd)
        ref.step(grads)
    for p, c in zip(params, contiguous):
        assert np.ascontiguousarray(p).tobytes() == c.tobytes()
    assert big[:, 1::2].tobytes() == other_columns.tobytes()


# -- backend choice ----------------------------------------------------------------------------

class _Spy:
    """Counts the calls of a backend's multi-array entry points (the C backend's list path
    passes gradient addresses, the others arrays)."""

    def __init__(self, module, monkeypatch):
        self.calls = 0
        for name in ("update_many", "update_many_at_addresses"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, self._counting(getattr(module, name)))

    def _counting(self, original):
        def entry_point(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        return entry_point


def test_backend_argument_context_and_global_choice(monkeypatch):
    numpy_backend = backends.load("numpy")
    spy = _Spy(numpy_backend, monkeypatch)
    params = [np.ones(3, np.float32), np.ones(2), np.ones(4, np.float32)]
    grads = [np.ones(3, np.float32), np.ones(2), np.ones(4, np.float32)]
    RMSprop(params, backend="numpy").step(grads)
    assert spy.calls == 2  # one call per dtype, not per array
    opt = RMSprop([p.copy() for p in params])
    with fastrms.use_backend("numpy"):
        opt.step(grads)
    assert spy.calls == 4
    fastrms.set_backend("numpy")
    try:
        opt.step(grads)
    finally:
        fastrms.set_backend(None)
    assert spy.calls == 6


def test_one_update_many_call_per_group_and_dtype(monkeypatch):
    name = available_backends()[0]
    module = backends.load(name)
    spy = _Spy(module, monkeypatch)
    params = [np.ones(50, np.float32) for _ in range(40)] + [np.ones(3) for _ in range(5)]
    opt = RMSprop([{"params": params[:20]}, {"params": params[20:], "lr": 1e-3}], backend=name)
    opt.step([np.ones_like(p) for p in params])
    assert spy.calls == 3  # (group 0, f32), (group 1, f32), (group 1, f64)


# -- state_dict --------------------------------------------------------------------------------

def _assert_builtins_and_arrays(value):
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) in (str, int)
            _assert_builtins_and_arrays(v)
    elif isinstance(value, list):
        for v in value:
            _assert_builtins_and_arrays(v)
    else:
        assert value is None or type(value) in (bool, int, float, np.ndarray), type(value)


def _resumable_optimizer(params, lr_schedule):
    return RMSprop([{"params": params[:3], "momentum": 0.9, "centered": True},
                    {"params": params[3:], "lr": lr_schedule, "weight_decay": 0.01}],
                   lr=1e-2)


def _save_pickle(state_dict):
    return pickle.loads(pickle.dumps(state_dict))


def _save_npz(state_dict):
    buffer = io.BytesIO()
    np.savez(buffer, **state_dict_to_arrays(state_dict))
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as saved:
        return state_dict_from_arrays(saved)


@pytest.mark.parametrize("save", [_save_pickle, _save_npz], ids=["pickle", "npz"])
def test_resume_is_bit_identical(save):
    def schedule(t):
        return 1e-2 / (1 + 0.1 * t)

    rng = np.random.default_rng(10)
    start = make_params(rng) + [rng.standard_normal(4).astype(np.float32)]
    steps = [grads_like(rng, start) for _ in range(12)]

    uninterrupted = [p.copy() for p in start]
    opt = _resumable_optimizer(uninterrupted, schedule)
    for grads in steps:
        opt.step(grads)

    first = [p.copy() for p in start]
    opt_a = _resumable_optimizer(first, schedule)
    for grads in steps[:5]:
        opt_a.step(grads)
    saved = opt_a.state_dict()
    _assert_builtins_and_arrays(saved)
    assert saved["param_groups"][1]["lr"] is None  # the callable is not saved
    saved = save(saved)
    resumed = [p.copy() for p in first]
    opt_b = _resumable_optimizer(resumed, schedule)
    opt_b.load_state_dict(saved)
    for grads in steps[5:]:
        opt_b.step(grads)

    assert all(a.tobytes() == b.tobytes() for a, b in zip(uninterrupted, resumed))
    final_a, final_b = opt.state_dict(), opt_b.state_dict()
    assert final_a["param_groups"] == final_b["param_groups"]
    for i, entry in final_a["state"].items():
        assert entry.keys() == final_b["state"][i].keys()
        for name, value in entry.items():
            other = final_b["state"][i][name]
            assert (value == other) if name == "step" else (value.tobytes() == other.tobytes())


def test_state_dict_arrays_are_copies_and_layout_is_documented():
    params = [np.ones(3, np.float32)]
    opt = RMSprop(params, momentum=0.9)
    opt.step([np.ones(3, np.float32)])
    saved = opt.state_dict()
    assert saved["state"][0]["step"] == 1
    square = saved["state"][0]["square_avg"].copy()
    opt.step([np.ones(3, np.float32)])
    assert saved["state"][0]["square_avg"].tobytes() == square.tobytes()
    flat = state_dict_to_arrays(saved)
    assert set(flat) == {"state/0/step", "state/0/square_avg", "state/0/momentum_buffer",
                         *(f"param_groups/0/{k}" for k in HYPERPARAMETERS),
                         "param_groups/0/params"}
    assert flat["param_groups/0/params"].tolist() == [0]
    assert flat["state/0/step"].shape == ()


def _bad_state_dicts(good):
    """(description, mutate) pairs: each mutate takes a deep copy of ``good`` and breaks it."""
    def shape(d):
        d["state"][0]["square_avg"] = d["state"][0]["square_avg"][:2]

    def dtype(d):
        d["state"][1]["momentum_buffer"] = d["state"][1]["momentum_buffer"].astype(np.float32)

    def not_array(d):
        d["state"][0]["grad_avg"] = d["state"][0]["grad_avg"].tolist()

    def missing_key(d):
        del d["state"][1]["grad_avg"]

    def missing_step(d):
        del d["state"][0]["step"]

    def extra_key(d):
        d["state"][0]["exp_avg"] = d["state"][0]["square_avg"]

    def extra_top(d):
        d["extra"] = 1

    def missing_groups(d):
        del d["param_groups"]

    def group_count(d):
        d["param_groups"].append(dict(d["param_groups"][0]))

    def param_count(d):
        d["param_groups"][0]["params"] = d["param_groups"][0]["params"][:-1]

    def missing_state(d):
        del d["state"][2]

    def extra_state(d):
        d["state"][99] = d["state"][0]

    def duplicate_id(d):
        d["param_groups"][1]["params"] = [0]

    def group_key(d):
        del d["param_groups"][0]["alpha"]

    def bad_alpha(d):
        d["param_groups"][1]["alpha"] = 1.5

    def bad_flag(d):
        d["param_groups"][0]["centered"] = "yes"

    def step_inf(d):
        d["state"][0]["step"] = float("inf")

    def step_nan(d):
        d["state"][0]["step"] = float("nan")

    def step_negative(d):
        d["state"][0]["step"] = -1

    def step_fraction(d):
        d["state"][0]["step"] = 2.5

    def step_mismatch(d):
        d["state"][1]["step"] = 7

    def step_string(d):
        d["state"][0]["step"] = "3"

    def partial_buffer(d):
        # group 0 has momentum 0.9; drop momentum from the hyperparameters so the buffer is
        # optional, then give it to one parameter of a (group, dtype) pair but not the other.
        d["param_groups"][0]["momentum"] = 0.0
        del d["state"][0]["momentum_buffer"]

    def required_buffer(d):
        d["param_groups"][0]["momentum"] = 0.5
        for i in d["param_groups"][0]["params"]:
            del d["state"][i]["momentum_buffer"]

    def not_mapping(d):
        d["state"] = list(d["state"].values())

    def string_ids(d):
        d["state"] = {str(k): v for k, v in d["state"].items()}

    return [(f.__name__, f) for f in (
        shape, dtype, not_array, missing_key, missing_step, extra_key, extra_top, missing_groups,
        group_count, param_count, missing_state, extra_state, duplicate_id, group_key, bad_alpha,
        bad_flag, step_inf, step_nan, step_negative, step_fraction, step_mismatch, step_string,
        partial_buffer, required_buffer, not_mapping, string_ids)]


def test_bad_state_dicts_rejected_and_optimizer_unchanged():
    rng = np.random.default_rng(11)
    def build():
        params = [rng.standard_normal(4), rng.standard_normal(3), rng.standard_normal(2),
                  rng.standard_normal(5).astype(np.float32)]
        return params, RMSprop([{"params": params[:3]}, {"params": params[3:], "lr": 1e-3}],
                               momentum=0.9, centered=True)

    donor_params, donor = build()
    for _ in range(3):
        donor.step(grads_like(rng, donor_params))
    good = donor.state_dict()

    params, opt = build()
    opt.step(grads_like(rng, params))
    before = snapshot(opt, params)
    for name, mutate in _bad_state_dicts(good):
        broken = pickle.loads(pickle.dumps(good))
        mutate(broken)
        with pytest.raises((TypeError, ValueError)):
            opt.load_state_dict(broken)
        assert snapshot(opt, params) == before, name
    opt.load_state_dict(good)  # and the good one still loads
    assert opt.state[0]["step"] == 3


def test_load_keeps_current_callable_lr_and_loads_into_live_views():
    def schedule(t):
        return 1e-3

    params = [np.ones(3)]
    opt = RMSprop(params, lr=schedule)
    opt.step([np.ones(3)])
    view = opt.state[0]["square_avg"]
    saved = opt.state_dict()
    saved["state"][0]["square_avg"] = saved["state"][0]["square_avg"] * 2
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] is schedule
    assert np.shares_memory(view, opt.state[0]["square_avg"])
    assert view.tobytes() == saved["state"][0]["square_avg"].tobytes()
    # Loading the optimizer's own live views (aliasing its buffers) is safe too.
    opt.load_state_dict({"state": {0: dict(opt.state[0])},
                         "param_groups": opt.state_dict()["param_groups"]})


def test_update_many_cache_is_offered_and_kept_per_bucket(monkeypatch):
    """A backend whose update_many takes ``cache=`` gets one dict per bucket, the same on every
    step, and an empty one after a state buffer is (re)allocated; none when a parameter goes
    through a copy (then the params list is new each step)."""
    module = backends.load("numpy")
    original = module.update_many
    seen = []

    def update_many(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs, *,
                    cache=None):
        seen.append((cache, dict(cache) if cache is not None else None))
        if cache is not None:
            cache["marker"] = True
        return original(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs)

    monkeypatch.setattr(module, "update_many", update_many)
    params = [np.ones(3), np.ones(4)]
    opt = RMSprop(params, backend="numpy")
    grads = [np.ones(3), np.ones(4)]
    opt.step(grads)
    opt.step(grads)
    assert seen[0][0] is seen[1][0] and seen[1][1] == {"marker": True}
    opt.param_groups[0]["momentum"] = 0.9  # allocates the momentum buffer: new view lists
    opt.step(grads)
    assert seen[2][1] == {}
    strided = np.ones((3, 2))[:, 0]
    RMSprop([strided], backend="numpy").step([np.ones(3)])
    assert seen[3][0] is None


def test_repr_names_the_settings_and_each_group_once():
    params = [np.zeros(3, np.float32), np.zeros(2, np.float64)]
    opt = fastrms.RMSprop([{"params": params[:1]}, {"params": params[1:], "momentum": 0.5}],
                          lr=0.01)
    lines = repr(opt).splitlines()
    assert lines[0] == ("RMSprop(preset='torch', backend=None, skip_nonfinite=False, "
                        "layout='list',")
    assert [line.split(":")[0] for line in lines[1:]] == ["  group 0", "  group 1"]
    assert "lr=0.01" in lines[1] and "momentum=0.5" in lines[2] and lines[-1].endswith(")")
    assert repr(opt).count("(") == repr(opt).count(")")
