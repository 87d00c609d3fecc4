"""nanosd: Stable Diffusion, whole, in one small and fast codebase."""
from .controlnet import Control, ControlNet, load_controlnet, save_controlnet
from .pipeline import Pipeline, load, save
from .request import Generation, Hires, Request

__all__ = ["Control", "ControlNet", "Generation", "Hires", "Pipeline", "Request", "load", "load_controlnet", "save",
           "save_controlnet"]
