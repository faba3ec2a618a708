"""Block-parallel denoising `generate()` (filled in by the generation issue)."""


class DiffusionGenerationMixin:
    pass
