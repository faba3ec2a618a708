"""The three routing policies (DESIGN 2.1, 2.2, 2.4) and what they report.

A router maps hidden states [B, L, H] to a routing decision. Token choice and block
routing produce (expert index, weight) pairs per token, which the fused experts consume
through Transformers' experts interface; expert choice produces (token index, gate) per
expert slot, which the experts consume with one gather + batched matmul + scatter-add.
Router logits are computed in fp32. The `expert_bias` buffer only steers selection.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from .capacity_schedules import expert_capacity, experts_per_token
from .routing_groups import GroupedView, chunk_runs

# A finite "minus infinity": masked scores must still sum and sort without NaNs.
_MASKED = -1e30


@dataclass
class RoutingDecision:
    """One MoE layer's routing. Exactly one of the two layouts is filled.

    Token layout (token choice, block): `expert_index`, `expert_weights` [B*L, k]; an
    assignment whose weight is 0 (padding, dropped by capacity, outside a coreset) is not
    processed. Expert layout (expert choice): `token_index` (rows of the flattened [B*L]
    batch) and `gates`, both [groups, E, C_max].
    `assignment` [B, L, E] (bool: which experts process which token) is built on first use,
    so the dropless hot path never materialises it. `capacity` [B] is the per-expert token
    budget per sequence (summed over its capacity groups) when one applies.
    """

    router_logits: torch.Tensor
    expert_index: torch.Tensor | None = None
    expert_weights: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    capacity: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    _assignment: torch.Tensor | None = None

    @property
    def assignment(self) -> torch.Tensor:
        if self._assignment is None:
            B, L, E = self.router_logits.shape
            active = (self.expert_weights != 0).view(B, L, -1)
            self._assignment = torch.zeros(B, L, E, dtype=torch.bool, device=active.device).scatter_(
                -1, self.expert_index.view(B, L, -1), active
            )
        return self._assignment


@dataclass
class RouterStats:
    """Per-layer routing statistics returned with `output_router_stats=True`.

    tokens_per_expert: [B, E] assignments each expert received from each sequence.
    experts_per_token: [B, L] experts that processed each token (0 for padding).
    num_unique_experts: [B] distinct experts used by each sequence's real tokens.
    expert_mask: [B, L, E] bool, which expert processed which token.
    capacity: [B] per-expert token budget per sequence (expert choice, or token choice
        with a capacity factor); None when routing is dropless token choice or block.
    dropped_fraction: fraction of token-choice assignments dropped by capacity (0 else).
    """

    tokens_per_expert: torch.Tensor
    experts_per_token: torch.Tensor
    num_unique_experts: torch.Tensor
    expert_mask: torch.Tensor
    capacity: torch.Tensor | None = None
    dropped_fraction: float = 0.0


class RoutingInputs:
    """What routing needs besides the hidden states, shared by every MoE layer of a forward.

    Built once per forward; the derived tensors (capacity groups, coreset chunks, k per
    sequence, expert-choice capacities) depend only on positions, padding and the mask
    ratio, so each is computed on first use and reused by the following layers; the host
    syncs for static sizes (C_max, the chunk count) happen once per forward, not per layer.
    """

    def __init__(self, config, padding_mask: torch.Tensor, position_ids: torch.Tensor, mask_ratio=None):
        self.config = config
        self.padding_mask = padding_mask
        self.position_ids = position_ids
        self.mask_ratio = mask_ratio

    @cached_property
    def capacity_groups(self) -> GroupedView:
        """Sequences, or attention blocks of a block-causal model (see routing_groups)."""
        block = self.config.block_size if self.config.attention_layout == "block_causal" else None
        return GroupedView(chunk_runs(self.position_ids, block))

    @cached_property
    def grouped_padding(self) -> torch.Tensor:
        """[G, S] bool: the real tokens of each capacity group."""
        return self.capacity_groups.scatter(self.padding_mask, False)

    @cached_property
    def expert_choice_capacity(self) -> tuple[torch.Tensor, int]:
        """Per-group expert capacity C [G] (see `expert_choice`) and the static slot count C_max."""
        groups, real = self.capacity_groups, self.grouped_padding.sum(1)
        k = self.experts_per_sequence[groups.sequence_of_group]
        capacity = torch.minimum(expert_capacity(k, real, self.config.num_experts), real)
        return capacity, max(int(capacity.max().item()), 1)

    @cached_property
    def coreset_chunks(self) -> torch.Tensor:
        return chunk_runs(self.position_ids, self.config.block_router_size)

    @cached_property
    def num_coreset_chunks(self) -> int:
        return int(self.coreset_chunks.max().item()) + 1

    @cached_property
    def experts_per_sequence(self) -> torch.Tensor:
        """k_b from the capacity schedule ([B] long)."""
        return experts_per_token(self.config, self.mask_ratio, self.padding_mask.shape[0], self.padding_mask.device)


class DiffusionMoeRouter(nn.Module):
    """Router weights [E, H] (no bias) plus the `expert_bias` buffer; policy from the config."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor, inputs: RoutingInputs) -> RoutingDecision:
        logits = F.linear(hidden_states.float(), self.weight.float())  # [B, L, E], fp32
        config, padding_mask = self.config, inputs.padding_mask
        if config.router_type == "expert_choice":
            return expert_choice(logits, inputs)
        scores = score(logits, config.router_score_function)
        if config.router_type == "block":
            allowed = block_coreset(
                scores, self.expert_bias, padding_mask, inputs.coreset_chunks, config, inputs.num_coreset_chunks
            )
            return token_choice(logits, scores, self.expert_bias, padding_mask, config, allowed=allowed)
        capacity_inputs = inputs if config.capacity_factor is not None else None
        return token_choice(logits, scores, self.expert_bias, padding_mask, config, capacity_inputs=capacity_inputs)


def score(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if score_function == "softmax" else logits.sigmoid()


def select_top_k(
    scores: torch.Tensor, expert_bias: torch.Tensor, config, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice selection on [..., E] scores: biased, optionally group-limited and masked.

    Returns (indices [..., k], weights [..., k]); weights are the unbiased scores,
    renormalised when `norm_topk_prob` (k > 1), times `routed_scaling_factor`, and zero for
    experts outside `allowed`.
    """
    k = config.num_experts_per_tok
    biased = scores + expert_bias.to(scores.dtype)
    if allowed is not None:
        biased = biased.masked_fill(~allowed, _MASKED)
    if config.n_group is not None and config.n_group > 1:
        grouped = biased.unflatten(-1, (config.n_group, -1))  # [..., G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [..., G]
        keep_groups = group_scores.topk(config.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, keep_groups, True)
        biased = grouped.masked_fill(~group_mask.unsqueeze(-1), _MASKED).flatten(-2)
    indices = biased.topk(k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if allowed is not None:
        weights = weights * allowed.gather(-1, indices)
    if config.norm_topk_prob and k > 1:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return indices, weights * config.routed_scaling_factor


def token_choice(
    logits, scores, expert_bias, padding_mask, config, allowed=None, capacity_inputs: RoutingInputs | None = None
) -> RoutingDecision:
    """Each token picks its top-k experts. With `capacity_factor`, each expert keeps at most
    C = ceil(T * k / E * capacity_factor) of the T real tokens of each capacity group
    (`capacity_inputs.capacity_groups`), highest weights first; dropped assignments get weight 0."""
    B, L, E = logits.shape
    indices, weights = select_top_k(scores, expert_bias, config, allowed)  # [B, L, k]
    weights = weights * padding_mask.unsqueeze(-1)  # padding contributes nothing
    capacity = None
    if config.capacity_factor is not None:
        groups, real = capacity_inputs.capacity_groups, capacity_inputs.grouped_padding.sum(1)
        group_capacity = torch.ceil(real * config.num_experts_per_tok / E * config.capacity_factor).long()
        # rank of each token among its group's tokens routed to the same expert, by weight
        dense = torch.full_like(scores, -1.0).scatter(-1, indices, weights.masked_fill(weights == 0, -1.0))
        rank = groups.scatter(dense, -1.0).argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
        keep = groups.gather(rank < group_capacity.view(-1, 1, 1))
        weights = weights * keep.gather(-1, indices)
        capacity = groups.per_sequence_sum(group_capacity)
    return RoutingDecision(
        router_logits=logits,
        expert_index=indices.reshape(B * L, -1),
        expert_weights=weights.reshape(B * L, -1).to(logits.dtype),
        capacity=capacity,
        router_probs=scores,
    )


def expert_choice(logits: torch.Tensor, inputs: RoutingInputs) -> RoutingDecision:
    """Each expert picks, within each capacity group, its C highest-logit real tokens,
    C = max(floor(T_real * k_b / E), 1) (never more than the T_real real tokens).

    Shapes are static: every group uses C_max slots per expert, and slots beyond its own C
    get gate 0. A token's gates are a softmax over the logits of the experts that chose it;
    tokens nobody chose get no routed output.
    """
    groups, grouped_real = inputs.capacity_groups, inputs.grouped_padding  # [G, S]
    capacity, c_max = inputs.expert_choice_capacity  # [G], int
    grouped_logits = groups.scatter(logits, _MASKED)  # [G, S, E]
    masked = grouped_logits.masked_fill(~grouped_real.unsqueeze(-1), _MASKED).transpose(1, 2)  # [G, E, S]
    slots = masked.topk(c_max, dim=-1).indices  # [G, E, C]
    slot_used = torch.arange(c_max, device=logits.device).view(1, 1, c_max) < capacity.view(-1, 1, 1)
    slot_used = slot_used.expand_as(slots)
    chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, slots, slot_used).transpose(1, 2)
    chosen = groups.gather(chosen)  # [B, L, E]
    token_gates = logits.masked_fill(~chosen, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # [B, L, E]
    gates = groups.scatter(token_gates, 0.0).transpose(1, 2).gather(-1, slots) * slot_used  # [G, E, C]
    G = slots.shape[0]
    token_index = groups.flat_index.gather(1, slots.view(G, -1)).view_as(slots)
    return RoutingDecision(
        router_logits=logits,
        token_index=token_index,
        gates=gates,
        capacity=groups.per_sequence_sum(capacity),
        _assignment=chosen,
    )


def block_coreset(scores, expert_bias, padding_mask, chunk_ids, config, num_chunks: int | None = None) -> torch.Tensor:
    """dMoE: the experts every token of a chunk may use ([B, L, E] bool).

    Each real token votes with its own top-k biased scores; the chunk (`chunk_ids` from
    `chunk_runs(position_ids, block_router_size)`) keeps the smallest prefix of experts (by
    votes) whose mass reaches `block_router_top_p`, and at least the top
    `block_router_min_experts`. `num_chunks` (chunk_ids.max() + 1) is computed when not given.
    """
    B, L, E = scores.shape
    biased = scores + expert_bias.to(scores.dtype)
    top = biased.topk(config.num_experts_per_tok, dim=-1)
    votes = torch.zeros_like(scores).scatter(-1, top.indices, top.values) * padding_mask.unsqueeze(-1)
    chunk = chunk_ids.unsqueeze(-1).expand(-1, -1, E)
    if num_chunks is None:
        num_chunks = int(chunk_ids.max().item()) + 1
    chunk_votes = scores.new_zeros(B, num_chunks, E).scatter_add_(1, chunk, votes)
    chunk_votes = chunk_votes / chunk_votes.sum(-1, keepdim=True).clamp_min(1e-20)
    sorted_votes, order = chunk_votes.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_votes.cumsum(-1) - sorted_votes
    rank = torch.arange(E, device=scores.device)
    keep_sorted = (mass_before <= config.block_router_top_p) | (rank < config.block_router_min_experts)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # [B, chunks, E]
    return keep.gather(1, chunk)


def router_stats(decision: RoutingDecision, padding_mask: torch.Tensor) -> RouterStats:
    mask = decision.assignment & padding_mask.unsqueeze(-1)
    dropped = 0.0
    if decision.expert_index is not None and decision.capacity is not None:
        proposed = padding_mask.sum() * decision.expert_index.shape[-1]
        dropped = 1.0 - mask.sum().item() / max(proposed.item(), 1)
    return RouterStats(
        tokens_per_expert=mask.sum(1),
        experts_per_token=mask.sum(-1),
        num_unique_experts=mask.any(1).sum(-1),
        expert_mask=mask,
        capacity=decision.capacity,
        dropped_fraction=dropped,
    )


def load_balancing_loss(decision: RoutingDecision, padding_mask: torch.Tensor) -> torch.Tensor:
    """Switch-style E * sum_e f_e P_e over real tokens (token choice and block routing).

    f_e: fraction of assignments to e; P_e: mean routing probability of e (sigmoid scores
    are normalised per token to a distribution first).
    """
    probs = decision.router_probs
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)
    real = padding_mask.unsqueeze(-1).to(probs.dtype)
    n_real = real.sum().clamp_min(1.0)
    f = (decision.assignment.to(probs.dtype) * real).sum((0, 1))
    f = f / f.sum().clamp_min(1.0)
    p = (probs * real).sum((0, 1)) / n_real
    return probs.shape[-1] * (f * p).sum()


def z_loss(decision: RoutingDecision, padding_mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of logsumexp(router logits)^2."""
    lse = torch.logsumexp(decision.router_logits, dim=-1)
    real = padding_mask.to(lse.dtype)
    return (lse.square() * real).sum() / real.sum().clamp_min(1.0)
