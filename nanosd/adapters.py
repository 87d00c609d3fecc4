"""Adapters as patches on named modules: a LoRA adds scale * up(down(x)) to the output of the Linear or Conv2d it
names (Hu et al. 2021; scale = alpha / rank times the user's weight), through a forward hook, so the model classes
know nothing of it and removing the hook gives back the base model exactly; merged, its delta is added to the
weight, whose original is kept for an exact unmerge. LyCORIS's kinds are the same patch with another delta:
LoCon's Tucker middle (up(mid(down(x))), the module's stride and padding on mid), LoHa's
dW = (w1a w1b) * (w2a w2b) and LoKr's dW = kron(w1, w2) (each factor whole or a product), scaled as A1111 does.

Files: kohya / A1111 (`lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`; `.lora_down.weight`,
`.lora_up.weight`, `.alpha`), the U-Net named the diffusers way (SD 1.x files) or the original way (SDXL files),
and diffusers / PEFT files (`unet.*`, `text_encoder.*`, `text_encoder_2.*` with `.lora_A.weight` / `.lora_B.weight`).
Prompt tags: `<lora:NAME:W>` or `<lora:NAME:TE_W:UNET_W>`, for one generation.

Textual inversion: new token vectors (A1111's `.pt` `string_to_param` and `.safetensors` `emb_params`, diffusers'
learned_embeds, SDXL's `clip_l` + `clip_g`), appended to each text encoder's token embedding and used where the
prompt names them.
"""
import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .formats import diffusers
from .io import read_checkpoint
from .unet import OnFrozen

SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
            ".dora_scale": "dora_scale",
            ".lora_A.weight": "down", ".lora_B.weight": "up", **{f".{k}": k for k in (
                "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
EXTENSIONS = (".safetensors", ".pt", ".ckpt")  # adapter and embedding files, as A1111 lists them
TAG = re.compile(r"<lora:([^:>]+)(?::([+-]?[\d.]+))?(?::([+-]?[\d.]+))?>")


@dataclass
class Lora:
    """One file's deltas: (part, module name) -> (kind, tensors, scale): ("lowrank", (down, up, mid or None), alpha /
    rank) or ("full", (dW,), alpha / dim)."""
    name: str
    deltas: dict
    path: Path | None = None
    hash: str = ""  # A1111's short hash of the file, for a tag's infotext (Lora hashes)
    weights: dict = field(default_factory=dict)  # part kind ("text", "unet") -> the user's weight
    handles: list = field(default_factory=list)  # forward hooks while attached


def targets(pipe) -> dict:
    """Every name a LoRA file may give a patchable module, flattened as kohya flattens them ("." -> "_"), and
    diffusers' dotted names: -> (part, our module name)."""
    out = {}
    refiner = pipe.family == "sdxl-refiner"  # its one encoder is SDXL's second
    te = {"text_encoder": ["lora_te2_"] if refiner else ["lora_te_", "lora_te1_"], "text_encoder_2": ["lora_te2_"]}
    peft = {"text_encoder": "text_encoder_2." if refiner else "text_encoder.",
            "text_encoder_2": "text_encoder_2."}
    theirs = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in diffusers.names("unet", pipe.unet).items()
              if k.endswith(".weight")}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            for alias in (name, theirs.get(name, name)):
                out["lora_unet_" + alias.replace(".", "_")] = ("unet", name)
            out["unet." + theirs.get(name, name)] = ("unet", name)
    for part in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, part)
        if model is None:
            continue
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name != "text_projection":
                for prefix in te[part]:
                    out[prefix + "text_model_" + name.replace(".", "_")] = (part, name)
                out[peft[part] + "text_model." + name] = (part, name)
    return out


def read(path, pipe, name=None) -> Lora:
    """A LoRA file's deltas for this pipeline's modules; one-line errors for a file that matches nothing or that
    was made for another model, and the keys that match nothing listed."""
    path = Path(path)
    tensors = read_checkpoint(path)
    groups = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        stem = key[: -len(suffix)].removeprefix("base_model.model.")
        groups.setdefault(stem, {})[SUFFIXES[suffix]] = value
    if not groups:
        raise ValueError(f"{path} holds no LoRA weights (.lora_down/.lora_up or .lora_A/.lora_B): is it a LoRA?")
    names, modules = targets(pipe), _modules(pipe)
    deltas, unmatched = {}, []
    for stem, g in groups.items():
        if stem not in names:
            unmatched.append(stem)
            continue
        part, module = names[stem]
        target = modules[part][module]
        kind, tensors, scale = _delta(g, target, f"{path.name}: {stem}")
        shape = tuple(target.weight.shape)
        got = (tensors[1].shape[0], tensors[0].shape[1]) if kind == "lowrank" else tuple(tensors[0].shape[:2])
        if got != shape[:2]:
            raise ValueError(f"{path.name} is a LoRA for another model: {stem} is {got[0]}x{got[1]} but this "
                             f"{pipe.family or 'model'}'s {module} is {shape[0]}x{shape[1]} (an SDXL LoRA on SD 1.x?)")
        deltas[(part, module)] = (kind, tensors, scale)
    if not deltas:
        raise ValueError(f"{path.name} matches no layer of this {pipe.family or 'model'} "
                         f"(first keys: {', '.join(sorted(unmatched)[:3])}): is it a LoRA for another model family?")
    if unmatched:
        import warnings

        warnings.warn(f"{path.name}: {len(unmatched)} LoRA keys match no layer and are left out: "
                      f"{', '.join(sorted(unmatched)[:5])}{' …' if len(unmatched) > 5 else ''}", stacklevel=3)
    return Lora(name or path.stem, deltas, path)


def _modules(pipe) -> dict:
    """part -> {module name: module} for the parts a patch may name."""
    return {p: dict(getattr(pipe, p).named_modules()) for p in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, p) is not None}


def cached(pipe, name) -> Lora:
    """A prompt tag's LoRA, read once (until its file changes): tags are applied at every generation."""
    path = find(name, pipe.lora_dirs)
    key = (path, path.stat().st_mtime_ns)
    if key not in pipe.lora_cache:
        pipe.lora_cache = {k: v for k, v in pipe.lora_cache.items() if k[0] != path}  # an older version goes
        lora = read(path, pipe, name)
        lora.hash = short_hash(path)
        pipe.lora_cache[key] = lora
    return pipe.lora_cache[key]


def _delta(g: dict, module, what):
    """A key group's delta as ("lowrank", (down, up, mid), scale) or ("full", (dW,), scale), with A1111's scale:
    alpha / the inner dimension (no alpha: 1; a LoKr of two whole factors: 1)."""
    g = {k: v.float() for k, v in g.items()}
    alpha = g["alpha"].item() if "alpha" in g else None
    if "down" in g and "up" in g:
        # with DoRA's magnitude (dora_scale) a fourth tensor: the weight is renormed per output channel to it
        tensors = (g["down"], g["up"], g.get("mid")) + ((g["dora_scale"],) if "dora_scale" in g else ())
        return "lowrank", tensors, (alpha or g["down"].shape[0]) / g["down"].shape[0]
    shape = module.weight.shape
    if "hada_w1_a" in g:
        w1, w2 = (_factor(g[f"hada_w{i}_a"], g[f"hada_w{i}_b"], g.get(f"hada_t{i}")) for i in (1, 2))
        dim = g["hada_w1_b"].shape[0]
        return "full", ((w1 * w2).reshape(shape),), alpha / dim if alpha else 1.0
    if "lokr_w1" in g or "lokr_w1_a" in g:
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
        w2 = g["lokr_w2"] if "lokr_w2" in g else _factor(g["lokr_w2_a"], g["lokr_w2_b"], g.get("lokr_t2"))
        dim = g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else None
        w1 = w1[:, :, None, None] if w2.ndim == 4 else w1
        return "full", (torch.kron(w1, w2).reshape(shape),), alpha / dim if alpha and dim else 1.0
    raise ValueError(f"{what}: an adapter kind nanosd does not know ({', '.join(sorted(g))})")


def _factor(a, b, t=None):
    """A LyCORIS factor: a @ b, or with a Tucker core t: the core contracted with both (conv kernels)."""
    if t is None:
        return a @ b.flatten(1)
    return torch.einsum("ijkl,jr,ip->prkl", t, b.flatten(1), a.flatten(1))


def _delta_fn(module, kind, tensors):
    """x -> the delta's output, in the module's own kind (a 1x1 LoRA stored flat on a 1x1 convolution, or the
    reverse); low-rank deltas stay low-rank (two or three thin products, not a full weight)."""
    conv = isinstance(module, nn.Conv2d)
    if kind == "full":
        w = tensors[0]
        if conv:
            return lambda x: F.conv2d(x, w.to(x.dtype), None, module.stride, module.padding)
        return lambda x: F.linear(x, w.to(x.dtype))
    down, up, mid = tensors[:3]
    if not conv:
        return lambda x: F.linear(F.linear(x, down.flatten(1).to(x.dtype)), up.flatten(1).to(x.dtype))
    down = down if down.ndim == 4 else down[:, :, None, None]
    up = up if up.ndim == 4 else up[:, :, None, None]
    if mid is None:
        return lambda x: F.conv2d(F.conv2d(x, down.to(x.dtype), None, module.stride, module.padding), up.to(x.dtype))
    return lambda x: F.conv2d(F.conv2d(F.conv2d(x, down.to(x.dtype)), mid.to(x.dtype), None, module.stride,
                                       module.padding), up.to(x.dtype))


def _delta_weight(module, kind, tensors):
    """The delta as a weight of the module's shape."""
    if kind == "full":
        return tensors[0]
    down, up, mid = tensors[:3]
    if mid is not None:
        return torch.einsum("or,rskl,si->oikl", up.flatten(1), mid, down.flatten(1))
    if isinstance(module, nn.Conv2d):
        if down.ndim == 4 and down.shape[-1] > 1:
            return torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    return up.flatten(1) @ down.flatten(1)


def attach(pipe, lora: Lora, merge=False):
    """Patch the modules: hooks (unattached exactly by removing them), or the deltas added to the weights."""
    modules = _modules(pipe)
    for (part, name), (kind, tensors, scale) in lora.deltas.items():
        module = modules[part][name]
        tensors = [t if t is None else t.to(module.weight.device) for t in tensors]  # a model on a GPU: there
        s = scale * lora.weights["unet" if part == "unet" else "text"]
        dora = tensors[3] if kind == "lowrank" and len(tensors) > 3 else None
        if dora is not None:  # DoRA (Liu et al. 2024): W' = m (W + s dW) / |W + s dW|, a norm per output channel
            v = module.weight.data.float() + s * _delta_weight(module, kind, tensors)
            k = dora.flatten().to(v) / v.flatten(1).norm(dim=1)
        if merge:  # the weight as it was before any merge is kept once, however many LoRAs merge into it
            pipe.unmerged.setdefault((part, name), module.weight.data.clone())
            new = v * k.view(-1, *[1] * (v.ndim - 1)) if dora is not None else \
                module.weight.data + s * _delta_weight(module, kind, tensors)
            module.weight.data.copy_(new.to(module.weight.dtype))
        elif dora is not None:  # k (W x + s dW x) + b, from the module's own output
            f, bias = _delta_fn(module, kind, tensors), module.bias
            shape = (-1, 1, 1) if isinstance(module, nn.Conv2d) else (-1,)
            b = 0 if bias is None else bias.detach().view(shape)
            lora.handles.append(module.register_forward_hook(
                lambda m, inputs, out, f=f, s=s, k=k.view(shape), b=b: k.to(out) * (out - b + s * f(inputs[0])) + b))
        else:
            f = _delta_fn(module, kind, tensors)
            lora.handles.append(module.register_forward_hook(lambda m, inputs, out, f=f, s=s: out + s * f(inputs[0])))


def detach(pipe, lora: Lora):
    """Remove a LoRA's hooks (merged LoRAs leave with restore())."""
    for h in lora.handles:
        h.remove()
    lora.handles.clear()


def restore(pipe):
    """Every merged weight back to what it was before the first merge, exactly."""
    modules = _modules(pipe)
    for (part, name), original in pipe.unmerged.items():
        modules[part][name].weight.data.copy_(original)
    pipe.unmerged.clear()


def short_hash(path) -> str:
    """A1111's LoRA hash: SHA-256 of a .safetensors file's tensor data (after its header: the "addnet" hash, blind
    to metadata edits) or of the whole file otherwise; its first 12 hex digits. Read once per file version."""
    return file_hash(path, tensors_only=True)[:12]


def file_hash(path, tensors_only=False, compute=True) -> str | None:
    """SHA-256 of a file (A1111's checkpoint hash: its first 10 hex digits), or of a .safetensors file's tensor
    data alone; read once per file version (compute=False: None unless already read)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, tensors_only)
    if key not in _HASHES and compute:
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            if tensors_only and str(path).endswith(".safetensors"):
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES.get(key)


_HASHES = {}  # (path, size, mtime, tensors only) -> SHA-256: a file's version is hashed once


def tags(prompts) -> list[tuple[str, float, float]]:
    """A1111's <lora:NAME:W> / <lora:NAME:TE_W:UNET_W> tags of the prompts, in order, each name once."""
    found = {}
    for p in prompts:
        for m in TAG.finditer(p or ""):
            te = float(m.group(2)) if m.group(2) else 1.0
            found.setdefault(m.group(1), (m.group(1), te, float(m.group(3)) if m.group(3) else te))
    return list(found.values())


def strip(prompt):
    """The prompt the text encoder reads: without its LoRA tags."""
    return None if prompt is None else TAG.sub("", prompt)


def files(dirs) -> list[Path]:
    """The LoRA files in the folders, by name."""
    return sorted((f for d in dirs for ext in EXTENSIONS for f in Path(d).glob(f"*{ext}")), key=lambda f: f.stem)


def find(name, dirs) -> Path:
    for d in dirs:
        for ext in EXTENSIONS:
            if (Path(d) / f"{name}{ext}").is_file():
                return Path(d) / f"{name}{ext}"
    raise FileNotFoundError(f"<lora:{name}> names no file {name}.safetensors in the LoRA folders "
                            f"({', '.join(map(str, dirs)) or 'none: set pipe.lora_dirs or --lora-dir'})")


def setup(pipe, specs=(), dirs=(), merge=False, embedding_dirs=()):
    """LoRAs given as FILE or FILE:WEIGHT (the CLI's and the server's --lora), the folders tags look in, and every
    embedding of the embedding folders (as A1111 loads its embeddings/ folder), by file stem."""
    pipe.lora_dirs = [Path(d) for d in dirs or []]
    for f in files(embedding_dirs or []):
        pipe.load_embedding(f)
    for spec in specs or []:
        path, weight = (spec.rsplit(":", 1)[0], float(spec.rsplit(":", 1)[1])) \
            if re.fullmatch(r".+:[+-]?[\d.]+", spec) else (spec, 1.0)
        pipe.load_lora(path, weight, merge)


def read_embedding(path, pipe) -> dict:
    """A textual-inversion file's vectors for each text part: {"text_encoder": (n, width), ...}."""
    path = Path(path)
    parts = list(pipe.conditioner.encoders() if pipe.conditioner else {})
    if not parts or pipe.conditioner.text.kind != "clip":
        raise ValueError(f"{path.name}: embeddings are read by CLIP text encoders, and this model has none")
    t = read_checkpoint(path)
    if "clip_l" in t or "clip_g" in t:  # SDXL's: one set of vectors per encoder
        found = {"text_encoder": t.get("clip_l"), "text_encoder_2": t.get("clip_g")}
    else:
        vectors = t.get("emb_params")
        vectors = vectors if vectors is not None else next((v for k, v in t.items() if k.startswith("string_to_param.")),
                                                           None)
        if vectors is None and len(t) == 1:  # diffusers' learned_embeds: {token: vectors}
            vectors = next(iter(t.values()))
        if vectors is None:
            raise ValueError(f"{path.name} is not a textual-inversion embedding (no emb_params, string_to_param, "
                             "clip_l/clip_g or single learned vector)")
        found = {"text_encoder": vectors}
    out = {}
    for part in parts:
        v = found.get(part)
        width = getattr(pipe, part).cfg.width
        if v is None or v.reshape(-1, v.shape[-1]).shape[-1] != width:
            have = ", ".join(f"{k} {tuple(x.shape)}" for k, x in found.items() if x is not None)
            raise ValueError(f"{path.name} is an embedding for another model ({have}); this "
                             f"{pipe.family or 'model'}'s {part.replace('_', ' ')} takes vectors of width {width}")
        out[part] = v.reshape(-1, width).float()
    return out


class LoraUNet(OnFrozen):
    """A frozen U-Net with trainable LoRA deltas on its Linear and Conv2d modules whose names contain one of
    `targets` (down: small random, up: zero, so training starts from the base model). Only the deltas are
    parameters. Calling it runs the base U-Net with this instance's deltas added by hooks (the EMA copy shares the
    U-Net and its hooks, not the deltas)."""
    active = None  # the LoraUNet being called

    def __init__(self, base: nn.Module, rank=8, alpha=8.0, targets=("attn", "ff", "proj_", "in_layers", "out_layers"),
                 names: dict | None = None):
        super().__init__(base)
        self.rank, self.alpha = rank, alpha
        self.names = names or {}  # our module names -> the names the kohya file gives them (diffusers' for SD 1.x)
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        g = torch.Generator().manual_seed(0)
        for name, m in base.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or not any(t in name for t in targets):
                continue
            key = name.replace(".", "_")
            conv = isinstance(m, nn.Conv2d)
            shape = (rank, m.in_channels, *m.kernel_size) if conv else (rank, m.in_features)
            fan_in = shape[1] * (shape[2] * shape[3] if conv else 1)
            self.down[key] = nn.Parameter(torch.randn(*shape, generator=g) / fan_in ** 0.5)
            self.up[key] = nn.Parameter(torch.zeros(m.out_channels if conv else m.out_features, rank,
                                                    *((1, 1) if conv else ())))
            m.register_forward_hook(lambda mod, inputs, out, key=key: LoraUNet._add(mod, key, inputs[0], out))
        if not self.down:
            raise ValueError(f"lora.targets {list(targets)} name no Linear or Conv2d module of the U-Net")
        base.checkpoint_context = LoraUNet._recompute_context  # gradient checkpointing recomputes with the deltas

    @staticmethod
    def _recompute_context():
        """(forward, recomputation) contexts: the blocks are recomputed in the backward pass, after forward() has
        returned, so the LoRA active in the forward is made active again around the recomputation."""
        me = LoraUNet.active

        @contextlib.contextmanager
        def active():
            previous, LoraUNet.active = LoraUNet.active, me
            try:
                yield
            finally:
                LoraUNet.active = previous
        return contextlib.nullcontext(), active()

    @staticmethod
    def _add(module, key, x, out):
        me = LoraUNet.active
        if me is None or key not in me.down:
            return out
        f = _delta_fn(module, "lowrank", (me.down[key], me.up[key], None))
        return out + (me.alpha / me.rank) * f(x)

    def forward(self, *args, **kw):
        previous, LoraUNet.active = LoraUNet.active, self
        try:
            return self.base(*args, **kw)
        finally:
            LoraUNet.active = previous

    def kohya(self) -> dict:
        """The deltas as a kohya/A1111 LoRA file's tensors (our module names, which nanosd reads back)."""
        out, kohya = {}, {k.replace(".", "_"): v.replace(".", "_") for k, v in self.names.items()}
        for key in self.down:
            name = "lora_unet_" + kohya.get(key, key)
            out.update({f"{name}.lora_down.weight": self.down[key].detach().float().contiguous(),
                        f"{name}.lora_up.weight": self.up[key].detach().float().contiguous(),
                        f"{name}.alpha": torch.tensor(float(self.alpha))})
        return out


class LearnedToken(nn.Module):
    """Textual inversion, trained: a frozen token embedding with new rows that learn (ids past the vocabulary)."""

    def __init__(self, embedding: nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.register_buffer("frozen", embedding.weight.detach(), persistent=False)
        self.extra = nn.Parameter(init.clone())

    weight = property(lambda self: self.frozen)  # where callers look for the device and dtype

    def forward(self, ids):
        return F.embedding(ids, torch.cat([self.frozen, self.extra.to(self.frozen.dtype)]))


def learn_token(text, token: str, n: int, init: str) -> LearnedToken:
    """Give a CLIP TextConditioner a token of n learnable vectors, started from the embedding of `init`."""
    if text is None or text.kind != "clip":
        raise ValueError("textual inversion trains a CLIP text encoder's token: this model has none (MiniLM and "
                         "label models are not supported)")
    emb = text.model.embeddings.token_embedding
    start = text.tokenizer.ids(init)[:1] or [text.tokenizer.eos]
    learned = LearnedToken(emb, emb.weight.data[start[0]].repeat(n, 1))
    text.model.embeddings.token_embedding = learned
    text.embeddings[token] = list(range(emb.num_embeddings, emb.num_embeddings + n))
    return learned
