"""`load()` a model and `generate()` images: noise -> sampler(denoiser, steps) -> image."""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .checkpoint import load_into, load_tensors
from .condition import ConditionedUNet, Conditioner, bind_conditioner
from .config import Config, load_config
from .samplers import get_sampler
from .schedule import Schedule
from .unet import UNet


class Pipeline:
    """Pixel models have no autoencoder; latent models sample z and decode x = D(z / scale_factor).
    Conditioned models take prompts (text, or class names) and classifier-free guidance."""

    def __init__(self, unet: UNet, schedule: Schedule, cfg: Config, autoencoder=None, conditioner=None):
        self.unet, self.schedule, self.cfg = unet.eval(), schedule, cfg
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.conditioner = conditioner.eval() if conditioner is not None else None

    @classmethod
    def of(cls, model, schedule, cfg, autoencoder=None):
        """From what the trainer trains: a UNet, or a ConditionedUNet."""
        if isinstance(model, ConditionedUNet):
            return cls(model.unet, schedule, cfg, autoencoder, model.conditioner)
        return cls(model, schedule, cfg, autoencoder)

    def grid_prompts(self, n):
        """n prompts for a grid: the config's sample.prompts, each for consecutive images (None if unconditioned)."""
        p = self.cfg.sample.prompts
        return [p[i * len(p) // n] for i in range(n)] if self.conditioner and self.conditioner.prompted and p else None

    def denoiser(self, cond=None, uncond=None, scale=1.0):
        """model(x, t) -> eps, whatever the U-Net was trained to predict. With a condition and scale != 1,
        classifier-free guidance: out = out_uncond + scale (out_cond - out_uncond), both in one batch (eps, v
        and x_0 are linear in each other at fixed x_t, so guiding the raw output is guiding eps).
        With sample.clip_x0 (pixel models), the predicted x_0 is clipped to [-1, 1] and eps recomputed from it."""
        pred, s = self.cfg.diffusion.prediction, self.schedule
        guided = cond is not None and scale != 1.0
        if guided:  # one batch [cond; uncond]
            cond = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()}

        def model(x, t):
            t = t.reshape(1).expand(x.shape[0])
            if guided:
                c, u = self.unet(torch.cat([x, x]), torch.cat([t, t]), **cond).chunk(2)
                out = u + scale * (c - u)
            else:
                out = self.unet(x, t, **(cond or {}))
            if not self.cfg.sample.clip_x0:
                return s.to_eps(pred, out, x, t)
            x0 = s.to_x0(pred, out, x, t).clamp(-1, 1)
            return s.to_eps("x0", x0, x, t)

        return model

    def conditions(self, prompt, negative_prompt, batch_size, image=None, mask=None):
        """The U-Net's keyword arguments for the prompts and for the negative (or empty) ones, with the spatial
        condition (the same in both) for models that concatenate one."""
        self.prompts = None
        c = self.conditioner
        if c is None or not c.prompted:
            if prompt:
                raise ValueError("this model was trained without text or labels: generate without a prompt")
            cond, uncond, n = ({}, {}, batch_size) if c else (None, None, batch_size)
        else:
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
            both, n = {k: v for k, v in c(prompts + negatives).items() if v is not None}, len(prompts)
            cond, uncond = {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}
        if c is not None and c.cfg.concat:
            cond["concat"] = uncond["concat"] = self.spatial_condition(image, mask, n)
        elif image is not None or mask is not None:
            raise ValueError("this model was trained without a spatial condition: give no image or mask")
        return cond, uncond, n

    def spatial_condition(self, image, mask, n):
        """The concatenated channels from a condition image (PIL, or a tensor in [0, 1]) and, for inpainting, a mask
        (white = the hole to fill), checked against what the model was trained on."""
        c, size = self.conditioner.cfg, self.cfg.data.size
        want = {"inpaint": "an image and a mask", "edges": "an edge map", "lowres": "a low-resolution image"}[c.concat]
        if image is None or (c.concat == "inpaint" and mask is None):
            raise ValueError(f"this model is conditioned on {want}: give {'--image' if c.concat != 'inpaint' else want}")
        channels = 1 if c.concat == "edges" else (self.autoencoder.cfg.in_channels if self.autoencoder
                                                  else self.cfg.unet.in_channels)
        image = as_tensor(image, channels, "image")
        expect = size // c.sr_factor if c.concat == "lowres" else size
        if image.shape[-2:] != (expect, expect):
            raise ValueError(f"the {c.concat} image is {image.shape[-1]}x{image.shape[-2]} px; this model takes "
                             f"{expect}x{expect}: resize it")
        image = image * 2 - 1 if c.concat != "edges" else (image > 0.5).float()
        if mask is not None:
            mask = (as_tensor(mask, 1, "mask") > 0.5).float()
            if mask.shape[-2:] != image.shape[-2:]:
                raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} px but the image is "
                                 f"{image.shape[-1]}x{image.shape[-2]}: give a mask of the image's size")
            mask = mask.expand(n, -1, -1, -1)
        cfg_size = (self.cfg.latent_size, self.cfg.latent_size)
        return self.conditioner.spatial(image.expand(n, -1, -1, -1), mask, cfg_size)

    @torch.no_grad()
    def generate(self, prompt=None, negative_prompt=None, *, batch_size=1, steps=None, sampler=None, cfg_scale=None,
                 seed=None, eta=None, latents=None, image=None, mask=None, callback=None, output="pil"):
        """batch_size images (one per prompt when prompt is a list) from one seeded generator. DDPM defaults to
        every timestep of the schedule (Algorithm 2); cfg_scale defaults to the one the run recorded.
        `image` (and `mask`) are the spatial condition of models that concatenate one: the image to inpaint and
        its mask, an edge map, or the low-resolution image to upscale."""
        sampler = sampler or self.cfg.sample.sampler
        sample_fn = get_sampler(sampler)
        if steps is None:
            steps = self.schedule.timesteps if sampler == "ddpm" else self.cfg.sample.steps
        cond, uncond, n = self.conditions(prompt, negative_prompt, batch_size, image, mask)
        prompted = self.conditioner is not None and self.conditioner.prompted
        scale = (self.cfg.condition.guidance if cfg_scale is None else cfg_scale) if prompted else 1.0
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        self.last = {"Steps": steps, "Sampler": sampler, **({"CFG scale": scale} if prompted else {}),
                     "Seed": seed}  # for the PNG's parameters
        g = torch.Generator().manual_seed(seed)
        size, ch = self.cfg.latent_size, self.cfg.unet.in_channels
        x = torch.randn((n, ch, size, size), generator=g) if latents is None else latents
        kwargs = {} if sampler == "ddpm" else {"eta": self.cfg.sample.eta if eta is None else eta}
        x0 = sample_fn(self.denoiser(cond, uncond, scale), x, self.schedule.steps(steps), generator=g,
                       callback=callback, **kwargs)
        if output == "latent":
            return x0
        images = ((self.decode(x0) + 1) / 2).clamp(0, 1)
        if output == "tensor":
            return images
        if output != "pil":
            raise ValueError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        return [to_pil(im) for im in images]

    def decode(self, z):
        """Model space -> pixels in [-1, 1] (the identity for pixel models)."""
        if self.autoencoder is None:
            return z
        return torch.cat([self.autoencoder.decode(b / self.cfg.diffusion.scale_factor) for b in z.split(64)])


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


def load(path) -> Pipeline:
    """Load a run folder trained here (config.toml + model.safetensors with the EMA weights)."""
    path = Path(path)
    if not (path / "config.toml").is_file():
        raise FileNotFoundError(f"{path} is not a run folder: it has no config.toml (train one with 'nanosd train')")
    cfg = load_config(path / "config.toml")
    unet = UNet(cfg.unet)
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    ae = load_autoencoder(path / "autoencoder", path) if cfg.autoencoder else None
    model = ConditionedUNet(unet, bind_conditioner(Conditioner(cfg.condition), ae, cfg)) if cfg.condition else unet
    load_into(model, load_tensors(path / "model.safetensors"), f"{path / 'model.safetensors'}")
    if ae is not None and ae.cfg.z_channels != cfg.unet.in_channels:
        raise ValueError(f"latent model {path}: its autoencoder {path / 'autoencoder'} makes {ae.cfg.z_channels}-channel "
                         f"latents but the U-Net reads {cfg.unet.in_channels}")
    return Pipeline.of(model, schedule, cfg, ae)
