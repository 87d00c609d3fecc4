"""The forward process: beta schedules, alpha-bar, q(x_t | x_0), the posterior, and target conversions.

Everything is float32 exactly as diffusers computes it, so that samplers built on these tensors
reproduce the reference schedulers; tests check the values against the formulas in float64.
"""
import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")


def make_betas(name: str, timesteps: int = 1000, beta_start: float | None = None, beta_end: float | None = None,
               dtype=torch.float32):
    if name == "linear":  # DDPM (Ho et al. 2020)
        return torch.linspace(beta_start or 1e-4, beta_end or 0.02, timesteps, dtype=dtype)
    if name == "scaled_linear":  # Stable Diffusion: sqrt(beta) is linear
        lo, hi = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(lo**0.5, hi**0.5, timesteps, dtype=dtype) ** 2
    if name == "cosine":  # Nichol & Dhariwal 2021, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)]
        return torch.tensor(betas, dtype=dtype)
    raise ValueError(f"unknown beta schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


def zero_terminal_snr(betas):
    """Betas rescaled so that the last step is pure noise (Lin et al. 2023, Algorithm 1): sqrt(ab) shifted to 0 at
    the end and stretched to keep its start."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))  # in diffusers' order: the same float32 betas
    ab = root**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


class Schedule:
    def __init__(self, name="linear", timesteps=1000, beta_start=None, beta_end=None, final_alpha_cumprod=1.0,
                 steps_offset=0, spacing="", zero_snr=False):
        self.name, self.timesteps, self.steps_offset = name, timesteps, steps_offset
        self.spacing = spacing  # "": each sampler's own default; leading, linspace or trailing for all
        self.betas = make_betas(name, timesteps, beta_start, beta_end)
        if zero_snr:
            self.betas = zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if zero_snr:  # sigma would be infinite at the last step: diffusers' (and A1111's) tiny alpha-bar instead
            self.alphas_cumprod[-1] = 2.0**-24
        # alpha-bar as the original SD code (and so A1111's k-diffusion) holds it: float64 betas and product, stored
        # in float32; k-diffusion's sigmas are computed from it
        self.ldm_alphas_cumprod = self.alphas_cumprod if zero_snr else \
            torch.cumprod(1 - make_betas(name, timesteps, beta_start, beta_end, torch.float64), 0).float()
        self.ldm_sigmas = ((1 - self.ldm_alphas_cumprod) / self.ldm_alphas_cumprod) ** 0.5
        # alpha-bar "after" the last step: 1 (clean data), or alpha-bar_0 as SD's set_alpha_to_one=False has it
        self.final_alpha_cumprod = float(final_alpha_cumprod)

    @classmethod
    def of(cls, c) -> "Schedule":
        """From a DiffusionConfig."""
        s = cls(c.schedule, c.timesteps, c.beta_start or None, c.beta_end or None, steps_offset=c.steps_offset,
                spacing=c.timestep_spacing, zero_snr=c.zero_snr)
        s.final_alpha_cumprod = 1.0 if c.set_alpha_to_one else s.alphas_cumprod[0].item()
        return s

    def _at(self, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
        """v[t] shaped to broadcast against x; alpha-bar at fractional t (Euler's timesteps) from sigma
        interpolated linearly between the integer timesteps, as diffusers does."""
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                if v is not self.alphas_cumprod:
                    raise ValueError("only alpha-bar is defined at fractional timesteps")
                return (1 / (1 + self.sigma_at(t) ** 2)).to(x).reshape(-1, *([1] * (x.ndim - 1)))
            t = t.long()
        return v.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """Closed form of the forward process: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def q_step(self, x_prev, t, noise):
        """One step of the forward process: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
        beta = self._at(self.betas, t, x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        ab = self._at(self.alphas_cumprod, t, xt)
        ab_prev = self._at(torch.cat([torch.ones(1), self.alphas_cumprod[:-1]]), t, xt)
        beta, alpha = self._at(self.betas, t, xt), self._at(self.alphas, t, xt)
        mean = beta * ab_prev.sqrt() / (1 - ab) * x0 + (1 - ab_prev) * alpha.sqrt() / (1 - ab) * xt
        return mean, beta * (1 - ab_prev) / (1 - ab)

    # --- what the network predicts: eps, v = sqrt(ab) eps - sqrt(1-ab) x0, or x0 itself ---
    def target(self, prediction, x0, noise, t):
        ab = self._at(self.alphas_cumprod, t, x0)
        return {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]

    def to_eps(self, prediction, out, xt, t):
        if prediction == "eps":
            return out
        ab = self._at(self.alphas_cumprod, t, xt)
        if prediction == "v":
            return ab.sqrt() * out + (1 - ab).sqrt() * xt
        return (xt - ab.sqrt() * out) / (1 - ab).sqrt()

    def to_x0(self, prediction, out, xt, t):
        if prediction == "x0":
            return out
        ab = self._at(self.alphas_cumprod, t, xt)
        if prediction == "v":
            return ab.sqrt() * xt - (1 - ab).sqrt() * out
        return (xt - (1 - ab).sqrt() * out) / ab.sqrt()

    # --- noise levels in the sigma parametrisation of k-diffusion style samplers: x_t / sqrt(ab) = x_0 + sigma eps ---
    @property
    def sigmas(self):
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (possibly fractional) timesteps, interpolated linearly in float64 (numpy.interp's way)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.timesteps - 1)
        sig = self.sigmas.double()
        lo = t.floor().long().clamp(max=self.timesteps - 2)
        w = t - lo
        return torch.lerp(sig[lo], sig[lo + 1], w).float()

    def t_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The inverse: the fractional timestep of each sigma, linear in log sigma (diffusers' _sigma_to_t)."""
        log_sigmas = self.sigmas.double().log()
        ls = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-10).log()
        lo = (ls[None] >= log_sigmas[:, None]).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[lo] - ls) / (log_sigmas[lo] - log_sigmas[lo + 1])).clamp(0, 1)
        return (1 - w) * lo + w * (lo + 1)
