"""Samplers: plain functions behind one signature, `sample_x(model, x, steps, *, generator=None, callback=None)`.

`model(x, t)` returns the predicted noise eps (guidance and the prediction type already resolved);
`x` is the starting noise; `steps` (schedule.Steps) holds the timesteps visited and alpha-bar at each;
`callback(i, t, x, x0)` sees every step, with the current x_t and the predicted x_0.
"""
import torch


def _x0(x, eps, ab):
    return (x - (1 - ab) ** 0.5 * eps) / ab**0.5


@torch.no_grad()
def sample_ddpm(model, x, steps, *, generator=None, callback=None):
    """Ancestral sampling, DDPM Algorithm 2, with sigma_t^2 = beta~_t (the posterior variance):
    x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sigma_t z.
    With fewer steps than the schedule has, alpha_t and beta_t are those of the jump t -> t'."""
    for i, (t, ab, ab_next) in enumerate(zip(steps.t, steps.ab, steps.ab_next)):
        eps = model(x, t)
        alpha = ab / ab_next
        beta = 1 - alpha
        if callback:
            callback(i, t, x, _x0(x, eps, ab))
        x = (x - beta / (1 - ab) ** 0.5 * eps) / alpha**0.5
        if i < len(steps) - 1:
            var = beta * (1 - ab_next) / (1 - ab)
            x = x + var**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


@torch.no_grad()
def sample_ddim(model, x, steps, *, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s); eta = 0 is deterministic, 1 is DDPM-like."""
    for i, (t, ab, ab_next) in enumerate(zip(steps.t, steps.ab, steps.ab_next)):
        eps = model(x, t)
        x0 = _x0(x, eps, ab)
        if callback:
            callback(i, t, x, x0)
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)) ** 0.5
        x = ab_next**0.5 * x0 + (1 - ab_next - sigma**2) ** 0.5 * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
