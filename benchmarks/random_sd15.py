"""Write a Stable Diffusion v1.5-shaped single file with random weights (no real weights can be had offline):
what the CLI timing and the speed benchmarks run on.

    python benchmarks/random_sd15.py /tmp/sd15.safetensors [--fp16] [--inpainting] [--config DIR]
"""
import argparse

import torch

import nanosd
from nanosd.autoencoder import Autoencoder
from nanosd.condition import Conditioner
from nanosd.formats import diffusers, sd
from nanosd.pipeline import build
from nanosd.unet import UNet

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--fp16", action="store_true", help="store fp16 weights, as most published files do")
p.add_argument("--inpainting", action="store_true", help="the 9-channel inpainting U-Net")
p.add_argument("--config", help="also write its diffusers config folder here (what from_single_file takes)")
a = p.parse_args()
cfg = sd.preset("sd1", a.inpainting)
torch.manual_seed(0)
unet, vae, cond = UNet(cfg.unet), Autoencoder(cfg.autoencoder), Conditioner(cfg.condition)
with torch.no_grad():  # the U-Net's output layers start at zero; random weights everywhere make real work
    for w in unet.parameters():
        w.normal_(0, 0.02) if w.ndim > 1 else w.normal_(0, 0.01)
parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": cond.text_encoder.state_dict()}
pipe = build(cfg, parts, "random SD v1.5")
print(f"wrote {nanosd.save(pipe, a.out, dtype=torch.float16 if a.fp16 else None)}")
if a.config:
    diffusers.write(a.config, pipe, weights=False)
    print(f"wrote {a.config}")
