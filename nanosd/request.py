"""What to generate: one object for the Python API, the CLI and the server. `resolve(model)` fills the defaults
from the model and validates once (each refusal one line naming the field and the fix); the resolved request is
what sampling reads and what the infotext (A1111's PNG `parameters`) is written from."""
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .controlnet import Control
from .samplers import Sampler, sampler as get_sampler

OUTPUTS = ("pil", "tensor", "latent")


@dataclass
class Request:
    prompt: str | list[str] | None = None  # conditioned models: a prompt for all, or one per image
    negative_prompt: str | list[str] | None = None
    steps: int | None = None  # None: the model's (every timestep for DDPM)
    sampler: str | Sampler | None = None  # ours or A1111's name; None: the model's
    cfg_scale: float | None = None  # None: the model's guidance
    seed: int | None = None  # None: drawn
    height: int | None = None  # None: the init image's, else the model's
    width: int | None = None
    batch_size: int = 1
    eta: float | None = None  # samplers that take it (DDIM); None: the model's
    clip_skip: int = 1
    autoguidance: float | None = None  # None: the run's (1: off)
    init: Any = None  # img2img and inpainting: the image to start from (PIL, or a tensor in [0, 1])
    mask: Any = None  # inpainting: white = the hole to fill
    image: Any = None  # the spatial condition of a model trained with one (an edge map, a low-resolution image)
    strength: float = 1.0  # the part of the schedule redone from init (img2img)
    overlay: bool | None = None  # inpainting: paste the original pixels back outside the hole (None: the model's)
    latents: torch.Tensor | None = None  # the starting noise, instead of drawing it
    output: str = "pil"  # pil, tensor (in [0, 1]) or latent
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (for zero-terminal-SNR fine-tunes; 0.7 is typical)
    # SDXL's micro-conditioning (diffusers' names; None: the requested size, no crop): (height, width) and (top, left)
    original_size: tuple | None = None
    crops_coords_top_left: tuple | None = None
    target_size: tuple | None = None
    aesthetic_score: float | None = None  # the SDXL refiner's (None: 6.0) and its unconditional branch's (None: 2.5)
    negative_aesthetic_score: float | None = None
    control: list = ()  # ControlNets acting on this generation: nanosd.Control(net, image, scale, start, end, mode)

    def resolve(self, model) -> "Request":
        """A copy with every default taken from `model` (a Pipeline) and every field checked against it; resolving
        a resolved request gives it back unchanged (the server checks at the edge, the pipeline again)."""
        cfg, c = model.cfg, model.conditioner
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1 (1: CLIP's last layer), got {self.clip_skip}")
        spec = self.sampler if isinstance(self.sampler, Sampler) else get_sampler(self.sampler or cfg.sample.sampler)
        if self.eta is not None and "eta" not in spec.options and self.eta != spec.eta:
            raise ValueError(f"eta {self.eta}: the {spec.a1111} sampler always runs at eta {spec.eta:g}; choose DDIM "
                             f"for another eta, or give none")
        steps = self.steps or (model.schedule.timesteps if spec.every_step else cfg.sample.steps)
        if not 1 <= steps <= model.schedule.timesteps:
            raise ValueError(f"steps must be between 1 and {model.schedule.timesteps}, got {steps}")
        prompts, negatives = self._prompts(c)
        prompted = prompts is not None
        autoguidance = cfg.sample.autoguidance if self.autoguidance is None else self.autoguidance
        if autoguidance != 1.0 and model.guide is None:
            raise ValueError(f"autoguidance {autoguidance} needs the run's guide.safetensors, which this model lacks: "
                             f"train an unconditioned model with train.guide_at > 0, or use autoguidance 1 (off)")
        concat = c.cfg.concat if c else ""
        if concat == "inpaint" and (self.init is None or self.mask is None):
            raise ValueError("this is an inpainting model: give an image and a mask (inpaint)")
        if concat and concat != "inpaint" and self.mask is not None:
            raise ValueError(f"this model is conditioned on {concat}, not an inpainting mask: give no mask")
        if not concat and self.image is not None:
            raise ValueError("this model was trained without a spatial condition: give no image or mask")
        if self.mask is not None and self.init is None:
            raise ValueError("a mask needs the image it covers: give an image too (inpaint)")
        if model.family == "sdxl-refiner" and self.init is None:
            raise ValueError("the SDXL refiner refines an image, it does not draw one from noise: give it an image "
                             "(img2img, strength about 0.3), or load an SDXL base model for text-to-image")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.guidance_rescale and not (c and c.prompted):
            raise ValueError("guidance_rescale rescales classifier-free guidance, and this model takes no prompt: "
                             "give none")
        control = [self.control] if isinstance(self.control, Control) else list(self.control or ())
        for unit in control:
            unit.check()
            unit.net.check(cfg.unet)
            if unit.net.factor != model.factor_ae:
                raise ValueError(f"ControlNet {unit.net.name}'s hint encoder reduces images {unit.net.factor}x, this "
                                 f"model's latents are {model.factor_ae}x smaller than its images: use a ControlNet "
                                 "made for this model")
        micro = c.cfg.micro if c else ""
        takes = {"size": ("original_size", "crops_coords_top_left", "target_size"),
                 "aesthetic": ("original_size", "crops_coords_top_left", "aesthetic_score", "negative_aesthetic_score")}
        for name in ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                     "negative_aesthetic_score"):
            value = getattr(self, name)
            if value is not None and name not in takes.get(micro, ()):
                raise ValueError(f"{name}: this model is not conditioned on it (SDXL {'refiner' if 'aesthetic' in name else 'base'} "
                                 "models are): give none")
            if value is not None and not name.endswith("score") and len(value) != 2:
                raise ValueError(f"{name} must be two numbers, got {value}")
        # the size: as asked, else the init image's, else the model's own
        init = self.init
        default = (init.size[1], init.size[0]) if isinstance(init, Image.Image) else \
            tuple(torch.as_tensor(init).shape[-2:]) if init is not None else (cfg.data.size,) * 2
        height, width = self.height or default[0], self.width or default[1]
        if height % model.factor or width % model.factor:
            raise ValueError(f"size {width}x{height} is not divisible by the model's factor {model.factor}: "
                             f"use a multiple of {model.factor}")
        return dataclasses.replace(
            self, prompt=prompts, negative_prompt=negatives, steps=steps, sampler=spec,
            cfg_scale=(cfg.condition.guidance if self.cfg_scale is None else self.cfg_scale) if prompted else 1.0,
            seed=int(torch.randint(0, 2**31 - 1, ()).item()) if self.seed is None else self.seed,
            height=height, width=width, control=control, batch_size=len(prompts) if prompted else self.batch_size,
            eta=cfg.sample.eta if self.eta is None and "eta" in spec.options else self.eta, autoguidance=autoguidance,
            overlay=cfg.sample.inpaint_overlay if self.overlay is None else self.overlay,
            **({"original_size": tuple(self.original_size or (height, width)),
                "crops_coords_top_left": tuple(self.crops_coords_top_left or (0, 0))} if micro else {}),
            **({"target_size": tuple(self.target_size or (height, width))} if micro == "size" else {}),
            **({"aesthetic_score": 6.0 if self.aesthetic_score is None else self.aesthetic_score,
                "negative_aesthetic_score": 2.5 if self.negative_aesthetic_score is None
                else self.negative_aesthetic_score} if micro == "aesthetic" else {}))

    def _prompts(self, c):
        """(prompts, negatives), one each per image, or (None, None) for a model that takes none."""
        if c is None or not c.prompted:
            if self.prompt:
                raise ValueError("this model was trained without text or labels: generate without a prompt")
            return None, None
        prompt = self.prompt
        if self.control and (prompt is None or (isinstance(prompt, str) and not prompt.strip())):
            prompt = ""  # a ControlNet may draw from its control alone (guess mode): the empty prompt
        elif prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("this model is conditioned: give a non-empty prompt"
                             + (f" (one of: {', '.join(c.classes)})" if c.classes else ""))
        prompts = [prompt] * self.batch_size if isinstance(prompt, str) else list(prompt)
        # None: no negative prompt given (SDXL's unconditional branch is then zeros; others encode "")
        negatives = self.negative_prompt if self.negative_prompt is not None else None if c.cfg.zero_negative else ""
        negatives = list(negatives) if isinstance(negatives, (list, tuple)) else [negatives] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one each")
        c.check(prompts + negatives)
        return prompts, negatives

    @property
    def guided(self):
        return self.prompt is not None

    def infotext(self, index=0, model="") -> str:
        """A resolved request in A1111's `parameters` format: the prompt, 'Negative prompt: ...', then
        'Steps: 20, Sampler: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...'."""
        lines = []
        if self.prompt is not None:
            lines += [self.prompt[index]] + ([f"Negative prompt: {self.negative_prompt[index]}"]
                                             if self.negative_prompt[index] else [])
        settings = {"Steps": self.steps, "Sampler": self.sampler.a1111,
                    **({"CFG scale": self.cfg_scale} if self.guided else {}),
                    **({"Autoguidance": self.autoguidance} if self.autoguidance != 1.0 else {}),
                    **({"Guidance rescale": self.guidance_rescale} if self.guidance_rescale else {}),
                    "Seed": self.seed, **({"Clip skip": self.clip_skip} if self.clip_skip != 1 else {}),
                    **({"Denoising strength": self.strength} if self.init is not None and self.strength < 1 else {}),
                    "Size": f"{self.width}x{self.height}", **({"Model": model} if model else {}),
                    **{f"ControlNet {i}": f'"{unit.infotext()}"' for i, unit in enumerate(self.control)}}
        return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in settings.items())])


@dataclass
class Generation:
    """What generate() returns: the images and the resolved request that made them."""
    images: Any  # a list of PIL images, or a (N, C, H, W) tensor (output="tensor" or "latent")
    request: Request
    lora_hashes: dict = dataclasses.field(default_factory=dict)  # the prompt tags' LoRAs: name -> A1111's short hash

    def infotext(self, index=0, model="") -> str:
        text = self.request.infotext(index, model)
        if self.lora_hashes:  # as A1111 writes them
            text += ', Lora hashes: "' + ", ".join(f"{k}: {v}" for k, v in self.lora_hashes.items()) + '"'
        return text
