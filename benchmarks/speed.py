"""Training images/s and sampling seconds per image for a recipe, as medians over repeated measurements.

    python benchmarks/speed.py configs/mnist-pixel.toml [--steps 20] [--n 64]
"""
import argparse
import copy
import dataclasses
import statistics
import tempfile
import time

import torch

from nanosd.config import load_config
from nanosd.data import ImageSet
from nanosd.pipeline import Pipeline
from nanosd.schedule import Schedule
from nanosd.recipes import diffusion_loss
from nanosd.train import Trainer
from nanosd.unet import UNet


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--n", type=int, default=64, help="images per sampling batch")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling batches")
    a = p.parse_args()
    cfg = load_config(a.config)
    c, s = cfg.unet.in_channels, cfg.data.size
    data = ImageSet(torch.rand(1024, c, s, s) * 2 - 1, None, [])  # the speed does not depend on the pixels
    schedule = Schedule.of(cfg.diffusion)
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    with tempfile.TemporaryDirectory() as tmp:
        loss = lambda m, b, g, step: diffusion_loss(m, b, g, schedule=schedule, prediction=cfg.diffusion.prediction)
        trainer = Trainer(tmp, unet, loss, data, dataclasses.replace(cfg.train, steps=a.steps + 2))
        times = []
        for i in range(a.steps + 2):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
    step = statistics.median(times[2:])
    guided = cfg.sample.autoguidance != 1.0  # a second U-Net pass per step, through a guide of the same shape
    pipe = Pipeline(unet, schedule, cfg, guide=copy.deepcopy(unet) if guided else None)
    pipe.generate(batch_size=2, steps=2, output="tensor")  # warm-up
    per_image = []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        pipe.generate(batch_size=a.n, seed=r, output="tensor")
        per_image.append((time.perf_counter() - t0) / a.n)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"{a.config}: {params:.2f}M-parameter U-Net, {c}x{s}x{s}, {torch.get_num_threads()} threads")
    print(f"training:  {cfg.train.batch_size / step:.1f} images/s (median of {a.steps} steps, batch {cfg.train.batch_size})")
    print(f"sampling:  {statistics.median(per_image):.3f} s/image ({cfg.sample.sampler}, {cfg.sample.steps} steps"
          f"{f', autoguidance {cfg.sample.autoguidance}' if guided else ''}, batch {a.n}, median of {a.repeats})")


if __name__ == "__main__":
    main()
