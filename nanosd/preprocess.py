"""Control images from pictures (A1111's ControlNet "modules"), with OpenCV: the ones that need no network.

canny    white edges on black (cv2.Canny; thresholds low / high, A1111's 100 / 200)
scribble thick white strokes where the picture has lines: difference of Gaussians, thresholded (A1111's
         scribble_xdog), for scribble and lineart ControlNets
inpaint  the picture with the hole (mask white) at -1, as ControlNet 1.1's inpaint model reads it
tile     the picture blurred by a downscale (A1111's tile_resample), for the tile ControlNet
none     the picture as it is
Each returns an (H, W, 3) float32 array: [0, 1], except inpaint's -1 in the hole."""
import numpy as np
from PIL import Image

KINDS = ("canny", "scribble", "inpaint", "tile", "none")
DEFAULTS = {"canny": (100, 200), "scribble": (32,), "tile": (2.0,), "inpaint": (), "none": ()}  # a, b per kind
A1111_MODULES = {"none": "none", "canny": "canny", "scribble_xdog": "scribble", "inpaint_only": "inpaint",
                 "inpaint": "inpaint", "tile_resample": "tile", "scribble": "scribble", "tile": "tile"}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("control images need OpenCV: pip install opencv-python-headless") from None
    return cv2


def _rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def canny(image, low=DEFAULTS["canny"][0], high=DEFAULTS["canny"][1]):
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds low {low} and high {high}: need 0 <= low <= high (A1111: 100, 200)")
    edges = _cv2().Canny(_rgb(image), low, high)
    return np.repeat(edges[..., None], 3, axis=2).astype(np.float32) / 255


def scribble(image, threshold=DEFAULTS["scribble"][0]):
    cv2 = _cv2()
    rgb = _rgb(image).astype(np.float32)
    dog = cv2.GaussianBlur(rgb, (0, 0), 5.0) - cv2.GaussianBlur(rgb, (0, 0), 0.5)
    lines = dog.min(axis=2) * 2 > threshold  # darker than its blurred surroundings in every channel: a stroke
    return np.repeat(lines[..., None], 3, axis=2).astype(np.float32)


def inpaint(image, mask):
    if mask is None:
        raise ValueError("the inpaint control needs a mask (white = the hole): inpaint with it, or give --control-mask")
    rgb = _rgb(image).astype(np.float32) / 255
    m = np.asarray(mask.convert("L").resize((rgb.shape[1], rgb.shape[0]))) >= 128 if isinstance(mask, Image.Image) \
        else np.asarray(mask, dtype=np.float32).squeeze() >= 0.5
    rgb[m] = -1.0
    return rgb


def tile(image, down=DEFAULTS["tile"][0]):
    if down < 1:
        raise ValueError(f"tile downscale {down}: give 1 or more (1: the picture as it is)")
    cv2, rgb = _cv2(), _rgb(image)
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, round(w / down)), max(1, round(h / down))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255


def check(kind, mask=None, a=None, b=None):
    """One line for a kind nanosd lacks, or for a threshold or mask the kind would not read."""
    if kind not in KINDS:
        raise ValueError(f"unknown control image kind {kind!r}: one of {', '.join(KINDS)}")
    takes = len(DEFAULTS[kind])
    for name, value, n in (("a", a, 1), ("b", b, 2)):
        if value is not None and takes < n:
            raise ValueError(f"the {kind} control takes {takes or 'no'} threshold{'s' * (takes != 1)}: give no {name} "
                             f"(threshold_{name})")
    if mask is not None and kind != "inpaint":
        raise ValueError(f"the {kind} control reads no mask: give one to the inpaint kind only")


def control_image(image, kind="canny", mask=None, a=None, b=None) -> np.ndarray:
    """The control image of `kind` for a picture (PIL or uint8 array); a, b: the kind's thresholds (A1111's
    threshold_a / threshold_b: canny's low / high, scribble's threshold, tile's downscale; None: DEFAULTS)."""
    check(kind, mask, a, b)
    if kind == "inpaint":
        return inpaint(image, mask)
    if kind == "none":
        return _rgb(image).astype(np.float32) / 255
    args = [d if v is None else v for v, d in zip((a, b), DEFAULTS[kind])]
    return {"canny": canny, "scribble": scribble, "tile": tile}[kind](image, *args)


def control_images(images, kind="canny", a=None, b=None):
    """Each image's control ((N, C, H, W) in [-1, 1], as data sets hold them) as uint8 (N, 1 or 3, H, W): one
    channel when the set is gray. Made once, before training."""
    import torch
    from tqdm import tqdm

    if kind not in ("canny", "scribble", "tile", "none"):
        raise ValueError(f"controlnet.kind {kind!r}: trainable kinds are canny, scribble, tile and none (inpaint "
                         "needs a mask per image)")
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    keep = 1 if images.shape[1] == 1 else 3
    out = np.empty((len(u8), keep, *u8.shape[1:3]), np.uint8)
    for i, im in enumerate(tqdm(u8, desc=f"{kind} control images", leave=False, disable=len(u8) < 5000)):
        rgb = np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im
        out[i] = (control_image(rgb, kind, None, a, b) * 255).round().astype(np.uint8).transpose(2, 0, 1)[:keep]
    return torch.from_numpy(out)


def to_image(array: np.ndarray) -> Image.Image:
    """A control image as a PNG-able picture (inpaint's hole, -1, shown black)."""
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
