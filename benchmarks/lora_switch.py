"""LoRAs on a full-size SD v1.5 (random weights of the real shapes, from benchmarks/random_sd15.py): the time to
load, switch and unload LoRAs between images, and the memory with three loaded.

    python benchmarks/random_sd15.py /tmp/sd15.safetensors
    python benchmarks/lora_switch.py /tmp/sd15.safetensors --rank 32
"""
import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import nanosd
from nanosd.adapters import targets


def rss_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


def random_lora(pipe, path, rank, seed):
    """A kohya file on every attention, feed-forward and projection layer of the U-Net and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (part, name) in targets(pipe).items():
        if not key.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_")):
            continue
        if part == "unet" and not any(t in name for t in ("attn", "ff", "proj_")):
            continue
        m = dict(getattr(pipe, part).named_modules())[name]
        i, o = (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (m.in_channels, m.out_channels)
        shape = (1, 1) if isinstance(m, torch.nn.Conv2d) else ()
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, i, *shape, generator=g) * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn(o, rank, *shape, generator=g) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--rank", type=int, default=32)
a = p.parse_args()
pipe = nanosd.load(a.model)
base = rss_gib()
tmp = Path(tempfile.mkdtemp())
files = [random_lora(pipe, tmp / f"l{i}.safetensors", a.rank, i) for i in range(3)]
print(f"{len(nanosd.io.read_checkpoint(files[0])) // 3} modules a LoRA, rank {a.rank}, "
      f"{files[0].stat().st_size / 2**20:.0f} MiB a file; model loaded: {base:.2f} GiB RSS")
kw = dict(steps=1, height=256, width=256, seed=0, output="latent")
pipe.generate("warm-up", **kw)
for what, merge in (("hooked", False), ("merged", True)):
    t = time.perf_counter()
    for f in files:
        pipe.load_lora(f, 0.7, merge=merge)
    loaded = time.perf_counter() - t
    rss = rss_gib()
    t = time.perf_counter()
    pipe.generate("a photo", **kw)
    step = time.perf_counter() - t
    t = time.perf_counter()
    pipe.unload_loras()
    unloaded = time.perf_counter() - t
    print(f"{what}: three LoRAs loaded in {loaded:.2f} s, unloaded in {unloaded:.3f} s; RSS {rss:.2f} GiB "
          f"(+{rss - base:.2f}); a 1-step 256x256 image with them {step:.2f} s")
t = time.perf_counter()
pipe.generate("a photo", **kw)
print(f"without: {time.perf_counter() - t:.2f} s; switching between images never reloads the checkpoint; "
      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
