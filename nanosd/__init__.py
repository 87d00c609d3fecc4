"""nanosd: Stable Diffusion, whole, in one small and fast codebase."""
from .pipeline import Pipeline, load, save

__all__ = ["Pipeline", "load", "save"]
