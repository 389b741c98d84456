"""``fastrms.RMSprop`` and ``rmsprop_update`` as a hostile user meets them: ndarray subclasses
as parameters, hyperparameters that change behind the same object, copies of the optimizer, and
parameters whose layout is reassigned between steps."""
from __future__ import annotations

import copy
import numbers
import pickle
import threading

import numpy as np
import pytest

import fastrms
from fastrms.backends import numpy_reference
from rms_helpers import BACKENDS, require_backend


class Matrixish(np.ndarray):
    """A subclass whose arithmetic would differ from plain memory (like np.matrix)."""

    def __mul__(self, other):  # pragma: no cover - must never be called by a backend
        raise AssertionError("a backend used the subclass's arithmetic")


@pytest.mark.parametrize("backend", BACKENDS)
def test_subclass_passed_only_as_param_is_updated_as_plain_memory(backend):
    require_backend(backend)
    rng = np.random.default_rng(3)
    plain = rng.standard_normal((4, 5)).astype(np.float32)
    grad = rng.standard_normal((4, 5)).astype(np.float32)
    expected, s_expected = plain.copy(), np.zeros_like(plain)
    numpy_reference.update(fastrms.kernel_coefficients(np.float32, 0.01), expected, grad,
                           s_expected)
    for param in (plain.copy().view(Matrixish), np.matrix(plain.copy())):
        square_avg = np.zeros_like(plain)
        fastrms.rmsprop_update(param, grad, square_avg, lr=0.01, backend=backend)
        assert np.asarray(param).tobytes() == expected.tobytes()
        assert square_avg.tobytes() == s_expected.tobytes()


class MutableReal(numbers.Real):
    """A Real whose value changes behind the same object (a schedule object, say)."""

    def __init__(self, value):
        self.value = value

    def __float__(self):
        return float(self.value)

    def __hash__(self):
        return id(self)

    # The rest of numbers.Real's abstract methods, by value.
    def __abs__(self): return abs(self.value)
    def __add__(self, o): return self.value + o
    def __ceil__(self): return self.value.__ceil__()
    def __eq__(self, o): return self is o
    def __floor__(self): return self.value.__floor__()
    def __floordiv__(self, o): return self.value // o
    def __le__(self, o): return self.value <= o
    def __lt__(self, o): return self.value < o
    def __mod__(self, o): return self.value % o
    def __mul__(self, o): return self.value * o
    def __neg__(self): return -self.value
    def __pos__(self): return +self.value
    def __pow__(self, o): return self.value ** o
    def __radd__(self, o): return o + self.value
    def __rfloordiv__(self, o): return o // self.value
    def __rmod__(self, o): return o % self.value
    def __rmul__(self, o): return o * self.value
    def __round__(self, n=None): return round(self.value, n)
    def __rpow__(self, o): return o ** self.value
    def __rtruediv__(self, o): return o / self.value
    def __truediv__(self, o): return self.value / o
    def __trunc__(self): return self.value.__trunc__()


def test_a_mutable_real_hyperparameter_is_read_by_value_every_step():
    lr = MutableReal(0.01)
    p, twin = np.ones(5), np.ones(5)
    opt = fastrms.RMSprop([p], lr=lr)
    twin_opt = fastrms.RMSprop([twin], lr=0.01)
    for value in (0.01, 0.5, 0.02):
        lr.value = value
        twin_opt.param_groups[0]["lr"] = value
        opt.step([np.full(5, 0.5)])
        twin_opt.step([np.full(5, 0.5)])
        assert p.tobytes() == twin.tobytes()
    # rmsprop_update too: the same object, another value, another step.
    a, b = np.ones(3), np.ones(3)
    sa, sb = np.zeros(3), np.zeros(3)
    for value in (0.01, 0.3):
        lr.value = value
        fastrms.rmsprop_update(a, np.ones(3), sa, lr=lr)
        fastrms.rmsprop_update(b, np.ones(3), sb, lr=value)
        assert a.tobytes() == b.tobytes()
    lr.value = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step([np.full(5, 0.5)])


@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_copies_of_the_optimizer_continue_bit_for_bit(flat, duplicate):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((3, 4)), rng.standard_normal(7).astype(np.float32)]
    params = fastrms.FlatParams(arrays) if flat else [a.copy() for a in arrays]
    opt = fastrms.RMSprop(params if flat else [{"params": params[:1], "momentum": 0.9},
                                               {"params": params[1:], "centered": True}],
                          lr=1e-2, skip_nonfinite=True)
    grads = [[rng.standard_normal(a.shape).astype(a.dtype) for a in arrays] for _ in range(4)]

    def step(o, g):
        if flat:
            for view, x in zip(o._flat.grads, g):
                view[...] = x
            return o.step()
        return o.step(g)

    step(opt, grads[0])
    twin = duplicate(opt)
    for g in grads[1:]:
        assert step(opt, g) and step(twin, g)
    ours = opt._flat.params if flat else opt._params
    theirs = twin._flat.params if flat else twin._params
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ours, theirs))
    assert not any(np.shares_memory(a, b) for a, b in zip(ours, theirs))
    assert twin.state_dict()["state"][0]["step"] == 4


def test_a_parameter_whose_layout_is_reassigned_keeps_its_memory_updated():
    """The optimizer walks its own views of the parameters, made at construction: reassigning
    an array's shape in place changes how the caller sees the memory, not what is updated."""
    p, twin = np.arange(6.0), np.arange(6.0)
    opt, twin_opt = fastrms.RMSprop([p]), fastrms.RMSprop([twin])
    grads = [np.linspace(-1, 1, 6)]
    opt.step(grads)
    twin_opt.step(grads)
    p.shape = (2, 3)
    opt.step(grads)  # gradients keep the shape the optimizer was built with
    twin_opt.step(grads)
    assert p.shape == (2, 3) and p.tobytes() == twin.tobytes()
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(2, 3\)"):
        opt.step([np.ones((2, 3))])


def test_steps_from_two_threads_are_serialised():
    p, twin = np.ones(200_000, np.float32), np.ones(200_000, np.float32)
    opt, twin_opt = fastrms.RMSprop([p], lr=1e-3), fastrms.RMSprop([twin], lr=1e-3)
    grads = [np.full(200_000, 0.5, np.float32)]
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        for _ in range(40):
            opt.step(grads)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for _ in range(80):
        twin_opt.step(grads)
    assert opt.state[0]["step"] == 80 and p.tobytes() == twin.tobytes()
