from .generation_config_diffusion import DiffusionGenerationConfig
from .generation_utils import DiffusionGenerateOutput, DiffusionGenerationMixin

__all__ = ["DiffusionGenerationConfig", "DiffusionGenerateOutput", "DiffusionGenerationMixin"]
