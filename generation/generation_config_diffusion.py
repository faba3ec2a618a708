"""Generation settings for block-parallel denoising (filled in by the generation issue)."""

from transformers import GenerationConfig


class DiffusionGenerationConfig(GenerationConfig):
    pass
