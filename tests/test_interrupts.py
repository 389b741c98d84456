"""A Ctrl-C (SIGINT) arriving in the middle of a step: the step completes, counts included, and
the KeyboardInterrupt comes after its last write (fastrms.engine.interrupts).

The signal is raised for real (``signal.raise_signal``) from inside the step, right after one
bucket's kernel call: exactly where, without the deferral, CPython would raise
KeyboardInterrupt with the other buckets not yet written and the counts behind.
"""
from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

import fastrms
from fastrms.engine import buckets as engine_buckets
from fastrms.engine import stepper
from rms_helpers import BACKENDS, assert_bits_equal, require_backend


def _model(seed: int = 0):
    """Two groups and two dtypes: four buckets, so four kernel calls per step."""
    rng = np.random.default_rng(seed)
    shapes = [((7, 5), np.float32), ((11,), np.float64), ((3, 4), np.float32), ((9,), np.float64)]
    params = [rng.standard_normal(s).astype(d) for s, d in shapes]
    grads = [rng.standard_normal(s).astype(d) for s, d in shapes]
    return params, grads


def _optimizer(params, backend):
    return fastrms.RMSprop([{"params": params[:2]},
                            {"params": params[2:], "momentum": 0.9, "centered": True}],
                           lr=1e-2, backend=backend)


def _interrupt_after_bucket(monkeypatch, which: int):
    """Make the ``which``-th kernel call of the next step raise SIGINT right after it returns."""
    real_run = engine_buckets.Bucket.run
    calls = []

    def run(self, *args, **kwargs):
        real_run(self, *args, **kwargs)
        calls.append(self)
        if len(calls) == which:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(engine_buckets.Bucket, "run", run)
    return calls


def _expected_after_one_step(backend):
    params, grads = _model()
    opt = _optimizer(params, backend)
    opt.step(grads)
    return params, opt.state


def _assert_one_whole_step(params, opt, backend):
    expected_params, expected_state = _expected_after_one_step(backend)
    for k, (p, e) in enumerate(zip(params, expected_params)):
        assert_bits_equal(p, e, f"param {k}")
    for k, (got, want) in enumerate(zip(opt.state, expected_state)):
        assert got["step"] == want["step"] == 1, k
        for name in ("square_avg", "momentum_buffer", "grad_avg"):
            assert (name in got) == (name in want), (k, name)
            if name in want:
                assert_bits_equal(got[name], want[name], f"param {k} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", [1, 2, 4])
def test_a_ctrl_c_between_kernel_calls_comes_after_the_whole_step(backend, which, monkeypatch):
    require_backend(backend)
    params, grads = _model()
    opt = _optimizer(params, backend)
    calls = _interrupt_after_bucket(monkeypatch, which)
    with pytest.raises(KeyboardInterrupt):
        opt.step(grads)
    assert len(calls) == 4  # every bucket ran before the KeyboardInterrupt
    monkeypatch.undo()
    _assert_one_whole_step(params, opt, backend)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    opt.step(grads)  # and the optimizer steps on as usual
    assert all(entry["step"] == 2 for entry in opt.state)


def test_without_the_deferral_the_same_interrupt_tears_the_step(monkeypatch):
    """The check above can fail: with the deferral switched off, the interrupt after the first
    kernel call leaves three buckets unwritten and every count at 0."""
    monkeypatch.setattr(stepper, "hold_interrupts", lambda: False)
    params, grads = _model()
    before = [p.copy() for p in params]
    opt = _optimizer(params, "numpy")
    calls = _interrupt_after_bucket(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        opt.step(grads)
    assert len(calls) == 1
    changed = [not np.array_equal(p, b) for p, b in zip(params, before)]
    assert sum(changed) == 1
    assert all(entry["step"] == 0 for entry in opt.state)


def test_a_users_own_sigint_handler_is_called_once_after_the_step(monkeypatch):
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        params, grads = _model()
        opt = _optimizer(params, "numpy")
        calls = _interrupt_after_bucket(monkeypatch, 2)
        opt.step(grads)  # the handler does not raise: the step returns normally
        assert len(calls) == 4 and received == [signal.SIGINT]
        assert all(entry["step"] == 1 for entry in opt.state)
        handler = signal.getsignal(signal.SIGINT)
        assert handler is not signal.default_int_handler and handler.__name__ == "<lambda>"
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored(monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        params, grads = _model()
        opt = _optimizer(params, "numpy")
        _interrupt_after_bucket(monkeypatch, 1)
        opt.step(grads)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert all(entry["step"] == 1 for entry in opt.state)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_step_in_another_thread_leaves_the_handler_alone():
    params, grads = _model()
    opt = _optimizer(params, "numpy")
    seen = []

    def step():
        seen.append(signal.getsignal(signal.SIGINT))
        opt.step(grads)

    worker = threading.Thread(target=step)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert seen == [signal.default_int_handler]
    assert all(entry["step"] == 1 for entry in opt.state)


def test_the_torch_drop_in_finishes_its_step_too(monkeypatch):
    torch = pytest.importorskip("torch")
    from fastrms.torch import RMSprop

    torch.manual_seed(0)
    make = lambda: [torch.randn(6, 5), torch.randn(7, dtype=torch.float64),
                    torch.randn(3, dtype=torch.complex64)]  # the last one goes to torch
    tensors = make()
    grads = [torch.randn_like(t) for t in tensors]

    def optimizer(ts):
        ps = [torch.nn.Parameter(t.clone()) for t in ts]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps, RMSprop(ps, lr=1e-2, momentum=0.9)

    expected, reference = optimizer(tensors)
    reference.step()
    params, opt = optimizer(tensors)
    opt.step()  # a first step builds the plan; the second one is interrupted
    reference.step()
    real_engine_run = stepper.Engine.run

    def engine_run(self, *args, **kwargs):
        result = real_engine_run(self, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # after the kernel's tensors, before torch's
        return result

    monkeypatch.setattr(stepper.Engine, "run", engine_run)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    monkeypatch.undo()
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e.detach())
    for p, e in zip(params, expected):
        assert float(opt.state[p]["step"]) == float(reference.state[e]["step"]) == 2.0
