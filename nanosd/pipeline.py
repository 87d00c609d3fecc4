"""`load()` a model and generate images: request -> noise -> sampler(denoiser, steps) -> decoder -> image."""
import dataclasses
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from . import adapters
from .condition import ConditionedUNet, Conditioner, bind_conditioner, to_latent
from .config import Config, load_config
from .controlnet import residuals
from .fast import FeatureCache, choose_precision, keep_freed_buffers, set_threads, token_merging
from .formats import diffusers, sd
from .images import as_tensor, to_pil
from .io import load_into, load_tensors, read_checkpoint, release_freed_memory, save_tensors
from .request import UPSCALERS, Generation, Request
from .run import CONFIG, LORA, TINY_DECODER, WEIGHTS, is_run, load_run
from .samplers import after_step
from .schedule import Schedule
from .seeds import ImageNoise
from .unet import UNet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Pipeline:
    """Pixel models have no autoencoder; latent models sample z and decode x = D(z / scale_factor).
    Conditioned models take prompts (text, or class names) and classifier-free guidance; unconditioned ones can
    take autoguidance (Karras et al. 2024) from `guide`, the same U-Net's weights early in training. One class for
    the models trained here and for Stable Diffusion checkpoints (`family` says which SD family, None for runs)."""

    def __init__(self, unet: UNet, schedule: Schedule, cfg: Config, autoencoder=None, conditioner=None,
                 precision="fp32", guide: UNet | None = None, layout: sd.Family | None = None):
        self.unet, self.schedule, self.cfg, self.layout = unet.eval(), schedule, cfg, layout
        self.guide = guide.eval() if guide is not None else None
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.conditioner = conditioner.eval() if conditioner is not None else None
        if precision not in DTYPES:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.precision, self.precision_why = precision, "asked for"
        if precision != "fp32":  # half-size weights (half the memory, AMX or tensor-core matmuls); the sampler's
            for m in (self.unet, self.guide, self.autoencoder, self.text_encoder, self.text_encoder_2):  # stays fp32
                if m is not None:  # oneDNN's bf16 and cuDNN's half convolutions want channels-last
                    m.to(DTYPES[precision], memory_format=torch.channels_last)
        self.progress = False  # a tqdm bar over the sampler's steps (the CLI turns it on)
        self.vae_tile = 96  # latents larger than this decode in tiles (96 = 768 px for SD)
        self.loras = []  # LoRAs loaded with load_lora, in order
        self.unmerged = {}  # (part, module) -> its weight before LoRAs were merged into it
        self.lora_dirs = []  # where prompt tags <lora:NAME:W> find NAME.safetensors
        self.lora_cache = {}  # (path, mtime) -> the tags' LoRAs, read once
        self.embeddings = {}  # textual inversion: token -> what A1111's /sdapi/v1/embeddings says of it
        self.tiny_decoder = None  # TAESD's decoder (load_tiny_decoder; a run's own distilled one): previews, and
        # final images with decoder="tiny"

    def to(self, device):
        """Every model of the pipeline on `device` (in place; their dtype and channels-last layout kept); the
        sampler's noise is still drawn on the CPU, so a seed gives the same image on any device."""
        for m in (self.unet, self.guide, self.autoencoder, self.conditioner, self.tiny_decoder):
            if m is not None:
                m.to(device)
        return self

    @classmethod
    def of(cls, model, schedule, cfg, autoencoder=None, precision="fp32", guide=None):
        """From what the trainer trains: a UNet, or a ConditionedUNet."""
        if isinstance(model, ConditionedUNet):
            return cls(model.unet, schedule, cfg, autoencoder, model.conditioner, precision)
        return cls(model, schedule, cfg, autoencoder, precision=precision, guide=guide)

    # diffusers' names for the parts
    vae = property(lambda self: self.autoencoder)
    text_encoder = property(lambda self: self.conditioner.text.model if self.conditioner and self.conditioner.text else None)
    tokenizer = property(lambda self: self.conditioner.text.tokenizer if self.conditioner and self.conditioner.text else None)
    text_encoder_2 = property(lambda self: self.conditioner.text2.model if self.conditioner and self.conditioner.text2 else None)

    @property
    def family(self):
        """The Stable Diffusion family ("sd1", "sd2", "sdxl", "sdxl-refiner"), or None for a model trained here."""
        return self.layout.name if self.layout else None

    # what kind of model this is
    @property
    def factor_ae(self):
        return self.autoencoder.cfg.factor if self.autoencoder else 1

    @property
    def factor(self):
        """Sizes must be multiples of this: the autoencoder's factor times the U-Net's."""
        return self.factor_ae * self.cfg.unet.factor

    @property
    def prompted(self):
        return self.conditioner is not None and self.conditioner.prompted

    def state_dict(self) -> dict:
        """The weights in the family's original single-file layout (model.diffusion_model.*, first_stage_model.*,
        and its text encoders' prefixes)."""
        parts = {"unet": self.unet, "vae": self.autoencoder, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return sd.join({name: m.state_dict() for name, m in parts.items() if m is not None}, self.layout or sd.SD1)

    def grid_prompts(self, n):
        """n prompts for a grid: the config's sample.prompts, each for consecutive images (None if unconditioned)."""
        p = self.cfg.sample.prompts
        return [p[i * len(p) // n] for i in range(n)] if self.prompted and p else None

    @torch.no_grad()
    def preview(self, z: torch.Tensor) -> torch.Tensor:
        """A cheap look at one model-space sample (C, H, W) as an image in [0, 1]: pixels as they are, an SD
        family's latents through its linear latent-to-RGB map, small latent models through their decoder."""
        z = z.float().cpu()
        if self.autoencoder is None:
            return (z / 2 + 0.5).clamp(0, 1)
        tiny = self.tiny_decoder is not None
        if self.layout is not None and self.layout.latent_rgb and not tiny:
            rgb = torch.einsum("chw,cr->rhw", z / self.cfg.diffusion.scale_factor, torch.tensor(self.layout.latent_rgb))
            return ((rgb + 1) / 2).clamp(0, 1)
        return (self.decode(z[None], tiny=tiny)[0].float().cpu() / 2 + 0.5).clamp(0, 1)

    def denoiser(self, cond=None, uncond=None, scale=1.0, autoguidance=1.0, rescale=0.0, controls=(), hints=(),
                 step=(0, 1), cfg_end=1.0, cache=None):
        """model(x, t) -> eps, whatever the U-Net was trained to predict. With a condition and scale != 1,
        classifier-free guidance: out = out_uncond + scale (out_cond - out_uncond), both in one batch [uncond; cond]
        as diffusers runs it (eps, v and x_0 are linear in each other at fixed x_t, so guiding the raw output is
        guiding eps). Autoguidance is the same step away from a weaker model: out = guide + w (out - guide).
        `rescale` (diffusers' guidance_rescale, Lin et al. 2023 eq. 16) brings the guided output's standard deviation
        back toward the conditional one's. With sample.clip_x0 (pixel models), the predicted x_0 is clipped to
        [-1, 1]. `controls` (ControlNets, with their `hints`) add residuals to the U-Net's skips at the steps their
        range covers; `step` is (a list holding the current step, the number of steps), kept by the sampling loop.
        Guidance stops after the fraction `cfg_end` of the steps (the conditional branch alone: half the batch);
        `cache` (fast.FeatureCache) is DeepCache's, given to the U-Net."""
        pred, s = self.cfg.diffusion.prediction, self.schedule
        guided = cond is not None and scale != 1.0
        both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()} if guided else None

        def unet(x, t, guiding, **c):
            control = residuals(controls, hints, x, t, c, step[0], step[1], guiding) if controls else None
            out = self.unet(x, t, **c, **({"control": control} if control else {}),
                            **({"cache": cache} if cache else {})).float()
            if autoguidance == 1.0:
                return out
            weak = self.guide(x, t, **c).float()
            return weak + autoguidance * (out - weak)

        def model(x, t):
            t = t.reshape(1).expand(x.shape[0])
            if guided and step[0] < cfg_end * step[1]:
                u, c = unet(torch.cat([x, x]), torch.cat([t, t]), True, **both).chunk(2)
                out = u + scale * (c - u)
                if rescale:
                    dims = list(range(1, out.ndim))
                    rescaled = out * (c.std(dims, keepdim=True) / out.std(dims, keepdim=True))
                    out = rescale * rescaled + (1 - rescale) * out
            else:
                out = unet(x, t, False, **(cond or {}))
            if not self.cfg.sample.clip_x0:
                return s.to_eps(pred, out, x, t)
            x0 = s.to_x0(pred, out, x, t).clamp(-1, 1)
            return s.to_eps("x0", x0, x, t)

        return model

    def encode_prompts(self, r: Request):
        """The U-Net's keyword arguments for a resolved request's prompts and for its negative (or empty) ones."""
        if not self.prompted:
            return ({}, {}) if self.conditioner else (None, None)
        n = len(r.prompt)
        micro = None
        if self.conditioner.cfg.micro:  # SDXL's ids: the same sizes for both halves; the refiner's scores differ
            ids = [*r.original_size, *r.crops_coords_top_left]
            ids = [ids + [*r.target_size]] * 2 if self.conditioner.cfg.micro == "size" else \
                [ids + [r.aesthetic_score], ids + [r.negative_aesthetic_score]]
            micro = torch.tensor([ids[0]] * n + [ids[1]] * n, dtype=torch.float32)
        both = {k: v.float() if v.is_floating_point() else v
                for k, v in self.conditioner([adapters.strip(p) for p in r.prompt + r.negative_prompt], r.clip_skip,
                                             micro).items()
                if v is not None}
        return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}

    def _image(self, image, size, what, channels=None):
        """A PIL image (resized to `size` if it differs, with Lanczos as diffusers does) or a tensor in [0, 1]."""
        channels = channels or (self.autoencoder.cfg.in_channels if self.autoencoder else self.cfg.unet.in_channels)
        if isinstance(image, Image.Image) and size is not None and image.size != (size[1], size[0]):
            image = image.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.LANCZOS)
        return as_tensor(image, channels, what)

    def spatial_condition(self, image, mask, n, size, generator=None):
        """The concatenated channels from a condition image (PIL, or a tensor in [0, 1]) and, for inpainting, a mask
        (white = the hole to fill), checked against what the model was trained on."""
        c = self.conditioner.cfg
        want = {"inpaint": "an image and a mask", "edges": "an edge map", "lowres": "a low-resolution image"}[c.concat]
        if image is None or (c.concat == "inpaint" and mask is None):
            raise ValueError(f"this model is conditioned on {want}: give {'--image' if c.concat != 'inpaint' else want}")
        expect = (size[0] // c.sr_factor, size[1] // c.sr_factor) if c.concat == "lowres" else size
        image = self._image(image, expect if c.concat == "inpaint" else None, "image",
                            1 if c.concat == "edges" else None)
        if tuple(image.shape[-2:]) != tuple(expect):
            raise ValueError(f"the {c.concat} image is {image.shape[-1]}x{image.shape[-2]} px; this model takes "
                             f"{expect[1]}x{expect[0]} here: resize it")
        image = image * 2 - 1 if c.concat != "edges" else (image > 0.5).float()
        if mask is not None:
            mask = (self._mask(mask, image) >= 0.5).float()
        latent = (size[0] // self.factor_ae, size[1] // self.factor_ae)
        return self.conditioner.spatial(image, mask, latent, generator).float().cpu().expand(n, -1, -1, -1)

    def _mask(self, mask, image):
        """The mask in [0, 1] at the image's size (soft where blurred; the hole is where it is >= 1/2)."""
        mask = self._image(mask, tuple(image.shape[-2:]), "mask", 1)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} px but the image is "
                             f"{image.shape[-1]}x{image.shape[-2]}: give a mask of the image's size")
        return mask

    def generate(self, prompt=None, negative_prompt=None, *, image=None, mask=None, callback=None, **fields):
        """Images for a prompt (a list: one image each) as a Generation (.images, and .request: what made them).
        `fields` are those of Request (steps, sampler, cfg_scale, seed, height, width, batch_size, control, ...),
        each defaulting to the model's; control=[nanosd.Control(controlnet, image, scale, start, end)] adds
        ControlNets (any number; img2img and inpaint take them too). `image` (and `mask`) are the spatial condition of a model that concatenates one:
        the image to inpaint and its mask, an edge map, or the low-resolution image to upscale. Seeded as diffusers
        seeds: one generator, drawn from in the order diffusers draws."""
        if self.conditioner and self.conditioner.cfg.concat == "inpaint":  # its image is the one to inpaint
            return self.inpaint(image, mask, prompt, negative_prompt, callback=callback, **fields)
        return self(Request(prompt, negative_prompt, image=image, **fields), callback)

    def img2img(self, image, prompt=None, negative_prompt=None, *, strength=0.75, callback=None, **fields):
        """SDEdit: the image noised to the step that `strength` of the schedule leaves, then denoised from there."""
        return self(Request(prompt, negative_prompt, init=image, strength=strength, **fields), callback)

    def inpaint(self, image, mask, prompt=None, negative_prompt=None, *, strength=1.0, callback=None, **fields):
        """Fill the white part of `mask`. An inpainting U-Net (SD's 9-channel one, or one trained here) reads the
        mask and the masked image; any other model keeps the unmasked part by blending it in, noised to the
        current step, after every step (diffusers' way for a standard U-Net); sample.inpaint_blend makes an
        inpainting U-Net blend too (A1111's way). `overlay=` (default: sample.inpaint_overlay) pastes the original
        pixels back outside the mask after decoding, as A1111 does, so that they are exactly the image's."""
        return self(Request(prompt, negative_prompt, init=image, mask=mask, strength=strength, **fields), callback)

    def outpaint(self, image, prompt=None, negative_prompt=None, *, left=0, right=0, up=0, down=0, callback=None,
                 **fields):
        """Extend the canvas on the chosen sides (px, each rounded up to the model's multiple) and inpaint the new
        area: A1111's outpainting, as inpainting with the hole pre-filled from the image's edge ("fill") and the seam
        blurred (mask_blur, default 8 px); whole-canvas inpainting (inpaint_full_res off)."""
        canvas, mask = extend_canvas(image, left, right, up, down, self.factor)
        fields = {"inpainting_fill": "fill", "mask_blur": 8, **fields}
        return self(Request(prompt, negative_prompt, init=canvas, mask=mask, strength=fields.pop("strength", 1.0),
                            **fields), callback)

    def load_lora(self, path, weight=1.0, merge=False):
        """Patch the U-Net and text encoders with a LoRA file (kohya/A1111 or diffusers/PEFT), at `weight`; several
        may be loaded, each with its own weight. merge=True adds it into the weights (faster sampling)."""
        lora = adapters.read(path, self)
        lora.weights = {"text": weight, "unet": weight}
        adapters.attach(self, lora, merge)
        self.loras.append(lora)
        return lora

    def load_tiny_decoder(self, path):
        """TAESD's decoder for this model's latents (taesd_decoder for SD 1.x/2.x, taesdxl_decoder for SDXL; TAESD's
        own files or diffusers' AutoencoderTiny): previews use it, and generate(decoder="tiny") final images."""
        from .autoencoder import TinyDecoder

        tiny = TinyDecoder.from_tensors(read_checkpoint(path), f"tiny decoder {path}")
        z, want = self.cfg.unet.in_channels, self.autoencoder.cfg if self.autoencoder else None
        if want is None or tiny[1].weight.shape[1] != z or tiny.factor != self.factor_ae:
            raise ValueError(f"tiny decoder {path} decodes {tiny[1].weight.shape[1]}-channel latents {tiny.factor}x "
                             f"smaller than images; this model's are " + (f"{z}-channel, {self.factor_ae}x" if want
                             else "pixels (no autoencoder)") + ": give the one made for this model's VAE")
        like = next(self.autoencoder.parameters())
        self.tiny_decoder = tiny.to(like.device, like.dtype).eval()
        return tiny

    def load_embedding(self, path, token=None):
        """A textual-inversion embedding, used where a prompt (or negative prompt) has `token` (default: the file's
        stem, as A1111 names them) as a word."""
        token = token or Path(path).stem
        found = adapters.read_embedding(path, self)
        for part, vectors in found.items():
            self.conditioner.encoders()[part].add_embedding(token, vectors)
        first = next(iter(found.values()))
        self.embeddings[token] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": first.shape[-1], "vectors": first.shape[0]}
        return token

    def unload_loras(self):
        """Back to the base weights, exactly (hooks removed, merged weights restored)."""
        for lora in self.loras:
            adapters.detach(self, lora)
        adapters.restore(self)
        self.loras.clear()

    @torch.no_grad()
    def __call__(self, request: Request, callback=None) -> Generation:
        """The one sampling path: resolve the request, then draw, sample and decode. LoRAs named in the prompts
        (<lora:NAME:W>) patch the model for this generation only, as in A1111."""
        r = request.resolve(self)
        tagged = []
        try:
            for name, text_w, unet_w in adapters.tags((r.prompt or []) + (r.negative_prompt or [])):
                tagged.append(adapters.cached(self, name))
                tagged[-1].weights = {"text": text_w, "unet": unet_w}
                adapters.attach(self, tagged[-1])
            made = self._hires(r, callback) if r.hires is not None else self._masked(r, callback)
            made.lora_hashes = {lora.name: lora.hash for lora in tagged}
            return made
        finally:
            for lora in reversed(tagged):
                adapters.detach(self, lora)

    def _masked(self, r: Request, callback=None) -> Generation:
        """A1111's inpainting options around the one sampling path: the mask inverted and blurred (the blur softens
        the paste-back; the hole is where the blurred mask is at least half), the hole pre-filled from its
        surroundings ("fill"), and "only masked" (inpaint_full_res): the mask's box, padded and widened to the
        request's aspect, cut out, inpainted at the request's size, and pasted back through the blurred mask."""
        if r.mask is None or not (r.mask_blur or r.inpainting_mask_invert or r.inpainting_fill != "original"
                                  or r.inpaint_full_res):
            return self._generate(r, callback)
        def picture(x, channels, what):  # these options act on one picture and one mask
            if isinstance(x, Image.Image):
                return x.convert("L" if channels == 1 else "RGB")
            x = as_tensor(x, channels, what)
            if len(x) > 1:
                raise ValueError(f"A1111's inpainting options take one {what} for the batch: give a single {what}")
            return to_pil(x[0])

        mask, image = picture(r.mask, 1, "mask"), picture(r.init, 3, "image")
        mask = mask.point(lambda v: 255 if v > 128 else 0)  # A1111 rounds the mask before it blurs it
        if r.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if r.mask_blur:  # A1111's kernel for a blur of sigma px
            k = 2 * int(2.5 * r.mask_blur + 0.5) + 1
            mask = Image.fromarray(cv2.GaussianBlur(np.asarray(mask), (k, k), r.mask_blur))
        if r.inpainting_fill != "original":  # A1111 fills the pixels for the latent fills too (then replaced)
            image = fill_hole(image, mask)
        if not r.inpaint_full_res:
            return self._generate(dataclasses.replace(r, init=image, mask=mask), callback)
        box = crop_region(mask, r.inpaint_full_res_padding, r.width, r.height)
        inner = dataclasses.replace(r, init=image.crop(box).resize((r.width, r.height), Image.LANCZOS),
                                    mask=mask.crop(box).resize((r.width, r.height), Image.LANCZOS), output="tensor",
                                    overlay=False)  # the paste-back below lays the original over it
        made = self._generate(inner, callback)
        out = []
        for im in made.images:  # pasted back, then the original over it where the blurred mask keeps it
            pasted = image.copy()
            pasted.paste(to_pil(im).resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
            out.append(Image.composite(pasted, image, mask))
        return Generation(out if r.output == "pil" else torch.cat([as_tensor(im, 3, "image") for im in out]), r)

    def _hires(self, r: Request, callback=None) -> Generation:
        """A1111's hires fix: the image at the request's size, upscaled, then redrawn as img2img: `hr steps` steps,
        the last of int(hr steps / strength) (A1111's count), with noise drawn again at the new size."""
        h = r.hires
        low = self._generate(dataclasses.replace(r, hires=None, output="latent"), callback).images
        height, width = h.size(r.height, r.width, self.factor)
        mode = UPSCALERS[h.upscaler]
        if mode in ("lanczos", "nearest-pixels"):  # in pixels: decode, resize, encode again
            resample = Image.LANCZOS if mode == "lanczos" else Image.NEAREST
            pixels = torch.cat([self._image(to_pil((im / 2 + 0.5).clamp(0, 1)).resize((width, height), resample),
                                              None, "image") for im in self.decode(low).float().cpu()]) * 2 - 1
            x0 = self.to_model_space(pixels, torch.Generator().manual_seed(r.seed))
        else:
            f = self.factor_ae
            x0 = torch.nn.functional.interpolate(low.float(), (height // f, width // f), mode=mode.split("-anti")[0],
                                                 antialias=mode.endswith("antialiased"))
        steps = h.steps or r.steps
        total = int(steps / min(h.strength, 0.999))
        second = dataclasses.replace(r, hires=None, height=height, width=width, steps=total, strength=h.strength)
        made = self._generate(second, callback, x0=x0.cpu(), skip=total - steps)
        return Generation(made.images, r)

    def _generate(self, r: Request, callback=None, x0=None, skip=None) -> Generation:
        """`x0`: the start in model space (the hires fix's upscaled latents), with `skip` steps of r.steps skipped;
        else skipped as strength says (diffusers' get_timesteps, or A1111's count in A1111 seed mode)."""
        spec, n, size = r.sampler, r.batch_size, (r.height, r.width)
        latent_size = (size[0] // self.factor_ae, size[1] // self.factor_ae)
        a1111 = r.noise == "a1111"
        cond, uncond = self.encode_prompts(r)
        g = torch.Generator().manual_seed(r.seed)
        sched = spec.steps(self.schedule, r.steps, a1111, self.family in ("sdxl", "sdxl-refiner"))
        if r.init is not None or x0 is not None:  # skip the first (1 - strength) of the steps
            if skip is None:
                skip = r.steps - int(min(r.strength, 0.999) * r.steps) - 1 if a1111 else \
                    r.steps - min(int(r.steps * r.strength), r.steps)
            sched = sched[skip:]
            if len(sched) < 1:
                raise ValueError(f"strength {r.strength} leaves no steps out of {r.steps}: raise either")
        concat = self.conditioner.cfg.concat if self.conditioner else ""
        # the generator's draws, in diffusers' order: E(image), the noise, E(masked image), the sampler's
        pixels = (self._image(r.init, size, "image") * 2 - 1) if r.init is not None else None
        soft = self._mask(r.mask, pixels) if r.mask is not None else None  # the overlay's; the hole is >= 1/2
        m = (soft >= 0.5).float() if soft is not None else None
        inpainting = m is not None
        # A1111 keeps the unmasked part by putting the known latents in place of the predicted x_0 at every step
        # (any model); diffusers blends them in after each step, noised (a standard U-Net; sample.inpaint_blend)
        a1111_blend = inpainting and a1111
        blend = inpainting and not a1111 and (not concat or self.cfg.sample.inpaint_blend)
        if r.init is not None and (not inpainting or r.strength < 1 or blend or a1111_blend):
            x0 = self.to_model_space(pixels, g)
        latent_fill = inpainting and x0 is not None and r.inpainting_fill in ("latent noise", "latent nothing")
        ch = self.cfg.unet.in_channels
        draws = g  # where the samplers' fresh noise comes from
        if r.latents is not None:
            noise = r.latents.float()
        elif a1111:  # a generator per image; the samplers' fresh noise comes from them too
            seeds, subseeds = zip(*r.image_seeds())
            draws = ImageNoise((ch, *latent_size), seeds, r.rng, subseeds, r.subseed_strength,
                           (r.seed_resize_from_w, r.seed_resize_from_h), r.eta_noise_seed_delta, self.factor_ae)
            noise = draws.first()
        else:
            noise = torch.randn((n, ch, *latent_size), generator=g)
        x0 = x0.expand(n, -1, -1, -1) if x0 is not None else None
        start = x0
        if latent_fill:  # A1111's latent noise / latent nothing: the hole starts from the noise, or from zeros
            hole = torch.nn.functional.interpolate(m, size=latent_size).round()
            start = x0 * (1 - hole) + (noise if r.inpainting_fill == "latent noise" else 0) * hole
        x = spec.start(sched, noise, start if x0 is not None and (not inpainting or r.strength < 1 or a1111) else None)
        if concat:
            image = (pixels + 1) / 2 if inpainting else r.image
            cond = dict(cond or {}, concat=self.spatial_condition(image, m, n, size, g))
            uncond = dict(uncond or {}, concat=cond["concat"])
        elif inpainting and not a1111:  # diffusers encodes the masked image here for a standard U-Net, unused
            torch.randn((1, ch, *latent_size), generator=g)
        device = next(self.unet.parameters()).device  # a model trained on a GPU samples there
        if blend:  # keep the unmasked part: the known latents, noised to the current step, after each step
            # a latent cell is repainted where its nearest mask pixel is white (diffusers' rule, for a standard
            # U-Net); an inpainting U-Net repaints only the cells wholly inside the hole, so that the kept pixels
            # decode from their own latents
            hole = -torch.nn.functional.max_pool2d(-m, self.factor_ae) if concat else \
                torch.nn.functional.interpolate(m, size=latent_size)
            keep, x0, noise = (1 - hole).to(device), x0.to(device), noise.to(device)  # moved once, not every step
            user_callback = callback

            def callback(i, t, x, x0_hat):
                known = x0 if i + 1 == len(sched) else spec.noised(sched, x0, noise, i + 1)
                return after_step(user_callback, i, t, keep * known + (1 - keep) * x, x0_hat)
        cond, uncond = ({k: v.to(device) for k, v in d.items()} if d else d for d in (cond, uncond))
        step = [0, len(sched)]  # the step being taken, for the ControlNets' ranges
        with tqdm(total=len(sched), desc=spec.a1111, disable=not self.progress, leave=False) as bar:
            def progress(i, t, x, x0_hat):
                step[0] = i + 1
                out = after_step(callback, i, t, x, x0_hat)
                bar.n = i + 1
                bar.refresh()
                return out

            for c in r.control:  # ControlNets run where the U-Net does, in its precision
                c.net.to(device, next(self.unet.parameters()).dtype)
            hints = [c.hint(r.height, r.width, n, r.mask).to(device) for c in r.control]
            cache = FeatureCache(r.cache_interval, r.cache_depth) if r.cache_interval > 1 else None
            denoiser = self.denoiser(cond, uncond, r.cfg_scale, r.autoguidance, r.guidance_rescale, r.control, hints,
                                     step, r.cfg_end, cache)
            if a1111_blend:  # A1111's latent mask: the (blurred) mask resized as a picture, then rounded
                lat = [np.asarray(to_pil(mm).resize(latent_size[::-1], Image.BICUBIC), np.float32) / 255 for mm in soft]
                keep = 1 - torch.from_numpy(np.stack(lat)[:, None]).round().to(device)
                denoiser = keep_known(denoiser, keep, x0.to(device), self.schedule)
            with token_merging(self.unet, r.tome, latent_size, r.seed):
                z = spec(denoiser, x.to(device), sched, generator=draws, callback=progress, eta=r.eta)
            if a1111_blend:
                z = z * (1 - keep) + x0.to(device) * keep
        if r.output == "latent":
            return Generation(z, r)
        release_freed_memory()  # the sampler's: the decoder's peak comes on top of what is held
        images = (self.decode(z, tiny=r.decoder == "tiny").float() / 2 + 0.5).clamp(0, 1).cpu()
        if inpainting and r.overlay:  # the decoder's error outside the hole undone; A1111's seam: the mask doubled
            over = (2 * soft).clamp(max=1)
            images = over * images + (1 - over) * (pixels + 1) / 2
        return Generation(images if r.output == "tensor" else [to_pil(im) for im in images], r)

    def to_model_space(self, pixels, generator=None):
        """Pixels in [-1, 1] -> the model's space: scale * a sample of E(x) (with the generator), or x itself."""
        if self.autoencoder is None:
            return pixels
        pixels = pixels.to(self.autoencoder.quant_conv.weight.device)
        return to_latent(self.autoencoder, pixels, self.cfg.diffusion.scale_factor, generator).cpu()

    def decode(self, z, tile: int | None = None, overlap: int = 16, tiny=False):
        """Model space -> pixels in [-1, 1] (the identity for pixel models). Latents larger than `tile` (default
        self.vae_tile, 96 = 768 px for SD) decode in overlapping tiles, feathered together, so memory stays that
        of one tile whatever the size. tiny=True: through the tiny decoder (whole: its memory is small)."""
        if self.autoencoder is None:
            return z
        if tiny:
            return torch.cat([self.tiny_decoder(b).float() for b in z.split(64)])
        z = z / self.cfg.diffusion.scale_factor
        tile = tile or self.vae_tile
        if max(z.shape[-2:]) <= tile:
            return torch.cat([self.autoencoder.decode(b).float() for b in z.split(64)])
        f, (H, W) = self.factor_ae, z.shape[-2:]
        out = weight = 0
        for y in _starts(H, tile, overlap):
            for x in _starts(W, tile, overlap):
                part = self.autoencoder.decode(z[..., y:y + tile, x:x + tile]).float()
                h, w = part.shape[-2:]
                ramp = (_ramp(h, overlap * f, y == 0, y + tile >= H)[:, None] * _ramp(w, overlap * f, x == 0, x + tile >= W))
                pad = (x * f, W * f - x * f - w, y * f, H * f - y * f - h)
                out = out + torch.nn.functional.pad(part * ramp, pad)
                weight = weight + torch.nn.functional.pad(ramp, pad)
        return out / weight


def keep_known(model, keep, known, schedule):
    """model(x, t) -> eps, with the predicted x_0 replaced by `known` where keep is 1 (A1111's inpainting: its
    CFGDenoiser's denoised = init * mask + nmask * denoised, at k-diffusion's sigma of t)."""
    from .samplers import k_t_to_sigma

    def blended(x, t):
        eps = model(x, t)
        sigma = k_t_to_sigma(schedule, t.float().cpu()).item()
        alpha, s = 1 / (1 + sigma**2) ** 0.5, sigma / (1 + sigma**2) ** 0.5  # x = alpha x_0 + s eps
        return (1 - keep) * eps + keep * (x - alpha * known) / s

    return blended


def extend_canvas(image: Image.Image, left=0, right=0, up=0, down=0, factor=8):
    """The image on a larger canvas (each added side rounded up so both sides are multiples of `factor`; the new
    area black) and the outpainting mask (white = the new area)."""
    if min(left, right, up, down) < 0 or not (left or right or up or down):
        raise ValueError("outpaint: give how many px to add on at least one side (left, right, up, down >= 0)")
    image = image.convert("RGB")
    w, h = image.size

    def rounded(size, a, b):  # the sides' px grown so that the canvas is a multiple of factor (b's side if neither)
        pad = -(size + a + b) % factor
        return (a + pad // 2, b + pad - pad // 2) if a and b else (a + pad, b) if a else (a, b + pad)

    (left, right), (up, down) = rounded(w, left, right), rounded(h, up, down)
    W, H = w + left + right, h + up + down
    canvas, mask = Image.new("RGB", (W, H)), Image.new("L", (W, H), 255)
    canvas.paste(image, (left, up))
    mask.paste(0, (left, up, left + w, up + h))
    return canvas, mask


def fill_hole(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the hole painted with its surroundings, blurred ever less (the kept pixels spread inward)."""
    keep = 1 - np.asarray(mask, np.float32)[..., None] / 255
    kept = np.asarray(image.convert("RGB"), dtype=np.float32) * keep
    out = np.zeros_like(kept)
    for sigma, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blur = (lambda a: cv2.GaussianBlur(a, (0, 0), sigma)) if sigma else (lambda a: a)
        colour, weight = blur(kept), blur(np.ascontiguousarray(keep[..., 0]))[..., None]
        colour = colour / np.maximum(weight, 1e-6)  # the average of the kept pixels nearby
        for _ in range(repeats):  # composited over what is there, as A1111's alpha_composite of the blurred copy
            out = colour * weight + out * (1 - weight)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple:
    """A1111's "only masked" box: the mask's bounding box plus padding, widened to width:height within the image."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        raise ValueError("the mask is empty: paint the area to inpaint white")
    W, H = mask.size
    x1, y1, x2, y2 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, W), min(box[3] + padding, H)
    w, h = x2 - x1, y2 - y1
    if w / h < width / height:  # too tall: widen
        grow = min(round(h * width / height) - w, W - w)
        x1 = max(0, min(x1 - grow // 2, W - w - grow))
        x2 = x1 + w + grow
    else:  # too wide: heighten
        grow = min(round(w * height / width) - h, H - h)
        y1 = max(0, min(y1 - grow // 2, H - h - grow))
        y2 = y1 + h + grow
    return x1, y1, x2, y2


def _starts(n, tile, overlap):
    """Tile origins along a side of n: every tile - overlap, the last flush with the end."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def _ramp(n, overlap, first, last):
    """A tile's weight along one side: 1 inside, rising over the overlap where another tile shares the border."""
    r = torch.ones(n)
    edge = torch.linspace(0, 1, overlap + 2)[1:-1]
    if not first:
        r[:overlap] = edge
    if not last:
        r[-overlap:] = edge.flip(0)
    return r


def load(path, precision="auto", compile=False, vae=None, ema=False, config=None, family=None,
         prediction=None, threads=None, device=None) -> Pipeline:
    """A run folder trained here, a Stable Diffusion single file (.safetensors, or .ckpt read without unpickling
    code) of any family nanosd knows, or a diffusers folder; `vae` replaces the model's autoencoder with another
    file's. A single file's family and architecture are told from its keys and shapes (`family=` checks it), or
    read from `config` (a diffusers folder's config files, as diffusers' from_single_file takes them); a file cannot
    say whether it predicts eps or v: `prediction=` ("eps", "v") says so (SD 2.x's 768-v models), else eps is
    assumed and said. ema=True takes a single file's EMA U-Net. compile=True compiles the U-Net (torch.compile;
    the first image pays for it). precision: "auto" (bf16 where this CPU does it faster, bf16 or fp16 on a GPU:
    fast.choose_precision), "fp32" (exact: diffusers' images to 1e-4), "bf16" or "fp16". threads: torch's (default:
    one per physical core). device: where the models run ("cpu", "cuda", "cuda:1"; default: the GPU if there is
    one, as A1111 does)."""
    path = Path(path)
    if precision not in (*DTYPES, "auto"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    device = _device(device)
    set_threads(threads)  # first: the precision's micro-benchmark measures at these threads
    keep_freed_buffers()
    if precision == "auto":
        precision, why = choose_precision(device=device)
        pipe = load(path, precision, compile, vae, ema, config, family, prediction, threads, device)
        pipe.precision_why = why
        return pipe
    if not path.is_file() and (ema or config is not None):  # never ignored: refused where they mean nothing
        raise ValueError(f"{'ema=' if ema else 'config='} applies to SD single files, not to the folder {path}")
    if family is not None and family not in sd.FAMILIES:
        raise ValueError(f"unknown family {family!r}: nanosd has {', '.join(sd.FAMILIES)}")
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be eps or v, got {prediction!r}")
    if is_run(path):
        if vae is not None or family is not None or prediction is not None:
            raise ValueError("vae=, family= and prediction= apply to Stable Diffusion checkpoints, not to run folders")
        run = load_config(path / CONFIG)
        if run.controlnet:  # it steers a model with an image: there is no model to load without one
            raise ValueError(f"{path} is a ControlNet run: generate with its base and the run as the ControlNet "
                             f"(nanosd generate {run.controlnet.base} PROMPT --controlnet {path} --control-image IMG)")
        if (lora := run.lora) is not None:  # a LoRA (or textual-inversion) run: its base, patched
            pipe = load(lora.base, precision, compile, device=device)
            if lora.embedding:
                pipe.load_embedding(path / f"{lora.embedding}.safetensors")
            else:
                pipe.load_lora(path / LORA)
            return pipe
        if run.init:  # a fine-tune: its base with the U-Net it learned
            pipe = load(run.init, precision, compile=False, device=device)
            unet = {k.removeprefix("unet."): v for k, v in load_tensors(path / WEIGHTS).items()}
            load_into(pipe.unet, unet, f"{path / WEIGHTS}")  # copied into the weights in their precision
            pipe.unet = torch.compile(pipe.unet) if compile else pipe.unet
            return pipe
        cfg, model, ae, guide = load_run(path)
        pipe = Pipeline.of(model, Schedule.of(cfg.diffusion), cfg, ae, precision, guide)
        if (tiny := path / TINY_DECODER / WEIGHTS).exists():
            pipe.load_tiny_decoder(tiny)
    elif path.is_dir() and (path / "unet").is_dir():
        archs, scheduler, scale, size, found = diffusers.configs(path)
        _check_family(found, family, path)
        cfg = sd.config(*archs, _predicting(scheduler, prediction), scale, size, found)
        pipe = build(cfg, diffusers.read(path, archs, DTYPES[precision], found), str(path), found,
                     _tokenizers(path, found), precision)
    elif path.is_file():
        found, parts = sd.read(path, DTYPES[precision], ema)  # cast as read: one copy in memory
        _check_family(found, family, path)
        if config is None:
            if prediction is None and found.name == "sd2":
                warnings.warn(f"{path.name}: an SD 2.x file does not say what it predicts; eps assumed (512 px "
                              "models). For 768-v models pass prediction='v' (--prediction v)", stacklevel=2)
            cfg, tokenizers = sd.config(*sd.infer(parts, found), _predicting({}, prediction), family=found), None
        else:
            archs, scheduler, scale, size, _ = diffusers.configs(Path(config))
            cfg = sd.config(*archs, _predicting(scheduler, prediction), scale, size, found)
            tokenizers = _tokenizers(Path(config), found)
        pipe = build(cfg, parts, str(path), found, tokenizers, precision)
    elif path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run folder (config.toml) nor a diffusers folder (unet/, vae/, ...)")
    else:
        raise FileNotFoundError(f"model {path} not found: give a run folder, a .safetensors/.ckpt file or a diffusers folder")
    if vae is not None:
        replace_vae(pipe, vae)
    pipe.to(device)
    if compile:
        pipe.unet = torch.compile(pipe.unet)
    release_freed_memory()  # the read buffers: before sampling adds its own peak
    return pipe


def _device(device) -> torch.device:
    """The device asked for (default: the first GPU if there is one, else the CPU), refused where it is not here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"device {device} is not on this machine ({torch.cuda.device_count()} CUDA GPUs seen by "
                         f"torch {torch.__version__}): give device='cpu' or install torch's CUDA build")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: nanosd runs on cpu or cuda")
    return device


def _check_family(found, family, path):
    if family is not None and family != found.name:
        raise ValueError(f"{path} is an {found.name} model, not {family}: load it without family= or with "
                         f"family={found.name!r}")


def _predicting(scheduler: dict, prediction):
    return {**scheduler, "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[prediction]} if prediction \
        else scheduler


def build(cfg: Config, parts: dict, where: str, layout=sd.SD1, tokenizers=None, precision="fp32") -> Pipeline:
    """An SD pipeline: the models of `cfg` built on the meta device, then given the checkpoint's tensors (our
    names, by part) with no random init."""
    from .autoencoder import Autoencoder

    dtype = DTYPES[precision]
    with torch.device("meta"):
        unet, ae = UNet(cfg.unet), Autoencoder(cfg.autoencoder)
        conditioner = Conditioner(cfg.condition, tokenizers)
    # popped: the models then hold the only reference, so converting them (channels-last for bf16) frees as it goes
    load_into(unet, parts.pop("unet"), f"{where}: the U-Net", assign=True, dtype=dtype)
    load_into(ae, diffusers.fit_shapes(ae, parts.pop("vae")), f"{where}: the VAE", assign=True, dtype=dtype)
    for part in layout.texts:
        load_into(getattr(conditioner, part), parts.pop(part), f"{where}: the {part.replace('_', ' ')}",
                  assign=True, dtype=dtype)
    return Pipeline(unet, Schedule.of(cfg.diffusion), cfg, ae, bind_conditioner(conditioner, ae, cfg), precision,
                    layout=layout)


def _tokenizers(folder: Path, family: sd.Family):
    """The folder's tokenizers for our text parts (None where it has none: the CLIP vocabulary's own)."""
    from .text import CLIPTokenizer

    subs = [sub.replace("text_encoder", "tokenizer") for sub in diffusers.text_folders(family).values()]
    found = [CLIPTokenizer.from_folder(folder / sub) if (folder / sub).is_dir() else None for sub in subs]
    return tuple(found + [None])[:2]


def replace_vae(pipe: Pipeline, path):
    """Another VAE's weights (a fine-tuned SD VAE): a file in the original layout, with or without the
    single file's VAE prefix, or in diffusers' names."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"VAE folder {path} has no .safetensors weights")
        path = files[0]
    tensors = sd.vae_tensors(read_checkpoint(path), pipe.layout or sd.SD1)
    back = {theirs: ours for ours, theirs in diffusers.names("vae", pipe.autoencoder).items()}
    tensors = {back.get(k, k): v for k, v in tensors.items()}
    load_into(pipe.autoencoder, {k: v.float() for k, v in diffusers.fit_shapes(pipe.autoencoder, tensors).items()},
              f"VAE {path}")


def save(pipe: Pipeline, path, dtype=None):
    """The pipeline as one file in the original SD layout (.safetensors; other SD tools read it), or as a
    diffusers folder when `path` has no .safetensors suffix."""
    path = Path(path)
    if pipe.text_encoder is None or pipe.autoencoder is None:
        raise ValueError("only text-conditioned latent models (Stable Diffusion's shape) save as SD checkpoints")
    if path.suffix == ".safetensors":
        save_tensors({k: v.to(dtype) if dtype else v for k, v in pipe.state_dict().items()}, path)
    elif path.suffix:
        raise ValueError(f"{path}: save to a .safetensors file, or to a folder (diffusers layout)")
    else:
        diffusers.write(path, pipe)
    return path
