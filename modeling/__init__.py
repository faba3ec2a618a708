from .modeling_diffusion_moe import (
    DiffusionMoeForMaskedLM,
    DiffusionMoeMaskedLMOutput,
    DiffusionMoeModel,
    DiffusionMoeModelOutput,
    DiffusionMoePreTrainedModel,
)
from .routing_decisions import RouterStats

__all__ = [
    "DiffusionMoeForMaskedLM",
    "DiffusionMoeMaskedLMOutput",
    "DiffusionMoeModel",
    "DiffusionMoeModelOutput",
    "DiffusionMoePreTrainedModel",
    "RouterStats",
]
