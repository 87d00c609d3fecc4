"""nanosd: Stable Diffusion, whole, in one small and fast codebase."""
from .pipeline import Pipeline, load, save
from .request import Generation, Request

__all__ = ["Generation", "Pipeline", "Request", "load", "save"]
