"""The peers the bench report times: torch.optim.RMSprop (eager and under torch.compile), numexpr
and optax under jax.jit.

A peer is one :class:`Peer` in :data:`PEERS`: its row name, a description, an availability check
returning ``(available, reason)`` and a factory ``(variant, state) -> step``, as for every row
of :mod:`fastrms.report.registry`, which lists these after its own. To add a peer, write its
factory and check here and append a ``Peer``; nothing else changes. Each factory imports its
library when called, so importing this module imports none of them. The hyperparameters are
the workload's (:mod:`fastrms.report.workload`).

A factory whose step keeps copies of the state (optax's own device arrays) sets
``step.reset()``, which the timing loop calls after it restores the shared arrays.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .workload import ALPHA, EPS, LR, MOMENTUM_VALUE


class Peer(NamedTuple):
    name: str
    description: str
    check: Callable[[], tuple[bool, str]]
    factory: Callable[[str, dict], Callable[[], None]]


def module_check(module: str, install: str) -> Callable[[], tuple[bool, str]]:
    """An availability check: ``module`` imports, else its absence and how to install it."""
    def check() -> tuple[bool, str]:
        try:
            found = importlib.import_module(module)
        except ImportError as exc:
            return False, f"{module} is not installed ({exc.__class__.__name__}; {install})"
        return True, f"{module} {getattr(found, '__version__', '?')}"
    return check


def _torch(variant: str, state: dict, foreach: bool):
    """torch.optim.RMSprop on tensors that share memory with the arrays (torch.from_numpy):
    param, grad and torch's own state (square_avg, momentum_buffer, grad_avg) are the arrays'
    memory, so torch moves the same bytes as every other row and nothing is copied."""
    import torch

    if state["param"].itemsize == 2:
        return _torch_16_bit(variant, state, foreach)
    param = torch.from_numpy(state["param"])
    param.grad = torch.from_numpy(state["grad"])
    optimizer = torch.optim.RMSprop([param], lr=LR, alpha=ALPHA, eps=EPS,
                                    momentum=MOMENTUM_VALUE if variant == "momentum" else 0.0,
                                    centered=variant == "centered", foreach=foreach)
    # Pre-filled state: torch initialises a parameter's state only when it finds it empty.
    torch_state = {"step": torch.tensor(0.0), "square_avg": torch.from_numpy(state["square_avg"])}
    if variant == "momentum":
        torch_state["momentum_buffer"] = torch.from_numpy(state["momentum_buffer"])
    if variant == "centered":
        torch_state["grad_avg"] = torch.from_numpy(state["grad_avg"])
    optimizer.state[param] = torch_state
    return optimizer.step


def _torch_16_bit(variant: str, state: dict, foreach: bool):
    """torch.optim.RMSprop on a bfloat16 / float16 parameter as torch runs it: its state in the
    parameter's dtype (torch's own, from the float32 state rounded), the parameter and gradient
    the arrays' memory (viewed as int16, then as the torch dtype: no copy)."""
    import torch

    kind = torch.bfloat16 if state["param"].dtype.name == "bfloat16" else torch.float16

    def tensor(array):
        return torch.from_numpy(array.view(np.int16)).view(kind)

    param = tensor(state["param"])
    param.grad = tensor(state["grad"])
    optimizer = torch.optim.RMSprop([param], lr=LR, alpha=ALPHA, eps=EPS,
                                    momentum=MOMENTUM_VALUE if variant == "momentum" else 0.0,
                                    centered=variant == "centered", foreach=foreach)
    torch_state = {"step": torch.tensor(0.0),
                   "square_avg": torch.from_numpy(state["square_avg"]).to(kind)}
    for name in ("momentum_buffer", "grad_avg"):
        if name in state:
            torch_state[name] = torch.from_numpy(state[name]).to(kind)
    optimizer.state[param] = torch_state
    return optimizer.step


#: The peers that also time 16-bit parameters.
SIXTEEN_BIT_PEERS = ("torch-forloop", "torch-foreach")


def torch_forloop(variant: str, state: dict):
    return _torch(variant, state, foreach=False)


def torch_foreach(variant: str, state: dict):
    return _torch(variant, state, foreach=True)


def torch_compile(variant: str, state: dict):
    """``torch.compile`` of ``torch.optim.RMSprop``'s step, as torch's tutorial writes it (a
    function calling ``opt.step()``, compiled): inductor turns the update into one fused C++
    loop on CPU, with torch's thread count baked in. Same tensors as :func:`_torch`.

    The first call compiles (seconds) and is made here, then undone (the arrays restored, the
    step count back to 0): the returned step carries its duration as ``compile_seconds``, and no
    timed call includes it. ``torch.compiler.reset()`` comes first: each new optimizer is a
    recompilation of the same code, and past dynamo's recompile limit (8) torch would silently
    run the step uncompiled; steps made before this one would recompile on their next call, so
    make and use them one at a time."""
    import time

    import torch

    optimizer_step = _torch(variant, state, foreach=False)
    torch.compiler.reset()

    @torch.compile
    def step():
        optimizer_step()

    written = {key: array.copy() for key, array in state.items() if key != "grad"}
    start = time.perf_counter()
    step()
    step.compile_seconds = time.perf_counter() - start
    for key, array in written.items():
        np.copyto(state[key], array)
    for torch_state in optimizer_step.__self__.state.values():
        torch_state["step"].zero_()
    return step


_NUMEXPR = {
    # output -> expression, evaluated in this order (each line reads the outputs before it).
    "plain": (("square_avg", "s * alpha + (c1ma * g) * g"),
              ("param", "p - lr * g / (sqrt(s) + eps)")),
    "momentum": (("square_avg", "s * alpha + (c1ma * g) * g"),
                 ("momentum_buffer", "b * mom + g / (sqrt(s) + eps)"),
                 ("param", "p - lr * b")),
    "centered": (("square_avg", "s * alpha + (c1ma * g) * g"),
                 ("grad_avg", "a + c1ma * (g - a)"),
                 ("param", "p - lr * g / (sqrt(s - a * a) + eps)")),
}
_SHORT = {"param": "p", "grad": "g", "square_avg": "s", "momentum_buffer": "b", "grad_avg": "a"}


def numexpr_step(variant: str, state: dict):
    """numexpr: one compiled expression per output array, evaluated in place (out= the array it
    updates). numexpr evaluates block by block on its own threads, so each output is one pass,
    but an output cannot feed the next expression within the pass: 2 or 3 passes per step."""
    import numexpr

    dtype = state["param"].dtype.type
    names = {_SHORT[k]: v for k, v in state.items()}
    names.update(alpha=dtype(ALPHA), c1ma=dtype(1 - ALPHA), eps=dtype(EPS), lr=dtype(LR),
                 mom=dtype(MOMENTUM_VALUE))
    lines = [(expression, {name: value for name, value in names.items()
                           if _mentions(expression, name)}, state[output])
             for output, expression in _NUMEXPR[variant]]
    evaluate = numexpr.evaluate  # caches each compiled expression by text and signature

    def step():
        for expression, local_dict, out in lines:
            evaluate(expression, local_dict=local_dict, out=out)
    return step


def _mentions(expression: str, name: str) -> bool:
    return re.search(rf"\b{name}\b", expression) is not None


def optax_step(variant: str, state: dict):
    """optax.rmsprop (eps outside the square root, as torch) under jax.jit, with the parameters
    and optimizer state donated so XLA can update them in place. jax needs arrays of its own
    (the gradient too), so this row starts from copies of the state; each step blocks until
    the result is ready. optax keeps lr inside the momentum buffer: the same streams.

    float64 needs jax's x64 mode. It is switched on around each call (a context manager,
    about a microsecond), never for the whole process, where it would change every other jax
    user's default dtype."""
    import contextlib

    import jax
    import jax.numpy as jnp
    import optax

    wide = state["param"].dtype == np.float64
    # jax.enable_x64 is the current spelling; older JAX had it in jax.experimental.
    x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with x64(True) if wide else contextlib.nullcontext():
        transform = optax.rmsprop(LR, decay=ALPHA, eps=EPS, eps_in_sqrt=False,
                                  centered=variant == "centered",
                                  momentum=MOMENTUM_VALUE if variant == "momentum" else None)
        params = jnp.array(state["param"])
        grads = jnp.array(state["grad"])
        opt_state = _seeded(transform.init(params), state, jnp)

    def update(params, opt_state, grads):
        updates, opt_state = transform.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jitted = jax.jit(update, donate_argnums=(0, 1))
    current = [params, opt_state]
    block = jax.block_until_ready

    def step32():
        params, opt_state = jitted(current[0], current[1], grads)
        current[0], current[1] = params, opt_state
        block(params)
        block(opt_state)

    def step64():
        with x64(True):
            step32()

    def reset():
        """Start again from the shared arrays (restored by the timing loop)."""
        with x64(True) if wide else contextlib.nullcontext():
            current[0] = jnp.array(state["param"])
            current[1] = _seeded(transform.init(current[0]), state, jnp)

    step = step64 if wide else step32
    step.current = current  # the live [params, opt_state], for tests
    step.reset = reset
    return step


#: optax state field -> the state array that starts it.
_OPTAX_FIELDS = {"nu": "square_avg", "mu": "grad_avg", "trace": "momentum_buffer"}


def _seeded(opt_state, state: dict, jnp):
    """optax's state with nu / mu / trace started from copies of our arrays, so its first step
    is the same step as every other row's."""
    if hasattr(opt_state, "_fields"):  # a NamedTuple state
        changes = {field: jnp.array(state[_OPTAX_FIELDS[field]])
                   for field in opt_state._fields
                   if field in _OPTAX_FIELDS and state.get(_OPTAX_FIELDS[field]) is not None}
        rest = {field: _seeded(getattr(opt_state, field), state, jnp)
                for field in opt_state._fields if field not in changes}
        return opt_state._replace(**changes, **rest)
    if isinstance(opt_state, (tuple, list)):
        return type(opt_state)(_seeded(item, state, jnp) for item in opt_state)
    return opt_state


def _optax_check() -> tuple[bool, str]:
    for module, install in (("jax", "pip install jax jaxlib optax"), ("optax", "pip install optax")):
        ok, reason = module_check(module, install)()
        if not ok:
            return ok, reason
    import jax
    import optax

    return True, f"optax {optax.__version__}, jax {jax.__version__}"


_TORCH_INSTALL = "pip install torch==2.13.0 (the CPU wheel; an unpinned torch pulls CUDA)"

#: The peers, in the order the tables list them (after fastrms's own rows). The report's
#: "vs torch" column is relative to ``torch-foreach``.
def _torch_compile_check() -> tuple[bool, str]:
    """torch, and the C++ compiler inductor needs on CPU ($CXX, else c++ or g++ on PATH)."""
    import os
    import shutil

    ok, reason = module_check("torch", _TORCH_INSTALL)()
    if not ok:
        return ok, reason
    cxx = os.environ.get("CXX", "").split()
    candidates = cxx[:1] or ["c++", "g++", "clang++"]
    compiler = next((found for name in candidates if (found := shutil.which(name))), None)
    if compiler is None:
        return False, f"torch.compile on CPU needs a C++ compiler; none of {candidates} found"
    return True, f"{reason}, inductor with {compiler}"


PEERS: tuple[Peer, ...] = (
    Peer("torch-forloop", "torch.optim.RMSprop(foreach=False)",
         module_check("torch", _TORCH_INSTALL), torch_forloop),
    Peer("torch-foreach", "torch.optim.RMSprop(foreach=True)",
         module_check("torch", _TORCH_INSTALL), torch_foreach),
    Peer("torch-compile", "torch.compile of torch.optim.RMSprop's step (compiled when made: the "
         "step's compile_seconds)", _torch_compile_check, torch_compile),
    Peer("numexpr", "numexpr.evaluate, one fused expression per output, out=",
         module_check("numexpr", "pip install numexpr"), numexpr_step),
    Peer("optax-jit", "optax.rmsprop under jax.jit with donated buffers", _optax_check,
         optax_step),
)
