"""A random full-size Stable Diffusion of any family (no real weights exist offline): made, saved, read back by
nanosd and by diffusers, timed. Each step is its own process (`make`, `nanosd`, `diffusers`, `speed`), so that a
24 GiB machine holds one SDXL at a time and each peak memory is that step's alone.

  python benchmarks/full_size.py make sdxl /tmp/xl         # random weights (seeded), a single file + a diffusers folder
  python benchmarks/full_size.py nanosd /tmp/xl            # load the single file, 256x256 from fixed latents
  python benchmarks/full_size.py diffusers /tmp/xl         # the folder in diffusers, the same latents: the difference
  python benchmarks/full_size.py speed /tmp/xl --size 1024 --precision bf16   # seconds per U-Net step, peak memory
  python benchmarks/full_size.py diffusers-speed /tmp/xl --size 512          # the reference's step, fp32
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

import nanosd
from nanosd.formats import sd

PROMPT, NEGATIVE, STEPS = "a photo of a lighthouse at dusk", "blurry", 4


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def latents(pipe, size):
    f = pipe.factor_ae
    return torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(0))


def make(a):
    from nanosd.autoencoder import Autoencoder
    from nanosd.condition import Conditioner, bind_conditioner
    from nanosd.schedule import Schedule
    from nanosd.unet import UNet

    cfg = sd.preset(a.family)
    torch.manual_seed(0)
    t = time.perf_counter()
    unet, ae, cond = UNet(cfg.unet), Autoencoder(cfg.autoencoder), Conditioner(cfg.condition)
    for p in unet.parameters():  # the output layers start at zero: a random model must pass a signal
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    pipe = nanosd.Pipeline(unet, Schedule.of(cfg.diffusion), cfg, ae, bind_conditioner(cond, ae, cfg),
                           layout=sd.FAMILIES[a.family])
    print(f"built {a.family}: U-Net {sum(p.numel() for p in unet.parameters()):,} parameters "
          f"({time.perf_counter() - t:.0f} s)")
    a.dir.mkdir(parents=True, exist_ok=True)
    for dst in (a.dir / "model.safetensors", a.dir / "diffusers"):
        t = time.perf_counter()
        nanosd.save(pipe, dst)
        print(f"wrote {dst} ({time.perf_counter() - t:.0f} s)")
    nanosd.formats.diffusers.write(a.dir / "config", pipe, weights=False)
    print(f"peak memory {peak_gib():.1f} GiB")


def run_nanosd(a):
    t = time.perf_counter()
    pipe = nanosd.load(a.dir / "model.safetensors", config=a.dir / "config")
    print(f"load: {time.perf_counter() - t:.1f} s ({pipe.family})")
    t = time.perf_counter()
    out = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", seed=0, height=a.size, width=a.size,
                        latents=latents(pipe, a.size), output="tensor").images
    print(f"{a.size}x{a.size}, {STEPS} euler steps: {time.perf_counter() - t:.1f} s; peak memory {peak_gib():.1f} GiB")
    torch.save(out, a.dir / f"nanosd-{a.size}.pt")


def run_diffusers(a):
    import diffusers

    t = time.perf_counter()
    ref = diffusers.DiffusionPipeline.from_pretrained(a.dir / "diffusers", torch_dtype=torch.float32,
                                                      local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    print(f"diffusers load: {time.perf_counter() - t:.1f} s ({type(ref).__name__})")
    f = 2 ** (len(ref.vae.config.block_out_channels) - 1)
    z = torch.randn(1, 4, a.size // f, a.size // f, generator=torch.Generator().manual_seed(0))
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0, height=a.size,
                 width=a.size, latents=z, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    ours = torch.load(a.dir / f"nanosd-{a.size}.pt")
    diff = (ours - theirs).abs().max().item()
    print(f"nanosd vs diffusers, {a.size}x{a.size} in [0, 1]: max |diff| {diff:.2e} (std of the image "
          f"{theirs.std():.3f}); peak memory {peak_gib():.1f} GiB")
    sys.exit(0 if diff <= 1e-4 else 1)


def speed(a):
    t = time.perf_counter()
    pipe = nanosd.load(a.dir / "model.safetensors", precision=a.precision, config=a.dir / "config")
    load = time.perf_counter() - t
    times = []
    pipe.generate(PROMPT, NEGATIVE, steps=a.steps, sampler="euler", seed=0, height=a.size, width=a.size,
                  output="latent", callback=lambda *_: times.append(time.perf_counter()))
    steps = [b - a_ for a_, b in zip(times, times[1:])]
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{pipe.family} {a.precision} {a.size}x{a.size}: load {load:.1f} s, U-Net step (guided, batch 2) "
          f"{min(steps):.2f} s (of {len(steps)} timed), peak memory {peak_gib():.1f} GiB, {torch.get_num_threads()} "
          f"threads, {cpu}")


def diffusers_speed(a):
    """The reference's U-Net step, side by side with `speed` (fp32, the same folder, the same sampler)."""
    import diffusers

    ref = diffusers.DiffusionPipeline.from_pretrained(a.dir / "diffusers", torch_dtype=torch.float32,
                                                      local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    times = []
    ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=a.steps, guidance_scale=5.0, height=a.size,
        width=a.size, output_type="latent", callback_on_step_end=lambda *args: times.append(time.perf_counter()) or {})
    steps = [b - a_ for a_, b in zip(times, times[1:])]
    print(f"diffusers fp32 {a.size}x{a.size}: U-Net step (guided, batch 2) {min(steps):.2f} s (of {len(steps)} "
          f"timed), peak memory {peak_gib():.1f} GiB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["make", "nanosd", "diffusers", "speed", "diffusers-speed"])
    p.add_argument("family_or_dir")
    p.add_argument("dir", nargs="?")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="speed: steps to run (the first is not timed)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args()
    if a.what == "make":
        a.family, a.dir = a.family_or_dir, Path(a.dir)
    else:
        a.dir = Path(a.family_or_dir)
    {"make": make, "nanosd": run_nanosd, "diffusers": run_diffusers, "speed": speed,
     "diffusers-speed": diffusers_speed}[a.what](a)
