"""Checkpoint conversion between diffusion-moe and other model families (LLaDA2-MoE)."""

from .llada2 import (
    LLADA2_EOS_TOKEN_ID,
    LLADA2_MASK_TOKEN_ID,
    convert_diffusion_moe_to_llada2,
    convert_llada2_to_diffusion_moe,
    diffusion_moe_config_from_llada2,
    llada2_config_from_diffusion_moe,
)

__all__ = [
    "LLADA2_EOS_TOKEN_ID",
    "LLADA2_MASK_TOKEN_ID",
    "convert_diffusion_moe_to_llada2",
    "convert_llada2_to_diffusion_moe",
    "diffusion_moe_config_from_llada2",
    "llada2_config_from_diffusion_moe",
]
