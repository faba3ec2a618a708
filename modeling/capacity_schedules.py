"""Timestep-dependent expert capacity (DESIGN 2.3).

Expert choice lets capacity be a free knob, so each sequence b gets its own average number
of experts per token, k_b, from its mask ratio r_b (1 = fully masked):
    k_b = clamp(round(k_min + (k_max - k_min) * f(r_b)), k_min, k_max)   (round half to even)
    C_b = max(floor(L_real_b * k_b / E), 1)                              (tokens per expert)
"""

import math

import torch


def _bell_gaussian(r: torch.Tensor, sigma: float) -> torch.Tensor:
    a = math.exp(-1.0 / (8.0 * sigma**2))
    return ((torch.exp(-((r - 0.5) ** 2) / (2.0 * sigma**2)) - a) / (1.0 - a)).clamp(0.0, 1.0)


SCHEDULE_FUNCTIONS = {
    "linear": lambda r, s: r,
    "linear_reverse": lambda r, s: 1.0 - r,
    "cosine": lambda r, s: (1.0 - torch.cos(math.pi * r)) / 2.0,
    "cosine_reverse": lambda r, s: (1.0 + torch.cos(math.pi * r)) / 2.0,
    "bell": lambda r, s: (1.0 - 4.0 * (r - 0.5) ** 2).clamp(0.0, 1.0),
    "bell_gaussian": _bell_gaussian,
    "bell_gaussian_reverse": lambda r, s: 1.0 - _bell_gaussian(r, s),
}


def experts_per_token(config, mask_ratio: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
    """k_b for each sequence ([B] long). `mask_ratio` may be None only for the constant schedule."""
    if config.capacity_schedule == "constant":
        return torch.full((batch_size,), config.num_experts_per_tok, dtype=torch.long, device=device)
    if mask_ratio is None:
        raise ValueError(
            f"capacity_schedule={config.capacity_schedule!r} needs the mask ratio: pass `mask_ratio` to forward "
            "or set `mask_token_id` in the config so it can be computed from `input_ids`."
        )
    r = mask_ratio.to(device=device, dtype=torch.float64).clamp(0.0, 1.0)
    f = SCHEDULE_FUNCTIONS[config.capacity_schedule](r, config.capacity_sigma)
    k = torch.round(config.capacity_min + (config.capacity_max - config.capacity_min) * f)
    return k.clamp(config.capacity_min, config.capacity_max).long()


def expert_capacity(k_per_seq: torch.Tensor, real_lengths: torch.Tensor, num_experts: int) -> torch.Tensor:
    """C_b = max(floor(L_real_b * k_b / E), 1): tokens each expert takes from sequence b ([B] long)."""
    return torch.div(real_lengths.long() * k_per_seq, num_experts, rounding_mode="floor").clamp(min=1)
