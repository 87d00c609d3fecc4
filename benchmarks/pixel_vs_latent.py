"""Pixel-space vs latent-space diffusion, measured side by side in one run: the same data at the same size and the
same U-Net recipe, trained for the same wall-clock budget (the latent budget includes training its autoencoder).

    python benchmarks/pixel_vs_latent.py [--config configs/fashion-mnist-latent.toml] [--minutes 10] [--n 1000]

Writes OUT/table.md and OUT/pixel_vs_latent.png and prints the table.
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from nanosd.config import load_config
from nanosd.fid import evaluate_run
from nanosd.pipeline import load
from nanosd.recipes import train


def sampling_seconds_per_image(run, n=64, repeats=3):
    pipe = load(run)
    pipe.generate(batch_size=2, steps=2, output="tensor")
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe.generate(batch_size=n, seed=r, output="tensor")
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def training_images_per_second(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in rows if "images_per_s" in r)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fashion-mnist-latent.toml")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--n", type=int, default=1000, help="samples for FID")
    p.add_argument("--out", default="runs/pixel_vs_latent")
    a = p.parse_args()
    out = Path(a.out)
    latent_cfg = load_config(a.config)
    pixel_cfg = copy.deepcopy(latent_cfg)
    pixel_cfg.autoencoder = pixel_cfg.autoencoder_train = None
    pixel_cfg.sample.clip_x0 = True
    results = {}
    for name, cfg in (("pixel", pixel_cfg), ("latent", latent_cfg)):
        run = train(cfg, out / name, minutes=a.minutes)
        fid, floor = evaluate_run(run, n=a.n)
        results[name] = {"train_img_s": training_images_per_second(run),
                         "sample_s_img": sampling_seconds_per_image(run), "fid": fid, "floor": floor}
    px, lt = results["pixel"], results["latent"]
    lines = [f"{a.config} at {latent_cfg.data.size} px, {a.minutes:g} min each, FID at N={a.n} "
             f"(real-vs-real floor {px['floor']:.2f}), {torch.get_num_threads()} threads",
             "", "| | pixel | latent | latent / pixel |", "|---|---|---|---|",
             f"| training images/s | {px['train_img_s']:.1f} | {lt['train_img_s']:.1f} | "
             f"{lt['train_img_s'] / px['train_img_s']:.1f}x |",
             f"| sampling s/image | {px['sample_s_img']:.4f} | {lt['sample_s_img']:.4f} | "
             f"{px['sample_s_img'] / lt['sample_s_img']:.1f}x faster |",
             f"| FID | {px['fid']:.2f} | {lt['fid']:.2f} | |"]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, key, title in zip(axes, ("train_img_s", "sample_s_img", "fid"),
                              ("training images/s", "sampling s/image", "FID (lower is better)")):
        ax.bar(["pixel", "latent"], [px[key], lt[key]], color=["tab:gray", "tab:blue"])
        ax.set_title(title)
    axes[2].axhline(px["floor"], color="k", ls="--", lw=1, label="real-vs-real floor")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pixel_vs_latent.png", dpi=110)
    print(f"wrote {out / 'table.md'} and {out / 'pixel_vs_latent.png'}")


if __name__ == "__main__":
    main()
