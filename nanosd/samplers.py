"""Samplers: plain functions behind one signature, `sample_x(model, x, steps, *, generator=None, callback=None)`.

`model(x, t)` returns the predicted noise eps for the variance-preserving x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps
(guidance and the prediction type already resolved); `t` may be fractional (Euler's timesteps).
`sampler(name)` resolves a name (ours or A1111's) once to a `Sampler`, which carries the function and its options;
`Sampler.steps(schedule, n)` holds what the sampler visits: the timesteps, and sigma and alpha-bar at each step
and after the last. Two families hold x differently, as their papers do:
  - alpha-bar samplers (ddpm, ddim, plms, dpmpp_2m, unipc) hold x_t itself;
  - sigma samplers (euler, euler_a, heun; Karras et al. 2022) hold x_t / sqrt(ab) = x_0 + sigma eps.
`Sampler.start(steps, noise, x0)` puts the first x where the sampler wants it. `callback(i, t, x, x0)` runs after
step i with the new x and the predicted x_0; if it returns a tensor, that replaces x (how inpainting keeps the
unmasked part). Each sampler reproduces the diffusers scheduler of its family, timesteps included.
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import Schedule


@dataclass
class Steps:
    t: torch.Tensor  # (n,) the timesteps the model sees (float)
    sigma: torch.Tensor  # (n + 1,) sigma at each step and after the last (float32)
    ab: torch.Tensor  # (n + 1,) alpha-bar at each step and after the last
    init: float | None = None  # sigma samplers: the scale of the starting noise (None: sigma at the first step)

    def __len__(self):
        return len(self.t)

    def __getitem__(self, s: slice):
        """The steps from s.start on (img2img begins part-way down the schedule)."""
        return Steps(self.t[s], self.sigma[s.start:], self.ab[s.start:], self.init)


def _interp_steps(schedule: Schedule, t: torch.Tensor, final_sigma=0.0):
    sigma = torch.cat([schedule.sigma_at(t), torch.tensor([final_sigma])])
    return Steps(t.float(), sigma, 1 / (1 + sigma.double() ** 2))


def _randn(x, generator):
    """Fresh noise like x: from a torch.Generator (diffusers' one for the batch), or from an object that draws it
    itself (A1111's per-image generators, seeds.ImageNoise)."""
    if hasattr(generator, "randn_like"):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def after_step(callback, i, t, x, x0):
    """Run a step's callback; a tensor it returns replaces x."""
    if callback is None:
        return x
    out = callback(i, t, x, x0)
    return x if out is None else out


# --- alpha-bar samplers: x is x_t ---

@torch.no_grad()
def sample_ddpm(model, x, steps, *, generator=None, callback=None):
    """Ancestral sampling, DDPM Algorithm 2, sigma_t^2 = beta~_t: x_{t-1} drawn from the posterior
    q(x_{t-1} | x_t, x_0 = x0_hat). With fewer steps than the schedule has, alpha_t and beta_t are the jump's."""
    for i, t in enumerate(steps.t):
        ab, ab_prev = steps.ab[i].float(), steps.ab[i + 1].float()
        eps = model(x, t)
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        alpha = ab / ab_prev
        beta = 1 - alpha
        x = ab_prev**0.5 * beta / (1 - ab) * x0 + alpha**0.5 * (1 - ab_prev) / (1 - ab) * x
        if t > 0:
            var = ((1 - ab_prev) / (1 - ab) * beta).clamp_min(1e-20)
            x = x + var**0.5 * _randn(x, generator)
        x = after_step(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(model, x, steps, *, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s); eta = 0 is deterministic, 1 is DDPM-like."""
    for i, t in enumerate(steps.t):
        ab, ab_next = steps.ab[i].float(), steps.ab[i + 1].float()
        eps = model(x, t)
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)) ** 0.5
        x = ab_next**0.5 * x0 + (1 - ab_next - sigma**2) ** 0.5 * eps
        if eta > 0:
            x = x + sigma * _randn(x, generator)
        x = after_step(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_plms(model, x, steps, *, generator=None, callback=None):
    """Pseudo linear multistep (Liu et al. 2022, PNDM without its Runge-Kutta warm-up): Adams-Bashforth over the
    last four eps. The first step is taken twice (with eps at both ends averaged), as diffusers' PNDM does."""
    def transfer(x, eps, i):  # PNDM's eq. 9: x_t -> x_{t-delta} along eps
        a, a_prev = steps.ab[i].float(), steps.ab[i + 1].float()
        denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom

    def x0_of(x, eps, i):
        a = steps.ab[i].float()
        return (x - (1 - a) ** 0.5 * eps) / a**0.5

    ets = []
    for i, t in enumerate(steps.t):
        eps = model(x, t)
        ets.append(eps)
        if i == 0 and len(steps) > 1:  # a trial step to t_1, and eps there
            trial = after_step(callback, 0, t, transfer(x, eps, 0), x0_of(x, eps, 0))
            eps = (eps + model(trial, steps.t[1])) / 2
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        elif len(ets) >= 4:
            eps = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x0 = x0_of(x, ets[-1], i)
        x = after_step(callback, i, t, transfer(x, eps, i), x0)
        ets = ets[-3:]
    return x


@torch.no_grad()
def sample_lcm(model, x, steps, *, generator=None, callback=None):
    """Latent consistency models (Luo et al. 2023): each step maps x_t straight to x_0 through the consistency
    boundary condition (c_skip, c_out at 10 t, sigma_data 0.5), then noises that afresh to the next timestep; the
    last step returns it. For LCM checkpoints and LCM-LoRAs: 4-8 steps, guidance about 1-2."""
    for i, t in enumerate(steps.t):
        ab, ab_next = steps.ab[i].float(), steps.ab[i + 1].float()
        x0 = (x - (1 - ab) ** 0.5 * model(x, t)) / ab**0.5
        scaled = 10 * t.float()
        x0 = scaled / (scaled**2 + 0.25) ** 0.5 * x0 + 0.25 / (scaled**2 + 0.25) * x
        x = x0 if i == len(steps) - 1 else ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * _randn(x, generator)
        x = after_step(callback, i, t, x, x0)
    return x


def _alpha_sigma(sigma):
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(sigma):  # log-SNR / 2: log(alpha_t / sigma_t)
    alpha, s = _alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(s)


@torch.no_grad()
def sample_dpmpp_2m(model, x, steps, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in the data prediction x0, first order at the
    first and last steps. With Karras sigmas, the same solver on Karras et al.'s rho = 7 spacing."""
    prev = None
    for i, t in enumerate(steps.t):
        s, s_next = steps.sigma[i], steps.sigma[i + 1]
        alpha_s, sigma_s = _alpha_sigma(s)
        alpha_t, sigma_t = _alpha_sigma(s_next)
        x0 = (x - sigma_s * model(x, t)) / alpha_s
        h = _lambda(s_next) - _lambda(s)
        if prev is None or i == len(steps) - 1:
            d = x0
        else:  # midpoint: D0 + D1 / 2 with D1 = (x0 - x0_prev) / r0
            r0 = (_lambda(s) - _lambda(steps.sigma[i - 1])) / h
            d = x0 + 0.5 * (x0 - prev) / r0
        x = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * d
        prev = x0
        x = after_step(callback, i, t, x, x0)
    return x


def _unipc_rhos(hh, rks):
    """UniPC's coefficients (Zhao et al. 2023, B(h) = e^h - 1 "bh2") for the ratios rks."""
    h_phi_k, factorial, b = torch.expm1(hh) / hh - 1, 1, []
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / torch.expm1(hh))
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.stack([rks ** (k - 1) for k in range(1, len(rks) + 1)])
    return torch.linalg.solve(R, torch.stack(b))


@torch.no_grad()
def sample_unipc(model, x, steps, *, generator=None, callback=None):
    """UniPC (Zhao et al. 2023), order 2, bh2, data prediction: each step predicts (UniP) x at the next sigma,
    and once the model has seen that x, corrects it (UniC) before going on; first order at the ends."""
    outs, last_x, order = [], None, 1

    def update(x_from, i, m0, res):  # x at sigma[i+1] from x at sigma[i]: exponential integrator + residual
        alpha_t, sigma_t = _alpha_sigma(steps.sigma[i + 1])
        _, sigma_s = _alpha_sigma(steps.sigma[i])
        hh = -(_lambda(steps.sigma[i + 1]) - _lambda(steps.sigma[i]))
        return sigma_t / sigma_s * x_from - alpha_t * torch.expm1(hh) * m0 - alpha_t * torch.expm1(hh) * res

    def ratio(i, j):  # (lambda_j - lambda_i) / h_i
        return (_lambda(steps.sigma[j]) - _lambda(steps.sigma[i])) / (_lambda(steps.sigma[i + 1]) - _lambda(steps.sigma[i]))

    for i, t in enumerate(steps.t):
        alpha, sigma = _alpha_sigma(steps.sigma[i])
        m = (x - sigma * model(x, t)) / alpha
        if last_x is not None:  # corrector for the step i-1 -> i, now that the model has seen x_i
            hh = -(_lambda(steps.sigma[i]) - _lambda(steps.sigma[i - 1]))
            if order == 1:
                rhos, res = torch.tensor([0.5]), 0.0
            else:
                r = ratio(i - 1, i - 2)
                rhos = _unipc_rhos(hh, torch.stack([r, torch.ones(())]))
                res = rhos[0] * (outs[-2] - outs[-1]) / r
            x = update(last_x, i - 1, outs[-1], res + rhos[-1] * (m - outs[-1]))
        outs = (outs + [m])[-2:]
        order = min(2, len(steps) - i, len(outs))
        last_x = x
        res = 0.0 if order == 1 else 0.5 * (outs[-2] - outs[-1]) / ratio(i, i - 1)
        x = after_step(callback, i, t, update(x, i, m, res), m)
    return x


# --- sigma samplers: x is x_0 + sigma eps; the model reads x / sqrt(sigma^2 + 1) ---

def _denoise(model, x, sigma, t):
    return x - sigma * model(x / (sigma**2 + 1) ** 0.5, t)


@torch.no_grad()
def sample_euler(model, x, steps, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma (Karras et al. 2022, Alg. 1)."""
    for i, t in enumerate(steps.t):
        s = steps.sigma[i]
        x0 = _denoise(model, x, s, t)
        x = x + (x - x0) / s * (steps.sigma[i + 1] - s)
        x = after_step(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_euler_a(model, x, steps, *, generator=None, callback=None):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of sigma_up, so that
    sigma_down^2 + sigma_up^2 = sigma_next^2."""
    for i, t in enumerate(steps.t):
        s, s_next = steps.sigma[i], steps.sigma[i + 1]
        x0 = _denoise(model, x, s, t)
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - x0) / s * (down - s)
        x = after_step(callback, i, t, x + _randn(x, generator) * up, x0)
    return x


@torch.no_grad()
def sample_heun(model, x, steps, *, generator=None, callback=None):
    """Heun's method (Karras et al. 2022, Alg. 1): an Euler step, then the slope averaged with the one at its end;
    a plain Euler step into sigma = 0."""
    for i, t in enumerate(steps.t):
        s, s_next = steps.sigma[i], steps.sigma[i + 1]
        x0 = _denoise(model, x, s, t)
        d = (x - x0) / s
        x_euler = x + d * (s_next - s)
        if s_next > 0:
            x2 = _denoise(model, x_euler, s_next, steps.t[i + 1])
            x = x + (d + (x_euler - x2) / s_next) / 2 * (s_next - s)
        else:
            x = x_euler
        x = after_step(callback, i, t, x, x0)
    return x


# --- A1111's schedule types: k-diffusion's discretisations of sigma over the model's own sigmas ---
SCHEDULE_TYPES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                  "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                  "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM"}
# Align Your Steps (Sabour et al. 2024): NVIDIA's 10-step sigmas, log-linearly resampled for other counts
AYS = {"sd": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
       "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]}


def schedule_type(name: str | None) -> str:
    """Our key ("sgm_uniform") for a schedule type named either way ("SGM Uniform"); None is Automatic."""
    if name is None:
        return "automatic"
    for key, label in SCHEDULE_TYPES.items():
        if name.lower() in (key, label.lower(), label.lower().replace(" ", "")):
            return key
    raise ValueError(f"unknown schedule type {name!r}: choose one of {', '.join(SCHEDULE_TYPES.values())}")


def k_sigma_to_t(schedule: Schedule, sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion's fractional timestep of each sigma: linear in log sigma between the integer timesteps."""
    log_sig = schedule.ldm_sigmas.log()
    lo = (sigma.log() - log_sig[:, None]).ge(0).cumsum(0).argmax(0).clamp(max=len(log_sig) - 2)
    w = ((log_sig[lo] - sigma.log()) / (log_sig[lo] - log_sig[lo + 1])).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


def k_t_to_sigma(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's sigma at (fractional) timesteps: log sigma interpolated linearly."""
    log_sig, t = schedule.ldm_sigmas.log(), torch.as_tensor(t, dtype=torch.float32)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sig[lo] + w * log_sig[hi]).exp()


def k_sigmas(schedule: Schedule, n: int, kind: str, sdxl=False) -> torch.Tensor:
    """The n + 1 sigmas (the last 0, KL Optimal's sigma_min) that A1111 gives k-diffusion for `kind`, in float32
    as it computes them, from the model's sigmas as the original SD code holds them."""
    sig = schedule.ldm_sigmas
    smin, smax = sig[0].item(), sig[-1].item()
    zero = torch.zeros(1)

    def t_to_sigma(t):
        return k_t_to_sigma(schedule, t)

    def sigma_to_t(sigma):
        return k_sigma_to_t(schedule, torch.tensor([sigma]))[0]

    if kind == "uniform":
        return torch.cat([t_to_sigma(torch.linspace(len(sig) - 1, 0, n)), zero])
    if kind == "karras":  # Karras et al. 2022, rho = 7
        ramp = torch.linspace(0, 1, n)
        return torch.cat([(smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7, zero])
    if kind in ("exponential", "polyexponential"):  # rho = 1: the same geometric spacing
        return torch.cat([torch.linspace(math.log(smax), math.log(smin), n).exp(), zero])
    if kind in ("sgm_uniform", "normal"):  # evenly in t, from sigma_max's t to sigma_min's
        ts = torch.linspace(sigma_to_t(smax), sigma_to_t(smin), n + (kind != "normal"))
        return torch.cat([t_to_sigma(ts[:n]), zero])
    if kind == "kl_optimal":
        i = torch.arange(n + 1)
        return torch.tan(i / n * math.atan(smin) + (1.0 - i / n) * math.atan(smax)).float()
    if kind == "align_your_steps":
        table = np.array(AYS["sdxl" if sdxl else "sd"])
        if n != len(table):
            ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
            table = np.exp(ys)[::-1]
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    if kind == "simple":
        return torch.cat([sig[[-(1 + int(x * len(sig) / n)) for x in range(n)]], zero])
    if kind == "ddim":
        return torch.cat([sig[1::max(len(sig) // n, 1)].flip(0), zero])
    raise ValueError(f"schedule type {kind!r} has no discretisation")


@dataclass(frozen=True)
class Sampler:
    """A sampler resolved once from its name: its function, the timesteps and the space it works in, the options it
    takes. `steps`, `start` and `noised` are what the pipeline asks of it; calling it samples."""
    name: str
    a1111: str  # A1111's name, for infotexts and the API
    fn: callable
    spacing: str  # the diffusers family's default timestep spacing: leading, linspace, or n+1 points ("multistep")
    sigma_family: bool = False
    options: tuple = ()  # keyword options of fn (DDIM's eta)
    every_step: bool = False  # by default every timestep of the schedule (DDPM), not sample.steps
    eta: float = 0.0  # the eta a sampler without the option always runs at (1: ancestral noise at every step)
    k: str = ""  # A1111 runs it through k-diffusion, with this schedule type by default ("": its own timesteps)
    schedule: str = "automatic"  # the schedule type ("DPM++ 2M Karras" is DPM++ 2M with "karras")

    @property
    def label(self):
        """The name with a schedule type where it is not the automatic one, as older A1111 versions wrote it."""
        return self.a1111 + ("" if self.schedule == "automatic" else f" {SCHEDULE_TYPES[self.schedule]}")

    def __call__(self, model, x, steps, *, generator=None, callback=None, **options):
        return self.fn(model, x, steps, generator=generator, callback=callback,
                       **{k: v for k, v in options.items() if k in self.options and v is not None})

    def check(self, a1111: bool):
        """Refuse a schedule type this sampler cannot take in this seed mode, naming what it can."""
        if self.schedule == "automatic":
            return
        if a1111 and not self.k:
            raise ValueError(f"schedule type {SCHEDULE_TYPES[self.schedule]}: A1111's {self.a1111} sampler takes its "
                             "own timesteps; give schedule type Automatic")
        if not a1111 and (self.name, self.schedule) != ("dpmpp_2m", "karras"):
            raise ValueError(f"schedule type {SCHEDULE_TYPES[self.schedule]} with {self.a1111}: diffusers' samplers "
                             "here take Automatic (and Karras with DPM++ 2M); A1111's schedule types are in A1111 seed "
                             "mode (noise='a1111', --seed-mode a1111)")

    def steps(self, schedule: Schedule, n: int, a1111=False, sdxl=False) -> Steps:
        """The n steps this sampler takes: with A1111's discretisation (a1111=True, k-diffusion samplers: sigmas from
        the schedule type, fractional timesteps from them), else with the timesteps diffusers' scheduler of its family
        takes: its own default spacing, or the one the model's scheduler config sets for all (schedule.spacing)."""
        T = schedule.timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {n}")
        if a1111 and self.k:  # the start is noise x sigma_max (k-diffusion's), not diffusers' init_noise_sigma
            kind = self.k if self.schedule == "automatic" else self.schedule
            sigma = k_sigmas(schedule, n, kind, sdxl)
            return Steps(k_sigma_to_t(schedule, sigma[:-1]), sigma, 1 / (1 + sigma.double() ** 2), init=sigma[0].item())
        if self.schedule == "karras":  # diffusers' use_karras_sigmas: rho = 7 spacing, each at a rounded timestep
            smin, smax = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
            sigma = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
            t = schedule.t_at(sigma).round()
            sigma = torch.cat([sigma.float(), torch.zeros(1)])
            return Steps(t.float(), sigma, 1 / (1 + sigma.double() ** 2))
        if self.spacing == "lcm":  # LCM's: n of the 50 distillation timesteps (every 20th, from 999 down)
            if n > 50:
                raise ValueError(f"the LCM sampler takes at most 50 steps (its distillation's), got {n}: 4 to 8 is usual")
            origin = (np.arange(1, 51) * (T // 50) - 1)[::-1]
            t = torch.tensor(origin[np.floor(np.linspace(0, 50, n, endpoint=False)).astype(np.int64)].copy())
            ab = schedule.alphas_cumprod[t]
            return Steps(t.float(), ((1 - torch.cat([ab, ab[-1:]])) / torch.cat([ab, ab[-1:]])) ** 0.5,
                         torch.cat([ab, ab[-1:]]))
        multistep = self.spacing == "multistep"  # DPM-Solver/UniPC: n + 1 points, the last (0) dropped
        spacing = schedule.spacing or ("linspace" if multistep else self.spacing)
        m = n + 1 if multistep and spacing != "trailing" else n
        if spacing == "leading":  # every T//m-th step, shifted by steps_offset (1 in SD)
            t = np.arange(m - 1, m - 1 - n, -1) * (T // m) + schedule.steps_offset
        elif spacing == "linspace":
            t = np.linspace(0, T - 1, m)[::-1][:n]
            t = t if self.sigma_family else t.round()  # Euler-like samplers take fractional timesteps
        else:  # trailing: from T - 1 down, as zero-terminal-SNR models want
            t = np.round(np.arange(T, 0, -T / n)) - 1
        t = torch.tensor(t.copy(), dtype=torch.float64)
        if self.spacing == "leading":  # alpha-bar samplers: after the last step, one stride lower (DDPM: clean)
            after = int(t[-1].item()) - T // n
            final = 1.0 if self.every_step else (
                schedule.alphas_cumprod[after].item() if after >= 0 else schedule.final_alpha_cumprod)
            ab = torch.cat([schedule.alphas_cumprod[t.long()], torch.tensor([final])])
            return Steps(t.float(), ((1 - ab) / ab) ** 0.5, ab)
        steps = _interp_steps(schedule, t)
        if self.sigma_family and spacing == "leading":  # diffusers' init_noise_sigma for this spacing
            steps.init = (steps.sigma.max().item() ** 2 + 1) ** 0.5
        return steps

    def start(self, steps: Steps, noise: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The first x: pure noise at the sampler's scale, or x_0 noised to the first step (img2img)."""
        if x0 is None:  # diffusers' init_noise_sigma: sigma_max for Euler-like samplers, 1 for the others
            if self.sigma_family:
                return noise * (steps.init or steps.sigma.max())
            # alpha-bar samplers hold x_t; k-diffusion's start, noise x sigma_max, is this as x_t
            return noise if steps.init is None else noise * (steps.init / (steps.init**2 + 1) ** 0.5)
        return self.noised(steps, x0, noise, 0)

    def noised(self, steps: Steps, x0, noise, i):
        """x_0 at the noise level of step i, in the sampler's space (diffusers' add_noise)."""
        if self.sigma_family:
            return x0 + noise * steps.sigma[i]
        ab = steps.ab[i]
        if self.spacing != "leading":  # the multistep solvers go through sigma
            alpha = 1 / (steps.sigma[i] ** 2 + 1) ** 0.5
            return alpha * x0 + steps.sigma[i] * alpha * noise
        return ab.float() ** 0.5 * x0 + (1 - ab.float()) ** 0.5 * noise


SAMPLERS = {s.name: s for s in (
    Sampler("ddpm", "DDPM", sample_ddpm, "leading", every_step=True, eta=1.0),
    Sampler("ddim", "DDIM", sample_ddim, "leading", options=("eta",)),
    Sampler("plms", "PLMS", sample_plms, "leading"),
    Sampler("euler", "Euler", sample_euler, "linspace", sigma_family=True, k="uniform"),
    Sampler("euler_a", "Euler a", sample_euler_a, "linspace", sigma_family=True, eta=1.0, k="uniform"),
    Sampler("heun", "Heun", sample_heun, "linspace", sigma_family=True, k="uniform"),
    Sampler("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "multistep", k="karras"),  # A1111 1.9+'s default: Karras
    Sampler("unipc", "UniPC", sample_unipc, "multistep"),
    Sampler("lcm", "LCM", sample_lcm, "lcm", eta=1.0),
)}


def sampler(name: str, schedule: str | None = None) -> Sampler:
    """The sampler named as ours ("dpmpp_2m", "dpmpp_2m_karras") or as A1111 writes it ("DPM++ 2M", "DPM++ 2M
    Karras": a schedule type after the name, as A1111 before 1.9 named them), with `schedule` (a schedule type,
    A1111 1.9+'s separate field; None or Automatic: the name's) on top."""
    base, kind = name, "automatic"
    for key, label in SCHEDULE_TYPES.items():
        for suffix in (f" {label}", f"_{key}"):
            if key != "automatic" and name.lower().endswith(suffix.lower()) and len(name) > len(suffix):
                base, kind = name[:-len(suffix)], key
    found = SAMPLERS.get(base) or next((s for s in SAMPLERS.values() if base.lower() == s.a1111.lower()), None)
    if found is None:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)} (or A1111's names: "
                         f"{', '.join(s.a1111 for s in SAMPLERS.values())}), with a schedule type if you like "
                         "(\"DPM++ 2M Karras\")")
    asked = schedule_type(schedule)
    if asked != "automatic" and kind != "automatic" and asked != kind:
        raise ValueError(f"sampler {name!r} names schedule type {SCHEDULE_TYPES[kind]}, and the schedule type "
                         f"asked is {SCHEDULE_TYPES[asked]}: give one")
    return dataclasses.replace(found, schedule=asked if asked != "automatic" else kind)
