"""Training data from shards: the reader's throughput beside what the trainer needs, and a full-size SD fine-tune.

    python benchmarks/data.py [--sd SD15.safetensors] [--steps 3] [--sizes 256 512]

1. Reader: samples/s of StreamSet.next (tar streaming, decoding, resizing and cropping, batching) over
   - MNIST written by `nanosd data shard mnist` (28 px PNGs, read at 32 px as the text recipe reads them),
   - img2dataset-style shards of real images at photo sizes: the 3,786 Google emoji upscaled to random sizes of
     384-1024 px a side and stored as JPEG (quality 90), read at 256 and 512 px (centre crops and aspect buckets),
   from the folder and through `pipe:cat`.
2. With --sd: an SD 1.5 fine-tune (init = the file) from img2dataset shards with the VAE's latents written ahead
   (`nanosd data shard --autoencoder`, 16 images), `--steps` steps at batch 1 with gradient checkpointing, per size: seconds
   per step (median, after the first), the latents' writing rate, and the training process's peak memory (max RSS).
"""
import argparse
import io
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanosd.shards import StreamSet


def img2dataset_shards(folder: Path, n=512, per_shard=128, seed=0):
    """Real images at photo sizes, as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json."""
    import webdataset as wds

    from nanosd.data import load_dataset

    emoji = load_dataset("emoji", 64)
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            j = rng.randrange(len(emoji))
            a = ((emoji.images[j] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            w, h = rng.randint(384, 1024), rng.randint(384, 1024)
            b = io.BytesIO()
            Image.fromarray(a).resize((w, h), Image.BICUBIC).save(b, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:09d}", "jpg": b.getvalue(), "txt": emoji.captions[j][0],
                        "json": json.dumps({"caption": emoji.captions[j][0], "width": w, "height": h}).encode()})
    return folder


def reader_rate(spec, size, batch, n, **kw):
    s = StreamSet(spec, size, shuffle=1000, **kw)
    s.open(0, 1, 0)
    s.next(batch)  # the shuffle buffer's first fill is not the steady state
    t = time.perf_counter()
    for _ in range(n // batch):
        s.next(batch)
    return n // batch * batch / (time.perf_counter() - t)


def finetune(sd, shards, size, steps, tmp: Path):
    """(seconds per step, peak RSS GiB, latents written per second) of `nanosd train` with init = sd."""
    pre = tmp / f"latents-{size}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanosd", "data", "shard", str(shards), str(pre), "--size", str(size),
                    "--autoencoder", str(sd), "--shard-size", "8"], check=True, capture_output=True)
    written = json.loads((pre / "index.json").read_text())["count"] / (time.perf_counter() - t)  # with the load
    cfg = tmp / f"tune-{size}.toml"
    cfg.write_text(f'init = "{sd}"\n[data]\nname = "{pre}/shard-{{000000..000001}}.tar"\nsize = {size}\n'
                   f"[train]\nbatch_size = 1\nlr = 1e-5\nwarmup_steps = 0\nsteps = {steps}\nlog_every = 1\n"
                   f"sample_every = 0\ncheckpoint_every = 1000\ncheckpointing = true\n[sample]\nn = 1\nsteps = 1\n")
    out = subprocess.run([sys.executable, "-m", "nanosd", "train", str(cfg), "--out", str(tmp / f"run-{size}")],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far, GiB
    log = [json.loads(line) for line in (tmp / f"run-{size}" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in log if "loss" in r]
    per_step = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return statistics.median(per_step), peak, written


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sd", help="an SD 1.5 file: also time a full fine-tune step per size")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    a = p.parse_args()
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "nanosd", "data", "shard", "mnist", str(tmp / "mnist"),
                        "--size", "28"], check=True, capture_output=True)
        photos = img2dataset_shards(tmp / "photos")
        rows = [("MNIST 28 px PNG -> 32", str(tmp / "mnist"), 32, 128, 4096, {}),
                ("MNIST via pipe:cat", f"pipe:cat {tmp / 'mnist'}/shard-{{000000..000008}}.tar", 32, 128, 4096, {}),
                ("photos 384-1024 JPEG -> 256", str(photos), 256, 8, 256, {}),
                ("photos -> 512 (centre crop)", str(photos), 512, 8, 256, {}),
                ("photos -> 512 (aspect buckets)", str(photos), 512, 1, 256, {"buckets": True, "multiple": 64}),
                ("photos -> 512 via pipe:cat", f"pipe:cat {photos}/{{00000..00003}}.tar", 512, 8, 256, {})]
        print(f"\n{'reader (one process, batch)':40s} {'samples/s':>10s}")
        for name, spec, size, batch, n, kw in rows:
            rate = statistics.median(reader_rate(spec, size, batch, n, **kw) for _ in range(3))
            print(f"{name + f' (b={batch})':40s} {rate:10.1f}")
        if a.sd:
            print(f"\n{'SD 1.5 fine-tune, batch 1':28s} {'s/step':>8s} {'samples/s needed':>17s} "
                  f"{'peak RSS GiB':>13s} {'latents written/s':>18s}")
            few = img2dataset_shards(tmp / "sd-photos", n=16, per_shard=8)  # the VAE takes seconds an image
            for size in a.sizes:
                step, peak, written = finetune(Path(a.sd), few, size, a.steps, tmp)
                print(f"{f'{size}x{size}, checkpointing':28s} {step:8.2f} {1 / step:17.3f} {peak:13.1f} {written:18.2f}")


if __name__ == "__main__":
    main()
