"""fastrms.torch.RMSprop with compact state (``state_format``, issue 15): bfloat16 state tensors
or blockwise8 codes and scales in ``opt.state``. The oracle is :func:`fastrms.rmsprop_update`
(NumPy reference) on each parameter's compact state, in the parameter's memory order. Exact
resume through ``torch.save``; checkpoints cross both ways with ``torch.optim.RMSprop`` (the
float32 layout on request, quantized on load); bad checkpoints change nothing.
"""
from __future__ import annotations

import copy
import io

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import fastrms  # noqa: E402
import fastrms.torch as fastrms_torch  # noqa: E402
from fastrms.engine.precision import parameter_seed  # noqa: E402
from fastrms.torch._tensors import flat_array  # noqa: E402
from rms_helpers import BACKENDS, require_backend  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
FORMATS = ("bfloat16", "blockwise8")
OPTIONS = {"plain": dict(lr=0.01), "centered": dict(lr=0.02, momentum=0.9, centered=True,
                                                    weight_decay=0.01)}
KEYS = {"bfloat16": ("square_avg", "momentum_buffer", "grad_avg"),
        "blockwise8": tuple(f"{b}_{part}" for b in ("square_avg", "momentum_buffer", "grad_avg")
                            for part in ("codes", "scales"))}


def memory(t) -> np.ndarray:
    """A copy of a tensor's values in its memory order (how the kernel walks it)."""
    return flat_array(t.detach()).reshape(-1).copy()


def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize])


def same(a, b) -> bool:
    return a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300,), (7, 5), (1,), (2, 3, 4, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    with torch.no_grad():  # a channels_last one: memory order differs from index order
        params[3].data = params[3].data.contiguous(memory_format=torch.channels_last)
    return params


def set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).contiguous(
            memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)


class Oracle:
    def __init__(self, params, state_format, options):
        self.params = [memory(p) for p in params]
        self.options, self.state, self.t = options, [], 0
        for p in self.params:
            n = p.size
            entry = {}
            for name in ("square_avg", "momentum_buffer", "grad_avg"):
                if name == "momentum_buffer" and not options.get("momentum"):
                    continue
                if name == "grad_avg" and not options.get("centered"):
                    continue
                entry[name] = (np.zeros(n, BF16) if state_format == "bfloat16" else
                               fastrms.Blockwise8.zeros(n, signed=name != "square_avg"))
            if p.dtype != np.float32 and options.get("master_weights"):
                entry["master_param"] = p.astype(np.float32)
            self.state.append(entry)

    def step(self, params):
        self.t += 1
        hyper = {k: v for k, v in self.options.items()
                 if k not in ("param_rounding", "seed", "master_weights")}
        for i, (p, tensor, entry) in enumerate(zip(self.params, params, self.state)):
            extra = {}
            if p.dtype != np.float32:
                extra["master_param"] = entry.get("master_param")
                if self.options.get("param_rounding") == "stochastic":
                    extra.update(param_rounding="stochastic", step=self.t,
                                 seed=parameter_seed(self.options["seed"], i))
            fastrms.rmsprop_update(p, memory(tensor.grad), entry["square_avg"],
                                   momentum_buffer=entry.get("momentum_buffer"),
                                   grad_avg=entry.get("grad_avg"), backend="numpy", **hyper,
                                   **extra)

    def check(self, params, opt, state_format):
        for i, (p, expected, entry) in enumerate(zip(params, self.params, self.state)):
            assert same(memory(p), expected), f"parameter {i}"
            for name, value in entry.items():
                if isinstance(value, fastrms.Blockwise8):
                    assert same(opt.state[p][name + "_codes"].numpy(), value.codes), (i, name)
                    assert same(opt.state[p][name + "_scales"].numpy(), value.scales), (i, name)
                else:
                    assert same(memory(opt.state[p][name]), value), (i, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flatten"])
@pytest.mark.parametrize("options", OPTIONS)
def test_float32_params_equal_the_oracle(backend, state_format, flatten, options):
    require_backend(backend)
    params = make_params()
    opt = fastrms_torch.RMSprop(params, backend=backend, flatten=flatten,
                                state_format=state_format, **OPTIONS[options])
    oracle = Oracle(params, state_format, OPTIONS[options])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        set_grads(params, gen)
        opt.step()
        oracle.step(params)
    oracle.check(params, opt, state_format)
    assert sorted(k for k in opt.state[params[0]] if k != "step") == sorted(
        k for k in KEYS[state_format]
        if options == "centered" or k.startswith("square_avg"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("mode", [dict(), dict(param_rounding="stochastic", seed=7),
                                  dict(master_weights=True)], ids=["nearest", "stochastic",
                                                                   "master"])
def test_bfloat16_params_equal_the_oracle(backend, state_format, mode):
    require_backend(backend)
    params = make_params(torch.bfloat16)
    options = dict(lr=0.01, momentum=0.9, **mode)
    opt = fastrms_torch.RMSprop(params, backend=backend, state_format=state_format, **options)
    oracle = Oracle(params, state_format, options)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        set_grads(params, gen)
        opt.step()
        oracle.step(params)
    oracle.check(params, opt, state_format)


@pytest.mark.parametrize("state_format", FORMATS)
def test_parameters_without_a_gradient_skip_their_step(state_format):
    params = make_params()
    opt = fastrms_torch.RMSprop(params, lr=0.01, state_format=state_format)
    oracle = Oracle(params[:2], state_format, dict(lr=0.01))
    gen = torch.Generator().manual_seed(3)
    set_grads(params, gen)
    params[2].grad = params[3].grad = None
    opt.step()
    oracle.step(params[:2])
    oracle.check(params[:2], opt, state_format)
    assert params[2] not in opt.state or not opt.state[params[2]]


def _train(model_params, opt, gen, steps):
    for _ in range(steps):
        set_grads(model_params, gen)
        opt.step()


@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flatten"])
def test_resume_equals_the_uninterrupted_run(state_format, flatten):
    options = dict(lr=0.01, momentum=0.9, centered=True)
    params = make_params()
    opt = fastrms_torch.RMSprop(params, flatten=flatten, state_format=state_format, **options)
    _train(params, opt, torch.Generator().manual_seed(4), 3)
    file = io.BytesIO()
    torch.save(opt.state_dict(), file)
    middle = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
              for p in params]
    _train(params, opt, torch.Generator().manual_seed(5), 3)
    file.seek(0)
    resumed = fastrms_torch.RMSprop(middle, flatten=flatten, state_format=state_format,
                                    **options)
    resumed.load_state_dict(torch.load(file))
    _train(middle, resumed, torch.Generator().manual_seed(5), 3)
    for p, q in zip(params, middle):
        assert same(memory(p), memory(q))
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def _decoded(opt, p, state_format, name):
    state = opt.state[p]
    if state_format == "bfloat16":
        return state[name].float()
    values = fastrms.Blockwise8(state[name + "_codes"].numpy(), state[name + "_scales"].numpy(),
                                signed=name != "square_avg").to_float32()
    out = torch.empty_like(p, memory_format=torch.preserve_format)
    flat_array(out).reshape(-1)[...] = values
    return out


@pytest.mark.parametrize("state_format", FORMATS)
def test_float32_layout_loads_into_torch(state_format):
    options = dict(lr=0.01, momentum=0.9, centered=True)
    params = make_params()
    opt = fastrms_torch.RMSprop(params, state_format=state_format, **options)
    _train(params, opt, torch.Generator().manual_seed(6), 2)
    saved = opt.state_dict(state_layout="float32")
    assert all("state_format" not in g for g in saved["param_groups"])
    twins = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
             for p in params]
    reference = torch.optim.RMSprop(twins, **options)
    reference.load_state_dict(saved)
    for p, q in zip(params, twins):
        for name in ("square_avg", "momentum_buffer", "grad_avg"):
            assert reference.state[q][name].dtype == torch.float32
            assert torch.equal(reference.state[q][name], _decoded(opt, p, state_format, name))
    _train(twins, reference, torch.Generator().manual_seed(7), 1)  # torch steps on it
    with pytest.raises(ValueError, match="state_layout must be one of"):
        opt.state_dict(state_layout="float16")


@pytest.mark.parametrize("state_format", FORMATS)
def test_a_torch_checkpoint_is_quantized_on_load(state_format):
    """torch.optim.RMSprop's float32 state becomes fastrms's encoding of it; the next steps are
    the oracle's from that quantized state."""
    options = dict(lr=0.01, momentum=0.9, centered=True)
    params = make_params()
    reference = torch.optim.RMSprop(params, **options)
    _train(params, reference, torch.Generator().manual_seed(8), 2)
    saved = reference.state_dict()
    opt = fastrms_torch.RMSprop(params, state_format=state_format, **options)
    opt.load_state_dict(saved)
    oracle = Oracle(params, state_format, options)
    for p, entry in zip(params, oracle.state):
        for name in entry:
            values = memory(reference.state[p][name])
            entry[name] = (values.astype(BF16) if state_format == "bfloat16" else
                           fastrms.Blockwise8.from_float32(values, signed=name != "square_avg"))
    oracle.check(params, opt, state_format)
    assert opt.state_dict()["param_groups"][0]["state_format"] == state_format
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        set_grads(params, gen)
        opt.step()
        oracle.step(params)
    oracle.check(params, opt, state_format)


def test_bfloat16_state_loads_into_torch_as_it_is():
    params = make_params()
    opt = fastrms_torch.RMSprop(params, lr=0.01, state_format="bfloat16")
    _train(params, opt, torch.Generator().manual_seed(10), 1)
    reference = torch.optim.RMSprop(params, lr=0.01)
    reference.load_state_dict(opt.state_dict())
    assert torch.equal(reference.state[params[0]]["square_avg"],
                       opt.state[params[0]]["square_avg"].float())


# -- refusals -----------------------------------------------------------------------------------

def _snapshot(opt, params):
    return ([memory(p) for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                           for g in opt.param_groups]))


def _assert_unchanged(opt, params, snapshot):
    values, states, groups = snapshot
    assert all(same(memory(p), v) for p, v in zip(params, values))
    for p, state in zip(params, states):
        assert opt.state[p].keys() == state.keys()
        for key, value in state.items():
            assert same(memory(opt.state[p][key]), memory(value)), key
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def _trained_blockwise():
    params = make_params()
    opt = fastrms_torch.RMSprop(params, lr=0.01, momentum=0.9, state_format="blockwise8")
    _train(params, opt, torch.Generator().manual_seed(11), 1)
    return params, opt


BAD = {
    "codes dtype": ("square_avg_codes", lambda t: t.to(torch.int16), TypeError, "torch.uint8"),
    "codes length": ("square_avg_codes", lambda t: t[:-1], ValueError, "299 codes"),
    "scales dtype": ("square_avg_scales", lambda t: t.double(), TypeError, "torch.float32"),
    "block size": ("square_avg_scales", lambda t: torch.zeros(3), ValueError,
                   "another block size"),
    "negative scale": ("momentum_buffer_scales", lambda t: -t - 1, ValueError,
                       "finite and >= 0"),
    "nan scale": ("square_avg_scales", lambda t: torch.full_like(t, float("nan")), ValueError,
                  "finite and >= 0"),
    "half a pair": ("square_avg_scales", None, ValueError, "but not 'square_avg_scales'"),
    "negative float32 square_avg": ("square_avg", lambda t: -torch.ones(300), ValueError,
                                    "negative"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_are_refused_and_change_nothing(case):
    key, corrupt, error, message = BAD[case]
    params, opt = _trained_blockwise()
    saved = copy.deepcopy(opt.state_dict())
    entry = saved["state"][0]
    if corrupt is None:
        del entry[key]
    elif key == "square_avg":  # a torch-layout entry with bad values for the encoder
        del entry["square_avg_codes"], entry["square_avg_scales"]
        entry[key] = corrupt(None)
    else:
        entry[key] = corrupt(entry[key])
    saved["param_groups"][0]["lr"] = 0.5
    snapshot = _snapshot(opt, params)
    with pytest.raises(error, match=message) as info:
        opt.load_state_dict(saved)
    assert "state_dict['state'][0]" in str(info.value)
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("pair", [("blockwise8", "bfloat16"), ("bfloat16", "float32"),
                                  ("blockwise8", "float32")])
def test_a_state_format_mismatch_is_refused(pair):
    saved_format, our_format = pair
    params = make_params()
    source = fastrms_torch.RMSprop(params, lr=0.01, state_format=saved_format)
    _train(params, source, torch.Generator().manual_seed(12), 1)
    twins = make_params()
    opt = fastrms_torch.RMSprop(twins, lr=0.01, state_format=our_format)
    _train(twins, opt, torch.Generator().manual_seed(12), 1)
    snapshot = _snapshot(opt, twins)
    with pytest.raises(ValueError, match="state_format"):
        opt.load_state_dict(source.state_dict())
    _assert_unchanged(opt, twins, snapshot)
    saved = source.state_dict()  # without the group key, the tensors still do not fit
    for group in saved["param_groups"]:
        del group["state_format"]
    if saved_format == "blockwise8" and our_format == "float32":
        with pytest.raises(ValueError, match="blockwise8 state tensor"):
            opt.load_state_dict(saved)
        _assert_unchanged(opt, twins, snapshot)


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="state_format must be one of"):
        fastrms_torch.RMSprop(make_params(), state_format="fp8")
    with pytest.raises(ValueError, match="float64 parameter"):
        fastrms_torch.RMSprop([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                              state_format="blockwise8")
    strided = torch.zeros(4, 6)[:, ::2].requires_grad_()
    with pytest.raises(ValueError, match="state_format='blockwise8'"):
        fastrms_torch.RMSprop([strided], state_format="blockwise8")
    opt = fastrms_torch.RMSprop(make_params(), state_format="bfloat16")
    with pytest.raises(ValueError, match="float64 parameter"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float64,
                                                    requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_a_diverged_block_is_refused_before_any_write():
    params = make_params()
    opt = fastrms_torch.RMSprop(params, lr=0.01, momentum=0.9, state_format="blockwise8")
    gen = torch.Generator().manual_seed(13)
    _train(params, opt, gen, 1)
    opt.state[params[2]]["momentum_buffer_scales"][0] = float("nan")
    snapshot = _snapshot(opt, params)
    set_grads(params, gen)
    with pytest.raises(ValueError, match="momentum_buffer of parameter 2 has scale nan"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("state_format", FORMATS)
def test_deepcopy_and_replaced_state_tensors(state_format):
    params = make_params()
    opt = fastrms_torch.RMSprop(params, lr=0.01, momentum=0.9, state_format=state_format)
    _train(params, opt, torch.Generator().manual_seed(14), 1)
    twin_params = copy.deepcopy(params)
    twin = fastrms_torch.RMSprop(twin_params, lr=0.01, momentum=0.9,
                                 state_format=state_format)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    # Code that replaces a state tensor by an equal one (another object) is followed.
    key = "square_avg" if state_format == "bfloat16" else "square_avg_codes"
    twin.state[twin_params[0]][key] = twin.state[twin_params[0]][key].clone()
    _train(params, opt, torch.Generator().manual_seed(15), 2)
    _train(twin_params, twin, torch.Generator().manual_seed(15), 2)
    for p, q in zip(params, twin_params):
        assert same(memory(p), memory(q))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 600), min_size=1, max_size=3),
       state_format=st.sampled_from(FORMATS), backend=st.sampled_from(BACKENDS),
       flatten=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_property_any_sizes(sizes, state_format, backend, flatten, seed):
    require_backend(backend)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    options = dict(lr=0.01, momentum=0.5, centered=state_format == "bfloat16")
    opt = fastrms_torch.RMSprop(params, backend=backend, flatten=flatten,
                                state_format=state_format, **options)
    oracle = Oracle(params, state_format, options)
    for _ in range(2):
        set_grads(params, gen)
        opt.step()
        oracle.step(params)
    oracle.check(params, opt, state_format)
