"""What a sample is conditioned on, turned into the U-Net's keyword arguments.

One currency for prompts of every kind: a string per sample, "" meaning none (the unconditional branch of
classifier-free guidance). Text prompts reach the U-Net as a context sequence for cross-attention; class names
as a label embedding added to the time embedding (the empty prompt is an extra, null class).

Spatially aligned conditions are concatenated to z_t (`concat`), at the model's resolution:
  inpaint  [mask, masked image in model space] (SD's inpainting U-Net reads [z_t, mask, E(x * (1 - mask))])
  edges    an edge map of the image (a structure map -> image model)
  lowres   the image sr_factor times smaller (LDM-SR): at f = sr_factor it is exactly the latent's size
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text import CLIPTextConfig, TextConditioner
from .unet import timestep_embedding

ENCODERS = ("minilm", "clip", "labels", "none")
CONCATS = ("", "inpaint", "edges", "lowres")
MICRO = {"": 0, "size": 6, "aesthetic": 5}  # SDXL's size ids (original h, w, crop top, left, target h, w); the
# refiner's (original h, w, crop top, left, aesthetic score)


@dataclass
class ConditionConfig:
    encoder: str = "minilm"  # minilm (frozen, pretrained), clip (a text transformer trained here), labels, none
    concat: str = ""  # a spatial condition concatenated to z_t: inpaint, edges or lowres ("" for none)
    sr_factor: int = 4  # lowres: how much smaller the low-resolution image is
    drop_prob: float = 0.1  # training drops the condition this often, for classifier-free guidance
    guidance: float = 3.0  # the default guidance scale when sampling
    classes: list[str] = field(default_factory=list)  # labels: the class names (filled in from the data)
    clip: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(width=256, layers=4, heads=4, max_length=32))
    clip2: CLIPTextConfig | None = None  # a second CLIP read beside the first, contexts concatenated (SDXL's bigG)
    micro: str = ""  # SDXL's micro-conditioning: the pooled text and these ids, embedded, as the U-Net's vector y
    micro_dim: int = 256  # the sinusoidal embedding width of each id
    zero_negative: bool = False  # no negative prompt: the unconditional context is zeros (SDXL's diffusers default)
    micro_lowres: float = 0.3  # micro = "size", trained here: the share of samples shown as enlarged half-size images

    def validate(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"condition.encoder {self.encoder!r} is unknown: choose one of {', '.join(ENCODERS)}")
        if self.concat not in CONCATS:
            raise ValueError(f"condition.concat {self.concat!r} is unknown: choose one of {', '.join(CONCATS[1:])}")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"condition.drop_prob {self.drop_prob} must be in [0, 1)")
        if self.micro not in MICRO:
            raise ValueError(f"condition.micro {self.micro!r} is unknown: choose size or aesthetic (or none)")


class Conditioner(nn.Module):
    """prompts (list of str) -> dict of U-Net keyword arguments. Its parameters are trained only for "clip"."""

    def __init__(self, cfg: ConditionConfig, tokenizer=None):
        super().__init__()
        self.cfg, self.classes = cfg, cfg.classes
        # the tokenizer and encoder, outside state_dict: a frozen pretrained encoder is not saved with each run
        tokenizer, tokenizer_2 = tokenizer if isinstance(tokenizer, tuple) else (tokenizer, None)
        text = TextConditioner(cfg.encoder, cfg.clip, tokenizer) if cfg.encoder in ("minilm", "clip") else None
        text2 = TextConditioner("clip", cfg.clip2, tokenizer_2) if cfg.clip2 else None
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "text2", text2)
        if cfg.encoder == "clip":
            self.text_encoder = text.model  # trained here: it learns and saves with the U-Net
        if text2:
            self.text_encoder_2 = text2.model
        self.bind(lambda x, generator=None: x, 1)

    def bind(self, to_model_space, factor):
        """How images reach the model's space (identity, or x -> scale * E(x).mode()), for inpainting, and how many
        pixels a cell of that space is across (the micro-conditioning's sizes are in pixels)."""
        object.__setattr__(self, "to_model_space", to_model_space)
        self.factor = factor
        return self

    def encoders(self) -> dict:
        """The text encoders by part ("text_encoder", "text_encoder_2"), as TextConditioners."""
        return {part: t for part, t in (("text_encoder", self.text), ("text_encoder_2", self.text2)) if t is not None}

    @property
    def prompted(self):
        return self.cfg.encoder != "none"

    def unet_options(self, model_channels, image_channels):
        """What the U-Net needs to read this condition."""
        c = self.cfg
        concat = {"": 0, "inpaint": 1 + model_channels, "edges": 1, "lowres": image_channels}[c.concat]
        pooled = (c.clip2 or c.clip).projection if c.encoder == "clip" else self.text.width if self.text else 0
        return {"num_classes": len(self.classes) + 1 if c.encoder == "labels" else None,
                "context_dim": (self.text.width + (self.text2.width if self.text2 else 0)) if self.text else None,
                "adm_in_channels": pooled + MICRO[c.micro] * c.micro_dim if c.micro else None,
                "cond_channels": concat}

    def derive(self, pixels, g):
        """Training: the condition image the data gives (the image and a random mask, its edges, or it smaller)."""
        c = self.cfg.concat
        if c == "inpaint":
            return pixels, random_masks(pixels.shape, g)
        if c == "edges":
            return edge_map(pixels), None
        return F.avg_pool2d(pixels, self.cfg.sr_factor), None

    def spatial(self, image, mask, size, generator=None) -> torch.Tensor:
        """The channels concatenated to z_t (at `size`) from the condition image (and, for inpainting, the mask:
        1 = the hole to fill). With a generator, the masked image's latent is drawn from E's posterior (diffusers'
        way, for SD's inpainting model); without, it is the posterior's mean (training)."""
        c = self.cfg.concat
        if c == "inpaint":
            with torch.no_grad():
                masked = self.to_model_space(image * (mask < 0.5), generator)
            return torch.cat([F.interpolate(mask, size=size, mode="nearest"), masked.to(mask.device)], 1)
        if c == "edges":
            return F.interpolate(image, size=size, mode="area") * 2 - 1
        return image if image.shape[-1] == size[-1] else F.interpolate(image, size=size, mode="bicubic")

    def check(self, prompts: list[str]):
        """One-line errors for prompts this model cannot take (the empty prompt is the unconditional branch)."""
        for p in prompts:
            if not p:
                continue
            if self.cfg.encoder == "labels":
                if p not in self.classes:
                    raise ValueError(f"prompt {p!r} is not one of this model's classes: {', '.join(self.classes)}")
            elif self.cfg.encoder == "minilm":  # CLIP encoders take any length, in chunks
                limit, n = self.text.tokenizer.max_length - 2, len(self.text.tokenizer.ids(p))
                if n > limit:
                    raise ValueError(f"prompt is {n} tokens long, over this model's {limit}: shorten it")

    def forward(self, prompts: list, clip_skip: int = 1, micro: torch.Tensor | None = None) -> dict:
        """The U-Net's inputs for prompts ("" or None: none; None is zeros where cfg.zero_negative) and, for a
        micro-conditioned model, its ids (B, n) (sizes in pixels, the aesthetic score)."""
        c = self.cfg
        if not self.prompted:
            return {}
        if c.encoder == "labels":
            null = len(self.classes)
            return {"y": torch.tensor([self.classes.index(p) if p else null for p in prompts])}
        texts = [p or "" for p in prompts]
        context, mask, pooled = self.text(texts, clip_skip) if c.encoder == "clip" else self.text(texts)
        if self.text2:
            context2, _, pooled = self.text2(texts, clip_skip)
            context = torch.cat([context, context2], -1)
        if c.zero_negative:
            keep = torch.tensor([p is not None for p in prompts], dtype=context.dtype)
            context = context * keep[:, None, None].to(context.device)
            pooled = pooled * keep[:, None].to(pooled.device) if pooled is not None else None
        out = {"context": context, "context_mask": mask}
        if c.micro:
            if micro is None or micro.shape != (len(prompts), MICRO[c.micro]):
                raise ValueError(f"this model is conditioned on {MICRO[c.micro]} {c.micro} ids per image: give them")
            ids = timestep_embedding(micro.flatten().to(pooled.device), c.micro_dim).reshape(len(prompts), -1)
            out["y"] = torch.cat([pooled, ids.to(pooled.dtype)], -1)
        return out

    def low_resolution(self, x0, g):
        """SDXL's size conditioning, trained here: a share (micro_lowres) of the batch becomes images whose original
        was half the size (pooled 2x2, then enlarged back), and every sample says its original size, so that the
        model learns what enlarged images look like without drawing them unless asked (original_size small).
        Returns (x0, ids (B, 6): original h, w, crop top, left, target h, w)."""
        if self.cfg.micro != "size":
            raise ValueError(f"condition.micro {self.cfg.micro!r} cannot be trained here: use size")
        B, _, H, W = x0.shape
        low = (torch.rand(B, generator=g, device=g.device) < self.cfg.micro_lowres).to(x0.device)
        blurred = F.interpolate(F.avg_pool2d(x0, 2), scale_factor=2, mode="nearest")
        x0 = torch.where(low[:, None, None, None], blurred, x0)
        h, w = H * self.factor, W * self.factor
        side = torch.where(low, 0.5, 1.0).cpu()
        ids = torch.stack([side * h, side * w, *torch.zeros(2, B), torch.full((B,), h), torch.full((B,), w)], 1)
        return x0, ids

    def training_prompts(self, captions: list[list[str]], labels, g: torch.Generator) -> list[str]:
        """One phrasing per sample (class names for labels), dropped to "" with probability drop_prob."""
        if not self.prompted:
            return []
        if self.cfg.encoder == "labels":
            prompts = [self.classes[i] for i in labels.tolist()]
        else:
            if captions is None:
                raise ValueError("this recipe is text-conditioned but its data has no captions "
                                 "(a folder needs a .txt caption beside each image)")
            pick = torch.randint(0, 1 << 30, (len(captions),), generator=g, device=g.device).tolist()
            prompts = [c[k % len(c)] for c, k in zip(captions, pick)]
        drop = torch.rand(len(prompts), generator=g, device=g.device) < self.cfg.drop_prob
        return ["" if d else p for p, d in zip(prompts, drop.tolist())]


def random_masks(shape, g) -> torch.Tensor:
    """Training holes (1 = fill): a box of a quarter to three quarters of each side, or (one time in ten) all."""
    B, _, H, W = shape
    r = torch.rand(B, 5, generator=g, device=g.device).cpu()
    mask = torch.zeros(B, 1, H, W)
    for i, (a, b, y, x, whole) in enumerate(r.tolist()):
        h, w = int(H * (0.25 + 0.5 * a)), int(W * (0.25 + 0.5 * b))
        y0, x0 = int(y * (H - h + 1)), int(x * (W - w + 1))
        mask[i, :, y0:y0 + h, x0:x0 + w] = 1
        if whole < 0.1:
            mask[i] = 1
    return mask.to(g.device)


def edge_map(pixels) -> torch.Tensor:
    """A structure map: where the Sobel gradient of the gray image is strong (1) or not (0)."""
    gray = (pixels.mean(1, keepdim=True) + 1) / 2
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=pixels.device)
    k = torch.stack([kx, kx.T])[:, None]
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k).norm(dim=1, keepdim=True)
    return (grad > 0.5).float()


class ConditionedUNet(nn.Module):
    """The U-Net with its conditioner: what a conditioned recipe trains and saves (keys unet.*, conditioner.*)."""

    def __init__(self, unet, conditioner: Conditioner):
        super().__init__()
        self.unet, self.conditioner = unet, conditioner


def bind_conditioner(conditioner: Conditioner, autoencoder, cfg) -> Conditioner:
    """Give an inpainting conditioner the way into the model's space: scale * E(x) for latent models."""
    if autoencoder is None:
        return conditioner.bind(lambda x, generator=None: x, 1)
    return conditioner.bind(lambda x, generator=None: to_latent(autoencoder, x, cfg.diffusion.scale_factor, generator),
                            autoencoder.cfg.factor)


def to_latent(autoencoder, x, scale, generator=None):
    """scale * E(x): the posterior's mean, or a sample from it drawn with `generator`."""
    posterior = autoencoder.encode(x)
    return scale * (posterior.mode() if generator is None else posterior.sample(generator)).float()
