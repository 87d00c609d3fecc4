"""Data at scale in the format Stable Diffusion's own training used: WebDataset tar shards.

`write_shards` turns any data set nanosd reads into `shard-000000.tar, ...`, one sample per key:
`KEY.png` (the image), `KEY.txt` (its captions, one per line), `KEY.cls` (its label), and, when an autoencoder is
given, `KEY.latent.npy` (E(x), the posterior mean, so a frozen autoencoder never runs in training). `index.json`
beside them names the shards, their sample counts, the classes and the autoencoder the latents came from.

`ShardSet` reads them on demand and never whole: the members' offsets are indexed once, and `take(idx)` seeks
to the samples a step needs. The trainer asks each rank for its own share of every global batch, so ranks read
disjoint samples, and a resumed run (with any number of processes) reads exactly what it would have.
"""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import to_float
from .io import atomic_path


def write_shards(data, out, shard_size=1000, latents=None, autoencoder_key=None, size=None):
    """`data` (an ImageSet, images in [-1, 1]) as tar shards of `shard_size` samples in the folder `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"shard folder {out} is not empty: give a new folder (nothing is overwritten)")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    images = ((data.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    shards = []
    for start in range(0, len(images), shard_size):
        name = f"shard-{len(shards):06d}.tar"
        with atomic_path(out / name) as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + shard_size, len(images))):
                key = f"{i:08d}"
                a = images[i]
                png = io.BytesIO()
                Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(png, format="PNG")
                members = {"png": png.getvalue()}
                if data.captions is not None:
                    members["txt"] = "\n".join(data.captions[i]).encode("utf-8")
                if data.labels is not None:
                    members["cls"] = str(int(data.labels[i])).encode()
                if latents is not None:
                    npy = io.BytesIO()
                    np.save(npy, latents[i].numpy().astype(np.float32), allow_pickle=False)
                    members["latent.npy"] = npy.getvalue()
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append({"name": name, "count": min(start + shard_size, len(images)) - start})
    index = {"count": len(images), "shards": shards, "classes": data.classes,
             "labels": data.labels.tolist() if data.labels is not None else None,
             "shape": list(data.images.shape[1:]), "captions": data.captions is not None,
             "latent": {"autoencoder": autoencoder_key, "shape": list(latents.shape[1:])} if latents is not None else None}
    with atomic_path(out / "index.json") as tmp:
        tmp.write_text(json.dumps(index))
    return out


class _Lazy:
    """A read-on-demand list (captions): len, truthiness and indexing, as the trainer uses them."""

    def __init__(self, n, get):
        self.n, self.get = n, get

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.get(i)


class ShardSet:
    """Tar shards as a data set the trainer reads a batch at a time: images in [-1, 1] (resized to `size`), or
    with `use_latents(scale)` the stored latents times scale."""

    def __init__(self, folder, size=None):
        self.folder = Path(folder)
        if not (self.folder / "index.json").is_file():
            raise FileNotFoundError(f"{folder} holds no index.json: write shards with 'nanosd data shard SRC {folder}'")
        index = json.loads((self.folder / "index.json").read_text())
        self.classes, self.latent_info = index["classes"], index["latent"]
        self.labels = torch.tensor(index["labels"]) if index["labels"] is not None else None
        self.size, self.scale, self.pixels = size, None, None
        self.where = []  # per sample: (shard, {ext: (offset, size)})
        for s, shard in enumerate(index["shards"]):
            try:
                with tarfile.open(self.folder / shard["name"]) as tar:
                    members = {}
                    for m in tar:  # headers only: tarfile seeks past each member's data
                        key, ext = m.name.split(".", 1)
                        members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            except (OSError, tarfile.TarError) as e:
                raise ValueError(f"shard {self.folder / shard['name']} is unreadable ({e}): write the shards again") from None
            if len(members) != shard["count"]:
                raise ValueError(f"shard {shard['name']} holds {len(members)} samples, index.json says {shard['count']}")
            self.where += [(s, members[k]) for k in sorted(members)]
        self.names = [shard["name"] for shard in index["shards"]]
        self._files = {}
        self.captions = _Lazy(len(self), self._captions) if index["captions"] else None
        self._shape = tuple(index["shape"])

    def __len__(self):
        return len(self.where)

    @property
    def shape(self):
        if self.scale is not None:
            return tuple(self.latent_info["shape"])
        return (self._shape[0], self.size or self._shape[1], self.size or self._shape[2])

    def use_latents(self, scale):
        """Read the stored latents (times scale) instead of the images."""
        if self.latent_info is None:
            raise ValueError(f"shards {self.folder} hold no latents: write them with 'nanosd data shard ... --autoencoder RUN'")
        self.scale = scale
        return self

    def _read(self, i, ext):
        shard, members = self.where[i]
        if ext not in members:
            raise ValueError(f"sample {i} of {self.folder} has no .{ext}")
        f = self._files.get(shard) or self._files.setdefault(shard, open(self.folder / self.names[shard], "rb"))
        offset, size = members[ext]
        f.seek(offset)
        return f.read(size)

    def _captions(self, i):
        return self._read(i, "txt").decode("utf-8").split("\n")

    def _image(self, i):
        if self.scale is not None:
            return torch.from_numpy(np.load(io.BytesIO(self._read(i, "latent.npy")), allow_pickle=False)) * self.scale
        a = np.asarray(Image.open(io.BytesIO(self._read(i, "png"))))
        a = a[..., None] if a.ndim == 2 else a
        return to_float(torch.from_numpy(a)[None], self.size or a.shape[0])[0]

    def take(self, idx) -> dict:
        idx = [int(i) for i in idx]
        batch = {"image": torch.stack([self._image(i) for i in idx])}
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        if self.captions is not None:
            batch["captions"] = [self._captions(i) for i in idx]
        return batch

    def spread_index(self, n):
        return torch.linspace(0, len(self) - 1, min(n, len(self))).long()

    def spread(self, n):
        return self.take(self.spread_index(n))["image"]

    def latents(self):
        """Every stored latent (unscaled), for the scale factor."""
        scale, self.scale = self.scale, 1.0
        try:
            return torch.stack([self._image(i) for i in range(len(self))])
        finally:
            self.scale = scale
