"""Routed experts stored as fused 3-D tensors (the Transformers MoE layout).

`gate_up_proj` [E, 2I, H] holds each expert's SwiGLU gate and up rows, `down_proj`
[E, H, I] its output projection. Token-layout routing (token choice, block) is dispatched
by `use_experts_implementation` to Transformers' experts implementations (`grouped_mm` by
default, `batched_mm`, or this file's `eager` loop, the portable fallback). Expert choice
honours the same choice: every Transformers name means Transformers' function, run on the
expert slots as tokens. Its default is its own static-shape dispatch, registered in
Transformers' experts interface as "expert_choice_static" (for SiLU the fused
`expert_choice_swiglu`). Both layouts go through `forward`, so wrappers of the module
(PEFT's LoRA on `target_parameters`, forward hooks) see every call.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .expert_choice_swiglu import expert_choice_swiglu
from .transformers_compat import experts_function, register_experts_function

EXPERT_CHOICE_STATIC = "expert_choice_static"


def expert_choice_only(experts, hidden_states, top_k_index, top_k_weights):
    """The token layout under "expert_choice_static": reached only by expert choice's slots
    sent as tokens (under Transformers' expert parallelism, which dispatches token layouts),
    which run as Transformers' `grouped_mm` (the model refuses the name for other rules)."""
    return experts_function("grouped_mm")(experts, hidden_states, top_k_index, top_k_weights)


register_experts_function(EXPERT_CHOICE_STATIC, expert_choice_only)


def dispatch_slots_as_tokens(run_experts, hidden_states, token_index, gates):
    """Expert choice through a token-layout experts function: each slot [E*G*C] goes as a token
    routed to its one expert with its gate, expert-major, and the outputs are added back to
    their rows. `run_experts` is the experts module itself under Transformers' expert
    parallelism (which replaces its forward with the EP dispatch: each rank runs its own
    experts' slots, the EP implementation exchanges or sums the outputs), or the token forward
    under a non-default experts implementation. Returns [B, L, H]."""
    G, E, C = token_index.shape
    rows = token_index.transpose(0, 1).reshape(-1)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    slots = flat.index_select(0, rows)
    expert_of_slot = torch.arange(E, device=rows.device).repeat_interleave(G * C).unsqueeze(1)
    y = run_experts(slots, expert_of_slot, gates.transpose(0, 1).reshape(-1, 1).to(slots.dtype))
    return torch.zeros_like(flat).index_add_(0, rows, y.to(flat.dtype)).view(hidden_states.shape)


@use_experts_implementation
class DiffusionMoeTokenExperts(nn.Module):
    """The fused expert weights and the token-layout forward (what the experts interface swaps)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self.hidden_act = config.hidden_act

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager token-layout dispatch: sort assignments by expert, one matmul pair per hit expert.

        hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H].
        """
        T, k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = torch.div(order, k, rounding_mode="floor")
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
        inputs = hidden_states[token_of]
        outputs = []
        for expert, rows in zip(range(self.num_experts), inputs.split(counts)):
            if rows.shape[0] == 0:
                continue
            hidden = self._apply_gate(rows @ self.gate_up_proj[expert].t())
            outputs.append(hidden @ self.down_proj[expert].t())
        out = torch.cat(outputs) * weights.to(hidden_states.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token_of, out.to(hidden_states.dtype))


class DiffusionMoeExperts(DiffusionMoeTokenExperts):
    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, *, token_index=None, gates=None):
        """Token layout: hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H].
        Expert layout (expert choice): hidden_states [B, L, H], `token_index` (rows of the
        flattened [B*L] batch) and `gates`, both [G, E, C] -> [B, L, H]."""
        if token_index is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        return self._expert_choice(hidden_states, token_index, gates)

    def _expert_choice(self, hidden_states, token_index, gates):
        """Expert choice under the model's experts implementation.

        "expert_choice_static" (expert choice's default): every expert holds the same number
        of slots, so it is one gather -> two batched matmuls -> one weighted scatter-add, with
        no sorting or padding (for SiLU the fused `expert_choice_swiglu`). Any other
        implementation ("eager", "grouped_mm", "batched_mm", ...) runs that experts function
        on the slots as tokens routed to one expert each.
        """
        if self.config._experts_implementation != EXPERT_CHOICE_STATIC:
            return dispatch_slots_as_tokens(super().forward, hidden_states, token_index, gates)
        B, L, H = hidden_states.shape
        G, E, C = token_index.shape
        rows = token_index.transpose(0, 1).reshape(-1)  # expert-major, so gathered rows are [E, G*C, H]
        gates = gates.transpose(0, 1).reshape(E, G * C)
        flat_hidden = hidden_states.reshape(B * L, H)
        if self.hidden_act in ("silu", "swish"):
            return expert_choice_swiglu(flat_hidden, rows, gates, self.gate_up_proj, self.down_proj).view(B, L, H)
        else:  # any other activation: the same maths through autograd
            x = flat_hidden.index_select(0, rows).view(E, G * C, H)
            hidden = self._apply_gate(torch.bmm(x, self.gate_up_proj.transpose(1, 2)))  # [E, G*C, I]
            y = torch.bmm(hidden, self.down_proj.transpose(1, 2)) * gates.unsqueeze(-1).to(hidden.dtype)
        return torch.zeros_like(flat_hidden).index_add_(0, rows, y.reshape(-1, H).to(flat_hidden.dtype)).view(B, L, H)
