"""How :class:`fastrms.distributed.ShardedRMSprop` cuts each dtype's flat buffer into one
contiguous shard per rank, and each shard into the pieces that travel together (buckets).

Pure arithmetic on sizes, no MPI: every rank computes the same plan from the same sizes.

Shards are whole :data:`BLOCK`-element blocks: 256 elements is 64 bytes or more for every
element size fastrms has or plans (2-byte float16/bfloat16, float32, float64), so each shard
starts on a cache line of its buffer, and it is the block of the compact state formats (8-bit
codes with one scale per 256 elements), so a shard will own whole blocks of those too. The
blocks are dealt out as evenly as they go (shard sizes differ by at most one block); the last
block, usually partial, belongs to the last non-empty shard; ranks beyond the number of blocks
get empty shards.
"""
from __future__ import annotations

from typing import NamedTuple

#: Shard boundaries and bucket pieces are multiples of this many elements.
BLOCK = 256


def shard_bounds(size: int, world: int) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` of each rank's shard of a buffer of ``size`` elements.

    >>> shard_bounds(1000, 3)          # 4 blocks: 2, 1, 1; the last one partial
    ((0, 512), (512, 768), (768, 1000))
    >>> shard_bounds(300, 3)           # 2 blocks for 3 ranks: the last shard is empty
    ((0, 256), (256, 300), (300, 300))
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    blocks = -(-size // BLOCK)
    base, extra = divmod(blocks, world)
    bounds = []
    start = 0
    for rank in range(world):
        stop = start + (base + (rank < extra)) * BLOCK
        bounds.append((min(start, size), min(stop, size)))
        start = stop
    return tuple(bounds)


def piece_elements(bucket_bytes: int, world: int, itemsize: int) -> int:
    """Elements of one rank's piece of a bucket: the bucket (``bucket_bytes`` over all ranks'
    pieces) split ``world`` ways, rounded down to whole blocks, at least one block.

    >>> piece_elements(2 << 20, 2, 4)
    262144
    >>> piece_elements(2 << 20, 1024, 4)
    512
    """
    per_rank = bucket_bytes // (world * itemsize)
    return max(BLOCK, per_rank // BLOCK * BLOCK)


class Bucket(NamedTuple):
    """One bucket of one dtype: index ``dtype_index`` into the FlatParams' dtypes, and the
    ``(lo, hi)`` element range of every rank's piece (empty ranges where a shard has ended)."""

    dtype_index: int
    pieces: tuple[tuple[int, int], ...]


def buckets(bounds: tuple[tuple[int, int], ...], piece: int,
            dtype_index: int = 0) -> list[Bucket]:
    """The buckets that cover ``bounds``: bucket k holds elements ``[k * piece, (k + 1) * piece)``
    of every shard, so every rank has one piece of it to update (or an empty one).

    >>> [b.pieces for b in buckets(((0, 512), (512, 768), (768, 1000)), 256)]
    [((0, 256), (512, 768), (768, 1000)), ((256, 512), (768, 768), (1000, 1000))]
    """
    longest = max(hi - lo for lo, hi in bounds)
    count = -(-longest // piece)
    return [Bucket(dtype_index, tuple((min(lo + k * piece, hi), min(lo + (k + 1) * piece, hi))
                                      for lo, hi in bounds))
            for k in range(count)]
