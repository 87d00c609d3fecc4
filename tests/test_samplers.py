"""Samplers against a denoiser known in closed form, and against diffusers' schedulers step for step."""
import pytest
import torch

from nanosd.samplers import SAMPLERS, sampler
from nanosd.schedule import Schedule

S = 0.5  # data standard deviation


def gaussian_eps(schedule):
    """For data x_0 ~ N(0, S^2), E[eps | x_t] is linear in x_t."""
    def model(x, t):
        ab = 1 / (1 + schedule.sigma_at(t.reshape(1)) ** 2)
        return (1 - ab).sqrt() * x / (ab * S**2 + 1 - ab)
    return model


def sd_schedule():
    """SD v1.5's scheduler config: scaled_linear, steps_offset 1, set_alpha_to_one false."""
    s = Schedule("scaled_linear", 1000, steps_offset=1)
    s.final_alpha_cumprod = s.alphas_cumprod[0].item()
    return s


def run(name, s, n, x, seed=1):
    spec = sampler(name)
    steps = spec.steps(s, n)
    return spec(gaussian_eps(s), spec.start(steps, x), steps, generator=torch.Generator().manual_seed(seed))


# DDPM with skipped steps and the posterior variance loses Var[x_0 | x_t]: its spread is a little low
@pytest.mark.parametrize("name, n, rel", [("ddpm", 1000, 0.03), ("ddpm", 100, 0.1), ("ddim", 200, 0.03),
                                          ("plms", 50, 0.03), ("euler", 100, 0.03), ("euler_a", 200, 0.05),
                                          ("heun", 30, 0.03), ("dpmpp_2m", 30, 0.03), ("dpmpp_2m_karras", 30, 0.03),
                                          ("unipc", 30, 0.03)])
def test_samples_have_the_data_distribution(name, n, rel):
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    out = run(name, Schedule("linear"), n, x)
    assert out.mean().item() == pytest.approx(0.0, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=rel)


def test_ddim_eta_1_is_stochastic_and_eta_0_is_not():
    s = Schedule("linear")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    steps = sampler("ddim").steps(s, 20)
    a, b = (sampler("ddim")(gaussian_eps(s), x, steps, eta=1.0, generator=torch.Generator().manual_seed(k))
            for k in (1, 2))
    assert not torch.equal(a, b)
    assert torch.equal(run("ddim", s, 20, x, 1), run("ddim", s, 20, x, 2))
    # deterministic DDIM solves the probability-flow ODE, which maps unit noise to S times itself
    torch.testing.assert_close(run("ddim", s, 500, x), x * S, atol=1e-3, rtol=0.02)


def test_callback_sees_every_step_and_can_replace_x():
    s = Schedule("linear")
    seen = []
    steps = sampler("ddim").steps(s, 7)
    out = sampler("ddim")(gaussian_eps(s), torch.randn(4), steps,
                              callback=lambda i, t, x, x0: seen.append((i, int(t))) or torch.zeros(4))
    assert [i for i, _ in seen] == list(range(7)) and seen[0][1] > seen[-1][1]
    assert torch.equal(out, torch.zeros(4))


def test_step_spacings_and_names():
    s = sd_schedule()
    lead = sampler("ddim").steps(s, 50)
    assert lead.t[0].item() == 981 and lead.t[-1].item() == 1 and len(lead) == 50
    assert lead.ab[-1].item() == s.alphas_cumprod[0].item()  # set_alpha_to_one = False
    assert sampler("euler").steps(s, 10).sigma[0].item() == pytest.approx(14.6146, abs=1e-4)
    assert sampler("DPM++ 2M Karras").steps(s, 10).t.tolist() == [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]
    assert sampler("Euler a").name == "euler_a"
    with pytest.raises(ValueError, match="steps must be between"):
        sampler("ddim").steps(s, 0)
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'"):
        sampler("k_lms")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        Schedule("quadratic")


FAMILIES = {"ddpm": ("DDPMScheduler", {}), "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {}),
            "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
            "heun": ("HeunDiscreteScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
            "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
            "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {})}
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


def reference_scheduler(name, n):
    import diffusers

    cls, extra = FAMILIES[name]
    s = getattr(diffusers, cls).from_config({**SD15_SCHEDULER, **extra})
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("name", list(SAMPLERS) + ["dpmpp_2m_karras"])  # a sampler with a schedule type
@pytest.mark.parametrize("n", [1, 2, 7, 25])
def test_each_sampler_reproduces_its_diffusers_scheduler(name, n):
    """The same fake network, noise and generator through diffusers' scheduler loop and through ours."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.3
    model = lambda x, t: torch.tanh(torch.einsum("ij,bjhw->bihw", w, x) + 0.001 * float(t))
    ref = reference_scheduler(name, n)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        kw = {"generator": g} if name in ("ddpm", "euler_a", "lcm") else {}
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x, **kw).prev_sample
    g = torch.Generator().manual_seed(0)
    torch.randn(2, 4, 8, 8, generator=g)
    spec = sampler(name)
    steps = spec.steps(sd_schedule(), n)
    ours = spec(model, spec.start(steps, noise), steps, generator=g)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-5)
