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
