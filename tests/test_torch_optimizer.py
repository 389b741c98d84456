"""``fastrms.torch.RMSprop`` as a drop-in for ``torch.optim.RMSprop``.

Agreement with torch is a tolerance, not equality (SPEC.md: torch's float32 ``sqrt`` is not
correctly rounded and its ``addcmul_`` uses an FMA), and training amplifies a difference of an ulp
into the next gradient. The tracking test trains a 10-32-1 tanh MLP on random data for 60 steps
(lr 1e-2, StepLR step 20 gamma 0.5) with both optimizers, for every combination of centered x
momentum (0 / 0.9) x weight_decay (0 / 0.01) x maximize, in float32 and float64, and compares

- parameters: per tensor ``max|ours - torch| / max|torch|`` after the last step, and
- losses: ``max over steps of |ours - torch| / |torch|``.

Measured on torch 2.13 CPU with seeds 0..6 (16 combinations each):

    =========  =================  ==========  ==========
    dtype      worst param rel    worst loss  tolerance
    =========  =================  ==========  ==========
    float32    1.5e-5             1.2e-5      1e-4
    float64    3.6e-13            1.7e-14     1e-11
    =========  =================  ==========  ==========

The tolerances leave a margin of about 7x (float32) and 30x (float64) over the worst seen, while a
real formula difference is far outside them: in the same setup eps_in_sqrt, lr_in_momentum,
nesterov, decoupled decay or alpha 0.985 instead of 0.99 move parameters by 0.15 to 1.5 relative
(``test_the_tolerance_catches_a_formula_difference``).

Everything that does not involve torch's own arithmetic is checked for bit equality: flatten=True
against flatten=False, every fastrms backend against the NumPy reference, checkpoints reloaded into
fastrms, and the parameters handed to torch's implementation against torch.optim.RMSprop.
"""
from __future__ import annotations

import copy
import io
import itertools
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastrms  # noqa: E402
import fastrms.torch as fastrms_torch  # noqa: E402
from fastrms.backends import c_backend  # noqa: E402
from rms_helpers import require_backend  # noqa: E402

RMSprop = fastrms_torch.RMSprop
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-11}
STEPS = 60
COMBOS = list(itertools.product((False, True), (0.0, 0.9), (0.0, 0.01), (False, True)))
COMBO_IDS = [f"{'cen' if c else 'unc'}-mom{m}-wd{w}-{'max' if x else 'min'}"
             for c, m, w, x in COMBOS]
ALL_BUFFERS = dict(momentum=0.9, centered=True, weight_decay=0.01)


# -- helpers ---------------------------------------------------------------------------------

def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 1)).to(dtype)


def make_data(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(64, 10, generator=generator, dtype=dtype),
            torch.randn(64, 1, generator=generator, dtype=dtype))


def train(model, opt, sched, data, steps, losses=None):
    x, y = data
    losses = [] if losses is None else losses
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def run(cls, dtype=torch.float32, steps=STEPS, seed=0, **options):
    """Train the MLP; return (parameters, losses, model, optimizer, scheduler)."""
    model = make_model(dtype, seed)
    opt = cls(model.parameters(), lr=1e-2, **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    losses = train(model, opt, sched, make_data(dtype, seed), steps)
    return [p.detach().clone() for p in model.parameters()], np.array(losses), model, opt, sched


def param_rel_diff(ours, theirs) -> float:
    return max(float((a - b).detach().abs().max() / b.detach().abs().max())
               for a, b in zip(ours, theirs))


def loss_rel_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs)) / np.abs(theirs)))


def assert_tracks(ours, theirs, ours_losses, theirs_losses, dtype):
    tolerance = TOLERANCE[dtype]
    assert param_rel_diff(ours, theirs) <= tolerance
    assert loss_rel_diff(ours_losses, theirs_losses) <= tolerance


def assert_tensors_identical(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(_uint(a)), b.view(-1).view(_uint(b))), "bits differ"


def _uint(t):
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def checkpoint(obj):
    """A round trip through torch.save / torch.load, as a checkpoint file makes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


#: The C backend's multi-tensor entry points: arrays, or gradients as addresses.
MULTI_TENSOR_ENTRIES = ("update_many", "update_many_at_addresses")


class CallCounter:
    """Counts calls of backend functions (together) while forwarding them."""

    def __init__(self, monkeypatch, module, *names):
        self.calls = 0
        for name in names:
            monkeypatch.setattr(module, name, self._counting(getattr(module, name)))

    def _counting(self, original):
        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        return counting


# -- import ----------------------------------------------------------------------------------

def test_import_fastrms_does_not_import_torch():
    code = "import sys, fastrms; fastrms.info(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_fastrms_torch_without_torch_says_why():
    code = ("import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
            "try:\n    import fastrms.torch\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "fastrms.torch needs PyTorch" in out.stdout
    assert "torch==2.13.0" in out.stdout


# -- tracking torch.optim.RMSprop --------------------------------------------------------------

@pytest.mark.parametrize(("centered", "momentum", "weight_decay", "maximize"), COMBOS,
                         ids=COMBO_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_training_tracks_torch(dtype, centered, momentum, weight_decay, maximize):
    options = dict(centered=centered, momentum=momentum, weight_decay=weight_decay,
                   maximize=maximize)
    theirs, their_losses, *_ = run(torch.optim.RMSprop, dtype, **options)
    ours, our_losses, _, opt, _ = run(RMSprop, dtype, **options)
    assert_tracks(ours, theirs, our_losses, their_losses, dtype)
    assert not opt.unfused_parameters()  # all of it ran on the kernel
    # Not vacuous: training moved the parameters far beyond the tolerance.
    start = [p.detach() for p in make_model(dtype).parameters()]
    assert param_rel_diff(ours, start) > 1000 * TOLERANCE[dtype]


@pytest.mark.parametrize("form", [dict(alpha=0.985), dict(eps_in_sqrt=True),
                                  dict(lr_in_momentum=True, momentum=0.9),
                                  dict(nesterov=True, momentum=0.9),
                                  dict(decoupled_weight_decay=True, weight_decay=0.01)],
                         ids=["alpha", "eps_in_sqrt", "lr_in_momentum", "nesterov", "decoupled"])
def test_the_tolerance_catches_a_formula_difference(form):
    torch_options = {k: v for k, v in form.items() if k in ("momentum", "weight_decay")}
    theirs, their_losses, *_ = run(torch.optim.RMSprop, **torch_options)
    ours, our_losses, *_ = run(RMSprop, **form)
    assert param_rel_diff(ours, theirs) > 100 * TOLERANCE[torch.float32]


def test_param_groups_with_different_lr_track_torch(monkeypatch):
    """Two groups (different lr, momentum) x two dtypes: one kernel call per (group, dtype)."""
    def build(cls):
        torch.manual_seed(1)
        a = torch.nn.Linear(6, 8)
        b = torch.nn.Linear(8, 1).double()
        opt = cls([{"params": a.parameters()},
                   {"params": list(b.parameters()), "lr": 3e-3, "momentum": 0.5}], lr=1e-2)
        return a, b, opt

    x = torch.randn(16, 6)
    results = []
    for cls in (torch.optim.RMSprop, RMSprop):
        a, b, opt = build(cls)
        if cls is RMSprop:
            counter = CallCounter(monkeypatch, c_backend, *MULTI_TENSOR_ENTRIES)
        for _ in range(20):
            opt.zero_grad()
            (b(torch.tanh(a(x)).double()) ** 2).mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in (*a.parameters(), *b.parameters())])
    assert counter.calls == 20 * 2  # (group 0, float32) and (group 1, float64)
    for ours, theirs in zip(results[1], results[0]):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) <= TOLERANCE[torch.float32]
    assert opt.state_dict()["param_groups"][1]["lr"] == 3e-3


def test_one_kernel_call_per_step_for_many_tensors(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(n)) for n in range(1, 200)]
    opt = RMSprop(params, momentum=0.9)
    counter = CallCounter(monkeypatch, c_backend, *MULTI_TENSOR_ENTRIES)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)  # fresh gradient tensors, as after zero_grad(None)
        opt.step()
    assert counter.calls == 3


# -- the optimizer protocol --------------------------------------------------------------------

def test_closure_returns_the_loss_and_runs_with_grad_enabled():
    model, data = make_model(), make_data()
    opt = RMSprop(model.parameters())
    reference = make_model()
    reference_opt = RMSprop(reference.parameters())
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data[0]), data[1])
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True]
    assert torch.is_tensor(loss) and loss.item() > 0
    train(reference, reference_opt, None, data, 1)
    assert_tensors_identical(list(model.parameters()), list(reference.parameters()))
    assert opt.step() is None


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = make_model()
    opt = RMSprop(model.parameters())
    train(model, opt, None, make_data(), 1)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


def test_step_hooks_and_scheduler_see_a_torch_optimizer():
    model = make_model()
    opt = RMSprop(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(model, opt, sched, make_data(), 3)
    assert calls == ["pre", "post"] * 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert isinstance(opt, torch.optim.Optimizer)


def test_parameters_without_gradient_are_skipped_as_torch_does():
    results = []
    for cls in (torch.optim.RMSprop, RMSprop):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
        opt = cls(params, momentum=0.9)
        for step in range(6):
            for k, p in enumerate(params):
                # parameter 3 never has a gradient, parameter 1 only on even steps
                has = k != 3 and (k != 1 or step % 2 == 0)
                p.grad = torch.full_like(p, 0.1 * (step + k + 1)) if has else None
            opt.step()
        results.append((params, opt))
    (theirs, their_opt), (ours, our_opt) = results
    for a, b in zip(ours, theirs):
        assert float((a - b).detach().abs().max()) <= 1e-6
    assert [float(our_opt.state[p]["step"]) for p in ours[:3]] == [6.0, 3.0, 6.0]
    assert ours[3] not in our_opt.state  # as torch: no state for a parameter never stepped
    assert their_opt.state.get(theirs[3]) is None


def test_lr_tensor_and_momentum_switched_on_later():
    p = torch.nn.Parameter(torch.ones(10))
    opt = RMSprop([p], lr=torch.tensor(0.01))
    p.grad = torch.ones(10)
    opt.step()
    assert "momentum_buffer" not in opt.state[p]
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["centered"] = True
    opt.step()
    assert set(opt.state[p]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert float(opt.state[p]["step"]) == 2.0


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_replaced_param_data_is_followed(flatten):
    """p.data replaced between steps (a new tensor, another shape): the optimizer follows."""
    results = []
    for cls, options in ((torch.optim.RMSprop, {}), (RMSprop, dict(flatten=flatten))):
        p = torch.nn.Parameter(torch.linspace(1, 2, 12))
        opt = cls([p], **options)
        for step in range(4):
            if step == 2:
                p.data = p.data.clone().view(3, 4)
                opt.state[p]["square_avg"] = opt.state[p]["square_avg"].view(3, 4)
            p.grad = torch.full_like(p, 0.5)
            opt.step()
        results.append(p.detach().clone())
    assert float((results[1] - results[0]).detach().abs().max()) <= 1e-6


def test_invalid_arguments_raise_like_torch():
    p = [torch.nn.Parameter(torch.ones(2))]
    for kwargs, match in [(dict(lr=-1.0), "Invalid learning rate"),
                          (dict(eps=-1.0), "Invalid epsilon"),
                          (dict(momentum=-1.0), "Invalid momentum"),
                          (dict(weight_decay=-1.0), "Invalid weight_decay"),
                          (dict(alpha=-1.0), "Invalid alpha"),
                          (dict(nesterov=True), "nesterov requires momentum"),
                          (dict(backend="nope"), "unknown backend")]:
        with pytest.raises(ValueError, match=match):
            RMSprop(p, **kwargs)
    opt = RMSprop(p)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: alpha"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "alpha": 1.5})
    assert len(opt.param_groups) == 1


# -- state_dict and checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, dict(momentum=0.9), dict(centered=True), ALL_BUFFERS],
                         ids=["plain", "momentum", "centered", "all"])
@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_state_dict_has_torchs_layout(options, flatten):
    _, _, _, ours, _ = run(RMSprop, steps=3, flatten=flatten, **options)
    _, _, _, theirs, _ = run(torch.optim.RMSprop, steps=3, **options)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for index in b["state"]:
        assert list(a["state"][index]) == list(b["state"][index])  # same keys, same order
        for key, theirs_value in b["state"][index].items():
            ours_value = a["state"][index][key]
            assert type(ours_value) is torch.Tensor
            assert (ours_value.dtype, ours_value.shape) == (theirs_value.dtype, theirs_value.shape)
        assert float(a["state"][index]["step"]) == 3.0
    for ours_group, their_group in zip(a["param_groups"], b["param_groups"]):
        assert set(ours_group) - set(their_group) == {*fastrms_torch.FASTRMS_OPTIONS, "param_rounding",
                                                      "seed", "master_weights"}
        assert {k: ours_group[k] for k in their_group} == their_group
    torch.optim.RMSprop(make_model().parameters(), **options).load_state_dict(checkpoint(a))


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_checkpoint_from_fastrms_continues_in_torch(flatten):
    _, _, model, opt, sched = run(RMSprop, steps=30, flatten=flatten, **ALL_BUFFERS)
    saved = checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict()})
    model2 = make_model()
    model2.load_state_dict(saved["model"])
    opt2 = torch.optim.RMSprop(model2.parameters(), lr=1e-2, **ALL_BUFFERS)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=20, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for p, q in zip(model.parameters(), model2.parameters()):  # the state arrived exactly
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], value), key
    their_losses = train(model2, opt2, sched2, make_data(), 30)
    uninterrupted, losses, *_ = run(torch.optim.RMSprop, **ALL_BUFFERS)
    assert_tracks(list(model2.parameters()), uninterrupted, their_losses, losses[30:],
                  torch.float32)


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_checkpoint_from_torch_continues_in_fastrms(flatten):
    _, _, model, opt, sched = run(torch.optim.RMSprop, steps=30, **ALL_BUFFERS)
    saved = checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict()})
    model2 = make_model()
    model2.load_state_dict(saved["model"])
    opt2 = RMSprop(model2.parameters(), lr=1e-2, flatten=flatten, **ALL_BUFFERS)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=20, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["eps_in_sqrt"] is False  # from the constructor
    our_losses = train(model2, opt2, sched2, make_data(), 30)
    uninterrupted, losses, *_ = run(torch.optim.RMSprop, **ALL_BUFFERS)
    assert_tracks(list(model2.parameters()), uninterrupted, our_losses, losses[30:],
                  torch.float32)
    assert [float(s["step"]) for s in opt2.state.values()] == [60.0] * 4


@pytest.mark.parametrize(("save_flat", "load_flat"), [(False, False), (True, False), (False, True)])
def test_checkpoint_from_fastrms_continues_in_fastrms_bit_for_bit(save_flat, load_flat):
    _, _, model, opt, sched = run(RMSprop, steps=30, flatten=save_flat, **ALL_BUFFERS)
    saved = checkpoint({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict()})
    model2 = make_model()
    model2.load_state_dict(saved["model"])
    opt2 = RMSprop(model2.parameters(), lr=1e-2, flatten=load_flat, **ALL_BUFFERS)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=20, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    our_losses = train(model2, opt2, sched2, make_data(), 30)
    uninterrupted, losses, *_ = run(RMSprop, **ALL_BUFFERS)
    assert_tensors_identical([p.detach() for p in model2.parameters()], uninterrupted)
    assert our_losses == list(losses[30:])


def test_in_memory_load_does_not_share_step_counters():
    _, _, _, opt, _ = run(RMSprop, steps=2)
    model2 = make_model()
    opt2 = RMSprop(model2.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model2, opt2, None, make_data(), 1)
    assert [float(s["step"]) for s in opt.state.values()] == [2.0] * 4
    assert [float(s["step"]) for s in opt2.state.values()] == [3.0] * 4


def test_reading_state_of_a_parameter_without_state_changes_nothing():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([p, q])
    assert opt.state[q] == {}  # a defaultdict: this read stores an empty dict
    p.grad = torch.ones(3)
    opt.step()
    q.grad = torch.ones(3)
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0 and float(opt.state[q]["step"]) == 1.0


def test_state_replaced_by_user_code_is_read_again():
    p = torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([p])
    p.grad = torch.ones(4)
    opt.step()
    opt.state[p]["square_avg"] = torch.full((4,), 100.0)
    opt.step()
    assert torch.allclose(opt.state[p]["square_avg"], torch.full((4,), 99.01))


# -- flatten -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("centered", "momentum", "weight_decay", "maximize"),
                         [COMBOS[0], COMBOS[-1], (True, 0.0, 0.0, False), (False, 0.9, 0.0, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_flatten_equals_tensors_bit_for_bit(dtype, centered, momentum, weight_decay, maximize):
    options = dict(centered=centered, momentum=momentum, weight_decay=weight_decay,
                   maximize=maximize)
    a, a_losses, _, a_opt, _ = run(RMSprop, dtype, steps=30, **options)
    b, b_losses, model, b_opt, _ = run(RMSprop, dtype, steps=30, flatten=True, **options)
    assert_tensors_identical(b, a)
    assert list(b_losses) == list(a_losses)
    for sa, sb in zip(a_opt.state.values(), b_opt.state.values()):
        assert sa.keys() == sb.keys()
        assert_tensors_identical(list(sb.values()), list(sa.values()))


def test_flatten_makes_one_buffer_and_one_call_per_dtype(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8),
                                torch.nn.Linear(8, 2).double())
    opt = RMSprop(model.parameters(), flatten=True)
    storages = {}
    for p in model.parameters():
        storages.setdefault(p.dtype, set()).add(p.untyped_storage().data_ptr())
    assert {d: len(s) for d, s in storages.items()} == {torch.float32: 1, torch.float64: 1}
    counter = CallCounter(monkeypatch, c_backend, "update_if_ready")
    x = torch.randn(3, 4)

    def backward():
        out = model[2](model[1](model[0](x)).double())
        out.sum().backward()

    for _ in range(3):
        opt.zero_grad()
        backward()
        opt.step()
    assert counter.calls == 3 * 2
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad()  # keeps the views (zeroed), so that backward accumulates into the buffer
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    backward()
    assert all(p.grad is g and g.any() for p, g in zip(model.parameters(), grads))


def test_flatten_follows_model_zero_grad_and_frozen_parameters():
    """model.zero_grad() (set_to_none) and a frozen layer: the flat path copies and skips, with
    the same bits as the per-tensor path."""
    results = []
    for flatten in (False, True):
        model = make_model()
        model[0].bias.requires_grad_(False)
        opt = RMSprop(model.parameters(), momentum=0.9, flatten=flatten)
        x, y = make_data()
        for _ in range(5):
            model.zero_grad()  # set_to_none=True: the flat views are dropped
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert model[0].bias not in opt.state
    assert_tensors_identical(results[1], results[0])


def test_flatten_with_a_group_added_later_equals_tensors_bit_for_bit():
    results = []
    for flatten in (False, True):
        model = make_model()
        first, second = model[0], model[2]
        opt = RMSprop(first.parameters(), momentum=0.9, flatten=flatten)
        x, y = make_data()
        for step in range(6):
            if step == 3:
                opt.add_param_group({"params": second.parameters(), "lr": 3e-3})
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert float(opt.state[first.weight]["step"]) == 6.0
        assert float(opt.state[second.weight]["step"]) == 3.0
    assert_tensors_identical(results[1], results[0])


def test_flatten_keeps_channels_last_layout():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    stride = conv.weight.stride()
    opt = RMSprop(conv.parameters(), flatten=True)
    assert conv.weight.stride() == stride
    conv(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    assert not opt.unfused_parameters()


# -- backends ------------------------------------------------------------------------------------

FASTRMS_FORMS = [{}, ALL_BUFFERS, dict(momentum=0.9, nesterov=True, lr_in_momentum=True),
                 dict(eps_in_sqrt=True, decoupled_weight_decay=True, weight_decay=0.1,
                      maximize=True)]


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("options", FASTRMS_FORMS, ids=["plain", "all", "nesterov", "keras"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_backends_give_the_reference_bits(dtype, options, backend):
    """The same gradients through backend="numpy" (the reference) and a compiled backend."""
    require_backend(backend)
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (5,), (130,), (3, 3, 4), ()]
    start = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [[torch.tensor(rng.standard_normal(s) * 10.0 ** rng.uniform(-2, 1), dtype=dtype)
              for s in shapes] for _ in range(8)]
    finals = []
    for name in ("numpy", backend):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = RMSprop(params, lr=1e-2, backend=name, **options)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals.append(params + [t for s in opt.state.values() for t in s.values()])
    assert_tensors_identical(finals[1], finals[0])


def test_use_backend_context_is_honoured(monkeypatch):
    counter = CallCounter(monkeypatch, c_backend, *MULTI_TENSOR_ENTRIES)
    p = torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([p])
    p.grad = torch.ones(3)
    with fastrms.use_backend("numpy"):
        opt.step()
    assert counter.calls == 0
    opt.step()
    assert counter.calls == 1


# -- what the kernel does not serve --------------------------------------------------------------

def _side_by_side(make_params, steps=5, **options):
    """The same parameters and gradients through torch.optim.RMSprop and fastrms."""
    runs = []
    for cls in (torch.optim.RMSprop, RMSprop):
        params = make_params()
        opt = cls(params, **options)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            opt.step()
        runs.append((params, opt))
    return runs


@pytest.mark.parametrize("dtype", [torch.complex64])  # bfloat16 / float16: the kernel's now
def test_other_dtypes_are_updated_by_torch(dtype):
    def make_params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(20)),
                torch.nn.Parameter(torch.randn(20).to(dtype))]

    (theirs, _), (ours, opt) = _side_by_side(make_params, momentum=0.9, centered=True)
    assert_tensors_identical([ours[1].detach()], [theirs[1].detach()])  # torch's own code
    assert float((ours[0] - theirs[0]).detach().abs().max()) <= 1e-5
    [(group, param, reason)] = opt.unfused_parameters()
    assert param is ours[1] and "dtype" in reason


def test_strided_views_and_shared_memory_are_updated_by_torch():
    def make_params():
        torch.manual_seed(0)
        base = torch.randn(6, 10)
        strided = base[:, ::2]  # gaps between elements
        shared = torch.randn(20)
        params = [strided, shared[:12], shared[8:], torch.randn(4)]
        return [p.requires_grad_() for p in params]

    (theirs, _), (ours, opt) = _side_by_side(make_params)
    assert_tensors_identical([p.detach() for p in ours[:3]], [p.detach() for p in theirs[:3]])
    reasons = [reason for _, _, reason in opt.unfused_parameters()]
    assert len(reasons) == 3
    assert "not dense" in reasons[0] and "shares memory" in reasons[1]


def test_channels_last_runs_on_the_kernel_with_the_contiguous_bits():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(3)]
    finals = []
    for layout in (torch.contiguous_format, torch.channels_last):
        p = torch.nn.Parameter(weight.clone().to(memory_format=layout))
        opt = RMSprop([p], momentum=0.9)
        for g in grads:
            p.grad = g.clone().to(memory_format=layout)
            opt.step()
        assert not opt.unfused_parameters()
        assert opt.state[p]["square_avg"].stride() == p.stride()
        finals.append(p.detach().contiguous())
    assert_tensors_identical([finals[1]], [finals[0]])


GRADIENT_FORMS = ("plain", "transposed", "requires_grad", "neg_view", "misaligned")


def _gradient_in_form(g, form):
    """The values of g, held in the given form."""
    if form == "transposed":
        return g.t().contiguous().t()  # column-major
    if form == "requires_grad":
        return g.clone().requires_grad_()  # as backward(create_graph=True) leaves it
    if form == "neg_view":
        return torch._neg_view(-g)  # memory holds -g; the neg bit flips it back
    if form == "misaligned":
        memory = bytearray(g.numel() * g.element_size() + 1)
        out = torch.frombuffer(memory, dtype=g.dtype, offset=1, count=g.numel()).view(g.shape)
        out.copy_(g)
        return out
    return g


def test_gradients_in_another_form_give_the_same_bits(monkeypatch):
    """Dense, aligned, C-contiguous gradients (requiring grad or not: the kernel only reads
    them) take the address entry point; the other forms the checked path, which reads or copies
    each as it must. All give the bits of the plain run."""
    torch.manual_seed(0)
    start = torch.randn(6, 4)
    grads = [torch.randn(6, 4) for _ in range(3)]
    finals = []
    for form in GRADIENT_FORMS:
        with monkeypatch.context() as patch:
            by_address = CallCounter(patch, c_backend, "update_many_at_addresses")
            by_array = CallCounter(patch, c_backend, "update_many")
            p = torch.nn.Parameter(start.clone())
            q = torch.nn.Parameter(start[0].clone())  # a second tensor: a plain gradient always
            opt = RMSprop([p, q], centered=True)
            for g in grads:
                p.grad = _gradient_in_form(g, form)
                q.grad = g[0].clone()
                opt.step()
        by_address_expected = form in ("plain", "requires_grad")
        assert (by_address.calls, by_array.calls) == ((3, 0) if by_address_expected else (0, 3)), form
        finals.append(p.detach().clone())
    assert_tensors_identical(finals[1:], finals[:1] * (len(GRADIENT_FORMS) - 1))


def test_differentiable_groups_are_updated_by_torch():
    """differentiable=True: torch's code, so autograd sees the update (here: d step / d start)."""
    finals, leaves = [], []
    for cls in (torch.optim.RMSprop, RMSprop):
        torch.manual_seed(0)
        leaf = torch.randn(10, requires_grad=True)
        p = leaf.clone()  # not a leaf: the update is recorded, as torch's differentiable tests do
        opt = cls([p], differentiable=True, momentum=0.9)
        for _ in range(3):
            p.grad = torch.randn(10)
            opt.step()
        p.sum().backward()
        finals.append(p.detach())
        leaves.append(leaf.grad)
    assert_tensors_identical(finals[1:], finals[:1])
    assert_tensors_identical(leaves[1:], leaves[:1])
    assert "differentiable" in opt.unfused_parameters()[0][2]


def test_other_devices_are_updated_by_torch():
    p = torch.nn.Parameter(torch.randn(5, device="meta"))
    q = torch.nn.Parameter(torch.randn(5))
    opt = RMSprop([p, q])
    p.grad = torch.randn(5, device="meta")
    q.grad = torch.randn(5)
    opt.step()
    [(_, param, reason)] = opt.unfused_parameters()
    assert param is p and "device meta" in reason
    assert opt.state[p]["square_avg"].device.type == "meta"


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_sparse_gradients_are_refused_as_torch_refuses_them(flatten):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    opt = RMSprop(embedding.parameters(), flatten=flatten)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_capturable_is_refused():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="capturable=True is for CUDA graph capture"):
        RMSprop(params, capturable=True)
    opt = RMSprop(params)
    with pytest.raises(ValueError, match="capturable"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "capturable": True})
    opt.param_groups[0]["capturable"] = True  # as a checkpoint from a CUDA run would set it
    params[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="capturable"):
        opt.step()


def test_fastrms_options_cannot_go_to_torch():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2).cfloat())]
    with pytest.raises(ValueError, match="eps_in_sqrt=True.*dtype torch.complex64"):
        RMSprop(params, eps_in_sqrt=True)
    # A separate group for the half-precision parameter works.
    opt = RMSprop([{"params": params[:1], "eps_in_sqrt": True}, {"params": params[1:]}])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
