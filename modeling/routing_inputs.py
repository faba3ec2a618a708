"""What routing needs besides the hidden states: one immutable object per forward.

`RoutingInputs.build` runs once per forward, before the first layer, and every MoE layer
reads the same object (passed down through the layers' keyword arguments). It holds only
what the configured rule needs, so a forward pays the host syncs for static sizes (group
counts, expert-choice slots) once, not once per layer, and plain token choice pays none.

Routing units: a capacity group is a whole sequence (bidirectional models) or one
attention block (block-causal models, see routing_groups); the capacity schedule reads each
group's own mask ratio, so a block never depends on how masked later blocks are. With
`static=True` (rows of whole aligned attention blocks, as in static-shape decoding) groups
are fixed slices and expert-choice slots are bounded from `capacity_max`: nothing is read
back from the device.
"""

from dataclasses import dataclass

import torch

from .capacity_schedules import expert_capacity, scheduled_experts
from .routing_groups import BatchGroup, GroupedView, chunk_runs


def routing_groups(position_ids: torch.Tensor, chunk: int | None, static: bool) -> GroupedView:
    """Runs of tokens in one aligned chunk of `chunk` positions (None: whole sequences)."""
    if static:
        return GroupedView.aligned(*position_ids.shape, chunk, position_ids.device)
    return GroupedView(chunk_runs(position_ids, chunk))


def capacity_groups(config, position_ids: torch.Tensor, static: bool = False) -> GroupedView:
    """The routing units that compete for capacity: sequences, or attention blocks of a block-causal model."""
    return routing_groups(position_ids, config.block_size if config.attention_layout == "block_causal" else None, static)


def unit_mask_ratio(groups: GroupedView, padding_mask, mask_ratio=None, masked=None) -> torch.Tensor | None:
    """[G] masked real tokens / real tokens of each group, or the given per-sequence `mask_ratio`
    broadcast to its groups; None when neither is known."""
    if mask_ratio is not None:
        return mask_ratio.float()[groups.sequence_of_group]
    if masked is None:
        return None
    real = groups.scatter(padding_mask, False).sum(1)
    return groups.scatter(masked & padding_mask, False).sum(1).float() / real.clamp(min=1).float()


@dataclass(frozen=True)
class RoutingInputs:
    """Routing inputs of one forward. Fields a rule does not need are None.

    padding_mask [B, L] bool (real tokens); position_ids [B, L]; mask_ratio [B] / masked
    [B, L] as given to the model (for statistics by mask ratio).
    groups: capacity groups; grouped_padding [G, S] their real tokens, real_per_group [G] how many.
    experts_per_group [G]: each group's k (the capacity schedule's, else `num_experts_per_tok`);
    experts_per_token [B, L]: the schedule's k of each token's group (None under the constant
    schedule: the config's k everywhere).
    expert_choice_capacity [G] and expert_choice_slots (static C_max): expert choice only.
    chunks: the aligned chunks that decide together under block rules (dMoE's
    `block_router_size`, LLaDA2.2's `block_size`).
    """

    padding_mask: torch.Tensor
    position_ids: torch.Tensor
    mask_ratio: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    static: bool = False
    groups: GroupedView | None = None
    grouped_padding: torch.Tensor | None = None
    real_per_group: torch.Tensor | None = None
    experts_per_group: torch.Tensor | None = None
    experts_per_token: torch.Tensor | None = None
    expert_choice_capacity: torch.Tensor | None = None
    expert_choice_slots: int | None = None
    chunks: GroupedView | None = None

    @classmethod
    def build(cls, config, router_class, padding_mask, position_ids, mask_ratio=None, masked=None,
              static=False) -> "RoutingInputs":
        """Everything `router_class` (a `DiffusionMoeRouter` subclass) needs under `config`."""
        fields = dict(padding_mask=padding_mask, position_ids=position_ids, mask_ratio=mask_ratio, masked=masked,
                      static=static)
        scheduled = config.capacity_schedule != "constant"
        if router_class.needs_capacity_groups(config):
            groups = capacity_groups(config, position_ids, static)
            grouped = groups.scatter(padding_mask, False)
            real = grouped.sum(1)
            k = torch.full_like(real, config.num_experts_per_tok)
            if scheduled:
                ratio = unit_mask_ratio(groups, padding_mask, mask_ratio, masked)
                if ratio is None:
                    raise ValueError(
                        f"capacity_schedule={config.capacity_schedule!r} needs the mask ratio: pass `mask_ratio` "
                        "explicitly, or `input_ids` with `mask_token_id` set in the config."
                    )
                k = scheduled_experts(config, ratio)
                fields["experts_per_token"] = groups.per_group(k)
            if router_class.chooses_tokens and config.batch_level_expert_choice:
                # EC-DLM: experts choose among the whole batch, with the largest k of its sequences
                groups, real, k = BatchGroup(*padding_mask.shape, padding_mask.device), real.sum(0, True), k.amax(0, True)
                grouped = groups.scatter(padding_mask, False)
            fields.update(groups=groups, grouped_padding=grouped, real_per_group=real, experts_per_group=k)
            if router_class.chooses_tokens:
                capacity, slots = expert_choice_slots(config, groups, k, real, static)
                fields.update(expert_choice_capacity=capacity, expert_choice_slots=slots)
        chunk = router_class.chunk_size(config)
        if chunk is not None:
            fields["chunks"] = routing_groups(position_ids, chunk, static)
        return cls(**fields)

def expert_choice_slots(config, groups: GroupedView, k: torch.Tensor, real: torch.Tensor, static: bool):
    """Per-group expert capacity C [G] (never more than the group's real tokens) and the slot
    count C_max every group's experts use (static: the most any group of this size can get)."""
    capacity = torch.minimum(expert_capacity(k, real, config.num_experts), real)
    if static:
        size = groups.size
        k_max = config.num_experts_per_tok if config.capacity_schedule == "constant" else config.capacity_max
        return capacity, min(size, max(size * k_max // config.num_experts, 1))
    return capacity, max(int(capacity.max().item()), 1)
