"""Tensor parallelism: which of the model's KV heads a rank attends.

Under tensor parallelism (transformers' tp_plan, torch's ColwiseParallel, or a model built with
each rank's heads) every rank attends its own KV heads and selects blocks for them alone, which
is what one device does for those heads: selection is per (row, KV head). Only the hash weights
must follow: a rank's are its heads' rows of the model's, so TP 2 encodes, selects and attends
exactly as TP 1, with no collective in the attention."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .errors import GSAConfigError, GSAError


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """The KV heads one tensor-parallel rank attends: heads [first, first + count) of the
    model's `total`."""

    first: int
    count: int
    total: int

    def __post_init__(self):
        if not (0 <= self.first and 1 <= self.count and self.first + self.count <= self.total):
            raise GSAConfigError(
                f"a tensor-parallel shard holds KV heads [first, first + count) of the model's total; got "
                f"first={self.first}, count={self.count}, total={self.total}"
            )

    @classmethod
    def even(cls, rank: int, size: int, local_heads: int) -> "HeadShard":
        """Rank `rank` of `size`, each holding `local_heads` consecutive heads (how column-wise
        parallel key projections split heads)."""
        if not (isinstance(rank, int) and isinstance(size, int) and 0 <= rank < size):
            raise GSAConfigError(f"tensor parallelism needs integers 0 <= rank < size, got rank={rank!r}, size={size!r}")
        return cls(rank * local_heads, local_heads, size * local_heads)

    @classmethod
    def from_rows(cls, first: int, rows: int, total: int, per_head: int, what: str) -> "HeadShard":
        """The heads of a rank holding rows [first, first + rows) of a `total`-row projection
        whose heads have `per_head` rows each (`what` names the projection in errors)."""
        if per_head < 1 or total % per_head or first % per_head or rows % per_head or rows == 0:
            raise GSAError(
                f"this tensor-parallel rank holds rows [{first}, {first + rows}) of the {total} rows of {what}, "
                f"which is not a whole number of its heads ({per_head} rows each); GSA needs the number of heads "
                f"divisible by the tensor-parallel size"
            )
        return cls(first // per_head, rows // per_head, total // per_head)


def is_dtensor(tensor) -> bool:
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def row_shard(weight, what: str) -> Optional[tuple[int, int, int]]:
    """(first row, rows, all rows) of this rank's part of `weight` when it is a DTensor split by
    rows (Shard(0), column-wise parallel) or replicated; None for a plain tensor."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(weight.placements)
    if not all(type(p) is Replicate or (type(p) is Shard and p.dim == 0) for p in placements):
        raise GSAError(
            f"{what} is sharded as {placements}: GSA under tensor parallelism needs the heads' rows split in "
            f"consecutive ranges (Shard(0), column-wise parallel) or replicated"
        )
    local, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
    return offset[0], local[0], weight.shape[0]
