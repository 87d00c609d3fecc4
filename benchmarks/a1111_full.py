"""A1111 seed mode on a full-size checkpoint: nanosd's image against k-diffusion's own samplers (the package A1111
samples with) driven by the same model, noise drawn as A1111 draws it. Prints the largest latent difference per
sampler and the seconds each took.

    python benchmarks/a1111_full.py /tmp/sd15.safetensors --size 256 --steps 4

(`benchmarks/random_sd15.py` makes a random SD 1.5-shaped file: no real weights exist offline.) Needs k-diffusion
(`make install` puts it in, --no-deps).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_a1111 import k_diffusion  # noqa: E402  (its modules without the package's heavy imports)

import nanosd  # noqa: E402
from nanosd.samplers import k_sigmas  # noqa: E402
from nanosd.seeds import ImageNoise  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    sampling, external = k_diffusion()
    pipe = nanosd.load(a.model)
    print(f"{a.model}: {pipe.family}, {a.size}x{a.size}, {a.steps} steps, seed {a.seed}, batch of 2 (seeds s, s+1)")
    for name, schedule, fn in (("Euler a", None, sampling.sample_euler_ancestral),
                               ("DPM++ 2M", "Karras", sampling.sample_dpmpp_2m)):
        t0 = time.perf_counter()
        r = nanosd.Request("a photo of a cat", steps=a.steps, sampler=name, scheduler=schedule, cfg_scale=7.0,
                           seed=a.seed, height=a.size, width=a.size, batch_size=2, noise="a1111",
                           output="latent").resolve(pipe)
        ours = pipe(r).images
        t1 = time.perf_counter()
        eps = pipe.denoiser(*pipe.encode_prompts(r), r.cfg_scale)

        class Eps(torch.nn.Module):
            def forward(self, x, t):
                return eps(x, t[0])

        model = external.DiscreteEpsDDPMDenoiser(Eps(), pipe.schedule.ldm_alphas_cumprod, quantize=False)
        sigmas = k_sigmas(pipe.schedule, a.steps, schedule.lower() if schedule else r.sampler.k)
        f = pipe.factor_ae
        rng = ImageNoise((4, a.size // f, a.size // f), [a.seed, a.seed + 1], factor=f)
        x = rng.first() * sigmas[0]
        extra = {"noise_sampler": lambda s, s_next: rng.randn_like(x)} if name == "Euler a" else {}
        with torch.no_grad():
            theirs = fn(model, x, sigmas, disable=True, **extra)
        t2 = time.perf_counter()
        diff = (ours - theirs).abs().max().item()
        print(f"{name:9s} {schedule or 'Automatic':10s} max |nanosd - k-diffusion| = {diff:.2e} (latents up to "
              f"{theirs.abs().max().item():.1f}); nanosd {t1 - t0:.1f} s, k-diffusion {t2 - t1:.1f} s")


if __name__ == "__main__":
    main()
