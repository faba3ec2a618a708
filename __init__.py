"""diffusion-moe: mixture-of-experts masked-diffusion language models for Transformers.

Importing the package registers the model with AutoConfig / AutoModel /
AutoModelForMaskedLM under `model_type="diffusion_moe"`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration import DiffusionMoeConfig
from .configuration.remote_code import __version__
from .modeling import (  # before .generation: the model imports the generation mixin
    DiffusionMoeForMaskedLM,
    DiffusionMoeMaskedLMOutput,
    DiffusionMoeModel,
    DiffusionMoeModelOutput,
    DiffusionMoePreTrainedModel,
    RouterStats,
)
from .generation import DiffusionGenerationConfig, DiffusionGenerationMixin

AutoConfig.register("diffusion_moe", DiffusionMoeConfig, exist_ok=True)
AutoModel.register(DiffusionMoeConfig, DiffusionMoeModel, exist_ok=True)
AutoModelForMaskedLM.register(DiffusionMoeConfig, DiffusionMoeForMaskedLM, exist_ok=True)

__all__ = [
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
    "DiffusionMoeConfig",
    "DiffusionMoeForMaskedLM",
    "DiffusionMoeMaskedLMOutput",
    "DiffusionMoeModel",
    "DiffusionMoeModelOutput",
    "DiffusionMoePreTrainedModel",
    "RouterStats",
]
