"""Where a full SD 1.5 fine-tune step goes on this machine, each part timed in one process, side by side.

    python benchmarks/sd15_train_step.py SD15.safetensors [--size 256]

Forward + backward of the U-Net at batch 1 with and without gradient checkpointing (seconds, and the process's
peak RSS after each), gradient clipping, the EMA update, and AdamW as the trainer runs it (fused) against
PyTorch's default per-tensor loop.
"""
import argparse
import resource
import time

import torch

from nanosd.pipeline import load


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args()
    unet = load(a.model).unet.train().requires_grad_(True)
    params = list(unet.parameters())
    x, ctx, t = torch.randn(1, 4, a.size // 8, a.size // 8), torch.randn(1, 77, 768), torch.tensor([500])
    print(f"{sum(p.numel() for p in params) / 1e6:.0f}M parameters, {a.size}x{a.size}, batch 1, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")

    def step():
        unet(x, t, context=ctx).square().mean().backward()

    for checkpointing in (True, False):  # with first: the peak RSS only grows
        unet.checkpointing = checkpointing
        step()  # warm-up
        s = timed(step)
        print(f"forward + backward, checkpointing {'on ' if checkpointing else 'off'}: {s:6.2f} s   "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    print(f"gradient clipping:            {timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)):6.2f} s")
    ema = [q.detach().clone() for q in params]
    print(f"EMA update:                   {timed(lambda: torch._foreach_lerp_(ema, [q.detach() for q in params], 0.01)):6.2f} s")
    del ema
    for name, kw in (("AdamW fused (the trainer's)", {"fused": True}), ("AdamW per-tensor loop", {})):
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)
        opt.step()  # its moments allocated
        print(f"{name + ':':30s}{timed(opt.step):6.2f} s")
        del opt


if __name__ == "__main__":
    main()
