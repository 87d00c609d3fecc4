"""Training images/s of a recipe's U-Net beside diffusers' U-Net of the same configuration, in the same loop (the
one Trainer: AdamW, EMA, clipping) on the same data, alternating, each a median of its steps.

    python benchmarks/train_speed.py configs/mnist-text.toml [--steps 30] [--rounds 2]

Modes: nanosd fp32, nanosd bf16 autocast (train.bf16), diffusers fp32 (UNet2DConditionModel from the same
config: nanosd/formats/diffusers.unet_json; an unconditioned recipe's transformers have no context there either),
and nanosd fp32 / bf16 channels-last (weights and inputs; the Trainer itself trains NCHW: these say what it gives up).
The recipe's input is what its U-Net trains on: latents for latent recipes (its autoencoder's shape), pixels
otherwise; a text recipe's context is its encoder's width and length, computed once (the frozen encoder costs
both the same). Prints the CPU, each mode's images/s, its ratio to diffusers fp32, and the matmul and convolution
arithmetic it does per second as a share of this CPU's measured matmul peak in that arithmetic (how much faster it
could be).
"""
import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nanosd.config import load_config
from nanosd.data import ImageSet
from nanosd.fast import cpu_facts, matmul_gflops
from nanosd.formats.diffusers import unet_json
from nanosd.schedule import Schedule
from nanosd.train import Trainer
from nanosd.unet import UNet


class Diffusers(torch.nn.Module):
    """diffusers' U-Net behind ours' call: net(x, t, context=...)."""

    def __init__(self, cfg):
        super().__init__()
        import diffusers

        conf = {k: v for k, v in unet_json(cfg).items() if not k.startswith("_")}
        if cfg.context_dim is None:  # self-attention only: diffusers' transformers then attend to x itself
            conf["cross_attention_dim"] = cfg.model_channels * cfg.channel_mult[-1]
        self.net, self.context = diffusers.UNet2DConditionModel(**conf), cfg.context_dim

    def forward(self, x, t, context=None):
        return self.net(x, t, encoder_hidden_states=context).sample


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode and round (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every mode")
    p.add_argument("--compile", action="store_true", help="also torch.compile'd U-Nets (compile time not counted)")
    a = p.parse_args()
    cfg = load_config(a.config)
    u, size, channels = cfg.unet, cfg.data.size, 1
    if cfg.autoencoder:  # the U-Net trains on latents
        f = 2 ** (len(cfg.autoencoder.ch_mult) - 1)
        size, channels = size // f, cfg.autoencoder.z_channels
    context = None
    if cfg.condition and cfg.condition.encoder not in ("none", "labels"):
        from nanosd.condition import Conditioner

        conditioner = Conditioner(cfg.condition)
        context = conditioner(["a handwritten 7"] * cfg.train.batch_size)["context"].detach()
        u = dataclasses.replace(u, context_dim=context.shape[-1])
    u = dataclasses.replace(u, in_channels=channels, num_classes=None)
    data = ImageSet(torch.randn(4096, channels, size, size), None, [])
    schedule = Schedule.of(cfg.diffusion)

    def loss(model, batch, g, step):
        x0 = batch["image"]
        t = torch.randint(0, schedule.timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ctx = {"context": context[:len(x0)]} if context is not None else {}
        out = model(schedule.q_sample(x0, t, noise), t, **ctx)
        return torch.nn.functional.mse_loss(out.float(), schedule.target(cfg.diffusion.prediction, x0, noise, t))

    compiled = lambda c: torch.compile(UNet(c))

    class ChannelsLast(UNet):  # weights (made so after the Trainer's NCHW, below) and inputs channels-last
        def forward(self, x, t, **kw):
            return super().forward(x.contiguous(memory_format=torch.channels_last), t, **kw)

    modes = {"nanosd fp32": (UNet, False), "nanosd bf16 autocast": (UNet, True), "diffusers fp32": (Diffusers, False),
             "nanosd fp32 channels-last": (ChannelsLast, False), "nanosd bf16 channels-last": (ChannelsLast, True),
             **({"nanosd fp32 compiled": (compiled, False), "nanosd bf16 compiled": (compiled, True)}
                if a.compile else {})}
    times, flops = {m: [] for m in modes}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, (cls, bf16) in modes.items():
                torch.manual_seed(0)
                tcfg = dataclasses.replace(cfg.train, steps=a.steps + 3, bf16=bf16, sample_every=0, minutes=0,
                                           checkpoint_every=10**9, log_every=10**9)
                trainer = Trainer(f"{tmp}/{r}-{name}", cls(u), loss, data, tcfg)
                if cls is ChannelsLast:  # before the optimizer's state exists, which then takes the same layout
                    trainer.model.to(memory_format=torch.channels_last)
                for i in range(a.steps + 3):  # the first 3 (warm-up; compilation) are not counted
                    if i == 1 and cls is not compiled:
                        with FlopCounterMode(display=False) as counted:
                            trainer.train_step()
                        flops[name] = counted.get_total_flops()
                        continue
                    t0 = time.perf_counter()
                    trainer.train_step()
                    if i >= 3:
                        times[name].append(time.perf_counter() - t0)
    facts = cpu_facts()
    batch = cfg.train.batch_size
    print(f"CPU: {facts['name']} ({', '.join(facts['flags'])}), {torch.get_num_threads()} threads; {a.config}: "
          f"U-Net on {channels}x{size}x{size}, batch {batch}, medians of {a.steps} x {a.rounds} steps")
    ref = batch / statistics.median(times["diffusers fp32"])
    peak = {bf16: matmul_gflops(torch.bfloat16 if bf16 else torch.float32) for bf16 in (False, True)}
    print(f"matmul peak (1024²): fp32 {peak[False]:.0f}, bf16 {peak[True]:.0f} GFLOP/s")
    print("| mode | images/s | vs diffusers fp32 | GFLOP/step | GFLOP/s (of its matmul peak) |\n|---|---|---|---|---|")
    for name, ts in times.items():
        step = statistics.median(ts)
        gflop = flops.get(name, 0) / 1e9
        rate = f"{gflop:.1f} | {gflop / step:.0f} ({gflop / step / peak[modes[name][1]]:.0%})" if gflop else "- | -"
        print(f"| {name} | {batch / step:.1f} | {batch / step / ref:.2f}x | {rate} |")


if __name__ == "__main__":
    main()
