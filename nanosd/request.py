"""What to generate: one object for the Python API, the CLI and the server. `resolve(model)` fills the defaults
from the model and validates once (each refusal one line naming the field and the fix); the resolved request is
what sampling reads and what the infotext (A1111's PNG `parameters`) is written from."""
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .controlnet import Control
from .samplers import SCHEDULE_TYPES, Sampler, sampler as get_sampler
from .seeds import SOURCES

OUTPUTS = ("pil", "tensor", "latent")
# fast=True: what was measured to keep quality (README, "Speed"). Not the tiny decoder: a distilled one cost the
# emoji recipe half again its FID (it serves previews, and final images where asked for)
FAST = {"cfg_end": 0.5, "cache_interval": 3, "cache_depth": 1, "tome": 0.5}
NOISES = ("diffusers", "a1111")
FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0-3: what starts the hole
UPSCALERS = {"Latent": "bilinear", "Latent (antialiased)": "bilinear-antialiased", "Latent (bicubic)": "bicubic",
             "Latent (bicubic antialiased)": "bicubic-antialiased", "Latent (nearest)": "nearest",
             "Latent (nearest-exact)": "nearest-exact", "Lanczos": "lanczos", "Nearest": "nearest-pixels"}


@dataclass
class Hires:
    """A1111's hires fix: the image made at the request's size, upscaled (its latents, or its pixels with Lanczos)
    to `scale` times it (or resize_x by resize_y), then redrawn from there as img2img at `strength` in `steps`
    (0: the request's)."""
    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    resize_x: int = 0
    resize_y: int = 0

    def size(self, height, width, factor):
        """The second pass's (height, width): A1111's rule, then down to the model's multiple."""
        if self.resize_x or self.resize_y:  # one side given: the other keeps the aspect
            w = self.resize_x or round(self.resize_y * width / height)
            h = self.resize_y or round(self.resize_x * height / width)
        else:
            w, h = int(width * self.scale), int(height * self.scale)
        return h // factor * factor, w // factor * factor

    def check(self):
        if self.upscaler not in UPSCALERS:
            raise ValueError(f"hires upscaler {self.upscaler!r}: nanosd has {', '.join(UPSCALERS)}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"hires denoising strength must be in (0, 1], got {self.strength}")
        if self.steps < 0 or not 1 <= self.scale <= 4 or min(self.resize_x, self.resize_y) < 0:
            raise ValueError(f"hires fix: steps >= 0 (0: the same), scale from 1 to 4, resize sides >= 0; got steps "
                             f"{self.steps}, scale {self.scale}, resize {self.resize_x}x{self.resize_y}")


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
    scheduler: str | None = None  # the schedule type (A1111's: "Karras", "SGM Uniform", ...); None: the sampler's
    # seeds: "diffusers" (one generator for the batch, diffusers' order) or "a1111" (A1111's: a generator per image,
    # seed + i, from the RNG source `rng`; variation seeds, seed resize and ENSD; k-diffusion's discretisations)
    noise: str = "diffusers"
    rng: str = "GPU"  # A1111's randn_source: GPU (= NV: Philox, as CUDA draws), CPU
    subseed: int | None = None  # A1111's variation seed (None: drawn, when subseed_strength > 0)
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0  # A1111's "resize seed from": the noise drawn at this size, pasted centred
    seed_resize_from_h: int = 0
    eta_noise_seed_delta: int = 0  # A1111's ENSD: the ancestral samplers' noise seeded with seed + this
    hires: Hires | None = None  # A1111's hires fix (text-to-image only)
    # A1111's inpainting options: the mask blurred (px) and inverted, what the hole starts from (FILLS), and "only
    # masked": the mask's region plus padding inpainted at the request's size, then pasted back
    mask_blur: int = 0
    inpainting_mask_invert: bool = False
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 0
    # less work per image (fast.py), each off by default: guidance for the first cfg_end of the steps only (the
    # rest run the conditional half of the batch); DeepCache: the whole U-Net every cache_interval-th call, the
    # others reuse its features below skip cache_depth; ToMe: the ratio of tokens merged in self-attention at the
    # largest resolution; decoder "tiny": TAESD's decoder instead of the VAE's. fast=True: FAST, where not given.
    cfg_end: float | None = None
    cache_interval: int | None = None
    cache_depth: int | None = None
    tome: float | None = None
    decoder: str | None = None
    fast: bool = False

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
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        a1111 = self.noise == "a1111"
        spec = self.sampler if isinstance(self.sampler, Sampler) and self.scheduler is None else \
            get_sampler(self.sampler.label if isinstance(self.sampler, Sampler) else self.sampler or cfg.sample.sampler,
                        self.scheduler)
        spec.check(a1111)
        seeding = {"rng": self.rng != "GPU", "subseed": self.subseed is not None,
                   "subseed_strength": self.subseed_strength != 0,
                   "seed_resize_from_w": self.seed_resize_from_w != 0, "seed_resize_from_h": self.seed_resize_from_h != 0,
                   "eta_noise_seed_delta": self.eta_noise_seed_delta != 0}
        if not a1111 and any(seeding.values()):
            raise ValueError(f"{next(k for k, v in seeding.items() if v)}: A1111's seeding; give noise='a1111' "
                             "(--seed-mode a1111) to use it")
        if self.rng not in SOURCES:
            raise ValueError(f"rng {self.rng!r}: choose one of {', '.join(SOURCES)}")
        if not 0 <= self.subseed_strength <= 1:
            raise ValueError(f"subseed_strength must be in [0, 1], got {self.subseed_strength}")
        inpainting = {"mask_blur": self.mask_blur != 0, "inpainting_mask_invert": self.inpainting_mask_invert,
                      "inpainting_fill": self.inpainting_fill != "original", "inpaint_full_res": self.inpaint_full_res,
                      "inpaint_full_res_padding": self.inpaint_full_res_padding != 0}
        if self.mask is None and any(inpainting.values()):
            raise ValueError(f"{next(k for k, v in inpainting.items() if v)} is an inpainting option: give a mask too")
        if self.inpainting_fill not in FILLS:
            raise ValueError(f"inpainting_fill {self.inpainting_fill!r}: one of {', '.join(FILLS)}")
        if not 0 <= self.mask_blur <= 64 or self.inpaint_full_res_padding < 0:
            raise ValueError(f"mask_blur must be from 0 to 64 px and the padding >= 0, got {self.mask_blur} and "
                             f"{self.inpaint_full_res_padding}")
        if self.inpaint_full_res and (self.output == "latent" or not isinstance(self.init, Image.Image)):
            raise ValueError("inpaint_full_res (only masked) pastes the result into the image: give the image as a PIL "
                             "image and an image output")
        if self.hires is not None:
            self.hires.check()
            if self.init is not None or self.output == "latent":
                raise ValueError("the hires fix redraws a text-to-image result: give no init image, and an image output")
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
        speed = self._speed(model, prompts is not None and (cfg.condition.guidance if self.cfg_scale is None
                                                            else self.cfg_scale) != 1.0)
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
            subseed=int(torch.randint(0, 2**31 - 1, ()).item()) if self.subseed is None and self.subseed_strength
            else self.subseed,
            height=height, width=width, control=control, batch_size=len(prompts) if prompted else self.batch_size,
            **speed,
            eta=cfg.sample.eta if self.eta is None and "eta" in spec.options else self.eta, autoguidance=autoguidance,
            overlay=cfg.sample.inpaint_overlay if self.overlay is None else self.overlay,
            **({"original_size": tuple(self.original_size or (height, width)),
                "crops_coords_top_left": tuple(self.crops_coords_top_left or (0, 0))} if micro else {}),
            **({"target_size": tuple(self.target_size or (height, width))} if micro == "size" else {}),
            **({"aesthetic_score": 6.0 if self.aesthetic_score is None else self.aesthetic_score,
                "negative_aesthetic_score": 2.5 if self.negative_aesthetic_score is None
                else self.negative_aesthetic_score} if micro == "aesthetic" else {}))

    def _speed(self, model, guided) -> dict:
        """The speed options, resolved (FAST's where fast=True and not given; else off) and checked."""
        has = {"cfg_end": guided, "tome": model.cfg.unet.attention_levels}
        preset = {k: v for k, v in FAST.items() if self.fast and has.get(k, True)}
        off = {"cfg_end": 1.0, "cache_interval": 1, "cache_depth": None, "tome": 0.0, "decoder": "full"}
        given = {k: getattr(self, k) for k in off if getattr(self, k) is not None}
        out = {**off, **preset, **given}
        if "cache_depth" in given and out["cache_interval"] == 1:
            raise ValueError("cache_depth is DeepCache's: give cache_interval > 1 too")
        if out["cache_interval"] > 1 and out["cache_depth"] is None:
            out["cache_depth"] = FAST["cache_depth"]
        if not 0 < out["cfg_end"] <= 1:
            raise ValueError(f"cfg_end is the fraction of steps guided, in (0, 1]; got {out['cfg_end']}")
        if out["cfg_end"] < 1 and not guided:
            raise ValueError(f"cfg_end {out['cfg_end']}: this request has no classifier-free guidance to end "
                             "(no prompt, or cfg_scale 1): give none")
        inputs = model.cfg.unet.skips
        if out["cache_interval"] < 1 or not 0 <= (out["cache_depth"] or 0) < inputs:
            raise ValueError(f"cache_interval must be at least 1 (1: off) and cache_depth from 0 to {inputs - 1} "
                             f"(the U-Net's skips); got {out['cache_interval']} and {out['cache_depth']}")
        if not 0 <= out["tome"] <= 0.75:
            raise ValueError(f"tome (the ratio of tokens merged) must be from 0 to 0.75, got {out['tome']}")
        if out["tome"] and not model.cfg.unet.attention_levels:
            raise ValueError(f"tome {out['tome']}: this U-Net has no attention to merge tokens in: give none")
        if out["decoder"] not in ("full", "tiny"):
            raise ValueError(f"decoder must be full or tiny, got {out['decoder']!r}")
        if out["decoder"] == "tiny" and (model.tiny_decoder is None or self.output == "latent"):
            raise ValueError("decoder 'tiny': " + ("latents are not decoded: give an image output" if
                             model.tiny_decoder is not None else "this model has no tiny decoder: load one "
                             "(pipe.load_tiny_decoder(FILE), --tiny-decoder FILE; runs: nanosd train RUN "
                             "--tiny-decoder)"))
        return out

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

    def image_seeds(self):
        """Each image's (seed, variation seed): A1111's seed + i (with a variation: the seed, and subseed + i), or
        the batch's one seed (diffusers: one generator for the batch)."""
        n, sub = self.batch_size, self.subseed or 0
        if self.noise != "a1111":
            return [(self.seed, self.subseed)] * n
        return [(self.seed + (0 if self.subseed_strength else i), sub + i) for i in range(n)]

    def infotext(self, index=0, model="", model_hash="") -> str:
        """A resolved request in A1111's `parameters` format: the prompt, 'Negative prompt: ...', then
        'Steps: 20, Sampler: ..., Schedule type: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...'. A1111-seeded
        images write what A1111 writes; diffusers-seeded ones say so ("Seed mode: diffusers"), since A1111 would
        draw them differently."""
        lines = []
        if self.prompt is not None:
            lines += [self.prompt[index]] + ([f"Negative prompt: {self.negative_prompt[index]}"]
                                             if self.negative_prompt[index] else [])
        a1111, spec = self.noise == "a1111", self.sampler
        seed, subseed = self.image_seeds()[index]
        kind = spec.k if a1111 and spec.k and spec.schedule == "automatic" else spec.schedule
        h = self.hires
        settings = {"Steps": self.steps, "Sampler": spec.a1111 if a1111 else spec.label,
                    **({"Schedule type": SCHEDULE_TYPES[kind]} if a1111 and spec.k and
                       (kind, spec.schedule) != ("uniform", "automatic") else {}),
                    **({"CFG scale": self.cfg_scale} if self.guided else {}),
                    **({"Autoguidance": self.autoguidance} if self.autoguidance != 1.0 else {}),
                    **({"Guidance rescale": self.guidance_rescale} if self.guidance_rescale else {}),
                    "Seed": seed, "Size": f"{self.width}x{self.height}",
                    **({"Model hash": model_hash} if model_hash else {}), **({"Model": model} if model else {}),
                    **({"Variation seed": subseed, "Variation seed strength": self.subseed_strength}
                       if self.subseed_strength else {}),
                    **({"Seed resize from": f"{self.seed_resize_from_w}x{self.seed_resize_from_h}"}
                       if self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0 else {}),
                    **({"Denoising strength": self.strength} if self.init is not None and self.strength < 1 else {}),
                    **({"Denoising strength": h.strength} if h else {}),
                    **({"Clip skip": self.clip_skip} if self.clip_skip != 1 else {}),
                    **({"Mask blur": self.mask_blur} if self.mask_blur else {}),
                    **({"Masked content": self.inpainting_fill} if self.mask is not None and
                       self.inpainting_fill != "original" else {}),
                    **({"Inpaint area": "Only masked", "Masked area padding": self.inpaint_full_res_padding}
                       if self.inpaint_full_res else {}),
                    **({"ENSD": self.eta_noise_seed_delta} if self.eta_noise_seed_delta and spec.eta else {}),
                    **({"RNG": self.rng} if self.rng != "GPU" else {}),
                    **({"Hires upscale": h.scale} if h and not (h.resize_x or h.resize_y) else {}),
                    **({"Hires resize": f"{h.resize_x}x{h.resize_y}"} if h and (h.resize_x or h.resize_y) else {}),
                    **({"Hires steps": h.steps} if h and h.steps else {}),
                    **({"Hires upscaler": h.upscaler} if h else {}),
                    **({"CFG end": self.cfg_end} if self.cfg_end != 1 else {}),
                    **({"DeepCache interval": self.cache_interval, "DeepCache depth": self.cache_depth}
                       if self.cache_interval > 1 else {}),
                    **({"Token merging ratio": self.tome} if self.tome else {}),
                    **({"Decoder": self.decoder} if self.decoder != "full" else {}),
                    **{f"ControlNet {i}": f'"{unit.infotext()}"' for i, unit in enumerate(self.control)},
                    **({} if a1111 else {"Seed mode": "diffusers"})}
        return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in settings.items())])


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # Key: value, or Key: "quoted, value"
# infotext keys -> Request fields (with their types); the hires keys and Size go to Hires and width/height
_FIELDS = {"Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("scheduler", str),
           "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Clip skip": ("clip_skip", int),
           "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
           "ENSD": ("eta_noise_seed_delta", int), "RNG": ("rng", str), "Guidance rescale": ("guidance_rescale", float),
           "Autoguidance": ("autoguidance", float), "Denoising strength": ("strength", float),
           "CFG end": ("cfg_end", float), "DeepCache interval": ("cache_interval", int),
           "DeepCache depth": ("cache_depth", int), "Token merging ratio": ("tome", float), "Decoder": ("decoder", str)}
_HIRES = {"Hires upscale": ("scale", float), "Hires steps": ("steps", int), "Hires upscaler": ("upscaler", str)}


def parse_infotext(text: str) -> dict:
    """A1111's `parameters` text as a dict: "Prompt", "Negative prompt", then every "Key: value" of its last line
    (quoted values unquoted), in order."""
    *lines, last = text.strip().split("\n")
    params = _PARAM.findall(last)
    if len(params) < 3:  # not a settings line: part of the prompt
        lines, params = lines + [last], []
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip() if not negative else line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in params:
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value.strip()
    return out


def from_infotext(text: str) -> tuple[dict, dict]:
    """Request fields for an A1111 (or nanosd) infotext, and what it says that a request cannot replay (the model,
    LoRA hashes, ControlNet units, keys nanosd does not know), by key. An image without "Seed mode" was seeded as
    A1111 seeds: it is replayed so."""
    parsed = parse_infotext(text)
    fields = {"prompt": parsed.pop("Prompt") or None, "negative_prompt": parsed.pop("Negative prompt") or None,
              "noise": "diffusers" if parsed.pop("Seed mode", "") == "diffusers" else "a1111"}
    hires, rest = {}, {}
    for key, value in parsed.items():
        try:
            if key in _FIELDS:
                name, kind = _FIELDS[key]
                fields[name] = kind(value)
            elif key in _HIRES:
                hires[_HIRES[key][0]] = _HIRES[key][1](value)
            elif key in ("Size", "Seed resize from", "Hires resize"):
                w, h = (int(v) for v in value.split("x"))
                names = {"Size": ("width", "height"), "Seed resize from": ("seed_resize_from_w", "seed_resize_from_h"),
                         "Hires resize": ("resize_x", "resize_y")}[key]
                (hires if key == "Hires resize" else fields).update(dict(zip(names, (w, h))))
            else:
                rest[key] = value
        except ValueError:
            raise ValueError(f"infotext {key}: {value!r} is not what A1111 writes there") from None
    if hires:
        hires["strength"] = fields.pop("strength", 0.7)
        fields["hires"] = Hires(**hires)
    if fields["noise"] == "a1111" and "scheduler" not in fields and "sampler" in fields:
        # A1111 1.9+ always writes a k-diffusion sampler's schedule type; without one the image is older, and its
        # plain name meant the model's own schedule (Uniform; "DPM++ 2M" is Karras only since 1.9)
        spec = get_sampler(fields["sampler"])
        if spec.k and spec.schedule == "automatic":
            fields["scheduler"] = "Uniform"
    return fields, rest


@dataclass
class Generation:
    """What generate() returns: the images and the resolved request that made them."""
    images: Any  # a list of PIL images, or a (N, C, H, W) tensor (output="tensor" or "latent")
    request: Request
    lora_hashes: dict = dataclasses.field(default_factory=dict)  # the prompt tags' LoRAs: name -> A1111's short hash

    def infotext(self, index=0, model="", model_hash="") -> str:
        text = self.request.infotext(index, model, model_hash)
        if self.lora_hashes:  # as A1111 writes them
            text += ', Lora hashes: "' + ", ".join(f"{k}: {v}" for k, v in self.lora_hashes.items()) + '"'
        return text
