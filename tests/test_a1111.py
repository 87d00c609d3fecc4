"""A1111's seeds and schedules: the Philox generator against CUDA's draws, the k-diffusion discretisations and
samplers against k-diffusion's own functions (the package A1111 samples with, test-only), variation seeds and
per-image seeds, on the tiny SD 1.x of test_sd."""
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import nanosd
from nanosd.samplers import k_sigmas, sampler
from nanosd.seeds import ImageNoise, Philox, slerp
from test_sd import tiny_reference

pytest.importorskip("diffusers")


def k_diffusion():
    """k-diffusion's sampling and external modules, without its package's heavy imports (torchvision, skimage,
    clip): its two helpers the modules need, and stubs for the ODE/SDE packages only its adaptive and Brownian
    samplers use."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (make install puts it in, --no-deps)")
    root = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("kd")
    package.__path__ = [str(root)]
    utils = types.ModuleType("kd.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    utils.append_zero = lambda x: torch.cat([x, x.new_zeros([1])])
    sys.modules.update({"kd": package, "kd.utils": utils})
    for stub in ("torchdiffeq", "torchsde"):
        sys.modules.setdefault(stub, types.SimpleNamespace(odeint=None, BrownianInterval=object))
    loaded = {}
    for name in ("sampling", "external"):
        s = importlib.util.spec_from_file_location(f"kd.{name}", root / f"{name}.py")
        loaded[name] = sys.modules[f"kd.{name}"] = importlib.util.module_from_spec(s)
        s.loader.exec_module(loaded[name])
    return loaded["sampling"], loaded["external"]


def test_philox_is_cudas_randn():
    # torch.manual_seed(0); torch.randn(3, 4, device="cuda") on an NVIDIA GPU
    cuda = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285119, -0.32838709],
            [-1.07454228, -0.36314407, -1.67105067, 2.26550508]]
    assert torch.allclose(Philox(0).randn((3, 4)), torch.tensor(cuda), atol=1e-6)
    g = Philox(0)
    first, second = g.randn((4, 8, 8)), g.randn((4, 8, 8))
    assert not torch.allclose(first, second) and g.offset == 2  # each draw moves the offset on
    assert torch.equal(Philox(0).randn((4, 8, 8))[0, 0, :4], first[0, 0, :4])
    big = Philox(2**32 + 5).randn((16,))  # the seed's high half is the key's second word
    assert not torch.allclose(big, Philox(5).randn((16,)))
    many = Philox(123).randn((4, 64, 64))
    assert abs(many.mean()) < 0.03 and abs(many.std() - 1) < 0.02


def test_k_discretisations_equal_k_diffusions():
    sampling, external = k_diffusion()
    pipe_schedule = nanosd.schedule.Schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    wrap = external.DiscreteEpsDDPMDenoiser(None, pipe_schedule.ldm_alphas_cumprod, quantize=False)
    smin, smax = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    for n in (1, 7, 20):
        expect = {"uniform": wrap.get_sigmas(n), "karras": sampling.get_sigmas_karras(n, smin, smax),
                  "exponential": sampling.get_sigmas_exponential(n, smin, smax),
                  "polyexponential": sampling.get_sigmas_polyexponential(n, smin, smax),
                  "sgm_uniform": torch.cat([wrap.t_to_sigma(torch.linspace(
                      wrap.sigma_to_t(torch.tensor(smax)), wrap.sigma_to_t(torch.tensor(smin)), n + 1)[:-1]),
                      torch.zeros(1)])}
        for kind, sig in expect.items():
            assert torch.allclose(k_sigmas(pipe_schedule, n, kind), sig, rtol=1e-5), (kind, n)
        t = sampler("Euler").steps(pipe_schedule, n, a1111=True).t  # fractional timesteps, k-diffusion's
        assert torch.allclose(t, wrap.sigma_to_t(wrap.get_sigmas(n)[:-1]), atol=1e-3)
    ays = k_sigmas(pipe_schedule, 10, "align_your_steps")  # NVIDIA's SD 1.5 table at its own length + 0
    assert ays[0].item() == pytest.approx(14.615) and ays[-2].item() == pytest.approx(0.029) and ays[-1] == 0
    assert len(k_sigmas(pipe_schedule, 25, "align_your_steps")) == 26


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    _, folder = tiny_reference(tmp_path_factory.mktemp("sd"), vae_channels=(8, 8, 16, 16))  # f = 8, as SD's
    pipe = nanosd.load(folder)
    pipe.where = folder
    return pipe


@pytest.mark.parametrize("name,schedule", [("Euler", None), ("Euler a", None), ("DPM++ 2M", None),
                                           ("DPM++ 2M", "Exponential"), ("DPM++ 2M", "Uniform"), ("Euler", "Karras"),
                                           ("Heun", "SGM Uniform"), ("Euler a", "Align Your Steps")])
def test_samplers_equal_k_diffusion_in_a1111_mode(sd, name, schedule):
    sampling, external = k_diffusion()
    seed, steps, size = 7, 6, 64
    r = nanosd.Request("a red cat", steps=steps, sampler=name, scheduler=schedule, cfg_scale=6.0, seed=seed,
                       height=size, width=size, batch_size=2, noise="a1111", output="latent").resolve(sd)
    ours = sd(r).images
    cond, uncond = sd.encode_prompts(r)
    eps = sd.denoiser(cond, uncond, r.cfg_scale)

    class Eps(torch.nn.Module):  # the model as A1111 gives it to k-diffusion: eps from (x_t, t)
        def forward(self, x, t):
            return eps(x, t[0])

    model = external.DiscreteEpsDDPMDenoiser(Eps(), sd.schedule.ldm_alphas_cumprod, quantize=False)
    sigmas = k_sigmas(sd.schedule, steps, r.sampler.k if r.sampler.schedule == "automatic" else r.sampler.schedule)
    f = sd.factor_ae
    rng = ImageNoise((4, size // f, size // f), [seed, seed + 1], factor=f)  # A1111: image i of a batch has seed + i
    x = rng.first() * sigmas[0]
    fn = {"Euler": sampling.sample_euler, "Euler a": sampling.sample_euler_ancestral, "Heun": sampling.sample_heun,
          "DPM++ 2M": sampling.sample_dpmpp_2m}[name]
    extra = {"noise_sampler": lambda s, s_next: rng.randn_like(x)} if name == "Euler a" else {}
    theirs = fn(model, x, sigmas, disable=True, **extra)
    assert (ours - theirs).abs().max() < 1e-4 * max(1, theirs.abs().max())
    assert (ours[0] - ours[1]).abs().mean() > 0.1  # two images, two seeds


def test_per_image_seeds_variation_seeds_and_seed_resize(sd):
    base = dict(steps=3, sampler="Euler a", cfg_scale=5.0, height=64, width=64, noise="a1111", output="latent")
    batch = sd.generate("a dog", seed=10, batch_size=3, **base).images
    for i in range(3):  # image i of a batch is the image of seed + i made alone
        alone = sd.generate("a dog", seed=10 + i, **base).images
        assert (batch[i] - alone[0]).abs().max() < 1e-4, (batch[i] - alone[0]).abs().max()
    # a variation: slerp of the seed's noise toward the variation seed's; 0 is the seed's, 1 the variation seed's
    a = sd.generate("a dog", seed=10, **base).images
    none = sd.generate("a dog", seed=10, subseed=99, subseed_strength=0.0, **base).images
    full = sd.generate("a dog", seed=10, subseed=99, subseed_strength=1.0, **base).images
    some = sd.generate("a dog", seed=10, subseed=99, subseed_strength=0.3, **base).images
    assert torch.equal(a, none) and not torch.allclose(a, full, atol=1e-3) and not torch.allclose(a, some, atol=1e-3)
    n10, n99 = Philox(10).randn((4, 8, 8)), Philox(99).randn((4, 8, 8))
    assert torch.allclose(ImageNoise((4, 8, 8), [10], subseeds=[99], subseed_strength=1.0).first()[0], n99, atol=1e-5)
    mid = ImageNoise((4, 8, 8), [10], subseeds=[99], subseed_strength=0.3).first()[0]
    assert torch.allclose(mid, slerp(0.3, n10, n99))
    assert abs(mid.std() - 1) < 0.15  # slerp keeps the noise's scale (a lerp would shrink it)
    # a variation batch: one seed for all, the variation seed + i
    var = sd.generate("a dog", seed=10, subseed=99, subseed_strength=0.3, batch_size=2, **base)
    assert "Seed: 10" in var.infotext(1) and "Variation seed: 100" in var.infotext(1)
    # seed resize from 32x32: the 32x32 noise centred in the 64x64 one
    noise = ImageNoise((4, 8, 8), [5], resize_from=(32, 32)).first()[0]
    assert torch.equal(noise[:, 2:6, 2:6], Philox(5).randn((4, 4, 4)))
    # ENSD reseeds the ancestral noise only
    e = sd.generate("a dog", seed=10, eta_noise_seed_delta=31337, **base)
    assert not torch.allclose(e.images, a, atol=1e-4) and "ENSD: 31337" in e.infotext()
    cpu = sd.generate("a dog", seed=10, rng="CPU", **base)
    assert not torch.allclose(cpu.images, a, atol=1e-3) and "RNG: CPU" in cpu.infotext()


def test_a1111_infotexts_and_refusals(sd):
    made = sd.generate("a cat", seed=3, steps=2, sampler="DPM++ 2M", height=64, width=64, noise="a1111")
    assert made.infotext() == "a cat\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 64x64"
    made = sd.generate("a cat", seed=3, steps=2, sampler="Euler", height=64, width=64)  # diffusers' seeding says so
    assert made.infotext().endswith("Seed mode: diffusers")
    for fields, words in ((dict(subseed_strength=0.5), "noise='a1111'"), (dict(rng="CPU"), "noise='a1111'"),
                          (dict(sampler="Euler", scheduler="Exponential"), "A1111's schedule types"),
                          (dict(sampler="DDIM", scheduler="Karras", noise="a1111"), "its own timesteps"),
                          (dict(scheduler="Wobbly"), "unknown schedule type"), (dict(rng="TPU", noise="a1111"), "TPU"),
                          (dict(sampler="DPM++ 2M Karras", scheduler="Exponential"), "give one")):
        with pytest.raises(ValueError, match=words):
            sd.generate("a cat", steps=2, height=64, width=64, **fields)
    # an infotext without a schedule type is from A1111 before 1.9, where a plain name meant the model's schedule
    from nanosd.request import from_infotext

    old = "a cat\nSteps: 3, Sampler: {}, CFG scale: 5, Seed: 1, Size: 64x64"
    assert from_infotext(old.format("DPM++ 2M"))[0]["scheduler"] == "Uniform"
    assert "scheduler" not in from_infotext(old.format("DPM++ 2M Karras"))[0]
    assert "scheduler" not in from_infotext(old.format("DDIM"))[0]
    # "DPM++ 2M Karras" (A1111 before 1.9) is DPM++ 2M with schedule type Karras
    assert sampler("DPM++ 2M Karras") == sampler("DPM++ 2M", "Karras") and sampler("Euler", "SGM Uniform").schedule == "sgm_uniform"


def test_hires_fix(sd):
    base = dict(seed=4, steps=3, sampler="Euler", height=64, width=64, noise="a1111")
    for upscaler in ("Latent", "Lanczos"):
        made = sd.generate("a cat", hires=nanosd.Hires(scale=1.5, upscaler=upscaler, steps=2, strength=0.6), **base)
        assert made.images[0].size == (96, 96)
        text = made.infotext()
        assert "Size: 64x64" in text and "Hires upscale: 1.5" in text and f"Hires upscaler: {upscaler}" in text
        assert "Denoising strength: 0.6" in text and "Hires steps: 2" in text
    low = sd.generate("a cat", **base).images[0].resize((96, 96))
    high = sd.generate("a cat", hires=nanosd.Hires(scale=1.5), **base).images[0]
    assert low.size == high.size and low.tobytes() != high.tobytes()
    with pytest.raises(ValueError, match="hires upscaler"):
        sd.generate("a cat", hires=nanosd.Hires(upscaler="ESRGAN_4x"), **base)
    assert math.isclose(nanosd.Hires(resize_x=100).size(64, 64, 8)[1], 96)


def test_inpainting_options(sd):
    from PIL import Image, ImageOps

    from nanosd.pipeline import crop_region, fill_hole

    x = torch.linspace(0, 1, 128)
    picture = nanosd.images.to_pil(torch.stack([x[None].expand(128, -1), x[:, None].expand(-1, 128), 1 - x[None].expand(128, -1)]))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (80, 80, 112, 104))
    base = dict(seed=2, steps=3, sampler="Euler", noise="a1111", output="tensor", overlay=True, height=64, width=64)
    small, small_mask = picture.resize((64, 64)), mask.resize((64, 64), Image.NEAREST)
    plain = sd.inpaint(small, small_mask, "a cat", **base).images
    inverted = sd.inpaint(small, ImageOps.invert(small_mask), "a cat", inpainting_mask_invert=True, **base).images
    assert torch.equal(plain, inverted)
    original = nanosd.images.as_tensor(small, 3, "image")
    blurred = sd.inpaint(small, small_mask, "a cat", mask_blur=3, **base)
    far, edge = (slice(None), slice(None), slice(0, 20), slice(0, 20)), (0, slice(None), 38, 39)
    assert torch.allclose(blurred.images[far], original[far], atol=1 / 255)  # untouched far from the mask
    assert not torch.allclose(blurred.images[edge], plain[edge], atol=1e-3)  # the seam is soft
    assert "Mask blur: 3" in blurred.infotext()
    hole = (slice(None), slice(None), slice(42, 50), slice(42, 54))
    fills = {f: sd.inpaint(small, small_mask, "a cat", strength=0.6, inpainting_fill=f, **base).images
             for f in ("fill", "original", "latent noise", "latent nothing")}
    for a, b in [("fill", "original"), ("original", "latent noise"), ("latent noise", "latent nothing")]:
        assert not torch.allclose(fills[a][hole], fills[b][hole], atol=1e-3), (a, b)
    assert all(torch.allclose(f[far], original[far], atol=1 / 255) for f in fills.values())
    # only masked: the mask's box (padded, widened to 1:1) inpainted at 64x64, pasted into the 128x128 picture
    assert crop_region(mask, 4, 64, 64) == (76, 72, 116, 112)  # (80, 80, 112, 104) padded, then 32 -> 40 high
    made = sd.inpaint(picture, mask, "a cat", inpaint_full_res=True, inpaint_full_res_padding=4,
                      **{**base, "output": "pil"})
    out = made.images[0]
    assert out.size == (128, 128) and "Inpaint area: Only masked, Masked area padding: 4" in made.infotext()
    outside = (slice(0, 60), slice(0, 128))
    assert (torch.as_tensor(list(out.getdata()))[:60 * 128] == torch.as_tensor(list(picture.getdata()))[:60 * 128]).all()
    inside = nanosd.images.as_tensor(out, 3, "out")[..., 84:100, 86:106]
    assert not torch.allclose(inside, nanosd.images.as_tensor(picture, 3, "p")[..., 84:100, 86:106], atol=0.02)
    # fill: the hole painted from its surroundings
    red = fill_hole(Image.new("RGB", (64, 64), (200, 10, 10)), small_mask)
    assert max(abs(a - b) for a, b in zip(red.getpixel((45, 45)), (200, 10, 10))) <= 2
    with pytest.raises(ValueError, match="give a mask"):
        sd.generate("a cat", mask_blur=4, **base)


def test_replay_an_a1111_image_and_ours(sd, tmp_path):
    from PIL import Image

    from nanosd.cli import main
    from nanosd.images import save_png

    a1111 = tmp_path / "a1111.png"  # an A1111 image's parameters, as its web UI writes them
    save_png(Image.new("RGB", (64, 64)), a1111, "a red cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, "
             "Schedule type: Automatic, CFG scale: 5, Seed: 11, Size: 64x64, Model hash: 6ce0161689, Model: v1-5, "
             "Variation seed: 4, Variation seed strength: 0.2, ENSD: 31337, Version: v1.10.1")
    out = tmp_path / "again.png"
    assert main(["generate", str(sd.where), "--from", str(a1111), "--out", str(out)]) == 0
    expect = sd.generate("a red cat", "blurry", steps=3, sampler="Euler a", cfg_scale=5, seed=11, height=64, width=64,
                         subseed=4, subseed_strength=0.2, eta_noise_seed_delta=31337, noise="a1111").images[0]
    assert Image.open(out).tobytes() == expect.tobytes()
    params = Image.open(out).text["parameters"]
    assert "Seed: 11" in params and "ENSD: 31337" in params and "Seed mode" not in params
    # a flag given wins over the image's; ours replays bit for bit, diffusers-seeded ones too
    again = tmp_path / "again2.png"
    assert main(["generate", str(sd.where), "a green dog", "--from", str(out), "--steps", "2", "--out", str(again)]) == 0
    assert Image.open(again).text["parameters"].startswith("a green dog\nNegative prompt: blurry\nSteps: 2,")
    ours = tmp_path / "ours.png"
    assert main(["generate", str(sd.where), "a dog", "--seed", "3", "--steps", "2", "--size", "64x64",
                 "--out", str(ours)]) == 0
    replayed = tmp_path / "replayed.png"
    assert main(["generate", str(sd.where), "--from", str(ours), "--out", str(replayed)]) == 0
    assert Image.open(ours).tobytes() == Image.open(replayed).tobytes()
    assert main(["info", str(a1111)]) == 0
    with pytest.raises(ValueError, match="no generation parameters"):
        nanosd.images.read_parameters(Image.new("RGB", (4, 4)))


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_a1111_inpainting_equals_k_diffusion_with_a1111s_mask(sd, strength):
    """A1111's inpainting with a standard model: the known latents put in place of the predicted x_0 at every step
    (its CFGDenoiser's mask), from init + noise x sigma at A1111's first step, blended once more at the end."""
    from PIL import Image

    sampling, external = k_diffusion()
    x = torch.linspace(0, 1, 64)
    picture = nanosd.images.to_pil(torch.stack([x[None].expand(64, -1), x[:, None].expand(-1, 64), 1 - x[None].expand(64, -1)]))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 12, 44, 40))
    steps, seed = 6, 3
    ours = sd.inpaint(picture, mask, "a cat", strength=strength, steps=steps, sampler="Euler", seed=seed, cfg_scale=5.0,
                      noise="a1111", output="latent").images
    r = nanosd.Request("a cat", cfg_scale=5.0).resolve(sd)
    eps = sd.denoiser(*sd.encode_prompts(r), 5.0)

    class Eps(torch.nn.Module):
        def forward(self, x, t):
            return eps(x, t[0])

    model = external.DiscreteEpsDDPMDenoiser(Eps(), sd.schedule.ldm_alphas_cumprod, quantize=False)
    init = sd.to_model_space(nanosd.images.as_tensor(picture, 3, "image") * 2 - 1, torch.Generator().manual_seed(seed))
    latent = torch.tensor(list(mask.resize((8, 8), Image.BICUBIC).getdata()), dtype=torch.float32).reshape(8, 8) / 255
    keep = 1 - latent.round()  # A1111's self.mask; its nmask is 1 - this
    sigmas = k_sigmas(sd.schedule, steps, "uniform")
    t_enc = int(min(strength, 0.999) * steps)  # A1111's img2img step count
    sigma_sched = sigmas[steps - t_enc - 1:]
    x = init + ImageNoise((4, 8, 8), [seed]).first() * sigma_sched[0]
    theirs = sampling.sample_euler(lambda x, s: init * keep + (1 - keep) * model(x, s), x, sigma_sched, disable=True)
    theirs = theirs * (1 - keep) + init * keep
    assert (ours - theirs).abs().max() < 1e-4 * max(1, theirs.abs().max())
    assert (ours - init).abs()[..., 3:5, 3:5].mean() > 0.05  # the hole was redrawn
