"""`load()` a model and `generate()` images: noise -> sampler(denoiser, steps) -> image."""
import math
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .checkpoint import load_into, load_tensors
from .config import Config, load_config
from .samplers import get_sampler
from .schedule import Schedule
from .unet import UNet


class Pipeline:
    """Pixel models have no autoencoder; latent models sample z and decode x = D(z / scale_factor)."""

    def __init__(self, unet: UNet, schedule: Schedule, cfg: Config, autoencoder=None):
        self.unet, self.schedule, self.cfg = unet.eval(), schedule, cfg
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None

    def denoiser(self):
        """model(x, t) -> eps, whatever the U-Net was trained to predict. With sample.clip_x0 (pixel models),
        the predicted x_0 is clipped to the data range [-1, 1] and eps recomputed from it, as the DDPM code does."""
        pred, s = self.cfg.diffusion.prediction, self.schedule

        def model(x, t):
            t = t.reshape(1).expand(x.shape[0])
            out = self.unet(x, t)
            if not self.cfg.sample.clip_x0:
                return s.to_eps(pred, out, x, t)
            x0 = s.to_x0(pred, out, x, t).clamp(-1, 1)
            return s.to_eps("x0", x0, x, t)

        return model

    @torch.no_grad()
    def generate(self, n=1, *, steps=None, sampler=None, seed=None, eta=None, latents=None, callback=None,
                 output="pil"):
        """n images from one seeded generator. DDPM defaults to every timestep of the schedule (Algorithm 2)."""
        sampler = sampler or self.cfg.sample.sampler
        sample_fn = get_sampler(sampler)
        if steps is None:
            steps = self.schedule.timesteps if sampler == "ddpm" else self.cfg.sample.steps
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        self.last = {"Steps": steps, "Sampler": sampler, "Seed": seed}  # for the PNG's parameters
        g = torch.Generator().manual_seed(seed)
        size, ch = self.cfg.latent_size, self.cfg.unet.in_channels
        x = torch.randn((n, ch, size, size), generator=g) if latents is None else latents
        kwargs = {} if sampler == "ddpm" else {"eta": self.cfg.sample.eta if eta is None else eta}
        x0 = sample_fn(self.denoiser(), x, self.schedule.steps(steps), generator=g, callback=callback, **kwargs)
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


def infotext(pipe: Pipeline, size, model: str) -> str:
    """The generation settings in A1111's `parameters` format."""
    return ", ".join(f"{k}: {v}" for k, v in {**pipe.last, "Size": f"{size[1]}x{size[0]}", "Model": model}.items())


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
    load_into(unet, load_tensors(path / "model.safetensors"), f"{path / 'model.safetensors'}")
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    ae = load_autoencoder(path / "autoencoder", path) if cfg.autoencoder else None
    if ae is not None and ae.cfg.z_channels != cfg.unet.in_channels:
        raise ValueError(f"latent model {path}: its autoencoder {path / 'autoencoder'} makes {ae.cfg.z_channels}-channel "
                         f"latents but the U-Net reads {cfg.unet.in_channels}")
    return Pipeline(unet, schedule, cfg, ae)
