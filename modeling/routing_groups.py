"""Routing groups: the tokens that compete for expert capacity, or share a dMoE coreset.

For a bidirectional model a capacity group is a whole sequence. For a block-causal model it
is one attention block: if tokens of a later block competed with an earlier block for an
expert's capacity, the earlier block's output would depend on the later block, breaking
block causality and with it the exact KV cache. dMoE coresets use chunks of
`block_router_size` positions.

A group is a maximal run of consecutive tokens whose positions fall in the same aligned
chunk. Defined on positions, it needs no special case for left padding, a KV cache
(positions continue from the prefix) or the two-stream [x_t ; x_0] training input
(positions restart at 0 in the second half).
"""

import torch


def chunk_runs(position_ids: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Group id of every token ([B, L] long, from 0 in each sequence); one group if chunk_size is None."""
    if chunk_size is None:
        return torch.zeros_like(position_ids)
    chunk = torch.div(position_ids, chunk_size, rounding_mode="floor")
    starts = torch.ones_like(chunk, dtype=torch.bool)
    starts[:, 1:] = chunk[:, 1:] != chunk[:, :-1]
    return starts.long().cumsum(1) - 1


class GroupedView:
    """Re-lays [B, L, ...] tensors as [B * G, S, ...]: one row per group, S = longest group.

    With one group per sequence this is the identity, so the common case costs nothing.
    """

    def __init__(self, group_ids: torch.Tensor, slot: torch.Tensor | None = None, groups_per_sequence=None,
                 size=None):
        B, L = group_ids.shape
        if slot is None:
            index = torch.arange(L, device=group_ids.device).expand(B, L)
            starts = torch.ones_like(group_ids, dtype=torch.bool)
            starts[:, 1:] = group_ids[:, 1:] != group_ids[:, :-1]
            slot = index - torch.where(starts, index, 0).cummax(1).values
            groups_per_sequence = int(group_ids.max().item()) + 1
            size = int(slot.max().item()) + 1
        self.slot, self.groups_per_sequence, self.size = slot, groups_per_sequence, size
        self.row = torch.arange(B, device=group_ids.device).unsqueeze(1) * self.groups_per_sequence + group_ids
        self.identity = self.groups_per_sequence == 1
        self.batch_size, self.length = B, L
        self.sequence_of_group = torch.arange(B * self.groups_per_sequence, device=group_ids.device).div(
            self.groups_per_sequence, rounding_mode="floor"
        )
        flat = torch.arange(B * L, device=group_ids.device).view(B, L)
        self.flat_index = self.scatter(flat, 0)  # [B*G, S]: row of each slot in the flattened [B*L] batch

    @classmethod
    def aligned(cls, batch_size: int, length: int, chunk_size: int | None, device) -> "GroupedView":
        """Groups for rows that are whole aligned chunks (`length` a multiple of `chunk_size`):
        group g is tokens [g * chunk, (g + 1) * chunk) of every row. Every size is known from
        the shapes, so nothing is read back from the device (static-shape decoding)."""
        chunk = length if chunk_size is None else chunk_size
        index = torch.arange(length, device=device).expand(batch_size, length)
        return cls(torch.div(index, chunk, rounding_mode="floor"), index % chunk, length // chunk, chunk)

    def scatter(self, x: torch.Tensor, fill) -> torch.Tensor:
        if self.identity:
            return x
        out = x.new_full((self.batch_size * self.groups_per_sequence, self.size, *x.shape[2:]), fill)
        out[self.row, self.slot] = x
        return out

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.identity else y[self.row, self.slot]

    def per_group(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-group [B*G, ...] quantity to every token of its group -> [B, L, ...]."""
        return values[self.row]

    def per_sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a per-group [B*G] quantity over each sequence's groups -> [B]."""
        return values.new_zeros(self.batch_size).index_add_(0, self.sequence_of_group, values)


class BatchGroup(GroupedView):
    """One group holding every token of the batch, [B, L, ...] -> [1, B*L, ...]: EC-DLM's
    batch-level expert choice (`moe_batch_level_expert_choice`), where sequences compete for
    expert capacity. Per-sequence sums give the batch's value on every row."""

    def __init__(self, batch_size: int, length: int, device):
        self.batch_size, self.length, self.size = batch_size, length, batch_size * length
        self.flat_index = torch.arange(self.size, device=device).view(1, -1)

    def scatter(self, x: torch.Tensor, fill) -> torch.Tensor:
        return x.reshape(1, self.size, *x.shape[2:])

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.batch_size, self.length, *y.shape[2:])

    def per_group(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, 1, *values.shape[1:]).expand(self.batch_size, self.length, *values.shape[1:])

    def per_sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.expand(self.batch_size)
