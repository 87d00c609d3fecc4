"""Data at scale in the format Stable Diffusion's own training used: WebDataset tar shards.

Two readers, one way of turning a sample's members into a training example (`decode`):
- `StreamSet`: shards as people have them (img2dataset's `KEY.jpg`, `KEY.txt`, `KEY.json`; any image format and
  size; no index), from a folder, a brace pattern (`data/{00000..00127}.tar`) or URLs (`https://`, `s3://`,
  `pipe:CMD`), streamed through the `webdataset` package. Each rank reads its own shards (its own samples of them
  when there are fewer shards than ranks) through a shuffle buffer; a resumed run skips the shards its samples
  came from (approximately: a shard in flight is read again). Undecodable samples are skipped and counted; an
  unreadable shard is named in one line and skipped.
- `ShardSet`: shards nanosd wrote (`index.json` beside them), indexed once and read by seeking, so every rank
  reads exactly its share of each global batch and a resumed run reads exactly what it would have.

`write_shards` writes `shard-000000.tar, ...`: `KEY.png`, `KEY.txt` (captions, one per line), `KEY.cls` (label),
`KEY.json` (size, caption, the autoencoder of the latents) and, with an autoencoder, `KEY.latent.npy` (E(x), the
posterior mean, so a frozen autoencoder never runs in training), and `index.json`.
"""
import io
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .images import to_float
from .io import atomic_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "prompt")  # where a sample's json keeps its caption (img2dataset: caption)


def bucket_sizes(size: int, multiple: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (height, width): for each width in steps of `multiple`, the tallest height that keeps
    the area within size^2, from 1:max_ratio to max_ratio:1 (kohya's buckets: 256x1024 ... 1024x256 for 512)."""
    out = set()
    for w in range(multiple, size * size // multiple + 1, multiple):
        h = size * size // w // multiple * multiple
        if h and 1 / max_ratio <= w / h <= max_ratio:
            out |= {(h, w), (w, h)}
    return sorted(out)


def fit_image(im: Image.Image, hw: tuple[int, int], channels: int, crop: str, rng: random.Random) -> torch.Tensor:
    """An image of any size and mode -> (channels, h, w) in [-1, 1]: resized to cover (h, w), then cropped at the
    centre or at random; transparency composited onto white."""
    if im.mode in ("P", "LA", "RGBA", "PA"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    im = im.convert("L" if channels == 1 else "RGB")
    centre = (rng.random(), rng.random()) if crop == "random" else (0.5, 0.5)
    a = np.asarray(ImageOps.fit(im, (hw[1], hw[0]), Image.BICUBIC, centering=centre))
    return torch.from_numpy(a.reshape(hw[0], hw[1], channels).copy()).permute(2, 0, 1).float() / 127.5 - 1


def caption_of(sample: dict) -> list[str] | None:
    """The sample's captions: its `txt` (one per line), else its json's caption field."""
    if "txt" in sample:
        return [c for c in sample["txt"].decode("utf-8").split("\n") if c.strip()] or [""]
    if "json" in sample:
        meta = json.loads(sample["json"])
        for k in CAPTION_KEYS:
            if isinstance(meta.get(k), str):
                return [meta[k]]
    return None


def write_shards(batches, out, shard_size=1000, *, classes=(), encode=None, autoencoder_key=None):
    """Samples (an iterable of training batches: image in [-1, 1], captions, label) as tar shards of `shard_size`
    samples in the new folder `out`, with index.json; `encode(images)` adds each image's latent."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"shard folder {out} is not empty: give a new folder (nothing is overwritten)")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    shards, pending, labels, count = [], [], [], 0
    shape = latent_shape = None
    captioned = True

    def flush():
        name = f"shard-{len(shards):06d}.tar"
        with atomic_path(out / name) as tmp, tarfile.open(tmp, "w") as tar:
            for key, members in pending:
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append({"name": name, "count": len(pending)})
        pending.clear()

    for batch in batches:
        images, captions, label = batch["image"], batch.get("captions"), batch.get("label")
        if shape not in (None, tuple(images.shape[1:])):
            raise ValueError(f"images of {tuple(images.shape[1:])} after {shape}: shards are written at one size")
        shape, captioned = tuple(images.shape[1:]), captioned and captions is not None
        latents = encode(images) if encode else None
        u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j, a in enumerate(u8):
            key = f"{count:08d}"
            png = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(png, format="PNG")
            members, meta = {"png": png.getvalue()}, {"key": key, "width": a.shape[1], "height": a.shape[0]}
            if captions is not None:
                members["txt"] = "\n".join(captions[j]).encode("utf-8")
                meta["caption"] = captions[j][0]
            if label is not None:
                members["cls"] = str(int(label[j])).encode()
                labels.append(int(label[j]))
            if latents is not None:
                npy = io.BytesIO()
                np.save(npy, latents[j].cpu().numpy().astype(np.float32), allow_pickle=False)
                members["latent.npy"], meta["autoencoder"] = npy.getvalue(), autoencoder_key
                latent_shape = list(latents.shape[1:])
            members["json"] = json.dumps(meta).encode()
            pending.append((key, members))
            count += 1
            if len(pending) == shard_size:
                flush()
    if pending:
        flush()
    if not count:
        raise ValueError("no samples to write")
    index = {"count": count, "shards": shards, "classes": list(classes), "labels": labels or None,
             "shape": list(shape), "captions": captioned,
             "latent": {"autoencoder": autoencoder_key, "shape": latent_shape} if latent_shape else None}
    with atomic_path(out / "index.json") as tmp:
        tmp.write_text(json.dumps(index))
    return out, count


def shard_urls(spec) -> list[str]:
    """A folder of .tar files, a brace pattern of paths or URLs, or several of them separated by '::' -> the shards
    in order. s3:// URLs are read through the AWS CLI (`pipe:aws s3 cp URL -`), as webdataset advises."""
    from braceexpand import braceexpand

    urls = []
    for part in str(spec).split("::"):
        if Path(part).is_dir():
            found = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not found:
                raise ValueError(f"folder {part} holds no .tar shards")
            urls += found
            continue
        for u in braceexpand(part):
            if u.startswith("s3://"):
                u = f"pipe:aws s3 cp {u} -"
            elif "://" not in u and not u.startswith("pipe:") and not Path(u).is_file():
                raise FileNotFoundError(f"shard {u} not found: give a folder, a brace pattern such as "
                                        f"data/{{00000..00009}}.tar, or URLs (https://, s3://, pipe:CMD)")
            urls.append(u)
    return urls


def is_shards(spec) -> bool:
    """Does the data name point at tar shards to stream (and not at nanosd's indexed shards)?"""
    spec = str(spec)
    if Path(spec).is_dir():
        return not (Path(spec) / "index.json").is_file() and any(Path(spec).glob("*.tar"))
    return spec.endswith(".tar") or "{" in spec or "://" in spec or spec.startswith("pipe:") or "::" in spec


def streamed(data) -> bool:
    return isinstance(data, StreamSet)


class StreamSet:
    """Tar shards streamed: `next(n)` gives this rank's next n samples (images resized and cropped to `size`, or
    to their aspect-ratio bucket; latents when the shards hold them or an autoencoder encodes them); `preview(n)`
    the first n samples of the set, in order (grids' prompts, held-out images)."""

    def __init__(self, spec, size, *, crop="center", buckets=False, multiple=8, shuffle=1000):
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop {crop!r} is unknown: choose center or random")
        self.spec, self.urls, self.size, self.crop, self.shuffle = str(spec), shard_urls(spec), size, crop, shuffle
        self.buckets = bucket_sizes(size, multiple) if buckets else [(size, size)]
        self.skipped, self.decoded, self.bad_shards, self.first_error = 0, 0, [], None
        self.scale, self.autoencoder, self.stream = None, None, None
        self.rng = random.Random(0)
        self.shard_count = [0, 0]  # shards read to the end, and their samples: the resume estimate
        first = self._first()
        self.channels = 1 if first["mode"] in ("1", "L", "I", "I;16") else 3
        self.latent_info = first["latent"]
        self.classes, self.labels, self.captions = [], None, None

    # --- reading ---
    def _bad_shard(self, exn):
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), self.spec)
        if url not in self.bad_shards:
            print(f"warning: shard {url} is unreadable ({str(exn.args[0] if exn.args else exn)[:200]}); skipped")
            self.bad_shards.append(url)
        return True

    def _read(self, urls):
        """Raw samples ({ext: bytes}) of the shards in order, counting each shard read to the end."""
        import webdataset as wds

        url, n = None, 0
        for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=self._bad_shard):
            if sample["__url__"] != url:
                if url is not None:
                    self.shard_count = [self.shard_count[0] + 1, self.shard_count[1] + n]
                url, n = sample["__url__"], 0
            n += 1
            yield sample
        if url is not None:
            self.shard_count = [self.shard_count[0] + 1, self.shard_count[1] + n]

    def _first(self):
        for sample in self._read(self.urls):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None and "latent.npy" not in sample:
                continue
            try:
                mode = Image.open(io.BytesIO(sample[ext])).mode if ext else "RGB"
            except Exception:  # noqa: BLE001 - a corrupt first image: look further
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            latent = None
            if "latent.npy" in sample:
                shape = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False).shape
                latent = {"autoencoder": meta.get("autoencoder"), "shape": list(shape)}
            return {"mode": mode, "latent": latent}
        raise ValueError(f"no image could be read from {self.spec} ({len(self.urls)} shards): look at the shards "
                         f"with 'tar tvf', or give other ones")

    def decode(self, sample, square=False):
        """(the sample's batch key: its shape, {image, captions}), or None (counted) when it cannot be decoded."""
        try:
            if self.scale is not None:
                x = torch.from_numpy(np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)) * self.scale
            else:
                ext = next(e for e in IMAGE_EXTS if e in sample)
                im = Image.open(io.BytesIO(sample[ext]))
                ratio = math.log(im.height / im.width)
                hw = (self.size, self.size) if square else min(self.buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
                cover = max(hw[0] / im.height, hw[1] / im.width)  # JPEGs decode at 1/2, 1/4, 1/8 when that covers
                im.draft(im.mode, (math.ceil(im.width * cover), math.ceil(im.height * cover)))
                im.load()
                x = fit_image(im, hw, self.channels, self.crop, self.rng)
            return tuple(x.shape), {"image": x, "captions": caption_of(sample) or [""]}
        except Exception as e:  # noqa: BLE001 - whatever a broken file raises, the sample is skipped
            self.skipped += 1
            if self.first_error is None:
                self.first_error = f"{sample.get('__key__')} in {sample.get('__url__')}: {type(e).__name__}: {e}"
                print(f"warning: skipping undecodable samples (first: {self.first_error[:300]})")
            return None

    def _batch(self, examples):
        batch = {"image": torch.stack([e["image"] for e in examples]), "captions": [e["captions"] for e in examples]}
        if self.autoencoder is not None:  # a frozen autoencoder's latents (posterior mean), scaled
            ae, scale = self.autoencoder
            with torch.no_grad():
                batch["image"] = ae.encode(batch["image"].to(next(ae.parameters()).device)).mode() * scale
        return batch

    def once(self, n):
        """Every sample once, in order, in batches of n (at the square size): for writing shards, and previews."""
        examples = []
        for sample in self._read(self.urls):
            if (d := self.decode(sample, square=True)) is not None:
                examples.append(d[1])
                if len(examples) == n:
                    yield self._batch(examples)
                    examples = []
        if examples:
            yield self._batch(examples)

    def preview(self, n) -> dict:
        return next(self.once(n))

    # --- training ---
    def _samples(self, rank, world, seed, done):
        """This rank's raw samples, epoch after epoch: the shards in an order drawn from (seed, epoch), rank r taking
        every world-th of them (or, with fewer shards than ranks, every world-th sample), the first `done` skipped."""
        n = len(self.urls)
        epoch, skip = divmod(done, n)
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()[skip:]
            mine = order[rank::world] if n >= world else order
            got = 0
            for j, sample in enumerate(self._read([self.urls[i] for i in mine])):
                if n >= world or j % world == rank:
                    got += 1
                    yield sample
            if not got and not skip:
                raise ValueError(f"no sample of {self.spec} could be read (unreadable: {', '.join(self.bad_shards)})")
            epoch, skip = epoch + 1, 0

    def open(self, rank, world, seed, consumed=0, state=None):
        """Start this rank's stream; a resumed run (`consumed` samples of the whole run, `state` from the checkpoint)
        starts after the shards those samples came from."""
        import webdataset as wds

        per_shard = (state or {}).get("per_shard")
        done = int(consumed // per_shard) if per_shard and consumed else 0
        raw = self._samples(rank, world, seed, done)
        if self.shuffle > 1:
            raw = wds.shuffle(self.shuffle, min(self.shuffle, 100), seed=seed * 1_000_003 + rank + done)(raw)
        self.stream, self.pending = raw, {}
        self.rng = random.Random(seed * 1_000_003 + rank + done)  # random crops
        return done

    def state(self) -> dict:
        shards, samples = self.shard_count
        return {"per_shard": samples / shards} if shards else {}

    def next(self, n) -> dict:
        """The next n samples of this rank that share a shape (an aspect-ratio bucket: the others wait)."""
        if self.stream is None:
            self.open(0, 1, 0)
        for sample in self.stream:
            if (d := self.decode(sample)) is None:
                if self.skipped >= 100 and not self.decoded:
                    raise ValueError(f"none of the first {self.skipped} samples of {self.spec} could be decoded "
                                     f"(first: {self.first_error[:300]}): look at the shards, or give other ones")
                continue
            self.decoded += 1
            group = self.pending.setdefault(d[0], [])
            group.append(d[1])
            if len(group) == n:
                del self.pending[d[0]]
                return self._batch(group)
        raise RuntimeError("the shard stream ended")  # _samples never ends: unreachable

    # --- what the recipes ask of a data set ---
    @property
    def shape(self):
        if self.scale is not None:
            return tuple(self.latent_info["shape"])
        if self.autoencoder is not None:
            ae = self.autoencoder[0]
            return (ae.cfg.z_channels, self.size // ae.cfg.factor, self.size // ae.cfg.factor)
        return (self.channels, self.size, self.size)

    def use_latents(self, scale):
        """Read the stored latents (times scale) instead of the images."""
        self.scale = scale
        return self

    def use_autoencoder(self, ae, scale):
        """Encode each batch with the frozen autoencoder `ae` (times scale): training on latents from images."""
        self.autoencoder = (ae, scale)
        return self

    def latents(self, n=256):
        """Stored latents (unscaled) of the first n samples, for the scale factor."""
        scale, self.scale = self.scale, 1.0
        try:
            return self.preview(n)["image"]
        finally:
            self.scale = scale


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
        a = np.array(Image.open(io.BytesIO(self._read(i, "png"))))
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

    def preview(self, n) -> dict:
        return self.take(self.spread_index(n))

    def latents(self):
        """Every stored latent (unscaled), for the scale factor."""
        scale, self.scale = self.scale, 1.0
        try:
            return torch.stack([self._image(i) for i in range(len(self))])
        finally:
            self.scale = scale
