from .generation_config_diffusion import DiffusionGenerationConfig
from .generation_utils import DiffusionGenerationMixin

__all__ = ["DiffusionGenerationConfig", "DiffusionGenerationMixin"]
