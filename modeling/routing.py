"""The three routing policies and what they report.

A router decides, a decision dispatches: `DiffusionMoeRouter` maps hidden states [B, L, H]
to a decision, and the decision knows how to run the experts on them.
* `TokenRouting` (token choice, block routing): (expert index, weight) pairs per token,
  dispatched through Transformers' experts interface.
* `ExpertChoiceRouting`: (token index, gate) per expert slot, dispatched with one gather,
  batched matmuls and one scatter-add.
Router logits are computed in fp32. The `expert_bias` buffer only steers selection.

Token choice and the dMoE block gate follow the published LLaDA2 / dMoE gate code op for
op (`torch.topk` with `sorted=False` for groups, true `-inf` masks, `/ (sum + 1e-20)`),
so that ties resolve as they do there; tests/llada2_reference.py transcribes that code.
"""

from dataclasses import dataclass
from functools import wraps

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .capacity_schedules import expert_capacity, scheduled_experts
from .ec_dlm_scaling import ec_scaling_factors_on, tc_scaling_factor
from .routing_groups import GroupedView, chunk_runs

logger = logging.get_logger(__name__)


def computed_once(method):
    """A property computed on first use and then stored: `functools.cached_property` without
    its lock, which torch.compile cannot trace on Python 3.11."""
    name = f"_{method.__name__}_value"

    @property
    @wraps(method)
    def getter(self):
        if name not in self.__dict__:
            self.__dict__[name] = method(self)
        return self.__dict__[name]

    return getter


@dataclass
class TokenRouting:
    """Token choice and block routing: `expert_index` / `expert_weights` [B*L, k].

    An assignment whose weight is 0 (padding, dropped by capacity, beyond a token's
    scheduled k) contributes nothing. `capacity` [B]: per-expert token budget per sequence
    (summed over its capacity groups) under a capacity factor, else None.
    """

    router_logits: torch.Tensor
    expert_index: torch.Tensor
    expert_weights: torch.Tensor
    router_probs: torch.Tensor
    capacity: torch.Tensor | None = None

    def dispatch(self, experts, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden_states.shape
        weights = self.expert_weights.to(hidden_states.dtype)
        return experts(hidden_states.reshape(B * L, H), self.expert_index, weights).view(B, L, H)

    @computed_once
    def assignment(self) -> torch.Tensor:
        """[B, L, E] bool: which experts process which token."""
        B, L, E = self.router_logits.shape
        active = (self.expert_weights != 0).view(B, L, -1)
        return torch.zeros(B, L, E, dtype=torch.bool, device=active.device).scatter_(
            -1, self.expert_index.view(B, L, -1), active
        )


@dataclass
class ExpertChoiceRouting:
    """Expert choice: `token_index` (rows of the flattened [B*L] batch) and `gates`, both
    [groups, E, C_max]; `assignment` [B, L, E]; `capacity` [B] tokens per expert per sequence."""

    router_logits: torch.Tensor
    token_index: torch.Tensor
    gates: torch.Tensor
    assignment: torch.Tensor
    capacity: torch.Tensor
    router_probs = None  # no load-balancing loss: balanced by construction

    def dispatch(self, experts, hidden_states: torch.Tensor) -> torch.Tensor:
        return experts(hidden_states, token_index=self.token_index, gates=self.gates)


@dataclass
class RouterStats:
    """Per-layer routing statistics returned with `output_router_stats=True`.

    tokens_per_expert: [B, E] assignments each expert received from each sequence.
    experts_per_token: [B, L] experts that processed each token (0 for padding).
    num_unique_experts: [B] distinct experts used by each sequence's real tokens.
    expert_mask: [B, L, E] bool, which expert processed which token.
    capacity: [B] per-expert token budget per sequence (expert choice, or token choice
        with a capacity factor); None when routing is dropless token choice or block.
    dropped_fraction: fraction of token-choice assignments dropped by capacity (0 else), a
        0-d tensor (reading it back is left to the caller: no host sync here).
    """

    tokens_per_expert: torch.Tensor
    experts_per_token: torch.Tensor
    num_unique_experts: torch.Tensor
    expert_mask: torch.Tensor
    capacity: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | float = 0.0


class RoutingContext:
    """What routing needs besides the hidden states, shared by every MoE layer of a forward,
    and where the layers leave their decisions when the model asks for them (router losses,
    statistics): `record` keeps them while `collecting` is on.

    Routing units: a capacity group is a whole sequence (bidirectional models) or one
    attention block (block-causal models, see routing_groups); the capacity schedule reads
    each group's own mask ratio, so a block never depends on how masked later blocks are.
    `mask_ratio` [B], when given, is each sequence's ratio, used by all of its groups;
    otherwise `masked` [B, L] (the mask tokens) gives every group its own ratio.
    Derived tensors depend only on positions, padding and masks, so each is computed on
    first use and reused by the following layers: host syncs for static sizes (C_max,
    group counts) happen once per forward, not once per layer. With `static=True` (rows of
    whole aligned attention blocks, as in static-shape decoding) there are none: groups are
    fixed slices and C_max is bounded from `capacity_max`.
    """

    def __init__(self, config, padding_mask, position_ids, mask_ratio=None, masked=None, collecting=False,
                 static=False):
        self.config = config
        self.static = static
        self.padding_mask = padding_mask
        self.position_ids = position_ids
        self.mask_ratio = mask_ratio
        self.masked = masked
        self.collecting = collecting
        self.decisions = []

    def record(self, decision):
        if self.collecting:
            self.decisions.append(decision)

    def collected(self) -> list:
        """The decisions recorded so far, one per MoE layer; stops collecting (so that a
        gradient-checkpointing recompute does not record the layers twice)."""
        self.collecting = False
        return self.decisions

    @computed_once
    def capacity_groups(self) -> GroupedView:
        block = self.config.block_size if self.config.attention_layout == "block_causal" else None
        return self._groups(block)

    def _groups(self, chunk: int | None) -> GroupedView:
        if self.static:
            return GroupedView.aligned(*self.position_ids.shape, chunk, self.position_ids.device)
        return GroupedView(chunk_runs(self.position_ids, chunk))

    @computed_once
    def grouped_padding(self) -> torch.Tensor:
        """[G, S] bool: the real tokens of each capacity group."""
        return self.capacity_groups.scatter(self.padding_mask, False)

    @computed_once
    def group_mask_ratio(self) -> torch.Tensor:
        """[G] masked real tokens / real tokens of each capacity group (or the given per-sequence ratio)."""
        groups = self.capacity_groups
        if self.mask_ratio is not None:
            return self.mask_ratio.float()[groups.sequence_of_group]
        if self.masked is None:
            raise ValueError(
                f"capacity_schedule={self.config.capacity_schedule!r} needs the mask ratio: pass `mask_ratio` "
                "explicitly, or `input_ids` with `mask_token_id` set in the config."
            )
        masked = groups.scatter(self.masked & self.padding_mask, False).sum(1)
        return masked.float() / self.grouped_padding.sum(1).clamp(min=1).float()

    @computed_once
    def experts_per_group(self) -> torch.Tensor:
        """k of each capacity group ([G] long): the capacity schedule of its mask ratio."""
        if self.config.capacity_schedule == "constant":
            G = self.grouped_padding.shape[0]
            return torch.full((G,), self.config.num_experts_per_tok, dtype=torch.long, device=self.padding_mask.device)
        return scheduled_experts(self.config, self.group_mask_ratio)

    @computed_once
    def experts_per_token(self) -> torch.Tensor | None:
        """[B, L] scheduled k of each token's group; None for the constant schedule (k everywhere)."""
        if self.config.capacity_schedule == "constant":
            return None
        return self.capacity_groups.per_group(self.experts_per_group)

    @computed_once
    def expert_choice_capacity(self) -> tuple[torch.Tensor, int]:
        """Per-group expert capacity C [G] (see `expert_choice`) and the static slot count C_max."""
        real = self.grouped_padding.sum(1)
        capacity = torch.minimum(expert_capacity(self.experts_per_group, real, self.config.num_experts), real)
        if self.static:  # the most any group of this size can get
            size, config = self.capacity_groups.size, self.config
            k = config.num_experts_per_tok if config.capacity_schedule == "constant" else config.capacity_max
            return capacity, min(size, max(size * k // config.num_experts, 1))
        return capacity, max(int(capacity.max().item()), 1)

    @computed_once
    def coreset_chunks(self) -> GroupedView:
        """dMoE chunks: runs of tokens in one aligned chunk of `block_router_size` positions."""
        return self._groups(self.config.block_router_size)


class DiffusionMoeRouter(nn.Module):
    """Router weights [E, H] (no bias) plus the `expert_bias` buffer; policy from `config.router_type`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self._bias_checked = False

    def forward(self, hidden_states: torch.Tensor, inputs: RoutingContext):
        """(router logits [B*L, E] in fp32, what Transformers records as `router_logits`; the decision)."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        return logits.flatten(0, 1), self.route(logits, inputs)

    def route(self, logits: torch.Tensor, inputs: RoutingContext):
        """The routing decision for fp32 router logits [B, L, E]."""
        config = self.config
        if config.router_type == "expert_choice":
            self._warn_if_bias_is_ignored()
            return expert_choice(logits, inputs, config)
        scores = score(logits, config.router_score_function)
        if config.router_type == "block":
            biased = scores + self.expert_bias.to(scores.dtype)
            allowed = block_coreset(biased, inputs.padding_mask, inputs.coreset_chunks, config)
            return token_choice(logits, scores, self.expert_bias, inputs, config, allowed=allowed)
        return token_choice(logits, scores, self.expert_bias, inputs, config)

    def _warn_if_bias_is_ignored(self):
        if not self._bias_checked and not torch.compiler.is_compiling():
            self._bias_checked = True
            if bool(self.expert_bias.any()):
                logger.warning_once(
                    "router_type='expert_choice' ignores the routers' nonzero `expert_bias` (experts pick "
                    "tokens by logits; load is balanced by construction). It stays in the checkpoint, so a "
                    "switch back to token choice or block routing uses it again."
                )


def score(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if score_function == "softmax" else logits.sigmoid()


def normalized_weights(weights: torch.Tensor, config, renormalize) -> torch.Tensor:
    """The token-choice weight rule: renormalise to sum 1 where `renormalize` (the config's
    `norm_topk_prob` with k > 1), as LLaDA2 does (`w / (sum + 1e-20)`), then x `routed_scaling_factor`."""
    if renormalize is True:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    elif renormalize is not False:  # a per-token bool tensor
        weights = torch.where(renormalize.unsqueeze(-1), weights / (weights.sum(-1, keepdim=True) + 1e-20), weights)
    return weights * config.routed_scaling_factor


def group_limited_top_k(biased: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """LLaDA2's `group_limited_topk` on [N, E]: a group scores the sum of its two best
    (a group with fewer than two finite scores is -inf), the `topk_group` best groups are
    kept (`sorted=False`, as published), and the token takes its top-k inside them."""
    N, E = biased.shape
    group_scores = biased.view(N, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, -1)
    return biased.masked_fill(~score_mask.bool(), float("-inf")).topk(k, dim=-1)[1]


def select_experts(scores, expert_bias, config, allowed=None, experts_per_token=None):
    """Token-choice selection on [..., E] scores: biased, masked to `allowed`, group-limited.

    Returns (indices [..., k], weights [..., k]). Weights are the UNBIASED scores at the
    chosen indices (also where fewer than k experts were allowed), renormalised when
    `norm_topk_prob` and k > 1, times `routed_scaling_factor`. With `experts_per_token`
    (a capacity schedule's k per token), each token keeps its first k_t experts of the
    top max-k: the rest get weight 0.
    """
    shape, E = scores.shape[:-1], scores.shape[-1]
    k = config.num_experts_per_tok if experts_per_token is None else config.capacity_max
    flat_scores = scores.reshape(-1, E)
    biased = flat_scores + expert_bias.to(flat_scores.dtype)
    if allowed is not None:
        biased = biased.masked_fill(~allowed.reshape(-1, E), float("-inf"))
    if config.n_group is not None and config.n_group > 1:
        indices = group_limited_top_k(biased, config.n_group, config.topk_group, k)
    else:
        indices = biased.topk(k, dim=-1)[1]
    weights = flat_scores.gather(-1, indices)
    renormalize = bool(config.norm_topk_prob) and k > 1
    if experts_per_token is not None:
        k_t = experts_per_token.reshape(-1, 1)
        weights = weights * (torch.arange(k, device=k_t.device) < k_t)
        renormalize = bool(config.norm_topk_prob) & (k_t.squeeze(-1) > 1)
    weights = normalized_weights(weights, config, renormalize)
    if config.routed_scaling_mode == "ec_dlm":
        weights = weights * tc_scaling_factor(E, config.num_experts_per_tok, config.num_shared_experts,
                                              config.router_score_function, bool(config.norm_topk_prob))
    return indices.view(*shape, k), weights.view(*shape, k)


def token_choice(logits, scores, expert_bias, inputs: RoutingContext, config, allowed=None) -> TokenRouting:
    """Each token picks its top-k experts. With `capacity_factor`, each expert keeps at most
    C = ceil(T * k / E * capacity_factor) of the T real tokens of each capacity group,
    highest weights first; dropped assignments get weight 0."""
    B, L, E = logits.shape
    padding_mask = inputs.padding_mask
    indices, weights = select_experts(scores, expert_bias, config, allowed, inputs.experts_per_token)
    weights = weights * padding_mask.unsqueeze(-1)  # padding contributes nothing
    capacity = None
    if config.capacity_factor is not None:
        groups, real = inputs.capacity_groups, inputs.grouped_padding.sum(1)
        group_capacity = torch.ceil(real * inputs.experts_per_group / E * config.capacity_factor).long()
        # rank of each token among its group's tokens routed to the same expert, by weight
        dense = torch.full_like(scores, -1.0).scatter(-1, indices, weights.masked_fill(weights == 0, -1.0))
        rank = groups.scatter(dense, -1.0).argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
        keep = groups.gather(rank < group_capacity.view(-1, 1, 1))
        weights = weights * keep.gather(-1, indices)
        capacity = groups.per_sequence_sum(group_capacity)
    return TokenRouting(
        router_logits=logits,
        expert_index=indices.reshape(B * L, -1),
        expert_weights=weights.reshape(B * L, -1).to(logits.dtype),
        router_probs=scores,
        capacity=capacity,
    )


def expert_choice(logits: torch.Tensor, inputs: RoutingContext, config) -> ExpertChoiceRouting:
    """Each expert picks, within each capacity group, its C highest-logit real tokens,
    C = max(floor(T_real * k_g / E), 1) (never more than the T_real real tokens).

    Shapes are static: every group uses C_max slots per expert, and slots beyond its own C
    get gate 0. A token's gates follow the token-choice weight rule applied to the experts
    that chose it (score function, renormalised when `norm_topk_prob` and k > 1, x
    `routed_scaling_factor`), so a retrofit keeps the model's output scale; for softmax
    scores that is a softmax over the choosing experts' logits. Tokens nobody chose get no
    routed output.
    """
    groups, grouped_real = inputs.capacity_groups, inputs.grouped_padding  # [G, S]
    capacity, c_max = inputs.expert_choice_capacity  # [G], int
    grouped_logits = groups.scatter(logits, float("-inf"))  # [G, S, E]
    masked = grouped_logits.masked_fill(~grouped_real.unsqueeze(-1), float("-inf")).transpose(1, 2)  # [G, E, S]
    # a stable sort, not topk: tied logits (identical tokens) go to the earlier token whatever the
    # group's padded length S, so batched, cached and uncached runs choose alike
    slots = masked.sort(dim=-1, descending=True, stable=True).indices[..., :c_max].contiguous()  # [G, E, C]
    slot_used = torch.arange(c_max, device=logits.device).view(1, 1, c_max) < capacity.view(-1, 1, 1)
    slot_used = slot_used.expand_as(slots)
    chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, slots, slot_used).transpose(1, 2)
    chosen = groups.gather(chosen)  # [B, L, E]
    renormalize = bool(config.norm_topk_prob) and config.num_experts_per_tok > 1
    token_gates = normalized_weights(score(logits, config.router_score_function) * chosen, config, renormalize)
    if config.routed_scaling_mode == "ec_dlm":  # x EC-DLM's factor for the number of experts that chose the token
        factors = ec_scaling_factors_on(config.num_experts, config.num_shared_experts, token_gates.device)
        token_gates = token_gates * factors[chosen.sum(-1)].unsqueeze(-1).to(token_gates.dtype)
    gates = groups.scatter(token_gates, 0.0).transpose(1, 2).gather(-1, slots) * slot_used  # [G, E, C]
    G = slots.shape[0]
    token_index = groups.flat_index.gather(1, slots.view(G, -1)).view_as(slots)
    return ExpertChoiceRouting(
        router_logits=logits,
        token_index=token_index,
        gates=gates,
        assignment=chosen,
        capacity=groups.per_sequence_sum(capacity),
    )


def block_coreset(biased: torch.Tensor, padding_mask: torch.Tensor, chunks: GroupedView, config) -> torch.Tensor:
    """dMoE's `block_experts_select`, op for op, per chunk of `chunks`: the experts every
    token of a chunk may use ([B, L, E] bool). `biased` = scores + expert_bias.

    Each real token votes with its own top-k biased scores (padding votes nothing: our
    extension, as are chunks aligned to absolute positions); votes are normalised; the
    coreset keeps the sorted prefix whose cumulative vote is <= `block_router_top_p`, the
    first expert always and the first one to exceed top_p; if that is fewer than
    `block_router_min_experts`, the coreset is replaced by `topk(votes, min_experts)`.
    """
    local_scores, local_idx = torch.topk(biased, k=config.num_experts_per_tok, dim=-1)
    masked_scores = torch.zeros_like(biased).scatter_(-1, local_idx, local_scores)
    masked_scores = masked_scores.masked_fill(~padding_mask.unsqueeze(-1), 0.0)
    votes = chunks.scatter(masked_scores, 0.0).sum(dim=1)  # [chunks, E]
    votes = votes / (votes.sum(dim=-1, keepdim=True) + 1e-20)
    sorted_votes, sorted_idx = torch.sort(votes, dim=-1, descending=True)
    cum_probs = torch.cumsum(sorted_votes, dim=-1)
    top_p = config.block_router_top_p
    sorted_keep = cum_probs <= top_p
    sorted_keep[..., 0] = True
    exceed = cum_probs > top_p
    exceed_prev = torch.cat([torch.zeros_like(exceed[..., :1]), exceed[..., :-1]], dim=-1)
    sorted_keep = sorted_keep | (exceed & ~exceed_prev)
    coreset = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, sorted_idx, sorted_keep)
    need_fix = coreset.sum(dim=-1) < config.block_router_min_experts
    fallback_idx = torch.topk(votes, k=config.block_router_min_experts, dim=-1).indices
    fallback = torch.zeros_like(coreset).scatter_(1, fallback_idx, True)
    coreset = torch.where(need_fix.unsqueeze(-1), fallback, coreset)
    return chunks.per_group(coreset)


def router_stats(decision, padding_mask: torch.Tensor) -> RouterStats:
    mask = decision.assignment & padding_mask.unsqueeze(-1)
    dropped = torch.zeros((), device=mask.device)
    if isinstance(decision, TokenRouting) and decision.capacity is not None:
        proposed = padding_mask.sum() * decision.expert_index.shape[-1]
        dropped = 1.0 - mask.sum() / proposed.clamp(min=1)
    return RouterStats(
        tokens_per_expert=mask.sum(1),
        experts_per_token=mask.sum(-1),
        num_unique_experts=mask.any(1).sum(-1),
        expert_mask=mask,
        capacity=decision.capacity,
        dropped_fraction=dropped,
    )


def load_balancing_loss(decision: TokenRouting, padding_mask: torch.Tensor) -> torch.Tensor:
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


def z_loss(decision, padding_mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of logsumexp(router logits)^2."""
    lse = torch.logsumexp(decision.router_logits, dim=-1)
    real = padding_mask.to(lse.dtype)
    return (lse.square() * real).sum() / real.sum().clamp_min(1.0)
