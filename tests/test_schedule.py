import math

import pytest
import torch

from nanosd.schedule import Schedule


def test_linear_and_scaled_linear_alpha_bar_against_the_formula():
    lin = Schedule("linear")
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert lin.alphas_cumprod[999].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-4)
    assert lin.alphas_cumprod[999].item() == pytest.approx(4.04e-5, rel=1e-2)
    sl = Schedule("scaled_linear")
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / 999) ** 2 for i in range(1000)]
    assert sl.alphas_cumprod[999].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-4)
    assert sl.alphas_cumprod[999].item() == pytest.approx(0.0046601, rel=1e-4)


def test_cosine_alpha_bar_follows_f_t_over_f_0():
    s = Schedule("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert s.betas.max().item() == pytest.approx(0.999)  # capped


def test_closed_form_matches_iterating_the_one_step_process():
    s = Schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    x = x0.clone()
    for t in range(300):
        x = s.q_step(x, torch.tensor(t), torch.randn(x.shape, generator=g))
    ab = s.alphas_cumprod[299]
    assert x.mean().item() == pytest.approx(ab.sqrt().item() * 0.7, abs=5e-3)
    assert x.std().item() == pytest.approx((1 - ab).sqrt().item(), rel=1e-2)
    closed = s.q_sample(x0, torch.tensor(299), torch.randn(x.shape, generator=g))
    assert closed.mean().item() == pytest.approx(x.mean().item(), abs=7e-3)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_the_product_of_the_two_gaussians(t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision and mean of the product, computed in float64."""
    s = Schedule("linear")
    beta, ab_prev = s.betas[t].double(), s.alphas_cumprod[t - 1].double()
    x0, xt = torch.tensor([0.3]), torch.tensor([-1.2])
    prec = (1 - beta) / beta + 1 / (1 - ab_prev)
    mean = ((1 - beta).sqrt() / beta * xt + ab_prev.sqrt() / (1 - ab_prev) * x0) / prec
    m, v = s.posterior(x0, xt, torch.tensor([t]))
    assert m.item() == pytest.approx(mean.item(), rel=1e-4, abs=1e-6)
    assert v.item() == pytest.approx(1 / prec.item(), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_targets_convert_back_to_eps_and_x0(prediction):
    s = Schedule("cosine")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 990])
    xt = s.q_sample(x0, t, eps)
    out = s.target(prediction, x0, eps, t)
    torch.testing.assert_close(s.to_eps(prediction, out, xt, t), eps, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(s.to_x0(prediction, out, xt, t), x0, atol=2e-3, rtol=1e-3)


