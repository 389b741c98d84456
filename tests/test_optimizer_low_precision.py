"""fastrms.RMSprop over float16 / bfloat16 parameters (issue 14).

The oracle is :func:`fastrms.rmsprop_update` called directly on each parameter by the NumPy
reference, with the seed and step the optimizer documents (``parameter_seed(seed, i)``, the
parameter's own 1-based step count): every backend of the registry, both 16-bit dtypes, both
roundings, master weights on and off, list and FlatParams layouts must give its bits. Resuming
from a checkpoint must continue the same stream; bad input names the argument and writes
nothing.
"""
from __future__ import annotations

import io
import pickle

import ml_dtypes
import numpy as np
import pytest

import fastrms
from fastrms.engine.precision import parameter_seed

F16, BF16, F32 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
LOW = (F16, BF16)
LOW_IDS = ["float16", "bfloat16"]
MODES = {"nearest": dict(param_rounding="nearest"),
         "stochastic": dict(param_rounding="stochastic", seed=2 ** 64 - 3),
         "master": dict(master_weights=True)}
OPTIONS = [dict(lr=0.01), dict(lr=0.02, momentum=0.9, centered=True, weight_decay=0.01),
           dict(lr=0.01, alpha=0.9, eps_in_sqrt=True, momentum=0.5, lr_in_momentum=True)]
SHAPES = [(3, 5), (7,), (1,), (40,)]


def bits(array) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def assert_same_bits(actual, expected, label=""):
    assert actual.dtype == expected.dtype, label
    mismatch = bits(actual) != bits(expected)
    assert not mismatch.any(), f"{label}: {int(mismatch.sum())} of {mismatch.size} differ"


class Oracle:
    """Per-parameter state stepped by rmsprop_update (NumPy reference) as the optimizer says."""

    def __init__(self, params, options, mode):
        self.params = [p.copy() for p in params]
        self.options = {k: v for k, v in options.items()}
        self.mode = MODES[mode]
        self.state = []
        for p in params:
            low = p.dtype in LOW
            entry = {"square_avg": np.zeros(p.shape, F32 if low else p.dtype), "step": 0}
            if options.get("momentum", 0):
                entry["momentum_buffer"] = np.zeros(p.shape, F32 if low else p.dtype)
            if options.get("centered"):
                entry["grad_avg"] = np.zeros(p.shape, F32 if low else p.dtype)
            if low and self.mode.get("master_weights"):
                entry["master_param"] = p.astype(F32)
            self.state.append(entry)

    def step(self, grads, grad_scale=None):
        for i, (p, g, entry) in enumerate(zip(self.params, grads, self.state)):
            entry["step"] += 1
            extra = {}
            if p.dtype in LOW:
                if self.mode.get("param_rounding") == "stochastic":
                    extra = dict(param_rounding="stochastic", step=entry["step"],
                                 seed=parameter_seed(self.mode["seed"], i))
                if "master_param" in entry:
                    extra["master_param"] = entry["master_param"]
            fastrms.rmsprop_update(p, g, entry["square_avg"], backend="numpy",
                                   momentum_buffer=entry.get("momentum_buffer"),
                                   grad_avg=entry.get("grad_avg"), grad_scale=grad_scale,
                                   **self.options, **extra)

    def check(self, opt, params, label):
        for i, (p, q) in enumerate(zip(params, self.params)):
            assert_same_bits(p, q, f"{label} param {i}")
        state = opt.state
        for i, entry in enumerate(self.state):
            assert state[i]["step"] == entry["step"]
            for name, value in entry.items():
                if name != "step":
                    assert_same_bits(state[i][name], value, f"{label} {name} {i}")
            assert set(state[i]) == set(entry), label


def make_params(rng, dtype, mixed=False):
    params = [(rng.standard_normal(shape) * 2).astype(dtype) for shape in SHAPES]
    if mixed:
        params.insert(1, rng.standard_normal(6).astype(np.float32))
    return params


def make_grads(rng, params, grad_dtype=None):
    return [(rng.standard_normal(p.shape)).astype(grad_dtype or p.dtype) for p in params]


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "centered-momentum", "tf-style"])
def test_list_layout_matches_rmsprop_update(backend, dtype, mode, options, rng):
    params = make_params(rng, dtype, mixed=True)
    oracle = Oracle(params, options, mode)
    opt = fastrms.RMSprop(params, backend=backend, **options, **MODES[mode])
    for step in range(4):
        # float32 gradients on odd steps: a 16-bit param takes its dtype or float32
        grads = make_grads(rng, params, np.float32 if step % 2 else None)
        grads = [g.astype(p.dtype) if p.dtype not in LOW else g for g, p in zip(grads, params)]
        if step == 3:  # gradient dtypes mixed within one bucket
            grads[0] = grads[0].astype(np.float32)
        assert opt.step(grads) is True
        oracle.step(grads)
        oracle.check(opt, params, f"{backend} step {step}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_flat_params_match_rmsprop_update(backend, dtype, mode, rng):
    arrays = make_params(rng, dtype, mixed=True)
    flat = fastrms.FlatParams(arrays)
    options = dict(lr=0.01, momentum=0.9)
    oracle = Oracle(arrays, options, mode)
    opt = fastrms.RMSprop(flat, backend=backend, **options, **MODES[mode])
    for step in range(3):
        grads = make_grads(rng, arrays)
        for view, g in zip(flat.grads, grads):
            view[...] = g
        assert opt.step() is True
        oracle.step(grads)
        oracle.check(opt, flat.params, f"{backend} flat step {step}")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_loss_scaling_and_skip_nonfinite(backend, dtype, rng):
    params = make_params(rng, dtype)
    oracle = Oracle(params, dict(lr=0.01), "stochastic")
    opt = fastrms.RMSprop(params, lr=0.01, backend=backend, skip_nonfinite=True,
                          **MODES["stochastic"])
    scale = 1024.0
    grads = [(g.astype(np.float32) * scale).astype(dtype) for g in make_grads(rng, params)]
    assert opt.step(grads, grad_scale=scale)
    oracle.step(grads, grad_scale=scale)
    before = [p.copy() for p in params]
    bad = [g.copy() for g in grads]
    bad[2][0] = np.inf
    assert opt.step(bad, grad_scale=scale) is False
    for p, q in zip(params, before):
        assert_same_bits(p, q, "skipped step")
    assert opt.step(grads, grad_scale=scale)  # the skipped step took no step number
    oracle.step(grads, grad_scale=scale)
    oracle.check(opt, params, backend)


def _run(rng_seed, dtype, mode, steps, backend, resume_at=None, through_npz=True):
    rng = np.random.default_rng(rng_seed)
    params = make_params(rng, dtype, mixed=True)
    grads = [make_grads(rng, params) for _ in range(steps)]
    kwargs = dict(lr=0.01, momentum=0.9, backend=backend, **MODES[mode])
    opt = fastrms.RMSprop(params, **kwargs)
    for t, g in enumerate(grads):
        if t == resume_at:
            saved = opt.state_dict()
            if through_npz:
                file = io.BytesIO()
                np.savez(file, **fastrms.state_dict_to_arrays(saved))
                file.seek(0)
                with np.load(file, allow_pickle=False) as loaded:
                    saved = fastrms.state_dict_from_arrays(loaded)
            snapshot = [p.copy() for p in params]
            params = snapshot
            opt = fastrms.RMSprop(params, **{**kwargs, "seed": 0, "master_weights": False,
                                             "param_rounding": "nearest"})
            opt.load_state_dict(saved)
        opt.step(g)
    return params, opt.state


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_checkpoint_resume_gives_identical_bits(backend, dtype, mode):
    straight, state = _run(3, dtype, mode, 6, backend)
    for through_npz in (True, False):
        resumed, state2 = _run(3, dtype, mode, 6, backend, resume_at=2, through_npz=through_npz)
        for a, b in zip(straight, resumed):
            assert_same_bits(a, b, f"{mode} resumed")
        for e1, e2 in zip(state, state2):
            assert set(e1) == set(e2)
            for name in e1:
                if name != "step":
                    assert_same_bits(e1[name], e2[name], name)


def test_pickle_keeps_the_stream(rng):
    params = make_params(rng, BF16)
    opt = fastrms.RMSprop(params, lr=0.01, **MODES["stochastic"])
    opt.step(make_grads(rng, params))
    copy = pickle.loads(pickle.dumps(opt))
    grads = make_grads(rng, params)
    opt.step(grads)
    copy.step(grads)
    for a, b in zip(params, copy._params):
        assert_same_bits(a, b, "pickled")
    assert copy.param_groups[0]["seed"] == MODES["stochastic"]["seed"]


def test_master_weights_switch_on_and_off(rng):
    params = make_params(rng, BF16)
    opt = fastrms.RMSprop(params, lr=0.01)
    opt.step(make_grads(rng, params))
    assert "master_param" not in opt.state[0]
    opt.param_groups[0]["master_weights"] = True
    grads = make_grads(rng, params)
    # The master copy starts at the parameters' values and takes this step's update.
    masters = [p.astype(np.float32) for p in params]
    expected = [p.copy() for p in params]
    squares = [entry["square_avg"].copy() for entry in opt.state]
    for p, g, s, m in zip(expected, grads, squares, masters):
        fastrms.rmsprop_update(p, g, s, lr=0.01, master_param=m, backend="numpy")
    opt.step(grads)
    for p, q, m, entry in zip(params, expected, masters, opt.state):
        assert_same_bits(p, q, "param")
        assert_same_bits(entry["master_param"], m, "master")
        assert_same_bits(p, m.astype(BF16), "nearest of the master")
    opt.param_groups[0]["master_weights"] = False
    opt.step(grads)
    assert "master_param" not in opt.state[0]
    assert "master_param" not in opt.state_dict()["state"][0]


def test_seed_changes_the_bits_and_default_is_documented(rng):
    params = make_params(rng, BF16)
    grads = make_grads(rng, params)
    outs = []
    for seed in (None, 0, 1):
        ps = [p.copy() for p in params]
        opt = fastrms.RMSprop(ps, lr=0.05, param_rounding="stochastic",
                              **({} if seed is None else {"seed": seed}))
        opt.step(grads)
        outs.append(np.concatenate([bits(p).reshape(-1) for p in ps]))
    assert (outs[0] == outs[1]).all()  # the default seed is 0
    assert not (outs[1] == outs[2]).all()


BAD_CONSTRUCTION = [
    (dict(master_weights=True), [np.ones(3, np.float32)], ValueError, "master_weights"),
    (dict(master_weights=True, param_rounding="stochastic"), None, ValueError, "master_weights"),
    (dict(param_rounding="up"), None, ValueError, "param_rounding"),
    (dict(param_rounding="stochastic", seed=-1), None, ValueError, "seed"),
    (dict(param_rounding="stochastic", seed=2 ** 64), None, ValueError, "seed"),
    (dict(param_rounding="stochastic", seed=1.0), None, TypeError, "seed"),
    (dict(seed=True), None, TypeError, "seed"),
    (dict(master_weights=1), None, TypeError, "master_weights"),
]


@pytest.mark.parametrize(("kwargs", "params", "error", "name"), BAD_CONSTRUCTION)
def test_bad_options_name_the_argument(kwargs, params, error, name):
    params = params if params is not None else [np.ones(3, BF16)]
    before = [p.tobytes() for p in params]
    with pytest.raises(error, match=name):
        fastrms.RMSprop(params, lr=0.01, **kwargs)
    with pytest.raises(error, match=name):
        fastrms.RMSprop([{"params": params, **kwargs}], lr=0.01)
    assert [p.tobytes() for p in params] == before


def test_bad_step_input_writes_nothing(backend, rng):
    params = make_params(rng, BF16, mixed=True)
    opt = fastrms.RMSprop(params, lr=0.01, backend=backend, master_weights=True, momentum=0.9)
    opt.step(make_grads(rng, params))
    before = pickle.dumps((params, opt.state_dict()))
    grads = make_grads(rng, params)
    bad = list(grads)
    bad[3] = bad[3].astype(np.float64)
    with pytest.raises(TypeError, match=r"grads\[3\].*float32"):
        opt.step(bad)
    bad = list(grads)
    bad[1] = bad[1].astype(BF16)  # a float32 parameter takes float32 only
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        opt.step(bad)
    opt.param_groups[0]["param_rounding"] = "stochastic"  # with master weights: refused
    with pytest.raises(ValueError, match="master_weights"):
        opt.step(grads)
    opt.param_groups[0]["param_rounding"] = "nearest"
    opt.param_groups[0]["seed"] = -5
    with pytest.raises(ValueError, match="seed"):
        opt.step(grads)
    opt.param_groups[0]["seed"] = 0
    assert pickle.dumps((params, opt.state_dict())) == before


def test_bad_state_dicts_are_refused_whole(rng):
    params = make_params(rng, BF16)
    opt = fastrms.RMSprop(params, lr=0.01, master_weights=True)
    opt.step(make_grads(rng, params))
    good = opt.state_dict()
    before = pickle.dumps(opt.state_dict())

    def broken(edit):
        saved = pickle.loads(pickle.dumps(good))
        edit(saved)
        return saved

    cases = [
        (lambda s: s["state"][0].update(square_avg=s["state"][0]["square_avg"].astype(BF16)),
         TypeError, "square_avg"),
        (lambda s: s["state"][2].pop("master_param"), ValueError, "master_param"),
        (lambda s: s["state"][1].update(master_param=np.zeros(7, np.float64)), TypeError,
         "master_param"),
        (lambda s: s["param_groups"][0].update(param_rounding="stochastic"), ValueError,
         "master_weights"),
        (lambda s: s["param_groups"][0].update(seed=-1), ValueError, "seed"),
        (lambda s: s["param_groups"][0].update(master_weights=False), ValueError,
         "master_param"),
    ]
    for edit, error, name in cases:
        with pytest.raises(error, match=name):
            opt.load_state_dict(broken(edit))
        assert pickle.dumps(opt.state_dict()) == before
    # Every group key is required, the 16-bit options too.
    for key in ("param_rounding", "seed", "master_weights"):
        with pytest.raises(ValueError, match=key):
            opt.load_state_dict(broken(lambda s: s["param_groups"][0].pop(key)))
        assert pickle.dumps(opt.state_dict()) == before


@pytest.mark.parametrize("preset", ["keras", "tf1", "optax"])
@pytest.mark.parametrize("mode", list(MODES))
def test_presets_give_the_reference_backends_bits(backend, preset, mode, rng):
    """Presets on bfloat16 params (tf1 runs its momentum line at momentum 0, which
    rmsprop_update cannot express): every backend gives the NumPy reference backend's bits."""
    params = make_params(rng, BF16, mixed=True)
    grads = [make_grads(rng, params) for _ in range(3)]
    results = []
    for name in ("numpy", backend):
        ps = [p.copy() for p in params]
        opt = fastrms.RMSprop(ps, preset=preset, lr=0.01, backend=name, **MODES[mode])
        for g in grads:
            opt.step(g)
        results.append((ps, opt.state))
    for a, b in zip(results[0][0], results[1][0]):
        assert_same_bits(b, a, f"{preset} {mode}")
    for ea, eb in zip(results[0][1], results[1][1]):
        assert set(ea) == set(eb)
        for name in ea:
            if name != "step":
                assert_same_bits(eb[name], ea[name], name)


def test_keras_preset_matches_rmsprop_update(rng):
    params = make_params(rng, F16)
    options = dict(lr=0.01, alpha=0.9, eps=1e-7, eps_in_sqrt=True, lr_in_momentum=True,
                   decoupled_weight_decay=True, weight_decay=0.004)
    oracle = Oracle(params, options, "stochastic")
    opt = fastrms.RMSprop(params, preset="keras", lr=0.01, weight_decay=0.004,
                          **MODES["stochastic"])
    for _ in range(3):
        grads = make_grads(rng, params)
        opt.step(grads)
        oracle.step(grads)
    oracle.check(opt, params, "keras")
