"""The routing rules: one router class per rule, chosen once from `config.router_type`.

A router maps hidden states [B, L, H] to fp32 router logits and a decision (see
routing_decisions); the decision dispatches the experts. Every router has the same
parameters, `weight` [E, H] and the `expert_bias` buffer (selection only), so a checkpoint
loads into any rule and a retrofit swaps the rule by config alone.
* `TokenChoiceRouter`: each token picks its top-k experts (LLaDA2's group-limited gate).
* `ExpertChoiceRouter`: each expert picks its tokens (balanced, static shapes).
* `BlockCoresetRouter` ("block"): dMoE's voted coreset per chunk, then token choice in it.
* `BlockPoolRouter` ("block_pool"): LLaDA2.2's pool of `expert_capacity` experts per
  attention block (each expert's best score over the block), then top-k inside it.

Token choice and the block gates follow the published LLaDA2 / dMoE / LLaDA2.2 gate code op
for op (`torch.topk` with `sorted=False` for groups, true `-inf` masks, `/ (sum + 1e-20)`),
so that ties resolve as they do there; tests/llada2_reference.py and
tests/llada2_2_reference.py transcribe that code.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .ec_dlm_scaling import ec_scaling_factors_on, tc_scaling_factor
from .routing_decisions import ExpertChoiceRouting, TokenRouting
from .routing_groups import GroupedView
from .routing_inputs import RoutingInputs

logger = logging.get_logger(__name__)


class DiffusionMoeRouter(nn.Module):
    """Router weights [E, H] (no bias) plus the `expert_bias` buffer. Subclasses are the rules:
    `decide(logits, inputs)` and what they need from `RoutingInputs.build`."""

    chooses_tokens = False  # experts pick tokens (expert-choice slots) rather than tokens experts

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    @classmethod
    def needs_capacity_groups(cls, config) -> bool:
        return config.capacity_factor is not None or config.capacity_schedule != "constant"

    @classmethod
    def chunk_size(cls, config) -> int | None:
        """Positions per aligned chunk whose tokens decide together (block rules), else None."""
        return None

    def forward(self, hidden_states: torch.Tensor, routing_inputs: RoutingInputs):
        """(router logits [B*L, E] in fp32, what Transformers records as `router_logits`; the decision)."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        return logits.flatten(0, 1), self.decide(logits, routing_inputs)

    def decide(self, logits: torch.Tensor, inputs: RoutingInputs):
        """The routing decision for fp32 router logits [B, L, E]."""
        raise NotImplementedError


class TokenChoiceRouter(DiffusionMoeRouter):
    """Each token picks its top-k experts by biased scores (group-limited when `n_group` > 1)."""

    group_limited = True

    def allowed_experts(self, scores: torch.Tensor, inputs: RoutingInputs) -> torch.Tensor | None:
        """[B, L, E] bool: the experts each token may choose from (None: all), from the unbiased scores."""
        return None

    def biased(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.expert_bias.to(scores.dtype)

    def decide(self, logits, inputs):
        scores = score(logits, self.config.router_score_function)
        allowed = self.allowed_experts(scores, inputs)
        return token_choice(logits, scores, self.expert_bias, inputs, self.config, allowed, self.group_limited)


class BlockCoresetRouter(TokenChoiceRouter):
    """dMoE: the tokens of a `block_router_size` chunk share a voted coreset of experts."""

    @classmethod
    def chunk_size(cls, config):
        return config.block_router_size

    def allowed_experts(self, scores, inputs):
        return block_coreset(self.biased(scores), inputs.padding_mask, inputs.chunks, self.config)


class BlockPoolRouter(TokenChoiceRouter):
    """LLaDA2.2: a `block_size` block admits its `expert_capacity` best experts; no group limit."""

    group_limited = False

    @classmethod
    def chunk_size(cls, config):
        return config.block_size

    def allowed_experts(self, scores, inputs):
        return block_pool(self.biased(scores), inputs.padding_mask, inputs.chunks, self.config.expert_capacity)


class ExpertChoiceRouter(DiffusionMoeRouter):
    """Each expert picks its highest-logit tokens of every capacity group (see `expert_choice`)."""

    chooses_tokens = True

    def __init__(self, config):
        super().__init__(config)
        self._bias_checked = False

    @classmethod
    def needs_capacity_groups(cls, config):
        return True

    def decide(self, logits, inputs):
        self._warn_if_bias_is_ignored()
        return expert_choice(logits, inputs, self.config)

    def _warn_if_bias_is_ignored(self):
        if not self._bias_checked and not torch.compiler.is_compiling():
            self._bias_checked = True
            if bool(self.expert_bias.any()):
                logger.warning_once(
                    "router_type='expert_choice' ignores the routers' nonzero `expert_bias` (experts pick "
                    "tokens by logits; load is balanced by construction). It stays in the checkpoint, so a "
                    "switch back to token choice or block routing uses it again."
                )


ROUTERS = {
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
    "block": BlockCoresetRouter,
    "block_pool": BlockPoolRouter,
}


def router_class(config) -> type[DiffusionMoeRouter]:
    return ROUTERS[config.router_type]


def build_router(config) -> DiffusionMoeRouter:
    """The router of `config.router_type`."""
    return router_class(config)(config)


def routing_inputs_for(config, padding_mask, position_ids, mask_ratio=None, masked=None, static=False) -> RoutingInputs:
    """`RoutingInputs.build` for the router of `config.router_type`."""
    return RoutingInputs.build(config, router_class(config), padding_mask, position_ids, mask_ratio, masked, static)


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


def select_experts(scores, expert_bias, config, allowed=None, experts_per_token=None, group_limited=True):
    """Token-choice selection on [..., E] scores: biased, masked to `allowed`, group-limited
    (unless `group_limited` is False: LLaDA2.2's pool takes a plain top-k).

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
    if group_limited and config.n_group is not None and config.n_group > 1:
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


def token_choice(logits, scores, expert_bias, inputs: RoutingInputs, config, allowed=None,
                 group_limited=True) -> TokenRouting:
    """Each token picks its top-k experts. With `capacity_factor`, each expert keeps at most
    C = ceil(T * k / E * capacity_factor) of the T real tokens of each capacity group,
    highest weights first; dropped assignments get weight 0."""
    B, L, E = logits.shape
    padding_mask = inputs.padding_mask
    indices, weights = select_experts(scores, expert_bias, config, allowed, inputs.experts_per_token, group_limited)
    weights = weights * padding_mask.unsqueeze(-1)  # padding contributes nothing
    capacity = None
    if config.capacity_factor is not None:
        groups, real = inputs.groups, inputs.real_per_group
        group_capacity = torch.ceil(real * inputs.experts_per_group / E * config.capacity_factor).long()
        # rank of each token among its group's tokens routed to the same expert, by weight
        dense = torch.full_like(scores, -1.0).scatter(-1, indices, weights.masked_fill(weights == 0, -1.0))
        rank = groups.scatter(dense, -1.0).argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
        keep = groups.gather(rank < group_capacity.view(-1, 1, 1))
        weights = weights * keep.gather(-1, indices)
        capacity = groups.per_sequence_sum(group_capacity)
    return TokenRouting(
        router_logits=logits,
        inputs=inputs,
        capacity=capacity,
        expert_index=indices.reshape(B * L, -1),
        expert_weights=weights.reshape(B * L, -1),  # fp32; `dispatch` casts to the hidden dtype
        router_probs=scores,
    )


def expert_choice(logits: torch.Tensor, inputs: RoutingInputs, config) -> ExpertChoiceRouting:
    """Each expert picks, within each capacity group, its C highest-logit real tokens,
    C = max(floor(T_real * k_g / E), 1) (never more than the T_real real tokens).

    Shapes are static: every group uses C_max slots per expert, and slots beyond its own C
    get gate 0. A token's gates follow the token-choice weight rule applied to the experts
    that chose it (score function, renormalised when `norm_topk_prob` and k > 1, x
    `routed_scaling_factor`), so a retrofit keeps the model's output scale; for softmax
    scores that is a softmax over the choosing experts' logits. Tokens nobody chose get no
    routed output.
    """
    groups, grouped_real = inputs.groups, inputs.grouped_padding  # [G, S]
    capacity, c_max = inputs.expert_choice_capacity, inputs.expert_choice_slots  # [G], int
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
        inputs=inputs,
        capacity=groups.per_sequence_sum(capacity),
        token_index=token_index,
        gates=gates,
        chosen=chosen,
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


def block_pool(biased: torch.Tensor, padding_mask: torch.Tensor, blocks: GroupedView, capacity: int) -> torch.Tensor:
    """LLaDA2.2's block expert pool ([B, L, E] bool): per block of `blocks`, each expert's
    admission score is its best biased score over the block's tokens, and the block admits
    the `capacity` best experts (`torch.topk`, as the hub gate). Padding nominates nothing
    and a partial block's missing lanes are -inf (our extensions, as are blocks aligned to
    each sequence's position 0)."""
    nominations = biased.masked_fill(~padding_mask.unsqueeze(-1), float("-inf"))
    admission = blocks.scatter(nominations, float("-inf")).amax(dim=1)  # [blocks, E]
    pool_idx = torch.topk(admission, k=capacity, dim=-1).indices
    pool = torch.zeros_like(admission, dtype=torch.bool).scatter_(1, pool_idx, True)
    return blocks.per_group(pool)

