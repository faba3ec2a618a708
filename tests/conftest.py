import pytest
import torch

from diffusion_moe import DiffusionMoeConfig

MASK_ID = 63


def tiny_config(**overrides) -> DiffusionMoeConfig:
    """A 2-layer model small enough that every test runs in milliseconds."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mask_token_id=MASK_ID,
        pad_token_id=0,
        max_position_embeddings=256,
    )
    values.update(overrides)
    return DiffusionMoeConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
