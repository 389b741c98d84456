"""fastrms.torch.RMSprop over bfloat16 / float16 CPU tensors (issue 14): they go to the kernel
(zero-copy NumPy views), with float32 state, ``param_rounding``, ``seed`` and ``master_weights``.
The oracle is :func:`fastrms.rmsprop_update` on each parameter (NumPy reference) with the seed
and step the optimizer documents.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastrms  # noqa: E402
import fastrms.torch as fastrms_torch  # noqa: E402
from fastrms.engine.precision import parameter_seed  # noqa: E402
from fastrms.torch._tensors import flat_array  # noqa: E402

LOW = (torch.bfloat16, torch.float16)
LOW_IDS = ["bfloat16", "float16"]
MODES = {"nearest": {}, "stochastic": dict(param_rounding="stochastic", seed=99),
         "master": dict(master_weights=True)}


def numpy_of(t):
    return flat_array(t.detach()).reshape(tuple(t.shape)).copy()


def raw_bits(array):
    array = np.ascontiguousarray(array)
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def assert_same_bits(tensor, array, label):
    got = numpy_of(tensor)
    assert got.dtype == array.dtype, label
    mismatch = raw_bits(got) != raw_bits(array)
    assert not mismatch.any(), f"{label}: {int(mismatch.sum())} of {mismatch.size} differ"


class Oracle:
    def __init__(self, params, options, mode):
        self.params = [numpy_of(p) for p in params]
        self.options, self.mode = options, MODES[mode]
        self.state = []
        for p in self.params:
            low = p.dtype.itemsize == 2
            entry = {"step": 0, "square_avg": np.zeros(p.shape, np.float32 if low else p.dtype)}
            if options.get("momentum", 0):
                entry["momentum_buffer"] = np.zeros(p.shape, np.float32 if low else p.dtype)
            if low and self.mode.get("master_weights"):
                entry["master_param"] = p.astype(np.float32)
            self.state.append(entry)

    def step(self, grads):
        for i, (p, g, entry) in enumerate(zip(self.params, grads, self.state)):
            entry["step"] += 1
            extra = {}
            if p.dtype.itemsize == 2:
                if self.mode.get("param_rounding") == "stochastic":
                    extra = dict(param_rounding="stochastic", step=entry["step"],
                                 seed=parameter_seed(self.mode["seed"], i))
                if "master_param" in entry:
                    extra["master_param"] = entry["master_param"]
            fastrms.rmsprop_update(p, g, entry["square_avg"], backend="numpy",
                                   momentum_buffer=entry.get("momentum_buffer"),
                                   **self.options, **extra)

    def check(self, opt, params, label):
        for i, (p, q, entry) in enumerate(zip(params, self.params, self.state)):
            assert_same_bits(p, q, f"{label} param {i}")
            state = opt.state[p]
            assert set(state) == set(entry), label
            assert float(state["step"]) == entry["step"]
            for name, value in entry.items():
                if name != "step":
                    assert state[name].dtype == torch.float32 or value.dtype.itemsize != 4
                    assert_same_bits(state[name], value, f"{label} {name} {i}")


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (7,), (2, 2, 5)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    params.insert(1, torch.randn(6, generator=gen).requires_grad_())  # a float32 neighbour
    return params


def set_grads(params, gen, wide=False):
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        if wide and p.dtype in LOW:
            p.grad_dtype = None  # torch then accepts a float32 gradient of a 16-bit tensor
            p.grad = g
        else:
            p.grad = g.to(p.dtype)
    return [numpy_of(p.grad) for p in params]


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flatten"])
def test_kernel_takes_16_bit_tensors_and_matches_rmsprop_update(backend, dtype, mode, flatten):
    params = make_params(dtype)
    options = dict(lr=0.01, momentum=0.9)
    oracle = Oracle(params, options, mode)
    opt = fastrms_torch.RMSprop(params, backend=backend, flatten=flatten, **options,
                                **MODES[mode])
    assert opt.unfused_parameters() == []
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = set_grads(params, gen, wide=step % 2 == 1)
        opt.step()
        oracle.step(grads)
        oracle.check(opt, params, f"{backend} {mode} step {step}")


def test_the_kernel_writes_the_tensors_memory():
    p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    view = flat_array(p.detach())
    assert view.dtype.name == "bfloat16" and view.ctypes.data == p.data_ptr()
    opt = fastrms_torch.RMSprop([p], lr=0.1)
    p.grad = torch.ones_like(p)
    address = p.data_ptr()
    opt.step()
    assert p.data_ptr() == address and (p.detach().float() < 1).all()


@pytest.mark.parametrize("mode", ["stochastic", "master"])
def test_state_dict_round_trip_resumes_exactly(mode):
    def run(resume_at=None):
        params = make_params(torch.bfloat16, seed=3)
        opt = fastrms_torch.RMSprop(params, lr=0.01, momentum=0.5, **MODES[mode])
        gen = torch.Generator().manual_seed(4)
        for t in range(5):
            if t == resume_at:
                saved = copy.deepcopy(opt.state_dict())
                params = [p.detach().clone().requires_grad_() for p in params]
                opt = fastrms_torch.RMSprop(params, lr=0.01, momentum=0.5)
                opt.load_state_dict(saved)
                for p in params:
                    for name, value in opt.state[p].items():
                        if name != "step" and p.dtype in LOW:
                            assert value.dtype == torch.float32, name
            set_grads(params, gen)
            opt.step()
        return params

    straight, resumed = run(), run(resume_at=2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach().view(torch.int16) if a.dtype in LOW else a.detach(),
                           b.detach().view(torch.int16) if b.dtype in LOW else b.detach())


def test_torch_checkpoint_of_16_bit_state_loads_into_float32_state():
    """torch.optim.RMSprop keeps a bfloat16 parameter's state in bfloat16: loading its
    checkpoint widens the state (exactly) to float32."""
    params = make_params(torch.bfloat16)
    theirs = torch.optim.RMSprop(params, lr=0.01)
    set_grads(params, torch.Generator().manual_seed(5))
    theirs.step()
    ours = fastrms_torch.RMSprop(params, lr=0.01)
    ours.load_state_dict(theirs.state_dict())
    set_grads(params, torch.Generator().manual_seed(6))
    ours.step()
    for p in params:
        assert ours.state[p]["square_avg"].dtype == torch.float32
        assert float(ours.state[p]["step"]) == 2


def test_replaced_data_is_seen_before_the_step():
    params = make_params(torch.bfloat16)
    oracle = Oracle(params, dict(lr=0.01), "stochastic")
    opt = fastrms_torch.RMSprop(params, lr=0.01, **MODES["stochastic"])
    gen = torch.Generator().manual_seed(7)
    oracle.step(set_grads(params, gen))
    opt.step()
    params[0].data = params[0].detach().clone()  # new memory under the same Parameter
    oracle.step(set_grads(params, gen))
    opt.step()
    oracle.check(opt, params, "after .data was replaced")


def test_strided_16_bit_views_fall_back_to_torch():
    base = torch.randn(4, 6).to(torch.bfloat16)
    p = base[:, ::2].detach().requires_grad_()  # a leaf on strided memory
    q = torch.randn(3).to(torch.bfloat16).requires_grad_()
    opt = fastrms_torch.RMSprop([p, q], lr=0.01)
    fallback = opt.unfused_parameters()
    assert [t for _, t, _ in fallback] == [p] and "dense" in fallback[0][2]


@pytest.mark.parametrize(("kwargs", "params", "error", "name"), [
    (dict(master_weights=True), "float32", ValueError, "master_weights"),
    (dict(master_weights=True, param_rounding="stochastic"), "bfloat16", ValueError,
     "master_weights"),
    (dict(param_rounding="toward_zero"), "bfloat16", ValueError, "param_rounding"),
    (dict(param_rounding="stochastic", seed=-1), "bfloat16", ValueError, "seed"),
])
def test_bad_options_are_refused(kwargs, params, error, name):
    p = torch.ones(3, dtype=getattr(torch, params), requires_grad=True)
    with pytest.raises(error, match=name):
        fastrms_torch.RMSprop([p], lr=0.01, **kwargs)
    opt = fastrms_torch.RMSprop([torch.ones(2, requires_grad=True)], lr=0.01)
    with pytest.raises(error, match=name):
        opt.add_param_group({"params": [p], **kwargs})
    assert len(opt.param_groups) == 1


def test_bad_group_options_at_step_write_nothing():
    params = make_params(torch.bfloat16)
    opt = fastrms_torch.RMSprop(params, lr=0.01, master_weights=True)
    gen = torch.Generator().manual_seed(8)
    set_grads(params, gen)
    opt.step()
    before = [numpy_of(p) for p in params]
    state = copy.deepcopy(opt.state_dict())
    set_grads(params, gen)
    opt.param_groups[0]["param_rounding"] = "stochastic"
    with pytest.raises(ValueError, match="master_weights"):
        opt.step()
    opt.param_groups[0]["param_rounding"] = "nearest"
    opt.param_groups[0]["seed"] = 2 ** 64
    with pytest.raises(ValueError, match="seed"):
        opt.step()
    for p, b in zip(params, before):
        assert_same_bits(p, b, "unchanged")
    after = opt.state_dict()
    for i, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][i][name], value), name


def test_master_weights_switched_off_drops_the_copy():
    params = make_params(torch.float16)
    opt = fastrms_torch.RMSprop(params, lr=0.01, master_weights=True)
    gen = torch.Generator().manual_seed(9)
    set_grads(params, gen)
    opt.step()
    assert "master_param" in opt.state[params[0]]
    opt.param_groups[0]["master_weights"] = False
    set_grads(params, gen)
    opt.step()
    assert "master_param" not in opt.state[params[0]]
    opt.param_groups[0]["master_weights"] = True
    set_grads(params, gen)
    widened = params[0].detach().float()
    opt.step()
    master = opt.state[params[0]]["master_param"]
    assert master.dtype == torch.float32 and not torch.equal(master, widened)
    assert torch.equal(master.to(torch.float16), params[0].detach())


def test_replaced_state_tensors_are_seen_before_the_step():
    """The per-step identity checks cover the 16-bit buckets' float32 state and master copy:
    a replaced square_avg is adopted (a bfloat16 one widened into a float32 copy), a master
    copy of the wrong shape is refused before anything is written."""
    params = make_params(torch.bfloat16)
    oracle = Oracle(params, dict(lr=0.01), "master")
    opt = fastrms_torch.RMSprop(params, lr=0.01, master_weights=True)
    gen = torch.Generator().manual_seed(10)
    oracle.step(set_grads(params, gen))
    opt.step()
    state = opt.state[params[0]]
    state["square_avg"] = state["square_avg"].clone()
    state["master_param"] = state["master_param"].clone()
    oracle.step(set_grads(params, gen))
    opt.step()
    oracle.check(opt, params, "replaced float32 state")
    rounded = state["square_avg"].to(torch.bfloat16)
    opt.state[params[0]]["square_avg"] = rounded
    oracle.state[0]["square_avg"] = numpy_of(rounded).astype(np.float32)
    oracle.step(set_grads(params, gen))
    opt.step()
    assert opt.state[params[0]]["square_avg"].dtype == torch.float32
    oracle.check(opt, params, "a bfloat16 square_avg, widened")
    before = [numpy_of(p) for p in params]
    opt.state[params[0]]["master_param"] = torch.zeros(5)
    set_grads(params, gen)
    with pytest.raises(RuntimeError, match="master_param"):
        opt.step()
    for p, b in zip(params, before):
        assert_same_bits(p, b, "unchanged")
