"""Line-by-line transcription of EC-DLM's scaling-factor functions (zhangshuibai/EC-DLM,
megatron/core/transformer/moe/moe_utils.py: `compute_ec_scaling_factors`,
`compute_tc_scaling_factor`), without their in-memory/disk caches and prints. The test
reference for diffusion_moe.modeling.ec_dlm_scaling: written from the published code, not
from our implementation."""

import numpy as np
import torch


def compute_ec_scaling_factors(num_routing_experts, num_shared_experts, num_samples=10000):
    rng_state = np.random.get_state()
    np.random.seed(42)

    scaling_factors = [1.0]  # Index 0: no routing expert (doesn't matter, gates are 0)

    shared_norm = np.sqrt(num_shared_experts)

    for k_routed in range(1, num_routing_experts + 1):
        observed_factors = []
        for _ in range(num_samples):
            logits = np.random.randn(num_routing_experts)
            e_x = np.exp(logits - np.max(logits))
            all_probs = e_x / e_x.sum()

            selected_probs = all_probs[:k_routed]
            prob_sum = selected_probs.sum()
            if prob_sum > 0:
                selected_probs = selected_probs / prob_sum

            routing_norm = np.sqrt(np.sum(selected_probs ** 2))
            if routing_norm > 1e-9:
                observed_factors.append(shared_norm / routing_norm)

        avg_factor = np.mean(observed_factors) if observed_factors else 1.0
        scaling_factors.append(avg_factor)

    np.random.set_state(rng_state)
    return torch.tensor(scaling_factors, dtype=torch.float32)


def compute_tc_scaling_factor(num_routing_experts, topk, num_shared_experts, act='softmax', renorm=True,
                              num_samples=10000):
    rng_state = np.random.get_state()
    np.random.seed(42)

    factors = []
    for _ in range(num_samples):
        logits = np.random.randn(num_routing_experts)
        if act == 'softmax':
            e_x = np.exp(logits - np.max(logits))
            p = e_x / e_x.sum()
        elif act == 'sigmoid':
            p = 1 / (1 + np.exp(-logits))
        else:
            raise ValueError(f"Unknown activation function: {act}")
        p = np.sort(p)[::-1][:topk]
        if renorm:
            p_sum = p.sum()
            if p_sum > 0:
                p = p / p_sum
        norm = np.sqrt(np.sum(p ** 2))
        if norm > 1e-9:
            factors.append(np.sqrt(num_shared_experts) / norm)

    np.random.set_state(rng_state)

    result = np.mean(factors) if factors else 1.0
    return result


def expert_choice_softmax_batch_level(logits, topk, scaling_factors=None):
    """`expert_choice_softmax_with_capacity` of the same file, the branch every EC-DLM run with
    `--moe-batch-level-expert-choice` takes: post-softmax (no `use_pre_softmax`), softmax
    activation, no shared-expert logits, one `topk` for the batch (with per-sample dynamic
    topk EC-DLM first sets `topk = max(dynamic_topk)`), non-transposed layout; then
    `enable_scaling_factor` (pass the factors of `compute_ec_scaling_factors`).
    logits [num_tokens, E] -> (topk_masked_gates [num_tokens, E], topk_map, experts_per_token)."""
    num_tokens, num_experts = logits.shape
    topk_ec = max(num_tokens * topk // num_experts, 1)
    scores, top_indices = torch.topk(logits, k=topk_ec, dim=0)

    flat_indices = top_indices.flatten().long()
    flat_scores = scores.flatten()
    flat_scores_fp32 = flat_scores.float()
    max_per_token = torch.full((num_tokens,), -float('inf'), device=logits.device, dtype=torch.float32)
    max_per_token.scatter_reduce_(0, flat_indices, flat_scores_fp32, reduce='amax')
    max_per_token = max_per_token.clamp(min=torch.finfo(torch.float32).min)
    flat_exp = torch.exp(flat_scores_fp32 - max_per_token[flat_indices])
    sum_per_token = torch.zeros(num_tokens, device=logits.device, dtype=torch.float32).scatter_add(
        0, flat_indices, flat_exp)
    flat_probs = (flat_exp / (sum_per_token[flat_indices] + 1e-20)).to(logits.dtype)

    probs = flat_probs.view_as(top_indices)
    topk_masked_gates = torch.zeros_like(logits).scatter(0, top_indices, probs)
    topk_map = torch.zeros_like(logits).int().scatter(0, top_indices, 1).bool()
    experts_per_token = topk_map.sum(dim=1)

    if scaling_factors is not None:
        factors_tensor = scaling_factors.to(device=logits.device, dtype=logits.dtype)
        topk_masked_gates = topk_masked_gates * factors_tensor[experts_per_token].unsqueeze(1)
    return topk_masked_gates, topk_map, experts_per_token
