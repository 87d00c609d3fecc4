"""A1111's seeds: the same seed gives the same picture as in AUTOMATIC1111's web UI.

A1111 draws each image's noise from its own generator seeded with that image's seed (image i of a batch: seed + i),
from one of three sources (its `randn_source` option): "GPU", CUDA's torch.randn, which is Philox 4x32-10 with the
Box-Muller transform and which A1111 reproduces on any device as "NV"; and "CPU", torch's CPU generator. Variation
seeds blend in a second seed's noise by spherical interpolation; "seed resize from" draws the noise at another
size and pastes it centred, so that a seed's composition survives a change of size. The ancestral samplers' fresh
noise comes from the same per-image generators, reseeded with seed + ENSD (eta noise seed delta) when it is set.
"""
import numpy as np
import torch

SOURCES = ("GPU", "CPU", "NV")

_M = (0xD2511F53, 0xCD9E8D57)  # Philox 4x32's multipliers and Weyl key increments (Salmon et al. 2011)
_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: np.ndarray, m: int):
    p = a.astype(np.uint64) * np.uint64(m)
    return (p >> np.uint64(32)).astype(np.uint32), p.astype(np.uint32)


def philox(seed: int, offset: int, n: int) -> np.ndarray:
    """Philox 4x32-10 for counters (offset, 0, i, 0), i < n, key = the seed's two 32-bit halves: (4, n) uint32.
    This is how CUDA's curand gives element i of a tensor (subsequence i) its numbers."""
    c = np.zeros((4, n), dtype=np.uint32)
    c[0], c[2] = offset, np.arange(n, dtype=np.uint32)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    for r in range(10):
        hi0, lo0 = _mulhilo(c[0], _M[0])
        hi1, lo1 = _mulhilo(c[2], _M[1])
        c = np.stack([hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0])
        k0, k1 = np.uint32((int(k0) + _W[0]) & 0xFFFFFFFF), np.uint32((int(k1) + _W[1]) & 0xFFFFFFFF)
    return c


class Philox:
    """torch.randn on an NVIDIA GPU, on any device: Box-Muller on the first two of each element's four numbers;
    every draw moves the offset on by one (A1111's "NV" generator)."""

    def __init__(self, seed: int):
        self.seed, self.offset = int(seed), 0

    def randn(self, shape) -> torch.Tensor:
        n = int(np.prod(shape))
        x, y = philox(self.seed, self.offset, n)[:2]
        self.offset += 1
        # float32 constants, float64 arithmetic (numpy's promotion of uint32 by float32), as A1111 computes it
        scale, scale_2pi = np.float64(np.float32(2.3283064e-10)), np.float64(np.float32(2.3283064e-10 * 6.2831855))
        u = x * scale + scale / 2
        v = y * scale_2pi + scale_2pi / 2
        return torch.from_numpy((np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape))


class _CPU:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(int(seed))

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.g)


def generator(seed: int, source: str = "GPU"):
    """A1111's create_generator: one image's generator for its randn_source."""
    if source not in SOURCES:
        raise ValueError(f"unknown RNG source {source!r}: choose one of {', '.join(SOURCES)}")
    return _CPU(seed) if source == "CPU" else Philox(seed)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of two (C, H, W) noises, norms taken along dim 1 as it takes them (and its
    near-parallel fallback, whose weights are the other way round, kept: it is what A1111 does)."""
    low_n, high_n = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


class ImageNoise:
    """A batch's noise as A1111 draws it: `first()` the starting noise, then `randn_like(x)` (what the samplers
    call for fresh noise) each image's next draw. `seeds`/`subseeds` hold one seed per image; `resize_from` is
    (width, height) in pixels, or None; `factor` is the autoencoder's (8 for SD)."""

    def __init__(self, shape, seeds, source="GPU", subseeds=None, subseed_strength=0.0, resize_from=None,
                 ensd=0, factor=8):
        self.shape, self.seeds, self.source = tuple(int(s) for s in shape), list(seeds), source
        self.subseeds, self.strength, self.ensd = subseeds, subseed_strength, ensd
        self.from_shape = self.shape if not resize_from or min(resize_from) <= 0 else \
            (self.shape[0], resize_from[1] // factor, resize_from[0] // factor)
        self.generators = [generator(s, source) for s in self.seeds]

    def first(self) -> torch.Tensor:
        xs = []
        for i, (seed, g) in enumerate(zip(self.seeds, self.generators)):
            resized = self.from_shape != self.shape
            noise = generator(seed, self.source).randn(self.from_shape) if resized else g.randn(self.shape)
            if self.subseeds is not None and self.strength != 0:
                sub = self.subseeds[i] if i < len(self.subseeds) else 0
                noise = slerp(self.strength, noise, generator(sub, self.source).randn(self.from_shape))
            if resized:  # the noise of the other size, centred on this size's (cropped where larger)
                x = g.randn(self.shape)
                (_, h, w), (_, fh, fw) = self.shape, self.from_shape
                dy, dx = (h - fh) // 2, (w - fw) // 2
                ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
                ch, cw = min(fh, fh + 2 * dy), min(fw, fw + 2 * dx)
                x[:, ty:ty + ch, tx:tx + cw] = noise[:, sy:sy + ch, sx:sx + cw]
                noise = x
            xs.append(noise)
        if self.ensd:
            self.generators = [generator(s + self.ensd, self.source) for s in self.seeds]
        return torch.stack(xs)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([g.randn(self.shape) for g in self.generators]).to(x)
