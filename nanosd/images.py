"""Images in and out: PIL <-> tensors in [0, 1], grids, PNGs with A1111's `parameters` chunk, written atomically."""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .io import atomic_path


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


def fit(image: Image.Image, width, height, resize="just") -> Image.Image:
    """A picture brought to width x height (A1111's resize modes): stretched ("just"), covered and center-cropped
    ("crop"), or fitted and padded ("fill")."""
    if image.size == (width, height):
        return image
    if resize == "just":
        return image.resize((width, height), Image.LANCZOS)
    w, h = image.size
    s = (max if resize == "crop" else min)(width / w, height / h)
    scaled = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    canvas = Image.new(image.mode if image.mode in ("L", "RGB") else "RGB", (width, height))
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))  # crop: negative offsets
    return canvas


def read_parameters(image: Image.Image, where="the image") -> str:
    """The `parameters` an A1111 or nanosd image carries (a PNG text chunk, or a JPEG/WebP's EXIF UserComment)."""
    text = image.info.get("parameters")
    if text is None and hasattr(image, "getexif"):
        comment = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD: UserComment, as A1111 writes JPEG/WebP
        if isinstance(comment, bytes):
            text = comment[8:].decode("utf-16-be" if comment[:8] == b"UNICODE\0" else "latin-1", "replace")
    if not text:
        raise ValueError(f"{where} carries no generation parameters (A1111's PNG `parameters` chunk)")
    return text.strip("\0")


def save_png(image: Image.Image, path, parameters: str | None = None):
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(parameters) if parameters else None)


def save_grid(images: torch.Tensor, path, parameters: str | None = None, nrow=None):
    save_png(grid(images, nrow), path, parameters)


def to_float(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, size, size) in [-1, 1]."""
    x = images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1
    h = x.shape[-1]
    if size == h:
        return x
    if size > h and (size - h) % 2 == 0:  # MNIST at 32 px: the 28 px digit zero-padded (black = -1)
        p = (size - h) // 2
        return torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area" if size < h else "bicubic").clamp(-1, 1)
