"""SOAP's optional block-diagonal preconditioner (`max_precond_block`): a parameter as a grid of blocks.

With a block size b > 0, every dimension longer than b is cut into ceil(n / b) blocks: n // b
blocks of b, then the remainder (a smaller last block). Each block is an independent sub-matrix
with SOAP state of its own (statistics and eigenbases per dimension of the block; layout rules
such as `max_precond_dim` and `merge_dims` apply to the block's shape), as distributed Shampoo's
and levanter's blocking do: the preconditioner of the whole parameter becomes block-diagonal.

Blocks of equal shape are batched: a parameter is split into regions, the product over its
dimensions of each dimension's segments (the run of full blocks; the remainder), so a region
holds `count` blocks of one shape, stacked on a leading block axis [N, *block]. A matrix with a
remainder in both dimensions has 4 regions; without remainders, 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

Segment = tuple[int, int, int]  # (start, size, count): `count` blocks of `size` from `start`
Region = tuple[Segment, ...]  # one segment per parameter dimension


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockedPreconditioner:
    """One parameter's SOAP state as a grid of independent blocks.

    parts[i]: a soap.Preconditioner for the blocks of regions[i], every array stacked on a
    leading block axis ([N, d, d] statistics and bases).
    """
    parts: tuple[Any, ...]
    regions: tuple[Region, ...] = dataclasses.field(metadata=dict(static=True))


def _segments(n: int, block: int) -> tuple[Segment, ...]:
    if n <= block:
        return ((0, n, 1),)
    full, rest = divmod(n, block)
    return ((0, block, full),) + (((full * block, rest, 1),) if rest else ())


def block_regions(shape: Sequence[int], block: int) -> tuple[Region, ...]:
    """The regions of a parameter of this shape, in row-major order; () when nothing is split
    (block <= 0, the default, or no dimension longer than the block)."""
    if block <= 0 or all(n <= block for n in shape):
        return ()
    return tuple(itertools.product(*(_segments(n, block) for n in shape)))


def region_shape(region: Region) -> tuple[int, ...]:
    """The shape of one block of the region."""
    return tuple(size for _, size, _ in region)


def region_count(region: Region) -> int:
    """How many blocks the region holds."""
    return math.prod(count for *_, count in region)


def to_blocks(x: jax.Array, region: Region) -> jax.Array:
    """The region's blocks of x (parameter-shaped), stacked: [N, *block], blocks in row-major order."""
    r = len(region)
    x = x[tuple(slice(start, start + size * count) for start, size, count in region)]
    x = x.reshape(tuple(v for _, size, count in region for v in (count, size)))
    x = x.transpose(tuple(range(0, 2 * r, 2)) + tuple(range(1, 2 * r, 2)))
    return x.reshape((-1, *region_shape(region)))


def _from_region(x_N: jax.Array, region: Region) -> jax.Array:
    """Inverse of `to_blocks`: the stacked blocks laid out as the region's slice of the parameter."""
    r = len(region)
    x = x_N.reshape(tuple(count for *_, count in region) + region_shape(region))
    x = x.transpose(tuple(v for k in range(r) for v in (k, r + k)))
    return x.reshape(tuple(size * count for _, size, count in region))


def from_blocks(blocks: Sequence[jax.Array], regions: Sequence[Region]) -> jax.Array:
    """The parameter-shaped array whose `to_blocks(., regions[i])` is blocks[i]."""
    pieces = [_from_region(x_N, region) for x_N, region in zip(blocks, regions)]
    per_dim = [len({region[k][0] for region in regions}) for k in range(len(regions[0]))]

    def join(pieces: list, axis: int) -> jax.Array:  # regions are row-major: dim 0 varies slowest
        if axis == len(per_dim):
            return pieces[0]
        stride = len(pieces) // per_dim[axis]
        rows = [join(pieces[i * stride:(i + 1) * stride], axis + 1) for i in range(per_dim[axis])]
        return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=axis)

    return join(pieces, 0)
