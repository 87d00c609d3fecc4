"""A full-size SD 1.5 ControlNet with random weights (no real ones can be had offline), against diffusers: its
parameter count beside diffusers' ControlNetModel.from_unet on the same U-Net, the file in the original layout read
by both, the same 256x256 image from the same latents; then the cost of one sampling step (guidance batch of 2) at
512x512 with none, one and two ControlNets.

    python benchmarks/random_sd15.py /tmp/sd15.safetensors --config /tmp/sd15-config
    python benchmarks/controlnet_full.py /tmp/sd15.safetensors /tmp/sd15-config
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

import nanosd
from nanosd.controlnet import copy_encoder

p = argparse.ArgumentParser()
p.add_argument("model", help="an SD 1.5-shaped single file")
p.add_argument("config", help="its diffusers config folder (what from_single_file takes)")
p.add_argument("--work", default="/tmp/controlnet-full", help="where the ControlNet files are written")
p.add_argument("--steps", type=int, default=8)
p.add_argument("--repeats", type=int, default=3, help="timed steps per case (the median is printed)")
a = p.parse_args()
work = Path(a.work)
work.mkdir(parents=True, exist_ok=True)
torch.set_grad_enabled(False)

pipe = nanosd.load(a.model)
torch.manual_seed(1)
net = copy_encoder(nanosd.ControlNet(pipe.cfg.unet), pipe.unet)
for m in [*net.zero_convs, net.middle_block_out, net.input_hint_block[-1]]:  # zero convolutions made to act
    for w in m.parameters():
        w.normal_(0, 0.1)
single = nanosd.save_controlnet(net, work / "control_sd15_random.safetensors")
nanosd.save_controlnet(net, work / "diffusers")  # its config.json is what from_single_file takes
del net
ours = nanosd.load_controlnet(single, base=pipe)
count = sum(p.numel() for p in ours.parameters())

import diffusers  # noqa: E402  (the reference, for this script only)

ref = diffusers.StableDiffusionPipeline.from_single_file(a.model, config=a.config, local_files_only=True)
theirs_count = sum(p.numel() for p in diffusers.ControlNetModel.from_unet(ref.unet).parameters())
theirs = diffusers.ControlNetModel.from_single_file(str(single), config=str(work / "diffusers"),
                                                   local_files_only=True)
print(f"parameters: nanosd {count:,}, diffusers from_unet {theirs_count:,}, read from the file by diffusers "
      f"{sum(p.numel() for p in theirs.parameters()):,}")

g = torch.Generator().manual_seed(0)
edges = (torch.rand(1, 1, 32, 32, generator=g) > 0.8).float()
control = Image.fromarray((torch.nn.functional.interpolate(edges, size=(256, 256))[0, 0] * 255).byte().numpy()).convert("RGB")
latents = torch.randn(1, 4, 32, 32, generator=g)
mine = pipe.generate("a photo of a cat", "blurry", steps=a.steps, sampler="euler", seed=0, height=256, width=256,
                     latents=latents, control=[nanosd.Control(ours, control, 0.9)], output="tensor").images
cp = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=theirs)
cp.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
cp.set_progress_bar_config(disable=True)
expected = cp("a photo of a cat", negative_prompt="blurry", image=control, num_inference_steps=a.steps,
              guidance_scale=7.5, height=256, width=256, latents=latents, controlnet_conditioning_scale=0.9,
              output_type="pt").images
plain = pipe.generate("a photo of a cat", "blurry", steps=a.steps, sampler="euler", seed=0, height=256, width=256,
                      latents=latents, output="tensor").images
print(f"256x256, {a.steps} Euler steps, guidance 7.5: max |nanosd - diffusers| = {(mine - expected).abs().max():.2e} "
      f"(the control moved the image by up to {(mine - plain).abs().max():.3f})")
del ref, cp, theirs

second = nanosd.load_controlnet(single, base=pipe)
x, t = torch.randn(2, 4, 64, 64), torch.tensor(500.0)
cond, uncond = pipe.encode_prompts(nanosd.Request("a photo of a cat", cfg_scale=7.5).resolve(pipe))
hint = torch.rand(1, 3, 512, 512)
for units in (0, 1, 2):
    controls = [nanosd.Control(n, hint) for n in (ours, second)[:units]]
    denoise = pipe.denoiser(cond, uncond, 7.5, controls=controls, hints=[c.hint(512, 512, 1) for c in controls])
    denoise(x[:1], t)  # warm-up
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        denoise(x[:1], t)
        times.append(time.perf_counter() - start)
    print(f"512x512, one guided step (batch 2), {units} ControlNet(s): {statistics.median(times):.2f} s "
          f"(median of {a.repeats})")
