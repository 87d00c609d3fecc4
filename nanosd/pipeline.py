"""`load()` a model and `generate()` images: noise -> sampler(denoiser, steps) -> image."""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from .checkpoint import GUIDE, PREFIXES, load_into, load_tensors
from .condition import ConditionedUNet, Conditioner, bind_conditioner, to_latent
from .config import Config, load_config
from .samplers import A1111_OF, after_step, canonical, get_sampler, make_steps, noised, start
from .schedule import Schedule
from .unet import UNet, UNetConfig


class Pipeline:
    """Pixel models have no autoencoder; latent models sample z and decode x = D(z / scale_factor).
    Conditioned models take prompts (text, or class names) and classifier-free guidance; unconditioned ones can
    take autoguidance (Karras et al. 2024) from `guide`, the same U-Net's weights early in training. One class for
    the models trained here and for Stable Diffusion checkpoints."""

    def __init__(self, unet: UNet, schedule: Schedule, cfg: Config, autoencoder=None, conditioner=None,
                 precision="fp32", guide: UNet | None = None):
        self.unet, self.schedule, self.cfg = unet.eval(), schedule, cfg
        self.guide = guide.eval() if guide is not None else None
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.conditioner = conditioner.eval() if conditioner is not None else None
        if precision not in DTYPES:
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.precision = precision
        if precision == "bf16":  # weights in bf16 (half the memory, AMX matmuls); the sampler's arithmetic stays fp32
            for m in (self.unet, self.guide, self.autoencoder, self.text_encoder):
                if m is not None:  # oneDNN's bf16 convolutions want channels-last
                    m.to(torch.bfloat16, memory_format=torch.channels_last)
        self.progress = False  # a tqdm bar over the sampler's steps (the CLI turns it on)
        self.vae_tile = 96  # latents larger than this decode in tiles (96 = 768 px for SD)

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

    def state_dict(self) -> dict:
        """The weights in the original SD single-file layout (model.diffusion_model.*, first_stage_model.*,
        cond_stage_model.transformer.text_model.*)."""
        parts = {"unet": self.unet, "vae": self.autoencoder, "text_encoder": self.text_encoder}
        return {PREFIXES[name] + k: v for name, m in parts.items() if m is not None for k, v in m.state_dict().items()}

    def grid_prompts(self, n):
        """n prompts for a grid: the config's sample.prompts, each for consecutive images (None if unconditioned)."""
        p = self.cfg.sample.prompts
        return [p[i * len(p) // n] for i in range(n)] if self.conditioner and self.conditioner.prompted and p else None

    def denoiser(self, cond=None, uncond=None, scale=1.0, autoguidance=1.0):
        """model(x, t) -> eps, whatever the U-Net was trained to predict. With a condition and scale != 1,
        classifier-free guidance: out = out_uncond + scale (out_cond - out_uncond), both in one batch [uncond; cond]
        as diffusers runs it (eps, v and x_0 are linear in each other at fixed x_t, so guiding the raw output is
        guiding eps). Autoguidance is the same step away from a weaker model: out = guide + w (out - guide).
        With sample.clip_x0 (pixel models), the predicted x_0 is clipped to [-1, 1]."""
        pred, s = self.cfg.diffusion.prediction, self.schedule
        guided = cond is not None and scale != 1.0
        if guided:
            cond = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}

        def unet(x, t, **c):
            out = self.unet(x, t, **c).float()
            if autoguidance == 1.0:
                return out
            weak = self.guide(x, t, **c).float()
            return weak + autoguidance * (out - weak)

        def model(x, t):
            t = t.reshape(1).expand(x.shape[0])
            if guided:
                u, c = unet(torch.cat([x, x]), torch.cat([t, t]), **cond).chunk(2)
                out = u + scale * (c - u)
            else:
                out = unet(x, t, **(cond or {}))
            if not self.cfg.sample.clip_x0:
                return s.to_eps(pred, out, x, t)
            x0 = s.to_x0(pred, out, x, t).clamp(-1, 1)
            return s.to_eps("x0", x0, x, t)

        return model

    def conditions(self, prompt, negative_prompt, batch_size, clip_skip=1):
        """The U-Net's keyword arguments for the prompts and for the negative (or empty) ones."""
        self.prompts = None
        c = self.conditioner
        if c is None or not c.prompted:
            if prompt:
                raise ValueError("this model was trained without text or labels: generate without a prompt")
            return ({}, {}, batch_size) if c else (None, None, batch_size)
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("this model is conditioned: give a non-empty prompt"
                             + (f" (one of: {', '.join(c.classes)})" if c.classes else ""))
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one each")
        c.check(prompts + negatives)
        self.prompts = list(zip(prompts, negatives))
        both = {k: v.float() if v.is_floating_point() else v
                for k, v in c(prompts + negatives, clip_skip).items() if v is not None}
        n = len(prompts)
        return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}, n

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
            mask = self._mask(mask, image)
        latent = (size[0] // self.factor_ae, size[1] // self.factor_ae)
        return self.conditioner.spatial(image, mask, latent, generator).float().cpu().expand(n, -1, -1, -1)

    def _mask(self, mask, image):
        mask = self._image(mask, tuple(image.shape[-2:]), "mask", 1)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} px but the image is "
                             f"{image.shape[-1]}x{image.shape[-2]}: give a mask of the image's size")
        return (mask >= 0.5).float()

    @property
    def factor_ae(self):
        return self.autoencoder.cfg.factor if self.autoencoder else 1

    def generate(self, prompt=None, negative_prompt=None, *, steps=None, sampler=None, cfg_scale=None, seed=None,
                 height=None, width=None, batch_size=1, latents=None, eta=None, clip_skip=1, image=None, mask=None,
                 callback=None, output="pil", autoguidance=None):
        """batch_size images (one per prompt when prompt is a list) from one seeded generator, consumed in the
        order diffusers consumes it. DDPM defaults to every timestep of the schedule; cfg_scale defaults to the
        run's. `image` (and `mask`) are the spatial condition of models that concatenate one: the image to inpaint
        and its mask, an edge map, or the low-resolution image to upscale. autoguidance defaults to the run's."""
        kw = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, height=height, width=width,
                  batch_size=batch_size, latents=latents, eta=eta, clip_skip=clip_skip, callback=callback, output=output,
                  autoguidance=autoguidance)
        if self.conditioner and self.conditioner.cfg.concat == "inpaint":
            if image is None or mask is None:
                raise ValueError("this model is conditioned on an image and a mask: give an image and a mask")
            return self.inpaint(image, mask, prompt, negative_prompt, **kw)
        return self._sample(prompt, negative_prompt, cond_image=image, **kw)

    def img2img(self, image, prompt=None, negative_prompt=None, *, strength=0.75, **kw):
        """SDEdit: the image noised to the step that `strength` of the schedule leaves, then denoised from there."""
        return self._sample(prompt, negative_prompt, init=image, strength=strength, **kw)

    def inpaint(self, image, mask, prompt=None, negative_prompt=None, *, strength=1.0, **kw):
        """Fill the white part of `mask`. An inpainting U-Net (SD's 9-channel one, or one trained here) reads the
        mask and the masked image; any other model keeps the unmasked part by blending it in, noised to the
        current step, after every step (diffusers' way for a standard U-Net); sample.inpaint_blend makes an
        inpainting U-Net blend too (A1111's way). `overlay=` (default: sample.inpaint_overlay) pastes the original
        pixels back outside the mask after decoding, as A1111 does, so that they are exactly the image's."""
        return self._sample(prompt, negative_prompt, init=image, mask=mask, strength=strength, **kw)

    @torch.no_grad()
    def _sample(self, prompt, negative_prompt, *, init=None, mask=None, cond_image=None, strength=1.0, steps=None,
                sampler=None, cfg_scale=None, seed=None, height=None, width=None, batch_size=1, latents=None, eta=None,
                clip_skip=1, callback=None, output="pil", overlay=None, autoguidance=None):
        if output not in ("pil", "tensor", "latent"):
            raise ValueError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        sampler = canonical(sampler or self.cfg.sample.sampler)
        steps = steps or (self.schedule.timesteps if sampler == "ddpm" else self.cfg.sample.steps)
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        cond, uncond, n = self.conditions(prompt, negative_prompt, batch_size, clip_skip)
        prompted = self.conditioner is not None and self.conditioner.prompted
        scale = (self.cfg.condition.guidance if cfg_scale is None else cfg_scale) if prompted else 1.0
        autoguidance = self.cfg.sample.autoguidance if autoguidance is None else autoguidance
        if autoguidance != 1.0 and self.guide is None:
            raise ValueError(f"autoguidance {autoguidance} needs the run's guide.safetensors, which this model lacks: "
                             f"train an unconditioned model with train.guide_at > 0, or use autoguidance 1 (off)")
        concat = self.conditioner.cfg.concat if self.conditioner else ""
        if concat == "inpaint" and init is None:
            raise ValueError("this is an inpainting model: give an image and a mask (inpaint)")
        if concat and concat != "inpaint" and mask is not None:
            raise ValueError(f"this model is conditioned on {concat}, not an inpainting mask: give no mask")
        if not concat and cond_image is not None:
            raise ValueError("this model was trained without a spatial condition: give no image or mask")
        # the size: as asked, else the init image's, else the model's own
        default = (init.size[1], init.size[0]) if isinstance(init, Image.Image) else \
            tuple(torch.as_tensor(init).shape[-2:]) if init is not None else (self.cfg.data.size,) * 2
        size = (height or default[0], width or default[1])
        factor = self.factor_ae * self.cfg.unet.factor
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"size {size[1]}x{size[0]} is not divisible by the model's factor {factor}: "
                             f"use a multiple of {factor}")
        latent_size = (size[0] // self.factor_ae, size[1] // self.factor_ae)
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        self.last = {"Steps": steps, "Sampler": A1111_OF.get(sampler, sampler), **({"CFG scale": scale} if prompted else {}),
                     **({"Autoguidance": autoguidance} if autoguidance != 1.0 else {}),
                     "Seed": seed, **({"Clip skip": clip_skip} if clip_skip != 1 else {}),
                     **({"Denoising strength": strength} if init is not None and strength < 1 else {})}
        g = torch.Generator().manual_seed(seed)
        sched = make_steps(self.schedule, sampler, steps)
        if init is not None:  # diffusers' get_timesteps: skip the first (1 - strength) of the steps
            sched = sched[steps - min(int(steps * strength), steps):]
            if len(sched) < 1:
                raise ValueError(f"strength {strength} leaves no steps out of {steps}: raise either")
        # the generator's draws, in diffusers' order: E(image), the noise, E(masked image), the sampler's
        pixels = (self._image(init, size, "image") * 2 - 1) if init is not None else None
        m = self._mask(mask, pixels) if mask is not None else None
        inpainting = m is not None
        blend = inpainting and (not concat or self.cfg.sample.inpaint_blend)
        x0 = self.to_model_space(pixels, g) if init is not None and (not inpainting or strength < 1 or blend) else None
        ch = self.cfg.unet.in_channels
        noise = torch.randn((n, ch, *latent_size), generator=g) if latents is None else latents.float()
        x0 = x0.expand(n, -1, -1, -1) if x0 is not None else None
        x = start(sched, sampler, noise, x0 if x0 is not None and (not inpainting or strength < 1) else None)
        if concat:
            image = (pixels + 1) / 2 if inpainting else cond_image
            cond = dict(cond or {}, concat=self.spatial_condition(image, m, n, size, g))
            uncond = dict(uncond or {}, concat=cond["concat"])
        elif inpainting:  # diffusers encodes the masked image here for a standard U-Net, unused
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
                known = x0 if i + 1 == len(sched) else noised(sched, sampler, x0, noise, i + 1)
                return after_step(user_callback, i, t, keep * known + (1 - keep) * x, x0_hat)
        cond, uncond = ({k: v.to(device) for k, v in d.items()} if d else d for d in (cond, uncond))
        x = x.to(device)
        kwargs = {"eta": self.cfg.sample.eta if eta is None else eta} if sampler == "ddim" else {}
        with tqdm(total=len(sched), desc=A1111_OF.get(sampler, sampler), disable=not self.progress, leave=False) as bar:
            def progress(i, t, x, x0_hat):
                out = after_step(callback, i, t, x, x0_hat)
                bar.n = i + 1
                bar.refresh()
                return out

            z = get_sampler(sampler)(self.denoiser(cond, uncond, scale, autoguidance), x, sched, generator=g, callback=progress,
                                     **kwargs)
        if output == "latent":
            return z
        images = (self.decode(z).float() / 2 + 0.5).clamp(0, 1).cpu()
        if inpainting and (self.cfg.sample.inpaint_overlay if overlay is None else overlay):
            images = m * images + (1 - m) * (pixels + 1) / 2  # the decoder's error outside the hole undone
        if output == "tensor":
            return images
        return [to_pil(im) for im in images]

    def to_model_space(self, pixels, generator=None):
        """Pixels in [-1, 1] -> the model's space: scale * a sample of E(x) (with the generator), or x itself."""
        if self.autoencoder is None:
            return pixels
        pixels = pixels.to(self.autoencoder.quant_conv.weight.device)
        return to_latent(self.autoencoder, pixels, self.cfg.diffusion.scale_factor, generator).cpu()

    def decode(self, z, tile: int | None = None, overlap: int = 16):
        """Model space -> pixels in [-1, 1] (the identity for pixel models). Latents larger than `tile` (default
        self.vae_tile, 96 = 768 px for SD) decode in overlapping tiles, feathered together, so memory stays that
        of one tile whatever the size."""
        if self.autoencoder is None:
            return z
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


def sample_from_derived(pipe: Pipeline, pixels: torch.Tensor, prompts=None, seed=0):
    """For a model with a spatial condition: samples conditioned on what images in [-1, 1] give, derived as in
    training (a random hole, the edges, the image made smaller). Returns (samples, condition image, mask), the
    samples and the condition image in [0, 1]."""
    c = pipe.conditioner
    image, mask = c.derive(pixels, torch.Generator().manual_seed(seed))
    shown = image if c.cfg.concat == "edges" else (image + 1) / 2
    samples = pipe.generate(prompts, batch_size=len(pixels), seed=seed, image=shown, mask=mask, output="tensor")
    return samples, shown, mask


def condition_rows(pipe: Pipeline, pixels: torch.Tensor, prompts=None, seed=0) -> torch.Tensor:
    """Rows of (condition, sample, original) for images in [-1, 1] (see sample_from_derived)."""
    samples, show, mask = sample_from_derived(pipe, pixels, prompts, seed)
    if pipe.conditioner.cfg.concat == "inpaint":
        show = show * (1 - mask) + 0.5 * mask  # the hole in gray
    show = torch.nn.functional.interpolate(show, size=samples.shape[-2:], mode="nearest")
    return torch.cat([show.expand(-1, samples.shape[1], -1, -1), samples, (pixels + 1) / 2])


def infotext(pipe: Pipeline, size, model: str, index=0) -> str:
    """The settings of the last generate() in A1111's `parameters` format: the prompt, 'Negative prompt: ...',
    then 'Steps: 20, Sampler: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...'."""
    lines = []
    if pipe.prompts:
        prompt, negative = pipe.prompts[index]
        lines += [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    settings = {**pipe.last, "Size": f"{size[1]}x{size[0]}", "Model": model}
    return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in settings.items())])


def as_tensor(image, channels, what) -> torch.Tensor:
    """A PIL image or a (C, H, W) / (1, C, H, W) tensor in [0, 1] -> (1, channels, H, W) float."""
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
        image = torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1)
    image = torch.as_tensor(image, dtype=torch.float32)
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or image.shape[1] != channels:
        raise ValueError(f"the {what} has shape {tuple(image.shape)}; this model takes {channels}-channel images")
    return image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL image (L for one channel, RGB for three)."""
    a = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    return to_pil(canvas)


def png_info(parameters: str) -> PngImagePlugin.PngInfo:
    """A1111 convention: the generation settings in a `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return info


def save_png(image: Image.Image, path, parameters: str | None = None):
    from .checkpoint import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(parameters) if parameters else None)


def save_grid(images: torch.Tensor, path, parameters: str | None = None, nrow=None):
    save_png(grid(images, nrow), path, parameters)


def load_autoencoder(folder, model_dir=None):
    """The autoencoder in `folder` (config.toml with [autoencoder] + model.safetensors)."""
    from .autoencoder import Autoencoder

    folder = Path(folder)
    who = f"latent model {model_dir}: its autoencoder {folder}" if model_dir else f"autoencoder {folder}"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.toml").is_file():
        raise FileNotFoundError(f"{who} is missing (no model.safetensors and config.toml there)")
    ae_cfg = load_config(folder / "config.toml").autoencoder
    if ae_cfg is None:
        raise ValueError(f"{who} has no [autoencoder] section in its config.toml")
    ae = Autoencoder(ae_cfg)
    load_into(ae, load_tensors(folder / "model.safetensors"), who)
    return ae.eval()


def load(path, precision="fp32", compile=False, vae=None, ema=False, config=None) -> Pipeline:
    """A run folder trained here, a Stable Diffusion v1.x single file (.safetensors, or .ckpt read without
    unpickling code) or a diffusers folder; `vae` replaces the model's autoencoder with another file's.
    A single file's architecture is inferred from its shapes, or read from `config` (a diffusers folder's config
    files, as diffusers' from_single_file takes them). ema=True takes a single file's EMA U-Net.
    compile=True compiles the U-Net (torch.compile; the first image pays for it)."""
    path = Path(path)
    if precision not in DTYPES:
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if path.is_dir() and (path / "config.toml").is_file():
        if vae is not None:
            raise ValueError("vae= replaces the VAE of Stable Diffusion checkpoints, not of run folders")
        pipe = load_run(path, precision)
    elif path.is_dir() and (path / "unet").is_dir():
        pipe = load_diffusers(path, precision)
    elif path.is_file():
        pipe = load_single_file(path, precision, ema, config)
    elif path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run folder (config.toml) nor a diffusers folder (unet/, vae/, ...)")
    else:
        raise FileNotFoundError(f"model {path} not found: give a run folder, a .safetensors/.ckpt file or a diffusers folder")
    if vae is not None:
        replace_vae(pipe, vae)
    if compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def load_run(path: Path, precision="fp32") -> Pipeline:
    """A run folder trained here (config.toml + model.safetensors with the EMA weights)."""
    cfg = load_config(path / "config.toml")
    unet = UNet(cfg.unet)
    schedule = Schedule.of(cfg.diffusion)
    ae = load_autoencoder(path / "autoencoder", path) if cfg.autoencoder else None
    model = ConditionedUNet(unet, bind_conditioner(Conditioner(cfg.condition), ae, cfg)) if cfg.condition else unet
    load_into(model, load_tensors(path / "model.safetensors"), f"{path / 'model.safetensors'}")
    if ae is not None and ae.cfg.z_channels != cfg.unet.in_channels:
        raise ValueError(f"latent model {path}: its autoencoder {path / 'autoencoder'} makes {ae.cfg.z_channels}-channel "
                         f"latents but the U-Net reads {cfg.unet.in_channels}")
    return Pipeline.of(model, schedule, cfg, ae, precision, load_guide(path, cfg))


def load_guide(run: Path, cfg: Config) -> UNet | None:
    """Autoguidance's weaker model: the run's early EMA weights (train.guide_at), for unconditioned models."""
    if cfg.condition or not (run / GUIDE).is_file():
        return None
    guide = UNet(cfg.unet)
    load_into(guide, load_tensors(run / GUIDE), f"{run / GUIDE}")
    return guide


def sd_config(unet_cfg, vae_cfg, text_cfg, scheduler: dict, scale_factor=0.18215, size=512) -> Config:
    """Stable Diffusion v1 as a nanosd config: a latent, CLIP-conditioned model (concat "inpaint" for the
    9-channel inpainting U-Net), with its scheduler's settings (SD v1.5's when the file carries none)."""
    from .condition import ConditionConfig
    from .config import DataConfig, DiffusionConfig, SampleConfig

    schedules = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if kind not in schedules:
        raise ValueError(f"scheduler beta_schedule {kind!r} is not supported: nanosd has {', '.join(schedules)}")
    diffusion = DiffusionConfig(
        schedule=schedules[kind], timesteps=scheduler.get("num_train_timesteps", 1000),
        prediction={"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.get("prediction_type", "epsilon")],
        scale_factor=scale_factor, beta_start=scheduler.get("beta_start", 0.00085),
        beta_end=scheduler.get("beta_end", 0.012), steps_offset=scheduler.get("steps_offset", 1),
        set_alpha_to_one=scheduler.get("set_alpha_to_one", False))
    condition = ConditionConfig(encoder="clip", concat="inpaint" if unet_cfg.cond_channels else "", drop_prob=0.0,
                                guidance=7.5, clip=text_cfg)
    return Config(data=DataConfig(name="", size=size), unet=unet_cfg, diffusion=diffusion,
                  sample=SampleConfig(sampler="dpmpp_2m", steps=20), autoencoder=vae_cfg, condition=condition)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sd_v1_config(inpainting=False) -> Config:
    """Stable Diffusion v1.x: the U-Net (320 channels, 1,2,4,4, attention at the first three levels, 8 heads,
    context 768), the f = 8 VAE (scale 0.18215) and CLIP ViT-L/14's text transformer."""
    from .autoencoder import AutoencoderConfig
    from .text import CLIPTextConfig

    unet = UNetConfig(in_channels=4, cond_channels=5 if inpainting else 0, model_channels=320, channel_mult=[1, 2, 4, 4],
                      num_res_blocks=2, attention_levels=[0, 1, 2], num_heads=8, context_dim=768)
    vae = AutoencoderConfig(in_channels=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    return sd_config(unet, vae, CLIPTextConfig(), {})


def build_sd(cfg: Config, parts: dict, where: str, tokenizer=None, precision="fp32") -> Pipeline:
    """The models of `cfg` built on the meta device, then given the checkpoint's tensors (no random init)."""
    from .autoencoder import Autoencoder
    from .checkpoint import fit_shapes

    dtype = DTYPES[precision]
    with torch.device("meta"):
        unet, ae = UNet(cfg.unet), Autoencoder(cfg.autoencoder)
        conditioner = Conditioner(cfg.condition, tokenizer)
    # popped: the models then hold the only reference, so converting them (channels-last for bf16) frees as it goes
    load_into(unet, parts.pop("unet"), f"{where}: the U-Net", assign=True, dtype=dtype)
    load_into(ae, fit_shapes(ae, parts.pop("vae")), f"{where}: the VAE", assign=True, dtype=dtype)
    load_into(conditioner.text_encoder, parts.pop("text_encoder"), f"{where}: the text encoder", assign=True,
              dtype=dtype)
    return Pipeline(unet, Schedule.of(cfg.diffusion), cfg, ae, bind_conditioner(conditioner, ae, cfg), precision)


def load_single_file(path: Path, precision="fp32", ema=False, config=None) -> Pipeline:
    from .checkpoint import diffusers_configs, infer_sd, read_checkpoint, split_single_file

    parts = split_single_file(read_checkpoint(path, DTYPES[precision]), ema)  # cast as read: one copy in memory
    if config is None:
        return build_sd(sd_config(*infer_sd(parts, str(path)), {}), parts, str(path), precision=precision)
    archs, scheduler, scale, size = diffusers_configs(Path(config))
    return build_sd(sd_config(*archs, scheduler, scale, size), parts, str(path), _tokenizer(Path(config)), precision)


def _tokenizer(folder: Path):
    from .text import CLIPTokenizer

    return CLIPTokenizer.from_folder(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None


def load_diffusers(folder: Path, precision="fp32") -> Pipeline:
    from .checkpoint import diffusers_configs, read_diffusers

    archs, scheduler, scale, size = diffusers_configs(folder)
    cfg = sd_config(*archs, scheduler, scale, size)
    return build_sd(cfg, read_diffusers(folder, archs, DTYPES[precision]), str(folder), _tokenizer(folder), precision)


def replace_vae(pipe: Pipeline, path):
    """Another VAE's weights (a fine-tuned SD VAE): a file in the original layout, with or without the
    first_stage_model. prefix, or in diffusers' names."""
    from .checkpoint import diffusers_names, fit_shapes, read_checkpoint

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"VAE folder {path} has no .safetensors weights")
        path = files[0]
    tensors = {k.removeprefix("first_stage_model."): v for k, v in read_checkpoint(path).items()
               if not k.startswith(("loss.", "model_ema."))}
    back = {theirs: ours for ours, theirs in diffusers_names("vae", pipe.autoencoder).items()}
    tensors = {back.get(k, k): v for k, v in tensors.items()}
    load_into(pipe.autoencoder, {k: v.float() for k, v in fit_shapes(pipe.autoencoder, tensors).items()},
              f"VAE {path}")


def save(pipe: Pipeline, path, dtype=None):
    """The pipeline as one file in the original SD layout (.safetensors; other SD tools read it), or as a
    diffusers folder when `path` has no .safetensors suffix."""
    from .checkpoint import save_tensors, write_diffusers

    path = Path(path)
    if pipe.text_encoder is None or pipe.autoencoder is None:
        raise ValueError("only text-conditioned latent models (Stable Diffusion's shape) save as SD checkpoints")
    if path.suffix == ".safetensors":
        save_tensors({k: v.to(dtype) if dtype else v for k, v in pipe.state_dict().items()}, path)
    elif path.suffix:
        raise ValueError(f"{path}: save to a .safetensors file, or to a folder (diffusers layout)")
    else:
        write_diffusers(path, pipe)
    return path
