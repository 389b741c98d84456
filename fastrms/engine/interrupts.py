"""Engine: a step's writes as one unit under Ctrl-C.

CPython raises ``KeyboardInterrupt`` between two bytecodes, so a Ctrl-C landing between two
kernel calls of a step, or between the last kernel call and the step-count update, would leave
some buckets updated and others not, or parameters updated with the count behind.
:func:`hold_interrupts` makes a SIGINT that arrives wait, and :func:`deliver_interrupts` hands
it to the handler that was installed as soon as the writes are done: the step is then either
not begun or complete, counts included. The pair costs under 1 us (two calls of the C-level
``_signal.signal``; the ``signal`` module's enum wrappers would cost ten times that), so it
sits in every step, small ones too.

Only the main thread can change a signal handler, and only the main thread ever raises
``KeyboardInterrupt``: in any other thread the block runs as it is, which is already atomic
with respect to Ctrl-C. A handler that is not a Python callable (``SIG_DFL``, ``SIG_IGN``, or
one installed from C) is left alone.
"""
from __future__ import annotations

import _signal
import _thread
import os
import threading

_SIGINT = _signal.SIGINT
_get_ident = _thread.get_ident
_getsignal = _signal.getsignal
_setsignal = _signal.signal

_main_ident = threading.main_thread().ident
_depth = 0  # nested holds (the torch drop-in's step around the engine's)
_previous = None  # the handler a hold replaced
_pending = None  # (signum, frame) of a SIGINT that arrived during the hold


def _after_fork() -> None:  # a fork from another thread makes that thread the child's main
    global _main_ident, _depth, _previous, _pending
    _main_ident = threading.main_thread().ident
    _depth, _previous, _pending = 0, None, None


os.register_at_fork(after_in_child=_after_fork)


def _hold(signum, frame) -> None:
    global _pending
    _pending = (signum, frame)


def hold_interrupts() -> bool:
    """Make a SIGINT that arrives from now on wait for :func:`deliver_interrupts`. Returns
    whether it did (False outside the main thread, or when SIGINT's handler is not a Python
    callable: ``SIG_DFL``, ``SIG_IGN``, or one set from C). Pair each True with one
    :func:`deliver_interrupts`, in a ``finally``.

    >>> import signal
    >>> log = []
    >>> previous = signal.signal(signal.SIGINT, lambda signum, frame: log.append("delivered"))
    >>> held = hold_interrupts()
    >>> try:
    ...     signal.raise_signal(signal.SIGINT)   # waits
    ...     log.append("the writes are done")
    ... finally:
    ...     if held:
    ...         deliver_interrupts()
    >>> log
    ['the writes are done', 'delivered']
    >>> _ = signal.signal(signal.SIGINT, previous)
    """
    global _depth, _previous
    if _get_ident() != _main_ident:
        return False
    if _depth:
        _depth += 1
        return True
    previous = _getsignal(_SIGINT)
    if not callable(previous):
        return False
    _setsignal(_SIGINT, _hold)
    _previous = previous
    _depth = 1
    return True


def deliver_interrupts() -> None:
    """End a hold: put the handler back and, if a SIGINT arrived, call it now (the default one
    raises ``KeyboardInterrupt`` here)."""
    global _depth, _previous, _pending
    _depth -= 1
    if _depth:
        return
    previous, pending = _previous, _pending
    _previous = _pending = None
    _setsignal(_SIGINT, previous)
    if pending is not None:
        previous(*pending)
