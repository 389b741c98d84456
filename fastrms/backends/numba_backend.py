"""The Numba backend: the fused update as a plain loop, compiled by Numba.

One loop holds the contract's order (docs/contract.md) over flat arrays; it is inlined once per
set of streams, with and without the rarer options (8 copies, below). Small arrays call it
directly (a ``prange`` always wakes the thread pool) and large ones through a ``prange`` over
cache-line-aligned chunks, one call per chunk. Options are run-time arguments, so each driver
compiles once per dtype.

Compilation settings live in one place, ``JIT`` in _numba_codecs.py (which this module imports
and the 16-bit codecs there use too): ``nogil=True``, never ``fastmath`` (it would reassociate
and fuse, breaking bit-identity), and ``cache=True`` unless ``FASTRMS_NUMBA_CACHE=0``.
Numba caches ``parallel=True`` functions too; tests/test_numba_cache.py proves a fresh process
loads them and gets the same bits.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

from .._codecs import BFLOAT16, FLOAT32, LOW_PRECISION_DTYPES
from .._coefficients import (CENTERED, EPS_IN_SQRT, GRAD_SCALE, LR_IN_MOMENTUM, MAXIMIZE, MOMENTUM,
                             NESTEROV, WD_COUPLED, WD_DECOUPLED)
from .._validation import check_no_overlap
from ._numba_codecs import (CACHE, JIT as _jit, decode_into, decode_low_precision,
                            encode_into, encode_low_precision)

#: sha256 (first 16 hex digits) of _numba_codecs.py. Numba invalidates a cached kernel when the
#: file that defines it changes, not when a function it inlines from another file does: a test
#: fails until this is updated after an edit there, and updating it invalidates the cache.
CODECS_SOURCE_SHA256 = "34c5577702c81279"

#: Below this many elements the serial driver runs (same value as the C kernel's threshold).
PARALLEL_THRESHOLD = 1 << 16



# One loop source, inlined (Numba IR inlining, inline="always") at call sites where the stream
# set is a constant, and so is the common case of none of weight decay, maximize and nesterov,
# so that LLVM specialises each copy: 8 loops, not one per option combination. In the other
# copies those options only choose between two results, never guard a load or a store, and
# eps_in_sqrt and the momentum form are no choice at all (see _kernel_arguments).
# Measured at 10^7 float32 elements, as a fraction of the roofline (median of 60 interleaved
# rounds): one loop whose loads of the optional streams sat under run-time flags stayed scalar
# (momentum 0.46); one loop per stream set with every option a select, plain 0.84-0.87; these
# loops 0.90-0.95, where C is at 0.94-0.98.

@njit(**_jit)
def _effective_gradient(g, p, maximize, decay_form, weight_decay, decay):
    """Lines 1-2: the gradient after maximize and coupled decay, and the decoupled-decayed p."""
    if maximize:
        g = -g
    coupled = g + weight_decay * p
    decayed = p * decay
    return (coupled if decay_form == 1 else g), (decayed if decay_form == 2 else p)


@njit(inline="always", **_jit)
def _update_loop(P, G, S, B, A, coefficients, options, decay_form, with_momentum, centered):
    """the contract's lines over one slice. B (with_momentum) and A (centered) are read only when
    used; unused ones are empty arrays."""
    (alpha, one_minus_alpha, eps_inside, eps_outside, neg_lr, momentum_numerator, momentum_step,
     weight_decay, momentum, decay) = coefficients
    maximize, nesterov = options
    # range(P.size) of a slice, not range(lo, hi): with a start that may be negative, Numba adds
    # index wraparound and LLVM no longer vectorises (measured 3x slower).
    for i in range(P.size):
        g, p = _effective_gradient(G[i], P[i], maximize, decay_form, weight_decay, decay)
        s = S[i] * alpha + (one_minus_alpha * g) * g
        S[i] = s
        v = s
        if centered:
            a = A[i] + one_minus_alpha * (g - A[i])
            A[i] = a
            v = s - a * a
        d = np.sqrt(v + eps_inside) + eps_outside
        if with_momentum:
            u = (momentum_numerator * g) / d
            b = B[i] * momentum + u
            B[i] = b
            P[i] = p + momentum_step * (u + momentum * b if nesterov else b)
        else:
            P[i] = p + (neg_lr * g) / d


@njit(inline="always", **_jit)
def _update_by_streams(P, G, S, B, A, coefficients, options, decay_form, with_momentum,
                       centered):
    if with_momentum:
        if centered:
            _update_loop(P, G, S, B, A, coefficients, options, decay_form, True, True)
        else:
            _update_loop(P, G, S, B, A, coefficients, options, decay_form, True, False)
    elif centered:
        _update_loop(P, G, S, B, A, coefficients, options, decay_form, False, True)
    else:
        _update_loop(P, G, S, B, A, coefficients, options, decay_form, False, False)


@njit(**_jit)
def _update_flat(P, G, S, B, A, coefficients, forms):
    # The loops are inlined here, not called: a call with array arguments costs reference
    # counting (measured 20x slower per element).
    maximize, centered, with_momentum, nesterov, decay_form = forms
    if decay_form == 0 and not maximize and not nesterov:
        _update_by_streams(P, G, S, B, A, coefficients, (False, False), 0, with_momentum,
                           centered)
    else:
        _update_by_streams(P, G, S, B, A, coefficients, (maximize, nesterov), decay_form,
                           with_momentum, centered)


#: Elements unscaled at a time into a scratch buffer by a loss-scaled step (16 KB at most).
UNSCALE_BLOCK = 2048


@njit(**_jit)
def _update_serial(P, G, S, B, A, unscale, coefficients, forms):
    unscale_form, grad_scale, grad_scale_inverse = unscale
    if unscale_form == 0:
        _update_flat(P, G, S, B, A, coefficients, forms)
        return
    # A loss-scaled step unscales a block into a small buffer and runs the ordinary loop on it
    # (the C kernel's design): a branch on the scale inside the loop stops LLVM vectorising it
    # (measured 5x slower). 1: an exact reciprocal, which gives the division's bits.
    n = P.size
    unscaled = np.empty(min(n, UNSCALE_BLOCK), G.dtype)
    for lo in range(0, n, UNSCALE_BLOCK):
        hi = min(n, lo + UNSCALE_BLOCK)
        block = unscaled[:hi - lo]
        grad = G[lo:hi]
        if unscale_form == 1:
            for i in range(block.size):
                block[i] = grad[i] * grad_scale_inverse
        else:
            for i in range(block.size):
                block[i] = grad[i] / grad_scale
        # Unused streams are empty arrays, and slices of them stay empty.
        _update_flat(P[lo:hi], block, S[lo:hi], B[lo:hi], A[lo:hi], coefficients, forms)


@njit(parallel=True, **_jit)
def _update_parallel(P, G, S, B, A, chunk, unscale, coefficients, forms):
    n = P.size
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(n, lo + chunk)
        _update_serial(P[lo:hi], G[lo:hi], S[lo:hi], B[lo:hi], A[lo:hi], unscale, coefficients,
                       forms)


@njit(**_jit)
def _update_low_precision_serial(P, G16, G32, S, B, A, M, first, formats, key, unscale,
                                 coefficients, forms):
    """A 16-bit param (P, uint16 bits) block by block: widen into float32 buffers (or take the
    float32 master copy M), run the float32 loop, narrow back (csrc/rmsprop16.h's design).
    The gradient is G16 (16-bit bits) or G32 (float32), the other one empty; so is M unless
    master. ``first``: the index of P[0] in its array, for the random bits."""
    bf16, grad32, stochastic, master = formats
    k0, k1 = key
    unscale_form, grad_scale, grad_scale_inverse = unscale
    n = P.size
    param_bits = np.empty(min(n, UNSCALE_BLOCK), np.uint32)
    grad_bits = np.empty(min(n, UNSCALE_BLOCK), np.uint32)
    param_block, grad_block = param_bits.view(np.float32), grad_bits.view(np.float32)
    master_bits = M.view(np.uint32)
    for lo in range(0, n, UNSCALE_BLOCK):
        hi = min(n, lo + UNSCALE_BLOCK)
        size = hi - lo
        if master:
            p, p_bits = M[lo:hi], master_bits[lo:hi]
        else:
            p, p_bits = param_block[:size], param_bits[:size]
            decode_into(P[lo:hi], p_bits, bf16)
        if grad32:
            g = G32[lo:hi]
        else:
            decode_into(G16[lo:hi], grad_bits[:size], bf16)
            g = grad_block[:size]
        if unscale_form != 0:
            unscaled = grad_block[:size]
            if unscale_form == 1:
                for i in range(size):
                    unscaled[i] = g[i] * grad_scale_inverse
            else:
                for i in range(size):
                    unscaled[i] = g[i] / grad_scale
            g = unscaled
        _update_flat(p, g, S[lo:hi], B[lo:hi], A[lo:hi], coefficients, forms)
        encode_into(p_bits, P[lo:hi], bf16, stochastic, k0, k1, first + lo)


@njit(parallel=True, **_jit)
def _update_low_precision_parallel(P, G16, G32, S, B, A, M, chunk, formats, key, unscale,
                                   coefficients, forms):
    n = P.size
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(n, lo + chunk)
        _update_low_precision_serial(P[lo:hi], G16[lo:hi], G32[lo:hi], S[lo:hi], B[lo:hi],
                                     A[lo:hi], M[lo:hi], lo, formats, key, unscale,
                                     coefficients, forms)


@njit(**_jit)
def _has_nonfinite(G, grad_scale, bound):
    # One compare per element settles almost all of them (see csrc/rmsprop_kernel.h); only a
    # chunk holding something beyond the bound pays for the exact division.
    beyond = False
    for i in range(G.size):
        beyond |= not abs(G[i]) <= bound
    if beyond:
        for i in range(G.size):
            if not np.isfinite(G[i] / grad_scale):
                return True
    return False


@njit(parallel=True, **_jit)
def _count_nonfinite_chunks(G, chunk, grad_scale, bound):
    n = G.size
    found = 0
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        found += _has_nonfinite(G[lo:min(n, lo + chunk)], grad_scale, bound)
    return found


@njit(**_jit)
def _has_nonfinite_16(G, bf16, grad_scale, bound):
    """_has_nonfinite of 16-bit gradient bits, widened a block at a time."""
    n = G.size
    bits = np.empty(min(n, UNSCALE_BLOCK), np.uint32)
    block = bits.view(np.float32)
    for lo in range(0, n, UNSCALE_BLOCK):
        hi = min(n, lo + UNSCALE_BLOCK)
        decode_into(G[lo:hi], bits[:hi - lo], bf16)
        if _has_nonfinite(block[:hi - lo], grad_scale, bound):
            return True
    return False


@njit(parallel=True, **_jit)
def _count_nonfinite_chunks_16(G, bf16, chunk, grad_scale, bound):
    n = G.size
    found = 0
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        found += _has_nonfinite_16(G[lo:min(n, lo + chunk)], bf16, grad_scale, bound)
    return found


@njit(parallel=True, **_jit)
def _roofline_low_precision_parallel(P, G, S, B, A, centered, use_momentum):
    for i in prange(P.size):
        g = G[i]
        S[i] += np.float32(g)
        if centered:
            A[i] += np.float32(g)
        if use_momentum:
            B[i] += np.float32(g)
        P[i] = P[i] + g


@njit(parallel=True, **_jit)
def _roofline_parallel(P, G, S, B, A, centered, use_momentum):
    for i in prange(P.size):
        S[i] += G[i]
        if centered:
            A[i] += G[i]
        if use_momentum:
            B[i] += G[i]
        P[i] += S[i]


# GNU OpenMP (Numba's "omp" threading layer here) does not survive fork(): Numba kills a forked
# child that launches a parallel region once the parent has. Such a child runs the serial
# kernel instead, which gives the same bits.
_parallel_used = False
_serial_only = False


def _after_fork_in_child() -> None:
    global _serial_only
    _serial_only = _serial_only or _parallel_used


os.register_at_fork(after_in_child=_after_fork_in_child)

_UNUSED = {np.dtype(np.float32): np.zeros(0, np.float32), np.dtype(np.float64): np.zeros(0, np.float64)}
#: Set by set_num_threads; until then the count follows fastrms.get_num_threads() call by call.
_explicit_threads: int | None = None


def _thread_count() -> int:
    from .. import _threads  # late: _threads imports the registry, which imports this module

    wanted = _explicit_threads if _explicit_threads is not None else _threads.get_num_threads()
    return max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))


def _kernel_arguments(coeffs) -> tuple:
    """The kernels' run-time arguments, made once per Coefficients (see kernel_arguments_of)."""
    arguments = coeffs.backend_cache.get("numba")
    if arguments is None:
        arguments = kernel_arguments_of(coeffs.scalars, coeffs.flags, coeffs.dtype.type(1.0),
                                        coeffs.dtype.type(-0.0))
        coeffs.backend_cache["numba"] = arguments
    return arguments


def kernel_arguments_of(scalars, flags, one, negative_zero) -> tuple:
    """(unscale, coefficients, forms), the kernels' run-time arguments: tuples of scalars of the
    dtype (``scalars``: the coefficients in kernel order; ``one`` and ``negative_zero`` of the
    same dtype) and plain ints and bools, so one compiled signature per dtype serves every
    option. Plain Python that Numba also compiles: the entry for @njit callers
    (fastrms/_numba_entry.py) makes the same arguments with it.

    Two choices of docs/contract.md become coefficients, exactly, so that the loops need no select:
    - eps: ``sqrt(v + eps_inside) + eps_outside``, one of the two being -0.0, since x + (-0.0)
      is x for every x (signed zeros, infinities and NaN payloads included);
    - the momentum forms: ``u = (numerator * g) / d`` and ``p = p + step * (b or nesterov's
      step)``; torch's form has numerator 1 (1 * g is g) and step -lr, lr inside has numerator
      lr and step -1, and p + (-1 * x) is p - x, a NaN x keeping its sign through both (an
      x86 multiply or subtract returns a NaN operand as it is).
    """
    (alpha, one_minus_alpha, eps, neg_lr, lr, weight_decay, momentum, decay, grad_scale,
     grad_scale_inverse) = scalars
    eps_inside, eps_outside = (eps, negative_zero) if flags & EPS_IN_SQRT else (negative_zero, eps)
    numerator, step = (lr, -one) if flags & LR_IN_MOMENTUM else (one, neg_lr)
    unscale_form = 0 if not flags & GRAD_SCALE else (1 if grad_scale_inverse else 2)
    decay_form = 1 if flags & WD_COUPLED else (2 if flags & WD_DECOUPLED else 0)
    return ((unscale_form, grad_scale, grad_scale_inverse),
            (alpha, one_minus_alpha, eps_inside, eps_outside, neg_lr, numerator, step,
             weight_decay, momentum, decay),
            (bool(flags & MAXIMIZE), bool(flags & CENTERED), bool(flags & MOMENTUM),
             bool(flags & NESTEROV), decay_form))


def _flat(array, dtype):
    return _UNUSED[dtype] if array is None else array.reshape(-1)


def _chunk_size(n: int, threads: int) -> int:
    """Elements per prange iteration: a few chunks per thread, each a multiple of 64 bytes."""
    chunk = -(-n // (4 * threads))
    return -(-chunk // 16) * 16


def update(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    check_no_overlap(param, grad, square_avg, momentum_buffer, grad_avg)
    n = param.size
    if n == 0:
        return
    dtype = param.dtype
    arrays = (param.reshape(-1), grad.reshape(-1), square_avg.reshape(-1),
              _flat(momentum_buffer, dtype), _flat(grad_avg, dtype))
    threads = 1 if n < PARALLEL_THRESHOLD or _serial_only else _thread_count()
    if threads == 1:
        _update_serial(*arrays, *_kernel_arguments(coeffs))
    else:
        _mark_parallel_used(threads)
        _update_parallel(*arrays, _chunk_size(n, threads), *_kernel_arguments(coeffs))


def all_finite(coeffs, grads) -> bool:
    """True when every gradient, divided by the loss scale (1 for none), is finite. With float32
    coefficients the gradients may also be float16 / bfloat16."""
    scale = coeffs.scalars[-2]
    t_max = np.finfo(coeffs.dtype).max
    # The C kernel's bound, in the same dtype arithmetic: below it no quotient can overflow.
    bound = t_max if scale >= 1 else t_max * scale * coeffs.dtype.type(1 - 2.0 ** -20)
    for grad in grads:
        flat = grad.reshape(-1)
        n = flat.size
        if flat.dtype in LOW_PRECISION_DTYPES:  # with the float32 coefficients of its param
            bf16 = flat.dtype == BFLOAT16
            flat = flat.view(np.uint16)
            if n < PARALLEL_THRESHOLD or _serial_only:
                if _has_nonfinite_16(flat, bf16, scale, bound):
                    return False
            else:
                threads = _thread_count()
                _mark_parallel_used(threads)
                if _count_nonfinite_chunks_16(flat, bf16, _chunk_size(n, threads), scale, bound):
                    return False
        elif n < PARALLEL_THRESHOLD or _serial_only:
            if _has_nonfinite(flat, scale, bound):
                return False
        else:
            threads = _thread_count()
            _mark_parallel_used(threads)
            if _count_nonfinite_chunks(flat, _chunk_size(n, threads), scale, bound):
                return False
    return True


def update_if_ready(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None) -> bool:
    """Numba's call overhead dwarfs the checks, so there is no separate fast path."""
    return False


def update_many(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs, *,
                cache=None):
    """One update per array; ``cache`` (see the C backend) is accepted and not needed."""
    for k in range(len(params)):
        update(coeffs, params[k], grads[k], square_avgs[k],
               momentum_buffers[k] if momentum_buffers is not None else None,
               grad_avgs[k] if grad_avgs is not None else None)


_NO_BITS = np.zeros(0, np.uint16)


def update_low_precision(coeffs, param, grad, square_avg, momentum_buffer=None, grad_avg=None,
                         master_param=None, key=None):
    """One step of a float16 / bfloat16 param (the registry's contract; see the C backend)."""
    check_no_overlap(param, grad, square_avg, momentum_buffer, grad_avg, master_param)
    n = param.size
    if n == 0:
        return
    grad32 = grad.dtype == FLOAT32
    flat_grad = grad.reshape(-1)
    arrays = (param.reshape(-1).view(np.uint16), _NO_BITS if grad32 else flat_grad.view(np.uint16),
              flat_grad if grad32 else _UNUSED[FLOAT32], square_avg.reshape(-1),
              _flat(momentum_buffer, FLOAT32), _flat(grad_avg, FLOAT32),
              _flat(master_param, FLOAT32))
    formats = (param.dtype == BFLOAT16, grad32, key is not None, master_param is not None)
    key = 0 if key is None else int(key)
    words = (np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32))
    threads = 1 if n < PARALLEL_THRESHOLD or _serial_only else _thread_count()
    if threads == 1:
        _update_low_precision_serial(*arrays, 0, formats, words, *_kernel_arguments(coeffs))
    else:
        _mark_parallel_used(threads)
        _update_low_precision_parallel(*arrays, _chunk_size(n, threads), formats, words,
                                       *_kernel_arguments(coeffs))


def update_many_low_precision(coeffs, params, grads, square_avgs, momentum_buffers, grad_avgs,
                              master_params=None, keys=None, *, cache=None):
    """One update per array; ``keys``: None (nearest) or one key per array."""
    for k in range(len(params)):
        update_low_precision(coeffs, params[k], grads[k], square_avgs[k],
                             momentum_buffers[k] if momentum_buffers is not None else None,
                             grad_avgs[k] if grad_avgs is not None else None,
                             master_params[k] if master_params is not None else None,
                             None if keys is None else int(keys[k]))


def roofline_low_precision(flags, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    if _serial_only:
        raise RuntimeError("the Numba roofline is parallel-only and cannot run in a process "
                           "forked after Numba's OpenMP layer ran")
    _mark_parallel_used(_thread_count())
    _roofline_low_precision_parallel(
        param.reshape(-1).view(np.uint16), grad.reshape(-1).view(np.uint16),
        square_avg.reshape(-1), _flat(momentum_buffer, FLOAT32), _flat(grad_avg, FLOAT32),
        bool(flags & CENTERED), bool(flags & MOMENTUM))


def roofline(flags, param, grad, square_avg, momentum_buffer=None, grad_avg=None):
    if _serial_only:
        raise RuntimeError("the Numba roofline is parallel-only and cannot run in a process "
                           "forked after Numba's OpenMP layer ran")
    dtype = param.dtype
    _mark_parallel_used(_thread_count())
    _roofline_parallel(param.reshape(-1), grad.reshape(-1), square_avg.reshape(-1),
                       _flat(momentum_buffer, dtype), _flat(grad_avg, dtype),
                       bool(flags & CENTERED), bool(flags & MOMENTUM))


def _mark_parallel_used(threads: int) -> None:
    global _parallel_used
    _parallel_used = True
    # Numba's thread count is per calling thread; apply ours in whichever thread calls.
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def set_num_threads(n: int | None) -> None:
    """n threads, or None to follow fastrms.get_num_threads() call by call."""
    global _explicit_threads
    _explicit_threads = None if n is None else max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))


def describe() -> dict:
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet, so no layer was chosen
        layer = f"not chosen yet (config: {numba.config.THREADING_LAYER})"
    return {
        "available": True,
        "reason": "numba loaded",
        "version": numba.__version__,
        "threads": _thread_count(),
        "threading_layer": layer,
        "cache": CACHE,
        "parallel_threshold": PARALLEL_THRESHOLD,
        "serial_only_after_fork": _serial_only,
    }
