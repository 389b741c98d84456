"""Every implementation the bench report times, in one registry.

Each :class:`Implementation` has a name, a kind (``baseline``, ``fastrms``, ``roofline`` or
``peer``), a one-line description, an availability check returning ``(available, reason)``,
and a factory ``make(variant, state) -> step``: ``state`` is a dict of arrays from
:func:`~fastrms.report.workload.make_state` (``param``, ``grad``, ``square_avg`` and, by
variant, ``momentum_buffer`` or ``grad_avg``) and ``step()`` performs one optimizer step on it.
Every factory works on the arrays it is given (torch through ``torch.from_numpy``) except optax,
whose jitted step with donated buffers needs arrays of its own, and the roofline kernel, whose
nonsense arithmetic writes copies. The factories get a shallow copy of the dict, so one that
rebinds entries (the NumPy formula) does not disturb the others; a step that keeps state of its
own sets ``step.reset()`` (see :class:`~fastrms.report.workload.StateGuard`).
``dtypes`` names the problem dtypes a row can time (None: float32 and float64 only); the
16-bit ones (bfloat16, float16) are timed by fastrms, the roofline and torch. ``state_format``
says how a row keeps the optimizer state (``"float32"``: the shared arrays, in the problem's
dtype; ``"bfloat16"`` / ``"blockwise8"``: compact copies of them, see issue 15), and
:data:`ROOFLINE_OF` names the roofline row each format is measured against.

The peers (torch, numexpr, optax) are :data:`fastrms.report.peers.PEERS`, listed after
fastrms's own rows. The workload (hyperparameters, variants, streams) is
:mod:`fastrms.report.workload`; its names are re-exported here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import peers
from .workload import (ALPHA, EPS, LR, MOMENTUM_VALUE, STATE_FORMATS, STREAMS, VARIANTS,
                       bytes_moved, make_state)

__all__ = ["ALPHA", "BASELINE", "BY_NAME", "EPS", "IMPLEMENTATIONS", "Implementation", "LR",
           "MOMENTUM_VALUE", "ROOFLINE", "ROOFLINE_OF", "STATE_FORMATS", "STREAMS", "TORCH",
           "VARIANTS", "bytes_moved", "get", "make_state", "numpy_formula", "numpy_inplace"]

#: Every problem dtype the report knows.
ALL_DTYPES = ("float32", "float64", "bfloat16", "float16")
#: The dtypes compact state goes with (its arithmetic is float32).
COMPACT_DTYPES = ("float32", "bfloat16", "float16")
#: Elements per block of the in-place NumPy version: its scratch and the slices of every
#: stream stay in L2 while the ~12 ufunc passes run over them.
NUMPY_BLOCK = 16384


@dataclass(frozen=True)
class Implementation:
    name: str
    kind: str
    description: str
    check: Callable[[], tuple[bool, str]]
    factory: Callable[[str, dict], Callable[[], None]]
    dtypes: tuple[str, ...] | None = None
    state_format: str = "float32"

    def supports(self, dtype: str) -> bool:
        return dtype in (self.dtypes or ("float32", "float64"))

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
    shared = dict(state)

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

    def reset():
        """Rebind to the shared arrays again (restored by the timing loop)."""
        state.update(shared)

    step.reset = reset
    return step


def numpy_inplace(variant: str, state: dict, block: int = NUMPY_BLOCK):
    """The update as well as NumPy allows: ufuncs with ``out=``, two preallocated scratch
    buffers, no temporaries, and the arrays walked in blocks so the ~12 passes over each block
    run in cache. It follows the update order of docs/contract.md with fastrms's coefficients,
    so it gives the NumPy reference's bits (a test checks that)."""
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


def _compact_copies(variant: str, state: dict, state_format: str) -> dict:
    """The row's own state in ``state_format``, made from the shared float32 state: unsigned
    blockwise8 for square_avg, signed for the buffers that change sign."""
    from fastrms import Blockwise8
    from fastrms._codecs import BFLOAT16

    copies = {}
    for name in ("square_avg", "momentum_buffer", "grad_avg"):
        if state.get(name) is None:
            continue
        if state_format == "bfloat16":
            copies[name] = state[name].astype(BFLOAT16)
        else:
            copies[name] = Blockwise8.from_float32(state[name], signed=name != "square_avg")
    return copies


def _compact_step(state_format: str):
    def factory(variant: str, state: dict):
        import fastrms

        update = fastrms.rmsprop_update
        p, g = state["param"], state["grad"]
        initial = _compact_copies(variant, state, state_format)
        own = {name: value.copy() for name, value in initial.items()}
        s = own["square_avg"]
        if variant == "momentum":
            b = own["momentum_buffer"]

            def step():
                update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, momentum=MOMENTUM_VALUE,
                       momentum_buffer=b)
        elif variant == "centered":
            a = own["grad_avg"]

            def step():
                update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS, centered=True, grad_avg=a)
        else:
            def step():
                update(p, g, s, lr=LR, alpha=ALPHA, eps=EPS)

        def reset():  # with the shared state (StateGuard): the copies start over too
            for name, value in initial.items():
                if state_format == "bfloat16":
                    own[name][...] = value
                else:
                    own[name].codes[...] = value.codes
                    own[name].scales[...] = value.scales
        step.reset = reset  # type: ignore[attr-defined]
        return step
    return factory


def _compact_roofline(state_format: str):
    def factory(variant: str, state: dict):
        from fastrms._coefficients import CENTERED, MOMENTUM
        from fastrms.backends import c_compact

        flags = {"plain": 0, "momentum": MOMENTUM, "centered": CENTERED}[variant]
        # Copies throughout: its arithmetic is no optimizer step.
        own = _compact_copies(variant, state, state_format)
        arrays = (state["param"].copy(), state["grad"], own["square_avg"],
                  own.get("momentum_buffer"), own.get("grad_avg"))

        def step():
            c_compact.roofline_compact(flags, *arrays)
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

        module = backends.load(backend)
        low = state["param"].itemsize == 2  # the 16-bit streams: 16-bit p and g, float32 state
        roofline = module.roofline_low_precision if low else module.roofline
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


def _compact_rows(state_format: str, tag: str, state: str) -> tuple:
    """fastrms with compact state of one format, and the roofline moving its streams."""
    return (Implementation(f"fastrms-{tag}", "fastrms",
                           f"fastrms.rmsprop_update with {state} (automatic choice)", _always,
                           _compact_step(state_format), COMPACT_DTYPES, state_format),
            Implementation(f"roofline-{tag}", "roofline",
                           f"the C roofline kernel over {state} (own copies)",
                           _backend_check("c"), _compact_roofline(state_format), COMPACT_DTYPES,
                           state_format))


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
                   _backend_check("numpy"), _fastrms_step("numpy"), ALL_DTYPES),
    Implementation("fastrms-c", "fastrms", "fastrms backend 'c'",
                   _backend_check("c"), _fastrms_step("c"), ALL_DTYPES),
    Implementation("fastrms-numba", "fastrms", "fastrms backend 'numba'",
                   _backend_check("numba"), _fastrms_step("numba"), ALL_DTYPES),
    Implementation("fastrms-auto", "fastrms", "fastrms.rmsprop_update, automatic choice",
                   _always, _fastrms_step(None), ALL_DTYPES),
    Implementation("roofline", "roofline",
                   "the C roofline kernel: the same streams, trivial arithmetic (own copies)",
                   _backend_check("c"), _roofline_step("c"), ALL_DTYPES),
    *_compact_rows("bfloat16", "bf16-state", "bfloat16 state arrays"),
    *_compact_rows("blockwise8", "blockwise8", "fastrms.Blockwise8 state"),
    *(Implementation(peer.name, "peer", peer.description, peer.check, peer.factory,
                     ALL_DTYPES if peer.name in peers.SIXTEEN_BIT_PEERS else None)
      for peer in peers.PEERS),
)
BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}
BASELINE, ROOFLINE, TORCH = "numpy-formula", "roofline", "torch-foreach"
#: state format -> the roofline row its rows' "of roof" figure is measured against.
ROOFLINE_OF = {"float32": ROOFLINE, "bfloat16": "roofline-bf16-state",
               "blockwise8": "roofline-blockwise8"}


def get(name: str) -> Implementation:
    """The row called ``name``, or ValueError naming the choices."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(BY_NAME)}") from None
