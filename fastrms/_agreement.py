"""The collective check behind :mod:`fastrms.distributed`: every rank learns, at the cost of one
small all-reduce, whether any rank failed its local preparation or the ranks disagree, and all
raise together instead of one rank hanging in a collective the others never enter.

mpi4py is imported when it is first needed, never by ``import fastrms``.
"""
from __future__ import annotations

import hashlib
from numbers import Integral

import numpy as np


class RankError(RuntimeError):
    """Raised on every other rank when a collective call failed on one rank: the message names
    the rank and its error (that rank raises its own exception). No rank changed anything."""


def mpi():
    """mpi4py's ``MPI`` module, or ``ImportError`` saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("fastrms.distributed needs mpi4py and an MPI library: "
                          "pip install 'fastrms[mpi]' (mpi4py and MPICH)") from exc
    return MPI


def digest(text: str) -> str:
    """A short hash of ``text``, the same on every rank."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def agree(comm, error, parts, what: str) -> None:
    """The collective check that ends every local preparation: every rank learns whether any
    rank failed (each failing rank raises its own error, the others :class:`RankError`) and
    whether the ranks' ``parts`` (name -> short text) agree (``ValueError`` on every rank
    naming what differs). One all-reduce of three integers, whatever the world size; the
    messages and texts travel only when something is wrong.
    """
    MPI = mpi()
    hashed = 0 if error is not None else int(digest(repr(sorted(parts.items()))), 16) >> 1
    local = np.array([error is not None, hashed, -hashed], np.int64)
    found = np.empty_like(local)
    comm.Allreduce(local, found, op=MPI.MAX)
    if not found[0] and found[1] == -found[2]:
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    everyone = comm.allgather((message, parts))
    failed = [(q, text) for q, (text, _) in enumerate(everyone) if text is not None]
    if failed:
        if error is not None:
            raise error
        q, text = failed[0]
        raise RankError(f"{what} failed on rank {q} ({text}); every rank raises and none "
                        f"changed anything")
    texts = [theirs for _, theirs in everyone]
    for q in range(1, len(texts)):
        for name in texts[0]:
            if texts[q].get(name) != texts[0][name]:
                raise ValueError(f"{what}: the ranks disagree on the {name}: rank 0 has "
                                 f"{texts[0][name]}, rank {q} has {texts[q].get(name)}")
    raise ValueError(f"{what}: the ranks disagree")  # pragma: no cover - digests differ only


def as_plain(value):
    """A construction option as the ranks compare it (bools, numbers and reprs)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (Integral, float, np.floating)):
        return float(value)
    return repr(value)


def raw_bits(array):
    """A 2-byte array as uint16, for MPI (mpi4py cannot export bfloat16's buffer format)."""
    return array.view(np.uint16) if array.itemsize == 2 else array
