"""The denoiser: one U-Net for every size and family, from a 1M-parameter MNIST model to SD v1/v2 and SDXL.

Attribute paths follow the original checkpoints (`time_embed.0`, `label_emb.0.0`, `input_blocks.N.M`,
`middle_block`, `output_blocks.N.M`, `out.2`), so `model.diffusion_model.*` tensors load without a conversion table.
The families differ only in numbers: SD 2.x and SDXL project to tokens with linear layers and use 64-channel heads;
SDXL stacks more transformer blocks per level and adds a vector (pooled text + size ids) to the time embedding.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 1  # channels of x_t (image or latent); also the output channels
    cond_channels: int = 0  # extra input channels concatenated to x_t (mask, masked latent, low-res image)
    model_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_levels: list = field(default_factory=lambda: [2])  # levels (indices into channel_mult) with transformers
    num_heads: int | list = 4  # attention heads, or one count per level (diffusers' tiny test configs)
    transformer_depth: int | list = 1  # transformer blocks per attention, or one count per level (SDXL: 1, 2, 10)
    context_dim: int | None = None  # width of the cross-attention context; None: no cross-attention
    num_classes: int | None = None  # class labels as an embedding added to the time embedding
    adm_in_channels: int | None = None  # a vector y (SDXL: pooled text + embedded size ids) through an MLP, added too
    linear_proj: bool = False  # the transformers' proj_in / proj_out are linear layers (SD 2.x, SDXL), not 1x1 convs
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm's groups (SD: 32; diffusers' tiny test models use fewer)

    def heads(self, level):
        return self.num_heads[level] if isinstance(self.num_heads, list) else self.num_heads

    def depth(self, level):
        """Transformer blocks at a level (the middle block has the last level's)."""
        d = self.transformer_depth
        return d[level] if isinstance(d, list) else d

    def validate(self):
        for level, c in enumerate(self.model_channels * m for m in self.channel_mult):
            if c % self.norm_groups:
                raise ValueError(f"unet: channels {c} (model_channels x channel_mult) must be a multiple of "
                                 f"norm_groups={self.norm_groups} for GroupNorm")
            if c % self.heads(level):
                raise ValueError(f"unet: channels {c} must be divisible by num_heads={self.heads(level)}")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"unet: attention_levels {bad} out of range for {len(self.channel_mult)} levels")

    @property
    def skips(self):
        """The input blocks, each of which passes a skip to the decoder: the stem, the ResBlocks, the downsamplers."""
        return 1 + len(self.channel_mult) * (self.num_res_blocks + 1) - 1

    @property
    def factor(self):
        """Image sides must be divisible by this: one halving per level but the last."""
        return 2 ** (len(self.channel_mult) - 1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos, sin] of the (possibly fractional) timesteps, as the original LDM code."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def normalization(ch, eps=1e-5, groups=32):
    return nn.GroupNorm(groups, ch, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_dim, out_ch, dropout=0.0, groups=32):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(ch, groups=groups), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(normalization(out_ch, groups=groups), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight), nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Attention(Q, K, V) with Q from x and K, V from the context (x itself when there is none)."""

    def __init__(self, dim, context_dim=None, heads=8, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.probe = None  # a list: each call appends its attention weights, averaged over heads (B, N, M)

    def forward(self, x, context=None, mask=None):
        ctx = x if context is None else context
        B, N, C = x.shape
        q, k, v = (p(s).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
                   for p, s in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx)))
        if mask is not None:  # (B, M) True for real tokens -> broadcast over heads and queries
            mask = mask[:, None, None, :].bool()
        h = attention(q, k, v, mask)
        if self.probe is not None:  # for figures only: the weights that SDPA does not return
            w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            self.probe.append((w if mask is None else w.masked_fill(~mask, -torch.inf)).softmax(-1).mean(1))
        return self.to_out(h.transpose(1, 2).reshape(B, N, C))


def attention(q, k, v, mask=None):
    """Scaled dot-product attention (B, heads, tokens, dim). Training under bf16 autocast computes it in fp32 below
    1024 queries: torch's CPU flash-attention backward runs 4-10x slower in bf16 than in fp32 there (half the text
    recipe's step, benchmarks/train_speed.py); longer sequences gain from bf16."""
    if q.dtype == torch.bfloat16 and torch.is_grad_enabled() and q.device.type == "cpu" and q.shape[2] < 1024:
        with torch.autocast("cpu", enabled=False):  # which would cast them back
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim=None, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.has_context = context_dim is not None
        if self.has_context:  # a model without a context skips cross-attention entirely
            self.attn2 = CrossAttention(dim, context_dim, heads, dropout)
            self.norm2 = nn.LayerNorm(dim)

    tome = None  # token merging for self-attention (fast.token_merging sets it for a generation)

    def forward(self, x, context=None, mask=None, hw=None):
        merging = self.tome(x, hw) if self.tome is not None else None
        if merging is None:
            x = self.attn1(self.norm1(x)) + x
        else:  # attention over the merged tokens, copied back out to the grid
            merge, unmerge = merging
            x = unmerge(self.attn1(merge(self.norm1(x)))) + x
        if self.has_context:
            x = self.attn2(self.norm2(x), context, mask) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 projection to tokens, transformer blocks, 1x1 projection back, residual."""

    def __init__(self, ch, heads, depth=1, context_dim=None, dropout=0.0, groups=32, linear=False):
        super().__init__()
        self.norm = normalization(ch, eps=1e-6, groups=groups)
        self.linear = linear
        proj = (lambda: nn.Linear(ch, ch)) if linear else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, heads, context_dim, dropout) for _ in range(depth))
        self.proj_out = proj()
        nn.init.zeros_(self.proj_out.weight), nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context=None, mask=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear:  # tokens first, then the projection (SD 2.x, SDXL)
            h = self.proj_in(h.flatten(2).transpose(1, 2))
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context, mask, (H, W))
        if self.linear:
            return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it takes: the time embedding, the context, or neither."""

    def forward(self, x, emb, context=None, mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class Encoder(nn.Module):
    """What the U-Net and a ControlNet share: the time (and label / vector) embedding, the input blocks down to
    the lowest resolution and the middle block, built from one config, so a ControlNet copies the U-Net's encoder
    name for name."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        elif cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels + cfg.cond_channels, mc, 3, padding=1))])
        self.skips, ch = [mc], mc  # each input block's output channels: what the decoder's skips carry
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mc * mult, cfg.dropout, cfg.norm_groups)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(self.attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.skips.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, cfg.dropout, cfg.norm_groups), self.attention(ch, len(cfg.channel_mult) - 1),
            ResBlock(ch, emb_dim, ch, cfg.dropout, cfg.norm_groups))

    checkpointing = False  # training: each block's activations recomputed in the backward pass (memory for time)
    checkpoint_context = staticmethod(torch.utils.checkpoint.noop_context_fn)  # what the recomputation must see
    # again (a LoRA being trained: its deltas)

    def run(self, block, h, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, *args, use_reentrant=False,
                                                     context_fn=self.checkpoint_context)
        return block(h, *args)

    def attention(self, ch, level):
        c = self.cfg
        return SpatialTransformer(ch, c.heads(level), c.depth(level), c.context_dim, c.dropout, c.norm_groups,
                                  c.linear_proj)

    def embed(self, x, t, context=None, y=None, concat=None):
        """(x in the weights' dtype with its concatenated channels, context likewise, the time (+ label) embedding)."""
        cfg = self.cfg
        dtype = self.time_embed[0].weight.dtype  # inputs follow the weights (fp32, or bf16 for speed)
        x, context = x.to(dtype), (context.to(dtype) if context is not None else None)
        if x.shape[-1] % cfg.factor or x.shape[-2] % cfg.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the U-Net's factor {cfg.factor} "
                             f"({len(cfg.channel_mult)} levels): use a multiple of {cfg.factor}")
        if cfg.cond_channels:
            if concat is None or concat.shape[1] != cfg.cond_channels:
                got = None if concat is None else concat.shape[1]
                raise ValueError(f"this U-Net expects {cfg.cond_channels} concatenated condition channels, got {got}")
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        t = t.to(x.device)  # a sampler's timesteps live on the CPU
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(x.dtype))
        if cfg.num_classes or cfg.adm_in_channels:
            emb = emb + self.label_emb(y if cfg.num_classes else y.to(x.dtype))
        return x, context, emb


class UNet(Encoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        mc, emb_dim, skips, ch = cfg.model_channels, cfg.model_channels * 4, list(self.skips), self.skips[-1]
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mc * mult, cfg.dropout, cfg.norm_groups)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(self.attention(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch, groups=cfg.norm_groups), nn.SiLU(), nn.Conv2d(mc, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight), nn.init.zeros_(self.out[2].bias)

    def forward(self, x, t, context=None, y=None, concat=None, context_mask=None, control=None, cache=None):
        """eps (or v, or x_0) predicted from x_t at timesteps t (B,) with optional conditions:
        context (B, L, context_dim) for cross-attention, y (B,) class labels or (B, adm_in_channels) a vector,
        concat (B, cond_channels, H, W), control: ControlNets' residuals, one per skip and one for the middle block
        (added to the skips the decoder reads and to the middle block's output). `cache` (fast.FeatureCache):
        DeepCache, the decoder's features below skip `cache.depth` kept from a full call and reused."""
        h, context, emb = self.embed(x, t, context, y, concat)
        n = len(self.input_blocks)
        deep = cache.reuse(h) if cache is not None else None  # None: this call runs every block
        hs = []
        for block in self.input_blocks[:n if deep is None else cache.depth + 1]:
            h = self.run(block, h, emb, context, context_mask)
            hs.append(h)
        if control is not None:
            hs = [s + c.to(s.dtype) for s, c in zip(hs, control)]
        if deep is None:
            h = self.run(self.middle_block, h, emb, context, context_mask)
            h = h + control[-1].to(h.dtype) if control is not None else h
        else:
            h = deep
        for j in range(n - len(hs), n):
            if cache is not None and deep is None and j == n - 1 - cache.depth:
                cache.feature = h
            h = self.run(self.output_blocks[j], torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.out(h)


class OnFrozen(nn.Module):
    """Something trainable on a frozen U-Net (a LoRA's deltas, a ControlNet): the U-Net is not a submodule, so
    the trainer's optimizer, EMA and checkpoints hold the new part alone; `.to()` moves the U-Net along, and the
    EMA copy shares it instead of copying it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        object.__setattr__(self, "base", base.requires_grad_(False))
        self.cfg = base.cfg

    def _apply(self, fn, *args, **kw):
        self.base._apply(fn, *args, **kw)
        return super()._apply(fn, *args, **kw)

    def __deepcopy__(self, memo):
        memo[id(self.base)] = self.base
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new
