"""Presets: SPEC.md's table as data, explicit arguments over presets, and each preset against its
framework (torch, Keras 3 on JAX, optax, and TF1's published equations in a NumPy model).

Tolerances are normwise ulps: max |ours - theirs| in units of the spacing at the reference
array's largest magnitude (elementwise ulps mean nothing where a value crosses zero). Each bound
is the worst case measured over several seeds and every option combination tested here, every
step of 30, with a margin of at least 2x.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from fastrms import presets
from fastrms.optimizer import RMSprop

# Keras picks its backend at import; JAX is the one this project can install without TF.
os.environ.setdefault("KERAS_BACKEND", "jax")

SHAPES = [(7, 5), (13,)]
STEPS = 30

#: torch: measured 7 (see tests/test_optimizer.py, TORCH_ULPS).
TORCH_ULPS = 16
#: optax: measured 4 (float32 and float64). optax multiplies by rsqrt(nu + eps) where SPEC
#: divides by sqrt; XLA's rsqrt is not correctly rounded.
OPTAX_ULPS = 8
#: Keras 3 without weight decay: measured 2 (the same roundings as SPEC but for (lr*g)/sqrt and
#: XLA's fused elementwise code).
KERAS_ULPS = 8
#: Keras 3 with weight decay: measured 12. Keras decays as p - (p*wd)*lr (two roundings), SPEC
#: as p * (1 - lr*wd) with the coefficient rounded once: up to ~1/2 ulp of p apart per step, and
#: that difference is never corrected, so it grows linearly over 30 steps.
KERAS_DECAY_ULPS = 32
#: TF1 model (float64 NumPy, TF1's own operation order): measured 4, mostly from
#: ms + (g*g - ms)*(1 - decay) against SPEC's ms*decay + ((1 - decay)*g)*g.
TF1_ULPS = 8


def normwise_ulps(ours, ref) -> float:
    ref = np.asarray(ref)
    scale = np.spacing(ref.dtype.type(np.abs(ref).max()))
    return float(np.abs(np.asarray(ours, np.float64) - ref.astype(np.float64)).max() / scale)


# -- the table ---------------------------------------------------------------------------------

SPEC_TABLE = {
    # preset: (eps_in_sqrt, initial square_avg, lr in momentum, decoupled decay, lr, alpha, eps)
    "torch": (False, 0.0, False, False, 1e-2, 0.99, 1e-8),
    "keras": (True, 0.0, True, True, 1e-3, 0.9, 1e-7),
    "tf1": (True, 1.0, True, False, None, 0.9, 1e-10),
    "optax": (True, 0.0, True, False, None, 0.9, 1e-8),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_table_matches_spec(name):
    row = presets.PRESETS[name]
    assert (row.eps_in_sqrt, row.initial_square_avg, row.lr_in_momentum,
            row.decoupled_weight_decay, row.lr, row.alpha, row.eps) == SPEC_TABLE[name]
    assert row.always_momentum_buffer == (name == "tf1")


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_preset_sets_every_default(name):
    row = presets.PRESETS[name]
    opt = RMSprop([np.ones(3)], lr=0.5, preset=name)
    group = opt.param_groups[0]
    assert opt.preset == name
    for key, value in row.defaults().items():
        if key != "lr":
            assert group[key] == value, key
    assert group["lr"] == 0.5


def test_explicit_arguments_override_the_preset():
    opt = RMSprop([np.ones(3)], lr=0.1, alpha=0.5, eps=1e-3, preset="keras", eps_in_sqrt=False,
                  lr_in_momentum=False, decoupled_weight_decay=False, initial_square_avg=2.0)
    group = opt.param_groups[0]
    assert (group["lr"], group["alpha"], group["eps"]) == (0.1, 0.5, 1e-3)
    assert not group["eps_in_sqrt"] and not group["lr_in_momentum"]
    assert not group["decoupled_weight_decay"] and group["initial_square_avg"] == 2.0
    assert opt.state[0]["square_avg"][0] == 2.0
    # Group keys override both.
    opt = RMSprop([{"params": [np.ones(2)], "alpha": 0.7}], preset="keras")
    assert opt.param_groups[0]["alpha"] == 0.7 and opt.param_groups[0]["lr"] == 1e-3


def test_no_preset_is_torch():
    plain = RMSprop([np.ones(2)]).param_groups[0]
    torch_like = RMSprop([np.ones(2)], preset="torch").param_groups[0]
    assert {k: v for k, v in plain.items() if k != "params"} == \
        {k: v for k, v in torch_like.items() if k != "params"}


def test_signature_defaults_are_sentinels_and_documented():
    import inspect

    signature = inspect.signature(RMSprop)
    for name in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize",
                 "eps_in_sqrt", "lr_in_momentum", "nesterov", "decoupled_weight_decay",
                 "initial_square_avg"):
        assert repr(signature.parameters[name].default) == "<preset default>"
    assert "lr=1e-2, alpha=0.99" in RMSprop.__doc__ and "eps=1e-8" in RMSprop.__doc__


@pytest.mark.parametrize("name", ["tf1", "optax"])
def test_lr_required(name):
    with pytest.raises(TypeError, match="lr is required"):
        RMSprop([np.ones(2)], preset=name)
    # A group that sets its own lr is enough.
    RMSprop([{"params": [np.ones(2)], "lr": 1e-3}], preset=name)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'adam'"):
        RMSprop([np.ones(2)], preset="adam")


# -- torch -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_preset_matches_torch_defaults(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ours = [a.copy() for a in start]
    opt = RMSprop(ours, preset="torch", momentum=0.9, centered=True)
    theirs = [torch.tensor(a.copy()) for a in start]
    reference = torch.optim.RMSprop(theirs, momentum=0.9, centered=True)  # torch's defaults
    worst = 0.0
    for _ in range(STEPS):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        opt.step(grads)
        for t, g in zip(theirs, grads):
            t.grad = torch.tensor(g)
        reference.step()
        worst = max(worst, *(normwise_ulps(p, t.numpy()) for p, t in zip(ours, theirs)))
    assert worst <= TORCH_ULPS


# -- optax -------------------------------------------------------------------------------------

OPTAX_CASES = [(c, m, n, e, s)
               for c, m, n, e, s in itertools.product([False, True], [None, 0.9], [False, True],
                                                      [True, False], [0.0, 0.5])
               if not (n and m is None)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("centered,momentum,nesterov,eps_in_sqrt,initial_scale", OPTAX_CASES)
def test_optax_preset_matches_optax(dtype, centered, momentum, nesterov, eps_in_sqrt,
                                    initial_scale):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(1)
    start = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ours = [a.copy() for a in start]
    options = dict(centered=centered, eps_in_sqrt=eps_in_sqrt, initial_square_avg=initial_scale)
    if momentum is not None:
        options.update(momentum=momentum, nesterov=nesterov)
    opt = RMSprop(ours, lr=1e-2, preset="optax", **options)
    transform = optax.rmsprop(1e-2, centered=centered, eps_in_sqrt=eps_in_sqrt,
                              initial_scale=initial_scale, momentum=momentum, nesterov=nesterov)
    worst = 0.0
    # jax.enable_x64 is the current spelling; older JAX had it in jax.experimental.
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with enable_x64(dtype == np.float64):
        theirs = [jax.numpy.asarray(a) for a in start]
        state = transform.init(theirs)
        for _ in range(STEPS):
            grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
            opt.step(grads)
            updates, state = transform.update([jax.numpy.asarray(g) for g in grads], state, theirs)
            theirs = optax.apply_updates(theirs, updates)
            assert theirs[0].dtype == dtype
            worst = max(worst, *(normwise_ulps(p, np.asarray(t)) for p, t in zip(ours, theirs)))
    assert worst <= OPTAX_ULPS


# -- Keras 3 -----------------------------------------------------------------------------------

def _keras():
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3."):
        pytest.skip(f"Keras 3 needed, found {keras.__version__}")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()!r} here; this test wants JAX "
                    f"(set KERAS_BACKEND=jax before Keras is imported)")
    return keras


@pytest.mark.parametrize("centered,momentum,weight_decay",
                         list(itertools.product([False, True], [0.0, 0.9], [None, 0.1])))
def test_keras_preset_matches_keras(centered, momentum, weight_decay):
    keras = _keras()
    rng = np.random.default_rng(2)
    start = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    ours = [a.copy() for a in start]
    options = dict(centered=centered, momentum=momentum)
    if weight_decay is not None:
        options["weight_decay"] = weight_decay
    opt = RMSprop(ours, lr=1e-2, preset="keras", **options)
    variables = [keras.Variable(a.copy(), dtype="float32") for a in start]
    reference = keras.optimizers.RMSprop(learning_rate=1e-2, momentum=momentum,
                                         centered=centered, weight_decay=weight_decay)
    worst = 0.0
    for _ in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        opt.step(grads)
        reference.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], variables))
        worst = max(worst, *(normwise_ulps(p, np.asarray(v.value))
                             for p, v in zip(ours, variables)))
    assert worst <= (KERAS_ULPS if weight_decay is None else KERAS_DECAY_ULPS)


def test_keras_preset_defaults_match_keras():
    keras = _keras()
    reference = keras.optimizers.RMSprop()
    row = presets.PRESETS["keras"]
    assert (row.lr, row.alpha, row.eps) == (pytest.approx(float(reference.learning_rate)),
                                            reference.rho, reference.epsilon)


# -- TF1 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("centered,momentum", list(itertools.product([False, True], [0.0, 0.9])))
def test_tf1_preset_matches_tf1_equations(centered, momentum):
    """TF1's RMSPropOptimizer as published (training_ops.cc, ApplyRMSProp/ApplyCenteredRMSProp):
    ms += (g*g - ms) * (1 - decay); [mg += (g - mg) * (1 - decay)];
    mom = momentum*mom + lr*g / sqrt(ms [- mg*mg] + eps); p -= mom; ms starts at 1."""
    rng = np.random.default_rng(3)
    lr, decay, eps = 1e-2, 0.9, 1e-10
    p = rng.standard_normal(50)
    ours = [p.copy()]
    opt = RMSprop(ours, lr=lr, momentum=momentum, centered=centered, preset="tf1")
    ms, mg, mom = np.ones(50), np.zeros(50), np.zeros(50)
    worst = 0.0
    for _ in range(STEPS):
        g = rng.standard_normal(50)
        opt.step([g])
        ms += (g * g - ms) * (1 - decay)
        if centered:
            mg += (g - mg) * (1 - decay)
            denominator = ms - mg * mg + eps
        else:
            denominator = ms + eps
        mom = momentum * mom + lr * g / np.sqrt(denominator)
        p -= mom
        state = opt.state[0]
        worst = max(worst, normwise_ulps(ours[0], p), normwise_ulps(state["square_avg"], ms),
                    normwise_ulps(state["momentum_buffer"], mom))
    assert worst <= TF1_ULPS


def test_tf1_keeps_the_momentum_buffer_at_momentum_zero():
    opt = RMSprop([np.ones(3)], lr=0.1, preset="tf1")
    assert np.all(opt.state[0]["square_avg"] == 1.0)
    assert np.all(opt.state[0]["momentum_buffer"] == 0.0)
    before = opt.param_groups[0]["params"][0].copy()
    opt.step([np.full(3, 0.5)])
    after = opt.param_groups[0]["params"][0]
    # The buffer holds the last update, and the parameter moved by exactly that much.
    np.testing.assert_array_equal(before - opt.state[0]["momentum_buffer"], after)
    plain = [np.ones(3)]
    RMSprop(plain, lr=0.1, alpha=0.9, eps=1e-10, eps_in_sqrt=True, initial_square_avg=1.0,
            lr_in_momentum=True).step([np.full(3, 0.5)])
    assert plain[0].tobytes() == after.tobytes()  # same bits as the no-momentum path
