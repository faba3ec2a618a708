"""Routing decisions: what a router decided for one MoE layer, and everything read from it.

Every decision has one interface: `dispatch(experts, hidden_states)` runs the experts,
`aux_loss()` is its load-balancing loss (None where the rule has none), `z_loss()` the
router z-loss, `stats()` its `RouterStats`. A decision keeps the `RoutingInputs` it was
made from, so nothing else (padding, routing units) has to travel with it.
* `TokenRouting` (token choice, dMoE block coreset, LLaDA2.2 block pool): (expert index,
  weight) pairs per token, dispatched through Transformers' experts interface.
* `ExpertChoiceRouting`: (token index, gate) per expert slot, dispatched with one gather,
  batched matmuls and one scatter-add. Balanced by construction: no aux loss.
"""

from dataclasses import dataclass
from functools import wraps

import torch

from .experts import dispatch_slots_as_tokens
from .routing_inputs import RoutingInputs
from .transformers_compat import is_expert_parallel


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
class RouterStats:
    """Per-layer routing statistics returned with `output_router_stats=True`.

    tokens_per_expert: [B, E] assignments each expert received from each sequence.
    experts_per_token: [B, L] experts that processed each token (0 for padding).
    num_unique_experts: [B] distinct experts used by each sequence's real tokens.
    expert_mask: [B, L, E] bool, which expert processed which token.
    capacity: [B] per-expert token budget per sequence (expert choice, or token choice
        with a capacity factor; batch-level expert choice: the batch's, on every row); None
        when routing is dropless token choice or block.
    dropped_fraction: fraction of token-choice assignments dropped by capacity (0 else), a
        0-d tensor (reading it back is left to the caller: no host sync here).
    """

    tokens_per_expert: torch.Tensor
    experts_per_token: torch.Tensor
    num_unique_experts: torch.Tensor
    expert_mask: torch.Tensor
    capacity: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | float = 0.0


@dataclass
class RoutingDecision:
    """router_logits [B, L, E] fp32; `inputs` the forward's routing inputs; `capacity` [B]
    per-expert token budget per sequence (summed over its capacity groups), None if uncapped."""

    router_logits: torch.Tensor
    inputs: RoutingInputs
    capacity: torch.Tensor | None

    def dispatch(self, experts, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def assignment(self) -> torch.Tensor:
        """[B, L, E] bool: which experts process which token."""
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def dropped_fraction(self) -> torch.Tensor:
        return torch.zeros((), device=self.router_logits.device)

    def z_loss(self) -> torch.Tensor:
        """mean over real tokens of logsumexp(router logits)^2."""
        lse = torch.logsumexp(self.router_logits, dim=-1)
        real = self.inputs.padding_mask.to(lse.dtype)
        return (lse.square() * real).sum() / real.sum().clamp_min(1.0)

    def stats(self) -> RouterStats:
        mask = self.assignment & self.inputs.padding_mask.unsqueeze(-1)
        return RouterStats(
            tokens_per_expert=mask.sum(1),
            experts_per_token=mask.sum(-1),
            num_unique_experts=mask.any(1).sum(-1),
            expert_mask=mask,
            capacity=self.capacity,
            dropped_fraction=self.dropped_fraction(),
        )


@dataclass
class TokenRouting(RoutingDecision):
    """`expert_index` / `expert_weights` [B*L, k]; `router_probs` [B, L, E] the scores the
    load-balancing loss averages. An assignment of weight 0 (padding, dropped by capacity,
    beyond a token's scheduled k) contributes nothing."""

    expert_index: torch.Tensor
    expert_weights: torch.Tensor
    router_probs: torch.Tensor

    def dispatch(self, experts, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden_states.shape
        weights = self.expert_weights.to(hidden_states.dtype)
        return experts(hidden_states.reshape(B * L, H), self.expert_index, weights).view(B, L, H)

    @computed_once
    def assignment(self) -> torch.Tensor:
        B, L, E = self.router_logits.shape
        active = (self.expert_weights != 0).view(B, L, -1)
        return torch.zeros(B, L, E, dtype=torch.bool, device=active.device).scatter_(
            -1, self.expert_index.view(B, L, -1), active
        )

    def aux_loss(self) -> torch.Tensor:
        return load_balancing_loss(self.router_probs, self.assignment, self.inputs.padding_mask)

    def dropped_fraction(self) -> torch.Tensor:
        if self.capacity is None:
            return super().dropped_fraction()
        padding_mask = self.inputs.padding_mask
        proposed = padding_mask.sum() * self.expert_index.shape[-1]
        return 1.0 - (self.assignment & padding_mask.unsqueeze(-1)).sum() / proposed.clamp(min=1)


@dataclass
class ExpertChoiceRouting(RoutingDecision):
    """`token_index` (rows of the flattened [B*L] batch) and `gates`, both [G, E, C_max];
    `chosen` [B, L, E] which expert chose which token."""

    token_index: torch.Tensor
    gates: torch.Tensor
    chosen: torch.Tensor

    def dispatch(self, experts, hidden_states: torch.Tensor) -> torch.Tensor:
        if is_expert_parallel(experts):  # Transformers' EP dispatches token layouts: the slots go as tokens
            return dispatch_slots_as_tokens(experts, hidden_states, self.token_index, self.gates)
        return experts(hidden_states, token_index=self.token_index, gates=self.gates)

    @property
    def assignment(self) -> torch.Tensor:
        return self.chosen


def load_balancing_loss(router_probs, assignment, padding_mask) -> torch.Tensor:
    """Switch-style E * sum_e f_e P_e over real tokens (token choice and block routing).

    f_e: fraction of assignments to e; P_e: mean routing probability of e (sigmoid scores
    are normalised per token to a distribution first).
    """
    probs = router_probs / router_probs.sum(-1, keepdim=True).clamp_min(1e-20)
    real = padding_mask.unsqueeze(-1).to(probs.dtype)
    n_real = real.sum().clamp_min(1.0)
    f = (assignment.to(probs.dtype) * real).sum((0, 1))
    f = f / f.sum().clamp_min(1.0)
    p = (probs * real).sum((0, 1)) / n_real
    return probs.shape[-1] * (f * p).sum()


def router_losses(decisions, config) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(aux, z): each decision's losses averaged over MoE layers; None where the coefficient is
    0 or the rule has no such loss (expert choice has no aux loss)."""
    if not decisions:
        return None, None
    z = sum(d.z_loss() for d in decisions) / len(decisions) if config.router_z_loss_coef > 0 else None
    aux = None
    if config.router_aux_loss_coef > 0:
        terms = [d.aux_loss() for d in decisions]
        if all(t is not None for t in terms):
            aux = sum(terms) / len(terms)
    return aux, z
