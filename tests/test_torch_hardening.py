"""``fastrms.torch.RMSprop`` under the torch idioms a hostile user reaches for: whatever happens to
a parameter, its gradient or its state between steps, the step serves the tensors as they are now
(or raises as torch does), the kernel never touches memory outside them, and a step is all or
nothing. Each case runs the same idiom on ``torch.optim.RMSprop`` and compares the outcome."""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

import fastrms.torch as fastrms_torch  # noqa: E402

RMSprop = fastrms_torch.RMSprop
TOLERANCE = 1e-5  # relative, float32, two or three steps (torch's sqrt and FMA; see parity tests)


def outcome(cls, idiom, seed=0, **options):
    """(parameters after the idiom, or the exception type it raised)."""
    torch.manual_seed(seed)
    try:
        return idiom(cls, **options)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)


def assert_same_outcome(idiom, **options):
    ours, theirs = outcome(RMSprop, idiom, **options), outcome(torch.optim.RMSprop, idiom)
    if isinstance(theirs, type):
        assert ours is theirs, (ours, theirs)
        return
    assert not isinstance(ours, type), f"fastrms raised {ours} where torch did not"
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = float(b.abs().max()) or 1.0
        assert float((a - b).abs().max()) <= TOLERANCE * scale


def stepped(cls, p, **options):
    opt = cls([p], lr=0.1, **options)
    p.grad = torch.randn_like(p)
    opt.step()
    return opt


# -- 1. a parameter changed between steps --------------------------------------------------------

def new_tensor(cls, **options):
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = stepped(cls, p, **options)
    p.data = torch.randn(4, 5)
    p.grad = torch.randn(4, 5)
    opt.step()
    return [p.detach().clone(), opt.state[p]["square_avg"].clone()]


def shrunk_in_place(cls, **options):
    """A slice of the old tensor: the same data pointer, fewer elements (an embedding table cut
    down). torch raises at the next step (the state no longer fits); so must we, untouched."""
    p = torch.nn.Parameter(torch.randn(12))
    opt = stepped(cls, p, **options)
    whole = p.data
    before = whole.clone()
    p.data = whole[:5]
    p.grad = torch.randn(5)
    try:
        opt.step()
    finally:
        assert torch.equal(whole, before), "memory outside the parameter was written"
    return [p.detach().clone()]


def transposed_view(cls, **options):
    """A square weight replaced by its transpose: same pointer, same shape, new strides."""
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = stepped(cls, p, **options)
    p.data = p.data.t()
    p.grad = torch.randn(3, 3)
    opt.step()
    return [p.detach().clone()]


def reshaped_view(cls, **options):
    p = torch.nn.Parameter(torch.randn(12))
    opt = stepped(cls, p, **options)
    p.data = p.data.view(3, 4)
    opt.state[p]["square_avg"] = opt.state[p]["square_avg"].view(3, 4)
    p.grad = torch.randn(3, 4)
    opt.step()
    return [p.detach().clone()]


def set_to_other_storage(cls, **options):
    p = torch.nn.Parameter(torch.randn(6))
    opt = stepped(cls, p, **options)
    with torch.no_grad():
        p.set_(torch.randn(6))
    p.grad = torch.randn(6)
    opt.step()
    return [p.detach().clone()]


def resized_in_place(cls, **options):
    p = torch.randn(8)  # a plain leaf tensor: resize_ refuses tensors that require grad
    opt = stepped(cls, p, **options)
    whole = p.clone()
    p.resize_(3)
    p.grad = torch.randn(3)
    opt.step()
    assert torch.equal(p, whole[:3]) is False
    return [p.clone()]


def dtype_changed(cls, **options):
    p = torch.nn.Parameter(torch.randn(6))
    opt = stepped(cls, p, **options)
    p.data = p.data.double()
    p.grad = torch.randn(6, dtype=torch.float64)
    opt.step()
    return [p.detach().clone()]


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("idiom", [new_tensor, shrunk_in_place, transposed_view, reshaped_view,
                                   set_to_other_storage, resized_in_place, dtype_changed],
                         ids=lambda f: f.__name__)
def test_parameter_changes_are_seen_before_the_kernel_runs(idiom, flatten):
    assert_same_outcome(idiom, flatten=flatten)


def test_shrunk_parameter_raises_and_writes_nothing_on_every_backend():
    for backend in ("c", "numba", "numpy"):
        p = torch.nn.Parameter(torch.randn(12))
        opt = stepped(RMSprop, p, backend=backend)
        whole = p.data
        before = whole.clone()
        state_before = opt.state[p]["square_avg"].clone()
        p.data = whole[:5]
        p.grad = torch.randn(5)
        with pytest.raises(RuntimeError, match="shape"):
            opt.step()
        assert torch.equal(whole, before) and torch.equal(opt.state[p]["square_avg"],
                                                           state_before)


# -- 2. gradients laid out differently from their parameters ---------------------------------

def _logical_twins(make_param, make_grad, steps=3):
    """The same values stepped once with the odd layouts and once all contiguous: the same
    bits, elementwise by logical index."""
    results = []
    for odd in (True, False):
        torch.manual_seed(1)
        p = make_param() if odd else make_param().contiguous()
        p = torch.nn.Parameter(p)
        opt = RMSprop([p], lr=0.05, momentum=0.9, centered=True)
        for _ in range(steps):
            g = torch.randn(p.shape)
            p.grad = make_grad(g) if odd else g.contiguous()
            opt.step()
        results.append(p.detach().contiguous())
    assert torch.equal(results[0], results[1])


def test_channels_last_weight_with_a_contiguous_gradient():
    _logical_twins(lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
                   lambda g: g.contiguous())


def test_transposed_weight_with_a_contiguous_gradient():
    _logical_twins(lambda: torch.randn(4, 4).t(), lambda g: g.contiguous())


def test_gradient_of_any_strides():
    _logical_twins(lambda: torch.randn(6, 4), lambda g: torch.zeros(12, 8)[::2, ::2].copy_(g))
    _logical_twins(lambda: torch.randn(6, 4), lambda g: g.t().contiguous().t())


# -- 3. state is what opt.state holds ------------------------------------------------------

def _two_steps(replace):
    p = torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    replace(opt.state[p])
    opt.step()
    return opt.state[p]["square_avg"]


@pytest.mark.parametrize("replace", [
    lambda s: s.__setitem__("square_avg", torch.full((4,), 100.0)),
    lambda s: setattr(s["square_avg"], "data", torch.full((4,), 100.0)),
    lambda s: s["square_avg"].set_(torch.full((4,), 100.0)),
    lambda s: s["square_avg"].copy_(torch.full((4,), 100.0)),
], ids=["assigned", "data", "set_", "copy_"])
def test_replaced_state_is_the_state_the_next_step_updates(replace):
    assert torch.allclose(_two_steps(replace), torch.full((4,), 99.01))


def test_state_dict_holds_the_live_tensors_not_frozen_copies():
    p = torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    saved = opt.state_dict()
    opt.step()
    assert saved["state"][0]["square_avg"] is opt.state[p]["square_avg"]
    assert float(saved["state"][0]["step"]) == 2.0


def test_a_held_step_tensor_stays_live_through_add_param_group_and_replans():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = RMSprop([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    held = opt.state[p]["step"]
    opt.add_param_group({"params": [q]})
    q.grad = torch.ones(2)
    opt.step()
    p.data = p.data.clone()  # a re-plan
    opt.step()
    assert float(held) == 3.0 and held is opt.state[p]["step"]


# -- 4. aliasing across tensors: refused, all or nothing ---------------------------------------

def _aliased(make_grad):
    a = torch.nn.Parameter(torch.ones(8))
    b = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
    c = torch.nn.Parameter(torch.ones(8))
    opt = RMSprop([{"params": [a]}, {"params": [b, c], "lr": 0.1}], momentum=0.9)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    before = [t.clone() for t in (a, b, c)] + [opt.state[p]["square_avg"].clone()
                                                for p in (a, b, c)]
    steps = [float(opt.state[p]["step"]) for p in (a, b, c)]
    c.grad = make_grad(opt, a, c)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\]"):
        opt.step()
    after = [a, b, c] + [opt.state[p]["square_avg"] for p in (a, b, c)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert steps == [float(opt.state[p]["step"]) for p in (a, b, c)]


@pytest.mark.parametrize("make_grad", [
    lambda opt, a, c: a.detach(),                                   # another parameter
    lambda opt, a, c: c.detach(),                                   # its own parameter
    lambda opt, a, c: opt.state[a]["square_avg"],                   # another's state
    lambda opt, a, c: opt.state[c]["momentum_buffer"],              # its own state
    lambda opt, a, c: opt.state[a]["square_avg"][0:8],             # a view into state
], ids=["other-param", "own-param", "other-state", "own-state", "view"])
def test_a_gradient_aliasing_what_the_step_writes_is_refused(make_grad):
    _aliased(make_grad)


# -- 5. checkpoints that do not fit ------------------------------------------------------------

@pytest.mark.parametrize("tamper,error", [
    (lambda sd: sd["state"][0].__setitem__("square_avg", torch.ones(2, 4)), ValueError),
    (lambda sd: sd["state"][0].__setitem__("square_avg", torch.ones(1)), ValueError),
    (lambda sd: sd["state"][0].pop("square_avg"), KeyError),
    (lambda sd: sd["state"][0].pop("step"), KeyError),
], ids=["broadcastable", "shorter", "no-square_avg", "no-step"])
def test_a_checkpoint_that_does_not_fit_raises_and_changes_nothing(tamper, error):
    p = torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    saved = opt.state_dict()
    saved = {"state": {k: dict(v) for k, v in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    tamper(saved)
    state_before = opt.state[p]["square_avg"]
    with pytest.raises(error):
        opt.load_state_dict(saved)
    assert opt.state[p]["square_avg"] is state_before
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0


# -- 6. two threads ---------------------------------------------------------------------------

def test_steps_from_two_threads_are_serialised():
    p = torch.nn.Parameter(torch.ones(100_000))
    twin = torch.nn.Parameter(torch.ones(100_000))
    opt, twin_opt = RMSprop([p], lr=1e-3), RMSprop([twin], lr=1e-3)
    p.grad = torch.full_like(p, 0.5)
    twin.grad = torch.full_like(twin, 0.5)
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        for _ in range(50):
            opt.step()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for _ in range(100):
        twin_opt.step()
    assert float(opt.state[p]["step"]) == 100.0
    assert torch.equal(p, twin)


def test_isinstance_of_torch_rmsprop():
    assert isinstance(RMSprop([torch.nn.Parameter(torch.ones(2))]), torch.optim.RMSprop)
