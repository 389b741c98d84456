"""Every implementation the bench report times, in one registry.

Each :class:`Implementation` has a name, a kind (``baseline``, ``fastrms``, ``roofline`` or
``peer``), a one-line description, an availability check returning ``(available, reason)``,
and a factory ``make(variant, state) -> step``: ``state`` is a dict of arrays from
:func:`make_state` (``param``, ``grad``, ``square_avg`` and, by variant, ``momentum_buffer`` or
``grad_avg``) and ``step()`` performs one optimizer step on it. Every factory works on the
arrays it is given (torch through ``torch.from_numpy``) except optax, whose jitted step with
donated buffers needs arrays of its own, and the roofline kernel, whose nonsense arithmetic
writes copies. The factories get a shallow copy of the dict, so one
that rebinds entries (the NumPy formula) does not disturb the others.

The hyperparameters are torch's defaults with lr 1e-3: lr=1e-3, alpha=0.99, eps=1e-8, and
momentum=0.9 for the momentum variant.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

LR, ALPHA, EPS, MOMENTUM_VALUE = 1e-3, 0.99, 1e-8, 0.9
#: variant -> the keyword arguments of fastrms.rmsprop_update that make it.
VARIANTS = {"plain": {}, "momentum": {"momentum": MOMENTUM_VALUE}, "centered": {"centered": True}}
#: Streams read + written per element: plain reads p, g, s and writes p, s; momentum and
#: centered add one buffer each, read and written.
STREAMS = {"plain": 5, "momentum": 7, "centered": 7}
#: Elements per block of the in-place NumPy version: its scratch and the slices of every
#: stream stay in L2 while the ~12 ufunc passes run over them.
NUMPY_BLOCK = 16384


def bytes_moved(variant: str, dtype, n: int) -> int:
    """Bytes one step must move at least: streams x itemsize x n."""
    return STREAMS[variant] * np.dtype(dtype).itemsize * n


def make_state(variant: str, dtype, n: int, seed: int = 0) -> dict:
    """Arrays for one step of ``variant``: random param and grad, positive square_avg."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    state = {"param": rng.standard_normal(n).astype(dtype),
             "grad": rng.standard_normal(n).astype(dtype),
             "square_avg": np.abs(rng.standard_normal(n)).astype(dtype) + dtype.type(1e-3)}
    if variant == "momentum":
        state["momentum_buffer"] = np.zeros(n, dtype)
    if variant == "centered":
        state["grad_avg"] = np.zeros(n, dtype)
    return state


@dataclass(frozen=True)
class Implementation:
    name: str
    kind: str
    description: str
    check: Callable[[], tuple[bool, str]]
    factory: Callable[[str, dict], Callable[[], None]]

    def availability(self) -> tuple[bool, str]:
        try:
            return self.check()
        except Exception as exc:  # a broken install is "absent", with the reason
            return False, f"{type(exc).__name__}: {exc}"

    def make(self, variant: str, state: dict) -> Callable[[], None]:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        return self.factory(variant, dict(state))


# -- NumPy baselines ---------------------------------------------------------------------------

def numpy_formula(variant: str, state: dict):
    """The straightforward NumPy formula: whole-array expressions, a temporary per operation,
    the state rebound (as most hand-written NumPy optimizers do)."""
    p, g = state["param"], state["grad"]

    def step():
        s = state["square_avg"] = ALPHA * state["square_avg"] + (1 - ALPHA) * g * g
        if variant == "centered":
            a = state["grad_avg"] = ALPHA * state["grad_avg"] + (1 - ALPHA) * g
            s = s - a * a
        if variant == "momentum":
            b = state["momentum_buffer"] = MOMENTUM_VALUE * state["momentum_buffer"] + g / (np.sqrt(s) + EPS)
            p[...] -= LR * b
        else:
            p[...] -= LR * g / (np.sqrt(s) + EPS)
    return step


def numpy_inplace(variant: str, state: dict, block: int = NUMPY_BLOCK):
    """The update as well as NumPy allows: ufuncs with ``out=``, two preallocated scratch
    buffers, no temporaries, and the arrays walked in blocks so the ~12 passes over each block
    run in cache. It follows SPEC.md's order with fastrms's coefficients, so it gives the NumPy
    reference's bits (a test checks that)."""
    from fastrms import kernel_coefficients

    p, g, s = state["param"], state["grad"], state["square_avg"]
    b, a = state.get("momentum_buffer"), state.get("grad_avg")
    coeffs = kernel_coefficients(p.dtype, LR, ALPHA, EPS, **VARIANTS[variant])
    alpha, c1ma, eps, neglr, _lr, _wd, mom = coeffs.scalars[:7]
    n = p.size
    width = min(block, n)
    u_full, d_full = np.empty(width, p.dtype), np.empty(width, p.dtype)
    blocks = []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        u, d = u_full[:hi - lo], d_full[:hi - lo]
        blocks.append((p[lo:hi], g[lo:hi], s[lo:hi], None if b is None else b[lo:hi],
                       None if a is None else a[lo:hi], u, d))
    multiply, subtract, divide, sqrt = np.multiply, np.subtract, np.divide, np.sqrt

    if variant == "plain":
        def step():
            for P, G, S, _, _, U, D in blocks:
                multiply(G, c1ma, out=U); U *= G                 # (c_1ma * g) * g
                S *= alpha; S += U                               # s = s * alpha + ...
                sqrt(S, out=D); D += eps                         # d = sqrt(s) + eps
                multiply(G, neglr, out=U); U /= D; P += U        # p = p + (-lr * g) / d
    elif variant == "momentum":
        def step():
            for P, G, S, B, _, U, D in blocks:
                multiply(G, c1ma, out=U); U *= G
                S *= alpha; S += U
                sqrt(S, out=D); D += eps
                divide(G, D, out=U); B *= mom; B += U            # b = b * mom + g / d
                multiply(B, neglr, out=U); P += U                # p = p + (-lr) * b
    else:
        def step():
            for P, G, S, _, A, U, D in blocks:
                multiply(G, c1ma, out=U); U *= G
                S *= alpha; S += U
                subtract(G, A, out=U); U *= c1ma; A += U         # a = a + c_1ma * (g - a)
                multiply(A, A, out=U); subtract(S, U, out=D)     # v = s - a * a
                sqrt(D, out=D); D += eps
                multiply(G, neglr, out=U); U /= D; P += U
    return step


# -- fastrms -----------------------------------------------------------------------------------

def _fastrms_step(backend: str | None):
    def factory(variant: str, state: dict):
        import fastrms

        update = fastrms.rmsprop_update
        p, g, s = state["param"], state["grad"], state["square_avg"]
        # Explicit arguments, as user code writes them: unpacking dicts on every call would add
        # a few hundred nanoseconds, which is a tenth of a small step.
        if variant == "momentum":
            b = state["momentum_buffer"]

            def step():
                update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, momentum=MOMENTUM_VALUE,
                       momentum_buffer=b, backend=backend)
        elif variant == "centered":
            a = state["grad_avg"]

            def step():
                update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, centered=True, grad_avg=a,
                       backend=backend)
        else:
            def step():
                update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, backend=backend)
        return step
    return factory


def _backend_check(name: str):
    def check():
        from fastrms import backends

        return backends.availability(name)
    return check


def _roofline_step(backend: str):
    def factory(variant: str, state: dict):
        from fastrms import backends
        from fastrms._coefficients import CENTERED, MOMENTUM

        roofline = backends.load(backend).roofline
        flags = {"plain": 0, "momentum": MOMENTUM, "centered": CENTERED}[variant]
        # Its arithmetic (s += g, p += s) is no optimizer step: it writes copies, never the
        # arrays the other implementations share.
        arrays = tuple(None if state.get(k) is None else
                       (state[k] if k == "grad" else state[k].copy())
                       for k in ("param", "grad", "square_avg", "momentum_buffer", "grad_avg"))

        def step():
            roofline(flags, *arrays)
        return step
    return factory


def _always() -> tuple[bool, str]:
    return True, "NumPy"


def _module_check(module: str, install: str):
    def check():
        try:
            found = importlib.import_module(module)
        except ImportError as exc:
            return False, f"{module} is not installed ({exc.__class__.__name__}; {install})"
        return True, f"{module} {getattr(found, '__version__', '?')}"
    return check


def _peer(name: str):
    """Factories in fastrms.report.peers, imported only when a peer is made."""
    def factory(variant: str, state: dict):
        from . import peers

        return getattr(peers, name)(variant, state)
    return factory


def _optax_check() -> tuple[bool, str]:
    for module, install in (("jax", "pip install jax jaxlib optax"), ("optax", "pip install optax")):
        ok, reason = _module_check(module, install)()
        if not ok:
            return ok, reason
    import jax
    import optax

    return True, f"optax {optax.__version__}, jax {jax.__version__}"


_TORCH_INSTALL = "pip install torch==2.13.0 (the CPU wheel; an unpinned torch pulls CUDA)"


def _torch_compile_check() -> tuple[bool, str]:
    """torch, and the C++ compiler inductor needs on CPU ($CXX, else c++ or g++ on PATH)."""
    import os
    import shutil

    ok, reason = _module_check("torch", _TORCH_INSTALL)()
    if not ok:
        return ok, reason
    cxx = os.environ.get("CXX", "").split()
    candidates = cxx[:1] or ["c++", "g++", "clang++"]
    compiler = next((found for name in candidates if (found := shutil.which(name))), None)
    if compiler is None:
        return False, f"torch.compile on CPU needs a C++ compiler; none of {candidates} found"
    return True, f"{reason}, inductor with {compiler}"


#: The registry, in the order the tables list it. The report's speedup columns are relative to
#: ``numpy-formula`` and ``torch-foreach``; its roofline column to ``roofline``.
IMPLEMENTATIONS = (
    Implementation("numpy-formula", "baseline",
                   "the straightforward NumPy formula (a temporary per operation)",
                   _always, numpy_formula),
    Implementation("numpy-inplace", "baseline",
                   "NumPy ufuncs with out=, preallocated scratch, blocked for cache",
                   _always, numpy_inplace),
    Implementation("fastrms-numpy", "fastrms", "fastrms backend 'numpy' (the reference)",
                   _backend_check("numpy"), _fastrms_step("numpy")),
    Implementation("fastrms-c", "fastrms", "fastrms backend 'c'",
                   _backend_check("c"), _fastrms_step("c")),
    Implementation("fastrms-numba", "fastrms", "fastrms backend 'numba'",
                   _backend_check("numba"), _fastrms_step("numba")),
    Implementation("fastrms-auto", "fastrms", "fastrms.rmsprop_update, automatic choice",
                   _always, _fastrms_step(None)),
    Implementation("roofline", "roofline",
                   "the C roofline kernel: the same streams, trivial arithmetic (own copies)",
                   _backend_check("c"), _roofline_step("c")),
    Implementation("torch-forloop", "peer", "torch.optim.RMSprop(foreach=False)",
                   _module_check("torch", _TORCH_INSTALL), _peer("torch_forloop")),
    Implementation("torch-foreach", "peer", "torch.optim.RMSprop(foreach=True)",
                   _module_check("torch", _TORCH_INSTALL), _peer("torch_foreach")),
    Implementation("torch-compile", "peer",
                   "torch.compile of torch.optim.RMSprop's step (compiled when made: the step's "
                   "compile_seconds)", _torch_compile_check, _peer("torch_compile")),
    Implementation("numexpr", "peer", "numexpr.evaluate, one fused expression per output, out=",
                   _module_check("numexpr", "pip install numexpr"), _peer("numexpr_step")),
    Implementation("optax-jit", "peer", "optax.rmsprop under jax.jit with donated buffers",
                   _optax_check, _peer("optax_step")),
)
BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}
BASELINE, ROOFLINE, TORCH = "numpy-formula", "roofline", "torch-foreach"


def get(name: str) -> Implementation:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(BY_NAME)}") from None
