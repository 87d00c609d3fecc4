"""The forward process: beta schedules, alpha-bar, q(x_t | x_0), the posterior, and target conversions.

Everything is float32 exactly as diffusers computes it, so that samplers built on these tensors
reproduce the reference schedulers; tests check the values against the formulas in float64.
"""
import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")


def make_betas(name: str, timesteps: int = 1000, beta_start: float | None = None, beta_end: float | None = None):
    if name == "linear":  # DDPM (Ho et al. 2020)
        return torch.linspace(beta_start or 1e-4, beta_end or 0.02, timesteps, dtype=torch.float32)
    if name == "scaled_linear":  # Stable Diffusion: sqrt(beta) is linear
        lo, hi = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(lo**0.5, hi**0.5, timesteps, dtype=torch.float32) ** 2
    if name == "cosine":  # Nichol & Dhariwal 2021, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


@dataclass
class Steps:
    """The discrete timesteps a sampler visits, with alpha-bar at each and at the step after it."""
    t: torch.Tensor  # (n,) long, descending
    ab: torch.Tensor  # (n,) alpha-bar at t
    ab_next: torch.Tensor  # (n,) alpha-bar at the following (less noisy) step; final_alpha_cumprod at the end

    def __len__(self):
        return len(self.t)


class Schedule:
    def __init__(self, name="linear", timesteps=1000, beta_start=None, beta_end=None, final_alpha_cumprod=1.0):
        self.name, self.timesteps = name, timesteps
        self.betas = make_betas(name, timesteps, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha-bar "after" the last step: 1 (clean data), or alpha-bar_0 as SD's set_alpha_to_one=False has it
        self.final_alpha_cumprod = float(final_alpha_cumprod)

    def _at(self, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
        """v[t] shaped to broadcast against x."""
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

    # --- noise levels in the sigma parametrisation used by k-diffusion style samplers ---
    @property
    def sigmas(self):
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def steps(self, n: int, spacing: str = "leading", offset: int = 0) -> Steps:
        """The n timesteps a sampler visits, spaced as diffusers' `timestep_spacing` does.

        "leading" starts below T-1 (first step at 981 for 50 steps): with the cosine schedule ab_999 is ~2e-9,
        and starting there blows the predicted x_0 up; "trailing" ends exactly at T-1.
        """
        T = self.timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {n}")
        if spacing == "leading":
            t = (torch.arange(n) * (T // n)).flip(0) + offset
        elif spacing == "trailing":
            t = torch.arange(T, 0, -T / n).round().long() - 1
        elif spacing == "linspace":
            t = torch.linspace(0, T - 1, n).round().long().flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}: choose leading, trailing or linspace")
        t = t.long()
        ab = self.alphas_cumprod[t]
        ab_next = torch.cat([ab[1:], torch.tensor([self.final_alpha_cumprod])])
        return Steps(t, ab, ab_next)
