"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder that reads a control image (edges, a
scribble, a masked image) and adds its features to the frozen U-Net's skips and middle block through zero-initialised
1x1 convolutions, so that training starts from the base model's own behaviour.

The copy is the U-Net's own `Encoder` (same blocks, same names), plus the hint encoder (small convolutions from the
control image down to the latent resolution) and the zero convolutions: the original checkpoint's names
(`input_hint_block`, `zero_convs.N.0`, `middle_block_out.0`), so its files load without a table. Files: the
original single file (`control_model.*` or bare keys, .safetensors or .pth through the weights-only unpickler), the
"diff" files (differences to the base U-Net, kohya's `difference` key) and diffusers' `ControlNetModel` folders."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .images import as_tensor, fit
from .io import load_into, read_checkpoint, save_tensors
from . import preprocess
from .preprocess import control_image, control_images, to_image
from .unet import Encoder, OnFrozen, UNetConfig

PREFIX = "control_model."
RUN_FILE = "controlnet.safetensors"  # what a ControlNet run leaves (original layout), beside controlnet/ (diffusers)
HINT = (16, 32, 96, 256)  # the hint encoder's widths for f = 8 (SD); one fewer halving per factor of 2 less
MODES = {"balanced": "Balanced", "prompt": "My prompt is more important", "control": "ControlNet is more important"}
RESIZE = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}  # A1111's resize modes
SHAPE = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels", "transformer_depth",
         "context_dim", "adm_in_channels", "linear_proj")  # what a ControlNet must share with its U-Net


def hint_widths(factor: int) -> tuple:
    """The hint encoder's widths for an autoencoder factor (1 for pixel models): one halving per stride-2 conv."""
    return HINT[:factor.bit_length()]


class ControlNet(Encoder):
    def __init__(self, cfg: UNetConfig, widths=HINT, hint_channels=3):
        super().__init__(dataclasses.replace(cfg, cond_channels=0))  # the control image replaces concatenation
        self.widths, self.hint_channels = tuple(widths), hint_channels
        self.name, self.hash = "", ""  # the file's stem and A1111's short hash, for the infotext and model list
        layers = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers, _zero(nn.Conv2d(widths[-1], cfg.model_channels, 3, padding=1)))
        self.zero_convs = nn.ModuleList(nn.Sequential(_zero(nn.Conv2d(c, c, 1))) for c in self.skips)
        self.middle_block_out = nn.Sequential(_zero(nn.Conv2d(self.skips[-1], self.skips[-1], 1)))

    @property
    def factor(self):
        return 2 ** (len(self.widths) - 1)

    def forward(self, x, t, hint, context=None, y=None, context_mask=None, scales=1.0):
        """The residuals for the U-Net's skips and middle block (a list, the middle block's last), each times its
        scale (one number, or one per residual)."""
        h, context, emb = self.embed(x, t, context, y)
        guided = self.input_hint_block(hint.to(h.dtype))
        outs = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context, context_mask)
            if i == 0:  # the hint joins after the first convolution
                h = h + guided
            outs.append(zero(h))
        outs.append(self.middle_block_out(self.middle_block(h, emb, context, context_mask)))
        scales = scales if isinstance(scales, (list, tuple, torch.Tensor)) else [scales] * len(outs)
        return [o * s for o, s in zip(outs, scales)]

    def check(self, unet_cfg: UNetConfig, what="this model"):
        same_shape(self.cfg, unet_cfg, self.name, what)


def same_shape(cfg: UNetConfig, unet_cfg: UNetConfig, name="", what="this model"):
    """One line if a ControlNet of `cfg` was made for another U-Net (another family or size) than `unet_cfg`."""
    differ = [k for k in SHAPE if getattr(cfg, k) != getattr(unet_cfg, k)]
    if differ:
        mine, theirs = (", ".join(f"{k}={getattr(c, k)}" for k in differ) for c in (cfg, unet_cfg))
        raise ValueError(f"ControlNet {name} was made for another U-Net ({mine}) than {what}'s ({theirs}): use a "
                         "ControlNet of the model's family and size")


def _zero(conv):
    nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)
    return conv


@dataclass
class Control:
    """One ControlNet acting on a generation: `image` (PIL, brought to the output's size by `resize`: "just"
    stretches it (Lanczos, as diffusers does), "crop" covers and center-crops, "fill" fits and pads with black; or a
    (B, 3, H, W) tensor in [0, 1] of the output's size) at `scale`, during the fraction [start, end] of the steps.
    mode: "balanced" (both halves of guidance), "prompt" (the residuals weighted down toward the shallow skips:
    A1111's "My prompt is more important"), "control" (that, on the conditional half only: diffusers' guess_mode,
    A1111's "ControlNet is more important"; with no prompt, the control alone shapes the image)."""
    net: ControlNet
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    module: str = "none"  # a preprocessor run on `image` first (A1111's "Module"): canny, scribble, inpaint, tile
    mask: Any = None  # the inpaint module's hole (None: the request's inpainting mask)
    a: float | None = None  # the module's thresholds (A1111's threshold_a, threshold_b; None: its defaults)
    b: float | None = None
    resize: str = "just"
    processor_res: int | None = None  # run the module at this short side, then resize (None: at the output's size)

    def check(self):
        if not isinstance(self.net, ControlNet):
            raise ValueError(f"Control.net must be a ControlNet (nanosd.load_controlnet), got {type(self.net).__name__}")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"control start {self.start} and end {self.end}: need 0 <= start < end <= 1 (fractions "
                             "of the steps)")
        if self.mode not in MODES:
            raise ValueError(f"control mode {self.mode!r}: one of {', '.join(MODES)}")
        preprocess.check(self.module, self.mask, self.a, self.b)
        if self.resize not in RESIZE:
            raise ValueError(f"control resize {self.resize!r}: one of {', '.join(RESIZE)}")
        if self.processor_res is not None and not 64 <= self.processor_res <= 2048:
            raise ValueError(f"control processor_res {self.processor_res}: from 64 to 2048")
        if self.processor_res is not None and self.module in ("none", "inpaint"):
            raise ValueError(f"processor_res sets the resolution a module detects at, and the {self.module} module "
                             "detects nothing: give none")
        if self.image is None:
            raise ValueError("a control needs its image (--control-image)")

    def hint(self, height, width, n, mask=None) -> torch.Tensor:
        """The control image as the ControlNet reads it: (n, 3, height, width) in [0, 1] (the inpaint module's
        hole -1), made by the module from the picture resized to the output."""
        image, mask = self.image, (self.mask if self.mask is not None else mask)
        if isinstance(image, (str, Path)):
            raise ValueError(f"control image {image}: give a PIL image or a tensor (Image.open it first)")
        if isinstance(image, Image.Image):
            if image.mode.startswith(("I", "F")):  # 16-bit or float: RGB would clip it to white
                raise ValueError(f"the control image is in mode {image.mode} (16-bit or float): save it as an 8-bit "
                                 "RGB or grayscale picture")
            image = image.convert("RGB")
            if self.module not in ("none", "inpaint") and self.processor_res:  # A1111's order: detect, then fit
                w, h = image.size
                s = self.processor_res / min(w, h)
                image = image.resize((round(w * s), round(h * s)), Image.LANCZOS)
                image = fit(to_image(control_image(image, self.module, None, self.a, self.b)), width, height,
                             self.resize)
            else:  # fit, then detect at the output's size (A1111's pixel perfect)
                image = fit(image, width, height, self.resize)
                if self.module != "none":
                    image = torch.from_numpy(control_image(image, self.module, mask, self.a, self.b)).permute(2, 0, 1)
        elif self.module != "none":
            raise ValueError(f"the {self.module} module reads a picture: give the control image as a PIL image")
        image = as_tensor(image, 3, "control image")
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(f"the control image is {image.shape[-1]}x{image.shape[-2]} px and the image "
                             f"{width}x{height}: resize it to the image's size (PIL images are resized for you)")
        if image.min() < -1 or image.max() > 1:
            raise ValueError("the control image's values must be in [0, 1] (-1 only in an inpaint control's hole)")
        if len(image) not in (1, n):
            raise ValueError(f"{len(image)} control images for {n} images: give one, or one each")
        return image.expand(n, -1, -1, -1)

    def infotext(self) -> str:
        """As A1111's ControlNet extension writes a unit into the PNG parameters."""
        model = f"{self.net.name} [{self.net.hash[:8]}]" if self.net.hash else self.net.name or "ControlNet"
        extra = "".join(f", {k}: {v:g}" for k, v in (("Processor Res", self.processor_res), ("Threshold A", self.a),
                                                   ("Threshold B", self.b)) if v is not None)
        return (f"Module: {self.module}, Model: {model}, Weight: {self.scale:g}, Resize Mode: {RESIZE[self.resize]}"
                f"{extra}, Guidance Start: {self.start:g}, Guidance End: {self.end:g}, "
                f"Pixel Perfect: {self.processor_res is None}, Control Mode: {MODES[self.mode]}")


def residuals(controls, hints, x, t, cond, step, total, guided):
    """The summed residuals of the controls active at `step` of `total` for the U-Net's batch x (guided:
    [uncond; cond], as diffusers batches it), or None when none acts. diffusers' rule for the step range: a
    control acts at step i when i/total >= start and (i+1)/total <= end."""
    out = None
    for c, hint in zip(controls, hints):
        if step / total < c.start or (step + 1) / total > c.end:
            continue
        n = len(hint)
        scales = c.scale
        if c.mode != "balanced":  # deeper residuals count more: 0.1 at the first skip to 1 at the middle block
            scales = (torch.logspace(-1, 0, len(c.net.skips) + 1) * c.scale).tolist()
        kw = {k: v for k, v in (cond or {}).items() if k != "concat"}
        if guided and c.mode == "control":  # the conditional half alone; the unconditional one gets nothing
            half = {k: v[n:] for k, v in kw.items()}
            r = [torch.cat([torch.zeros_like(a), a]) for a in c.net(x[n:], t[n:], hint, scales=scales, **half)]
        else:
            r = c.net(x, t, torch.cat([hint, hint]) if guided else hint, scales=scales, **kw)
        out = r if out is None else [a + b for a, b in zip(out, r)]
    return out


class ControlledUNet(OnFrozen):
    """A frozen U-Net steered by a trainable ControlNet: what `nanosd train` trains (the batch's `hint` goes to
    the ControlNet)."""

    def __init__(self, base: nn.Module, controlnet: ControlNet):
        super().__init__(base)
        self.controlnet = controlnet

    def forward(self, x, t, context=None, y=None, concat=None, context_mask=None, hint=None):
        control = self.controlnet(x, t, hint, context=context, y=y, context_mask=context_mask)
        return self.base(x, t, context=context, y=y, concat=concat, context_mask=context_mask, control=control)


def copy_encoder(net: ControlNet, unet: nn.Module) -> ControlNet:
    """The ControlNet's encoder starts as the U-Net's (the paper's trainable copy); what has no twin stays as built."""
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape},
                        strict=False)
    return net


def open_run(run):
    """(config, the base pipeline, the ControlNet) of a ControlNet run folder of `nanosd train`."""
    from .config import load_config
    from .pipeline import load
    from .run import CONFIG

    cfg = load_config(Path(run) / CONFIG)
    if not cfg.controlnet:
        raise ValueError(f"{run} is not a ControlNet run (no [controlnet] in its config)")
    pipe = load(cfg.controlnet.base, "fp32")  # trained against: exact weights
    return cfg, pipe, load_controlnet(run, base=pipe)


def held_out(cfg, n, prompted=True):
    """n held-out images of a ControlNet recipe's data, spread through it (in [-1, 1]), their labels (or None),
    their controls ((n, 3, H, W) in [0, 1], made as in training) and captions (or None)."""
    from .data import load_dataset

    held = load_dataset(cfg.data.name, cfg.data.size, split="test")
    held = held if len(held) else load_dataset(cfg.data.name, cfg.data.size)
    idx = held.spread_index(n)
    c = cfg.controlnet
    hints = (control_images(held.images[idx], c.kind, c.a, c.b).float() / 255).expand(-1, 3, -1, -1)
    prompts = [held.captions[i][0] for i in idx.tolist()] if held.captions and prompted else None
    return held.images[idx], held.labels[idx] if held.labels is not None else None, hints, prompts


# --- files ---

def load_controlnet(path, base=None, dtype=torch.float32) -> ControlNet:
    """A ControlNet from an original single file (.safetensors, or .pth/.ckpt read without unpickling code), a
    diffusers ControlNetModel folder, or a "diff" file (needs `base`, the pipeline whose U-Net it differs from).
    With `base`, the ControlNet takes the base U-Net's architecture and is checked against it."""
    from .formats import diffusers

    path = Path(path)
    if (path / RUN_FILE).is_file():  # a run folder of nanosd train
        path = path / RUN_FILE
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"ControlNet folder {path} has no config.json (a diffusers ControlNetModel)")
        conf = json.loads((path / "config.json").read_text())
        if conf.get("global_pool_conditions"):
            raise ValueError(f"{path} pools its condition globally (the shuffle ControlNet): not supported")
        if conf.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
            raise ValueError(f"{path} reads its control image as BGR: nanosd's ControlNets read RGB; not supported")
        cfg = diffusers.unet_config(conf, controlnet=True)
        widths = tuple(conf.get("conditioning_embedding_out_channels", HINT))
        with torch.device("meta"):
            net = ControlNet(cfg, widths, conf.get("conditioning_channels", 3))
        tensors = diffusers.read_named(path, "controlnet", net, dtype)
    elif path.is_file():
        tensors, cfg, widths = _original(path, base, dtype)
        with torch.device("meta"):
            net = ControlNet(cfg, widths, tensors["input_hint_block.0.weight"].shape[1])
    else:
        raise FileNotFoundError(f"ControlNet {path} not found: give a .safetensors/.pth file or a diffusers folder")
    load_into(net, tensors, f"ControlNet {path}", assign=True, dtype=dtype)
    if base is not None:
        net.check(base.cfg.unet, f"the model {getattr(base, 'family', '') or ''}".strip())
    net.name = path.stem if path.is_file() else path.name
    if path.is_file():
        from .adapters import short_hash

        net.hash = short_hash(path)
    return net.eval()


def _original(path: Path, base, dtype):
    """(tensors under our names, the U-Net config, the hint widths) of an original-layout file."""
    from .formats import sd

    tensors = read_checkpoint(path, dtype)
    meta = _metadata(path)
    diff = "difference" in tensors
    if any(k.startswith(PREFIX) for k in tensors):  # v1.0 files hold the whole SD model beside it: not read
        tensors = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    tensors.pop("difference", None)
    if "input_hint_block.0.weight" not in tensors:
        what = "a diffusers ControlNet's weights (give its folder, with config.json)" \
            if "controlnet_cond_embedding.conv_in.weight" in tensors else "not a ControlNet"
        raise ValueError(f"{path} has no hint encoder (input_hint_block.*): {what}")
    if diff and base is None:
        raise ValueError(f"{path} is a difference ControlNet: load it with the model it was made from "
                         "(nanosd.load_controlnet(path, base=pipe); the CLI does this)")
    hint = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("input_hint_block.") and k.endswith("weight"))
    widths = tuple(tensors[f"input_hint_block.{i}.weight"].shape[0] for i in hint[:-1:2])
    if "nanosd_unet" in meta:  # trained here: the heads are not in the shapes
        cfg = UNetConfig(**json.loads(meta["nanosd_unet"]))
    else:
        linear = any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in tensors.items())
        cfg = sd.infer_unet(tensors, sd.SDXL if "label_emb.0.0.weight" in tensors else sd.SD2 if linear else sd.SD1)
    cfg = dataclasses.replace(cfg, cond_channels=0)
    if base is not None:
        same_shape(cfg, base.cfg.unet, path.stem, "the model")
        if "nanosd_unet" not in meta:  # the base's heads, which shapes do not tell
            cfg = dataclasses.replace(base.cfg.unet, cond_channels=0)
    if diff:  # the tensors it shares with the U-Net are differences to the base's
        unet = base.unet.state_dict()
        tensors = {k: v + unet[k].to(v.dtype) if k in unet else v for k, v in tensors.items()}
    return tensors, cfg, widths


def _metadata(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def save_controlnet(net: ControlNet, path):
    """The original single-file layout (`control_model.*`, .safetensors: A1111's extension, ComfyUI and diffusers'
    from_single_file read it), or a diffusers ControlNetModel folder when `path` has no suffix."""
    from .formats import diffusers

    path = Path(path)
    if path.suffix == ".safetensors":
        save_tensors({PREFIX + k: v.contiguous() for k, v in net.state_dict().items()}, path,
                     metadata={"nanosd_unet": json.dumps(dataclasses.asdict(net.cfg))})
    elif path.suffix:
        raise ValueError(f"{path}: save a ControlNet to a .safetensors file or to a folder (diffusers layout)")
    else:
        diffusers.write_controlnet(path, net)
    return path
