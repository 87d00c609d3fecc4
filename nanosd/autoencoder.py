"""The KL-regularised autoencoder of latent diffusion: x -> E -> diagonal Gaussian over z -> D -> x.

Attribute paths follow SD v1's `first_stage_model` (`encoder.down.N.block.M`, `encoder.mid.attn_1`,
`quant_conv`, `decoder.up.N.upsample`, ...), so the SD VAE's tensors load as they are.
"""
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .io import release_freed_memory
from .unet import Upsample, attention  # nearest x2 then a 3x3 conv, in both networks


@dataclass
class AutoencoderConfig:
    in_channels: int = 1  # image channels (output channels too)
    ch: int = 32
    ch_mult: list = field(default_factory=lambda: [1, 2, 2])  # f = 2^(len-1)
    num_res_blocks: int = 1
    z_channels: int = 4  # latent channels
    attention: bool = True  # self-attention in the mid blocks, as SD's VAE
    kl_weight: float = 1e-6
    rec_loss: str = "l1"  # l1, l2 or l1+l2
    disc_weight: float = 0.0  # 0: no patch discriminator
    disc_start: int = 2000  # step at which the discriminator loss switches on
    disc_channels: int = 32
    norm_groups: int = 32  # GroupNorm's groups (SD: 32; diffusers' tiny test models use fewer)

    @property
    def factor(self):
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self):
        for c in [self.ch * m for m in self.ch_mult]:
            if c % self.norm_groups:
                raise ValueError(f"autoencoder: channels {c} (ch x ch_mult) must be a multiple of "
                                 f"norm_groups={self.norm_groups} for GroupNorm")
        if self.rec_loss not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"autoencoder.rec_loss {self.rec_loss!r} is unknown: choose l1, l2 or l1+l2")


def normalize(ch, groups=32):
    return nn.GroupNorm(groups, ch, eps=1e-6)


BAND_BYTES = 16 << 20  # sampling on a CPU: a 3x3 conv's input of 8 such bands of rows or more is made by bands


def conv_by_rows(conv: nn.Conv2d, x, norm: nn.GroupNorm | None = None, up=1):
    """conv(silu(norm(x))), or conv(x upsampled `up` times, nearest). When sampling on a CPU, image by image in
    bands of output rows: the normalised or upsampled input (the output's size or 4x it) is never whole in memory (SD's
    decode at 512² in fp32: its peak 0.1-0.15 GB lower). The same numbers: the norm's statistics are the whole
    image's, and each band is convolved with the rows above and below it that the 3x3 kernel reads."""
    N, C, H, W = x.shape
    Ho = H * up
    rows = BAND_BYTES // (C * W * up * x.element_size())
    if torch.is_grad_enabled() or Ho < 8 * rows or x.device.type != "cpu":  # training, small, or a GPU's: whole
        h = F.silu(norm(x), inplace=not torch.is_grad_enabled()) if norm else x
        return conv(F.interpolate(h, scale_factor=up, mode="nearest") if up > 1 else h)
    rows = max(rows, 1)
    release_freed_memory()  # the last bands' buffers, freed into the heap: out of the peak that this call makes
    out = None
    for i in range(N):
        xi = x[i:i + 1]
        if norm:
            mean, var = _group_stats(xi.split(rows, 2), norm.num_groups)
            weight, bias = norm.weight.float(), norm.bias.float()
        for r0 in range(0, Ho, rows):
            r1 = min(r0 + rows, Ho)
            a, b = max(r0 - 1, 0), min(r1 + 1, Ho)  # the conv's input rows for output rows r0..r1
            h = xi[:, :, a // up:(b - 1) // up + 1]
            if norm:  # GroupNorm with the image's statistics: per channel, the affine map batch_norm applies
                h = F.silu(F.batch_norm(h, mean, var, weight, bias, eps=norm.eps), inplace=True)
            if up > 1:
                h = F.interpolate(h, scale_factor=up, mode="nearest")[:, :, a % up:a % up + b - a]
            h = F.pad(h, (0, 0, int(r0 == 0), int(r1 == Ho)))  # the conv's zero padding, at the image's edges only
            y = F.conv2d(h, conv.weight, conv.bias, padding=(0, 1))
            if out is None:
                out = torch.empty(N, y.shape[1], Ho, y.shape[3], dtype=y.dtype, device=y.device, memory_format=
                                  torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) else
                                  torch.contiguous_format)
            out[i:i + 1, :, r0:r1] = y
    return out


def _group_stats(bands, groups):
    """Per channel (fp32): the mean and variance of its group over one image's bands of rows, as GroupNorm has
    them (each band's from GroupNorm's own kernel, in fp32; then combined)."""
    C, parts = bands[0].shape[1], []
    for b in bands:
        _, mean, rstd = torch.native_group_norm(b.float(), None, None, 1, C, b[0, 0].numel(), groups, 0.0)
        parts.append((mean[0], rstd[0] ** -2))
    mean, var = (torch.stack(t) for t in zip(*parts))  # band, group
    rows = torch.tensor([b.shape[2] for b in bands], device=mean.device, dtype=torch.float32)[:, None]
    share = rows / rows.sum()
    m = (share * mean).sum(0)
    v = (share * (var + (mean - m) ** 2)).sum(0)
    return m.repeat_interleave(C // groups), v.repeat_interleave(C // groups)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups=32):
        super().__init__()
        self.norm1, self.conv1 = normalize(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = normalize(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = conv_by_rows(self.conv2, conv_by_rows(self.conv1, x, self.norm1), self.norm2)
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h if torch.is_grad_enabled() else h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, ch, groups=32):
        super().__init__()
        self.norm = normalize(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(2, 3) for p in (self.q, self.k, self.v))
        h = attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original


def _mid(ch, attention, groups):
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)
    mid.attn_1 = AttnBlock(ch, groups) if attention else nn.Identity()
    return mid


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = c.ch
        for level, mult in enumerate(c.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(cin, c.ch * mult, c.norm_groups))
                cin = c.ch * mult
            if level != len(c.ch_mult) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = _mid(cin, c.attention, c.norm_groups)
        self.norm_out = normalize(cin, c.norm_groups)
        self.conv_out = nn.Conv2d(cin, 2 * c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        cin = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, c.attention, c.norm_groups)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(ResnetBlock(cin, c.ch * mult, c.norm_groups))
                cin = c.ch * mult
            if level != 0:
                stage.upsample = Upsample(cin)
            self.up.insert(0, stage)  # up[i] is level i, as in the original
        self.norm_out = normalize(cin, c.norm_groups)
        self.conv_out = nn.Conv2d(cin, c.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = conv_by_rows(stage.upsample.conv, h, up=2)
        return conv_by_rows(self.conv_out, h, self.norm_out)


class DiagonalGaussian:
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator=None):
        device = generator.device if generator is not None else self.mean.device  # a CPU generator for a GPU model
        return self.mean + self.std * torch.randn(self.mean.shape, generator=generator, device=device,
                                                  dtype=self.mean.dtype).to(self.mean.device)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(N(mean, var) || N(0, I)) per image, summed over latent elements."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x) -> DiagonalGaussian:
        f = self.cfg.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's factor {f}")
        return DiagonalGaussian(self.fp16_safe(lambda: self.quant_conv(self.encoder(x.to(self.quant_conv.weight)))))

    def decode(self, z):
        return self.fp16_safe(lambda: self.decoder(self.post_quant_conv(z.to(self.quant_conv.weight))))

    def fp16_safe(self, run):
        """run() in the weights' dtype; an fp16 autoencoder whose result is not finite (SDXL's VAE overflows
        fp16's 65504) turns fp32 for good and runs again, as A1111 reverts its VAE to 32-bit floats."""
        out = run()
        if self.quant_conv.weight.dtype == torch.float16 and not torch.isfinite(out).all():
            print("nanosd: the VAE overflowed in fp16 (inf/NaN); it computes in fp32 from now on", file=sys.stderr)
            with torch.inference_mode(False), torch.no_grad():  # weights usable outside inference mode too
                self.float()
            out = run()
        return out

    def forward(self, x, generator=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


# --- training: reconstruction + KL, and the LDM paper's optional patch discriminator ---

class PatchDiscriminator(nn.Module):
    """A PatchGAN (pix2pix) critic: one real/fake logit per overlapping patch."""

    def __init__(self, in_channels, ch=32, layers=2):
        super().__init__()
        mods, c = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(32, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.main = nn.Sequential(*mods)

    def forward(self, x):
        return self.main(x)


class AutoencoderLoss(nn.Module):
    """|x - D(z)| (L1 and/or L2) + kl_weight KL, and after disc_start a hinge GAN term with the LDM adaptive weight
    ||grad L_rec|| / ||grad L_G|| at the decoder's last layer. Generator and critic train in one backward pass:
    the generator's term sees the critic through detached weights, the critic's terms see detached images."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.disc_weight:
            self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.disc_channels)

    def forward(self, ae: Autoencoder, batch, g, step):
        c = self.cfg
        x = batch["image"]
        rec, posterior = ae(x, generator=g)
        err = rec.float() - x
        rec_loss = {"l1": err.abs().mean(), "l2": err.pow(2).mean(), "l1+l2": err.abs().mean() + err.pow(2).mean()}[c.rec_loss]
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the reconstruction term
        terms = {"rec": rec_loss, "kl": kl}
        loss = rec_loss + c.kl_weight * kl
        if c.disc_weight and step >= c.disc_start:
            d = self.discriminator
            frozen = {k: v.detach() for k, v in d.named_parameters()}
            g_loss = -torch.func.functional_call(d, frozen, (rec,)).mean()
            last = ae.decoder.conv_out.weight
            gr = torch.autograd.grad(rec_loss, last, retain_graph=True)[0].norm()
            gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
            weight = (gr / (gg + 1e-4)).clamp(0, 1e4).detach() * c.disc_weight
            d_loss = 0.5 * (F.relu(1 - d(x)).mean() + F.relu(1 + d(rec.detach())).mean())
            loss = loss + weight * g_loss + d_loss
            terms.update(g=g_loss, d=d_loss)
        terms["loss"] = loss
        return terms


def psnr(a, b):
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]."""
    return -10 * torch.log10((a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10))


def ssim(a, b, window=7, sigma=1.5):
    """Structural similarity (Wang et al. 2004) per image, Gaussian window, for images in [0, 1]."""
    coords = torch.arange(window, dtype=torch.float32, device=a.device) - window // 2
    g1 = torch.exp(-coords**2 / (2 * sigma**2))
    g1 = g1 / g1.sum()
    kernel = (g1[:, None] * g1[None]).expand(a.shape[1], 1, window, window)
    blur = lambda x: F.conv2d(x, kernel, groups=a.shape[1])
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


# --- the tiny decoder (TAESD's architecture, Bohan 2023): previews, and final images where speed matters more ---

class TinyBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class SoftClamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3


class TinyDecoder(nn.Sequential):
    """Model-space latents (the U-Net's: already times the scale factor) -> pixels in [-1, 1], without the
    autoencoder: plain 3x3 convolutions and ReLUs, 64 channels, one 2x upsampling per halving. Its layers are
    numbered as TAESD's `taesd_decoder` files (`1.weight`, `3.conv.0.weight`, ...), so they load as they are; at
    512 px about 1/20 of SD's VAE decoder's work."""

    def __init__(self, latent_channels=4, out_channels=3, upsamples=3, width=64):
        layers = [SoftClamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(upsamples):
            layers += [TinyBlock(width), TinyBlock(width), TinyBlock(width), nn.Upsample(scale_factor=2),
                       nn.Conv2d(width, width, 3, padding=1, bias=False)]
        layers += [TinyBlock(width), nn.Conv2d(width, out_channels, 3, padding=1)]
        super().__init__(*layers)
        self.factor = 2 ** upsamples

    def forward(self, z):
        return super().forward(z.to(self[1].weight)) * 2 - 1  # TAESD's images are in [0, 1]

    @classmethod
    def from_tensors(cls, tensors: dict, what: str) -> "TinyDecoder":
        """A TAESD decoder from its file's tensors: TAESD's own (`taesd_decoder.safetensors`, `taesdxl_decoder`,
        ...), or diffusers' AutoencoderTiny (`decoder.layers.N`: numbered from 0, without the clamp)."""
        from .io import load_into

        if any(k.startswith("decoder.layers.") for k in tensors):
            tensors = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in tensors.items()
                       if k.startswith("decoder.layers.")}
        convs = sorted((int(k.split(".")[0]), v) for k, v in tensors.items() if k.count(".") == 1 and
                       k.endswith("weight") and k.split(".")[0].isdigit())
        if not convs or convs[0][0] != 1:
            raise ValueError(f"{what}: not a TAESD decoder (no '1.weight' or 'decoder.layers.0.weight'); give "
                             "taesd_decoder.safetensors (or a diffusers AutoencoderTiny file)")
        first, last = convs[0][1], convs[-1][1]
        decoder = cls(first.shape[1], last.shape[0], (len(convs) - 2), first.shape[0])
        load_into(decoder, tensors, what)
        return decoder
