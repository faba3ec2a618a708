from .configuration_diffusion_moe import DiffusionMoeConfig

__all__ = ["DiffusionMoeConfig"]
