"""fastrms.RMSprop with compact state (``state_format="bfloat16" | "blockwise8"``, issue 15).

The oracle is :func:`fastrms.rmsprop_update` with ``backend="numpy"`` on per-parameter compact
state (a bfloat16 array or a Blockwise8 per parameter and buffer), with the seed and step the
optimizer documents for 16-bit parameters: every backend of the registry, both formats, list and
FlatParams layouts, float32 and 16-bit parameters (master weights and stochastic rounding) must
give its bits. A saved and resumed run equals the uninterrupted one bit for bit; a bad
checkpoint names the entry and leaves the optimizer unchanged.
"""
from __future__ import annotations

import copy
import io
import pickle

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrms
from fastrms.engine.precision import parameter_seed
from rms_helpers import BACKENDS, require_backend

F32, BF16, F16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
FORMATS = ("bfloat16", "blockwise8")
SHAPES = [(300,), (7, 5), (1,), (513,)]
OPTIONS = [dict(lr=0.01), dict(lr=0.02, momentum=0.9, centered=True, weight_decay=0.01),
           dict(lr=0.01, alpha=0.9, eps_in_sqrt=True, momentum=0.5, lr_in_momentum=True,
                initial_square_avg=0.1),
           dict(lr=0.01, momentum=0.9, nesterov=True, decoupled_weight_decay=True,
                weight_decay=0.1, maximize=True)]
_OPTIMIZER_ONLY = ("initial_square_avg", "param_rounding", "seed", "master_weights")


def bits(array) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.itemsize])


def same(a, b) -> bool:
    if isinstance(a, fastrms.Blockwise8):
        return same(a.codes, b.codes) and same(a.scales, b.scales)
    return a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def new_state(state_format, name, shape, fill=0.0):
    n = int(np.prod(shape))
    if state_format == "bfloat16":
        return np.full(shape, np.float32(fill), F32).astype(BF16)
    signed = name != "square_avg"
    if fill == 0:
        return fastrms.Blockwise8.zeros(n, signed=signed)
    return fastrms.Blockwise8.from_float32(np.full(n, fill, F32), signed=signed)


class Oracle:
    """Each parameter stepped alone by rmsprop_update (NumPy reference) on compact state."""

    def __init__(self, params, state_format, options):
        self.params = [p.copy() for p in params]
        self.options = options
        self.state = []
        for p in params:
            entry = {"square_avg": new_state(state_format, "square_avg", p.shape,
                                             np.float32(options.get("initial_square_avg", 0)))}
            if options.get("momentum", 0):
                entry["momentum_buffer"] = new_state(state_format, "momentum_buffer", p.shape)
            if options.get("centered"):
                entry["grad_avg"] = new_state(state_format, "grad_avg", p.shape)
            if p.dtype != F32 and options.get("master_weights"):
                entry["master_param"] = p.astype(F32)
            self.state.append(entry)
        self.t = 0

    def step(self, grads):
        self.t += 1
        hyper = {k: v for k, v in self.options.items() if k not in _OPTIMIZER_ONLY}
        for i, (p, g, entry) in enumerate(zip(self.params, grads, self.state)):
            extra = {}
            if p.dtype != F32:
                rounding = self.options.get("param_rounding", "nearest")
                extra = dict(param_rounding=rounding, master_param=entry.get("master_param"))
                if rounding == "stochastic":
                    extra.update(seed=parameter_seed(self.options.get("seed", 0), i),
                                 step=self.t)
            fastrms.rmsprop_update(p, g, entry["square_avg"],
                                   momentum_buffer=entry.get("momentum_buffer"),
                                   grad_avg=entry.get("grad_avg"), backend="numpy", **hyper,
                                   **extra)


def make_params(rng, shapes, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def make_grads(rng, params):
    return [rng.standard_normal(p.shape).astype(F32 if p.dtype == F32 else p.dtype)
            for p in params]


def build(params, state_format, options, backend, flat):
    if flat:
        holder = fastrms.FlatParams(params)
        return holder, fastrms.RMSprop(holder, backend=backend, state_format=state_format,
                                       **options)
    params = [p.copy() for p in params]
    return params, fastrms.RMSprop(params, backend=backend, state_format=state_format,
                                   **options)


def take_step(holder, opt, grads):
    if isinstance(holder, fastrms.FlatParams):
        for view, g in zip(holder.grads, grads):
            view[...] = g
        assert opt.step()
    else:
        assert opt.step(grads)


def current(holder):
    return list(holder.params) if isinstance(holder, fastrms.FlatParams) else holder


def assert_matches(holder, opt, oracle):
    for i, (p, q) in enumerate(zip(current(holder), oracle.params)):
        assert same(p, q), f"parameter {i}"
    for i, (entry, expected) in enumerate(zip(opt.state, oracle.state)):
        for name, value in expected.items():
            assert same(entry[name], value), f"state {i} {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "centered", "lr_in_momentum", "tf"])
def test_float32_params_equal_the_oracle(backend, state_format, flat, options):
    require_backend(backend)
    rng = np.random.default_rng(1)
    params = make_params(rng, SHAPES, F32)
    holder, opt = build(params, state_format, options, backend, flat)
    oracle = Oracle(params, state_format, options)
    for _ in range(3):
        grads = make_grads(rng, params)
        take_step(holder, opt, grads)
        oracle.step(grads)
    assert_matches(holder, opt, oracle)


LOW_MODES = {"nearest": {}, "stochastic": dict(param_rounding="stochastic", seed=12345),
             "master": dict(master_weights=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("mode", LOW_MODES)
def test_16bit_params_equal_the_oracle(backend, state_format, dtype, mode):
    require_backend(backend)
    rng = np.random.default_rng(2)
    options = dict(lr=0.01, momentum=0.9, centered=True, **LOW_MODES[mode])
    params = make_params(rng, SHAPES, dtype)
    for flat in (False, True):
        holder, opt = build(params, state_format, options, backend, flat)
        oracle = Oracle(params, state_format, options)
        for _ in range(3):
            grads = make_grads(rng, params)
            take_step(holder, opt, grads)
            oracle.step(grads)
        assert_matches(holder, opt, oracle)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
       state_format=st.sampled_from(FORMATS), options=st.sampled_from(OPTIONS),
       backend=st.sampled_from(BACKENDS), flat=st.booleans(), seed=st.integers(0, 2 ** 32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_property_any_sizes_and_scales(sizes, state_format, options, backend, flat, seed,
                                       scale):
    """Any sizes (empty, partial blocks, several blocks) and gradient scales."""
    require_backend(backend)
    rng = np.random.default_rng(seed)
    params = make_params(rng, [(n,) for n in sizes], F32)
    holder, opt = build(params, state_format, options, backend, flat)
    oracle = Oracle(params, state_format, options)
    for _ in range(2):
        grads = [g * np.float32(scale) for g in make_grads(rng, params)]
        take_step(holder, opt, grads)
        oracle.step(grads)
    assert_matches(holder, opt, oracle)


def test_groups_mix_formats_and_strided_params():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((20, 30)).astype(F32)
    strided = base[:, ::3]  # the list layout updates it through a copy
    dense = rng.standard_normal(600).astype(F32)
    wide = rng.standard_normal(50)
    opt = fastrms.RMSprop([{"params": [strided], "state_format": "blockwise8"},
                           {"params": [dense], "state_format": "bfloat16", "momentum": 0.9},
                           {"params": [wide]}], lr=0.01)
    oracle_a = Oracle([strided], "blockwise8", dict(lr=0.01))
    oracle_b = Oracle([dense], "bfloat16", dict(lr=0.01, momentum=0.9))
    for _ in range(2):
        grads = make_grads(rng, [strided, dense]) + [rng.standard_normal(50)]
        opt.step(grads)
        oracle_a.step(grads[:1])
        oracle_b.step(grads[1:2])
    assert same(strided, oracle_a.params[0]) and same(dense, oracle_b.params[0])
    assert opt.state[2]["square_avg"].dtype == np.float64
    groups = opt.state_dict()["param_groups"]
    assert [g["state_format"] for g in groups] == ["blockwise8", "bfloat16", "float32"]


def test_memory_is_compact():
    n = 10_000
    for state_format, per_element in (("float32", 4), ("bfloat16", 2), ("blockwise8", 1)):
        opt = fastrms.RMSprop([np.zeros(n, F32)], momentum=0.9, state_format=state_format)
        sizes = [opt.state[0][name].nbytes for name in ("square_avg", "momentum_buffer")]
        extra = 4 * -(-n // 256) if state_format == "blockwise8" else 0
        assert sizes == [per_element * n + extra] * 2


def test_switching_momentum_on_later_starts_a_compact_buffer():
    rng = np.random.default_rng(4)
    params = make_params(rng, [(300,)], F32)
    holder, opt = build(params, "blockwise8", dict(lr=0.01), "c", False)
    opt.param_groups[0]["momentum"] = 0.9
    opt.step(make_grads(rng, params))
    assert isinstance(opt.state[0]["momentum_buffer"], fastrms.Blockwise8)
    assert opt.state[0]["momentum_buffer"].signed


def test_skip_nonfinite_changes_nothing():
    params = [np.ones(300, F32)]
    opt = fastrms.RMSprop(params, state_format="blockwise8", skip_nonfinite=True)
    opt.step([np.full(300, 0.5, F32)])
    before = opt.state_dict()
    assert opt.step([np.full(300, np.nan, F32)]) is False
    assert_same_dicts(opt.state_dict(), before)


# -- refusals -----------------------------------------------------------------------------------

def test_bad_state_format_names_the_argument():
    with pytest.raises(ValueError, match="state_format must be one of"):
        fastrms.RMSprop([np.ones(3, F32)], state_format="int8")
    with pytest.raises(ValueError, match=r"param_groups\[0\]: state_format"):
        fastrms.RMSprop([{"params": [np.ones(3, F32)], "state_format": 8}])


def test_float64_params_with_compact_state_are_refused():
    with pytest.raises(ValueError, match="float64 parameter"):
        fastrms.RMSprop([np.ones(3, F32), np.ones(3)], state_format="blockwise8")
    with pytest.raises(ValueError, match="float64 parameter"):
        fastrms.RMSprop(fastrms.FlatParams([np.ones(3)]), state_format="bfloat16")


def test_changing_the_format_after_construction_is_refused():
    params = [np.ones(3, F32)]
    opt = fastrms.RMSprop(params, state_format="bfloat16")
    opt.param_groups[0]["state_format"] = "blockwise8"
    before = params[0].copy()
    with pytest.raises(ValueError, match="state format is fixed"):
        opt.step([np.ones(3, F32)])
    assert same(params[0], before)


def test_gradient_aliasing_the_codes_is_refused():
    params = [np.ones(256, F32), np.ones(64, F32)]
    opt = fastrms.RMSprop(params, state_format="blockwise8")
    codes = opt.state[0]["square_avg"].codes  # 256 bytes: the size of the second gradient
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with the optimizer's "
                                         r"square_avg"):
        opt.step([np.ones(256, F32), codes.view(F32)])
    assert all(same(p, q) for p, q in zip(params, before))


# -- checkpoints --------------------------------------------------------------------------------

def assert_same_dicts(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key, value in a["state"][i].items():
            if isinstance(value, np.ndarray):
                assert same(value, b["state"][i][key]), (i, key)
            else:
                assert value == b["state"][i][key]


@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_resume_equals_the_uninterrupted_run(state_format, flat, dtype):
    """Save after 3 steps (through np.savez and through pickle), resume in a new optimizer:
    the next 3 steps give the uninterrupted run's bits."""
    rng = np.random.default_rng(5)
    params = make_params(rng, SHAPES, dtype)
    options = dict(lr=0.01, momentum=0.9, centered=True)
    if dtype != F32:
        options.update(param_rounding="stochastic", seed=99)
    grads = [make_grads(rng, params) for _ in range(6)]
    holder, opt = build(params, state_format, options, None, flat)
    for g in grads[:3]:
        take_step(holder, opt, g)
    saved = opt.state_dict()
    file = io.BytesIO()
    np.savez(file, **fastrms.state_dict_to_arrays(saved))
    file.seek(0)
    middle = [p.copy() for p in current(holder)]
    for g in grads[3:]:
        take_step(holder, opt, g)
    for load in ("npz", "pickle"):
        again, resumed = build(middle, state_format, options, None, flat)
        if load == "npz":
            file.seek(0)
            with np.load(file, allow_pickle=False) as arrays:
                resumed.load_state_dict(fastrms.state_dict_from_arrays(arrays))
        else:
            resumed.load_state_dict(pickle.loads(pickle.dumps(saved)))
        for g in grads[3:]:
            take_step(again, resumed, g)
        for p, q in zip(current(again), current(holder)):
            assert same(p, q), load
        assert_same_dicts(resumed.state_dict(), opt.state_dict())
    twin = copy.deepcopy(opt)
    assert_same_dicts(twin.state_dict(), opt.state_dict())


def _trained(state_format="blockwise8", **options):
    rng = np.random.default_rng(6)
    params = make_params(rng, [(300,), (40,)], F32)
    opt = fastrms.RMSprop(params, lr=0.01, momentum=0.9, state_format=state_format, **options)
    opt.step(make_grads(rng, params))
    return params, opt


def _corrupt(saved, key, value):
    bad = copy.deepcopy(saved)
    bad["state"][0][key] = value
    return bad


BAD_BLOCKWISE = {
    "codes dtype": ("square_avg_codes", lambda e: e.astype(np.int8), TypeError, "uint8"),
    "codes length": ("square_avg_codes", lambda e: e[:-1], ValueError, "299 codes"),
    "scales dtype": ("square_avg_scales", lambda e: e.astype(np.float64), TypeError, "float32"),
    "block size": ("square_avg_scales", lambda e: np.zeros(3, F32), ValueError,
                   "another block size"),
    "negative scale": ("momentum_buffer_scales", lambda e: -e, ValueError, "finite and >= 0"),
    "nan scale": ("square_avg_scales", lambda e: np.full_like(e, np.nan), ValueError,
                  "finite and >= 0"),
    "inf scale": ("square_avg_scales", lambda e: np.full_like(e, np.inf), ValueError,
                  "finite and >= 0"),
    "2-d codes": ("square_avg_codes", lambda e: e.reshape(3, 100), TypeError, "1-D"),
    "not an array": ("square_avg_codes", lambda e: e.tolist(), TypeError, "numpy.ndarray"),
}


@pytest.mark.parametrize("case", BAD_BLOCKWISE)
def test_bad_blockwise_checkpoints_are_refused_and_change_nothing(case):
    key, corrupt, error, message = BAD_BLOCKWISE[case]
    params, opt = _trained()
    saved = opt.state_dict()
    bad = _corrupt(saved, key, corrupt(saved["state"][0][key]))
    bad["param_groups"][0]["lr"] = 0.5  # would be written first if the checks came late
    before, values = opt.state_dict(), [p.copy() for p in params]
    with pytest.raises(error, match=message) as info:
        opt.load_state_dict(bad)
    assert key in str(info.value) or case == "not an array"
    assert_same_dicts(opt.state_dict(), before)
    assert all(same(p, q) for p, q in zip(params, values))


def test_a_half_missing_pair_and_dense_state_are_refused():
    params, opt = _trained()
    saved = opt.state_dict()
    before = opt.state_dict()
    bad = copy.deepcopy(saved)
    del bad["state"][0]["square_avg_scales"]
    with pytest.raises(ValueError, match="'square_avg_codes' but not 'square_avg_scales'"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["state"][0]["square_avg"] = np.zeros(300, F32)
    with pytest.raises(ValueError, match="dense state array"):
        opt.load_state_dict(bad)
    assert_same_dicts(opt.state_dict(), before)


@pytest.mark.parametrize("pair", [("blockwise8", "float32"), ("float32", "blockwise8"),
                                  ("bfloat16", "blockwise8"), ("blockwise8", "bfloat16")])
def test_a_state_format_mismatch_is_refused(pair):
    saved_format, our_format = pair
    _, source = _trained(saved_format)
    _, opt = _trained(our_format)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=rf"\['param_groups'\]\[0\] has state_format "
                                         rf"'{saved_format}' but this optimizer's group 0 has "
                                         rf"state_format '{our_format}'"):
        opt.load_state_dict(source.state_dict())
    assert_same_dicts(opt.state_dict(), before)


def test_bfloat16_checkpoint_of_the_wrong_dtype_is_refused():
    _, opt = _trained("bfloat16")
    saved = opt.state_dict()
    before = opt.state_dict()
    bad = _corrupt(saved, "square_avg", saved["state"][0]["square_avg"].astype(F32))
    with pytest.raises(TypeError, match=r"\['square_avg'\] has dtype float32"):
        opt.load_state_dict(bad)
    assert_same_dicts(opt.state_dict(), before)


def test_loading_turns_momentum_on_with_a_compact_buffer():
    _, source = _trained()
    params, opt = _trained()
    saved = source.state_dict()
    for entry in saved["state"].values():
        entry.pop("momentum_buffer_codes"), entry.pop("momentum_buffer_scales")
    for group in saved["param_groups"]:
        group["momentum"] = 0.0
    opt.load_state_dict(saved)
    assert "momentum_buffer" not in opt.state[0]
    opt.load_state_dict(source.state_dict())
    assert same(opt.state[0]["momentum_buffer"], source.state[0]["momentum_buffer"])


def test_a_diverged_block_is_refused_before_any_write():
    params = [np.ones(300, F32), np.ones(40, F32)]
    opt = fastrms.RMSprop(params, momentum=0.9, state_format="blockwise8")
    opt.step([np.ones(300, F32), np.ones(40, F32)])
    opt.state[1]["momentum_buffer"].scales[0] = np.nan
    before = [p.copy() for p in params]
    codes = opt.state[0]["square_avg"].codes.copy()
    with pytest.raises(ValueError, match="momentum_buffer of parameter 1 has scale nan in "
                                         "block 0: its values diverged"):
        opt.step([np.ones(300, F32), np.ones(40, F32)])
    assert all(same(p, q) for p, q in zip(params, before))
    assert same(opt.state[0]["square_avg"].codes, codes) and opt.state[0]["step"] == 1


def test_the_docs_example_runs():
    """The doctest of docs/compact-state.md's section "In the optimizers"."""
    import doctest
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "compact-state.md").read_text()
    section = text.split("## In the optimizers", 1)[1].split("\n## ", 1)[0]
    test = doctest.DocTestParser().get_doctest(section, {}, "compact-state.md", None, 0)
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0
