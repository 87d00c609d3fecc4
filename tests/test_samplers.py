"""Samplers against a denoiser known in closed form: for data x_0 ~ N(0, s^2), E[eps | x_t] is linear in x_t."""
import pytest
import torch

from nanosd.samplers import sample_ddim, sample_ddpm
from nanosd.schedule import Schedule

S = 0.5  # data standard deviation


def gaussian_eps(schedule):
    def model(x, t):
        ab = schedule.alphas_cumprod[t]
        return (1 - ab).sqrt() * x / (ab * S**2 + 1 - ab)
    return model


# DDPM with skipped steps and the posterior variance loses Var[x_0 | x_t]: its spread is a little low
@pytest.mark.parametrize("sampler, n, rel", [(sample_ddpm, 1000, 0.03), (sample_ddpm, 100, 0.1), (sample_ddim, 200, 0.03)])
def test_samples_have_the_data_distribution(sampler, n, rel):
    s = Schedule("linear")
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    out = sampler(gaussian_eps(s), x, s.steps(n), generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(0.0, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=rel)


def test_ddim_eta_1_is_stochastic_and_eta_0_is_not():
    s = Schedule("linear")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a, b = (sample_ddim(gaussian_eps(s), x, s.steps(20), eta=1.0, generator=torch.Generator().manual_seed(k))
            for k in (1, 2))
    assert not torch.equal(a, b)
    c, d = (sample_ddim(gaussian_eps(s), x, s.steps(20), generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    assert torch.equal(c, d)
    # deterministic DDIM solves the probability-flow ODE, which maps unit noise to S times itself
    flow = sample_ddim(gaussian_eps(s), x, s.steps(500))
    torch.testing.assert_close(flow, x * S, atol=1e-3, rtol=0.02)


def test_callback_sees_every_step_with_x0():
    s = Schedule("linear")
    seen = []
    sample_ddim(gaussian_eps(s), torch.randn(4), s.steps(7), callback=lambda i, t, x, x0: seen.append((i, int(t))))
    assert [i for i, _ in seen] == list(range(7)) and seen[0][1] > seen[-1][1]
