"""Safetensors I/O: atomic writes, and loads that fail with one line naming the file and the fix."""
import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():  # a folder written in one piece
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict, path, metadata: dict | None = None):
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_tensors(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is unreadable or truncated ({e}): re-create or re-download it") from None


def load_into(module: torch.nn.Module, tensors: dict, what: str, assign=False, dtype=torch.float32):
    """load_state_dict(strict) with missing, unexpected and mis-shaped keys listed on one line. With assign, the
    module (built on the meta device) takes the tensors themselves, in `dtype`: no second copy, no random init."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))
    if assign:  # converted one by one in place: each original is freed as its copy is made
        layout = torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format  # oneDNN's bf16 convs
        for k in list(tensors):
            v = tensors[k].to(dtype)
            tensors[k] = v.contiguous(memory_format=layout) if v.ndim == 4 else v
    module.load_state_dict(tensors, assign=assign)


# --- Stable Diffusion v1 checkpoints: the original single-file layout and diffusers folders ---
# Our modules carry the original names, so the single file needs only these prefixes; diffusers renames modules,
# and `diffusers_names` spells that renaming out once, used both ways.
GUIDE = "guide.safetensors"  # a run's EMA weights early in training: the weaker model of autoguidance
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer.text_model."}


def _ckpt_globals():
    """The harmless globals real .ckpt files pickle beside their tensors (numpy scalars, Lightning's callback
    state, which is read into an inert placeholder); anything else is refused by the weights-only unpickler."""
    import codecs

    import numpy as np

    class ModelCheckpoint:  # pytorch_lightning's callback, present in unpruned SD files; never called
        pass
    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray.scalar, np.dtype, codecs.encode, ModelCheckpoint,
            *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32"))]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def stream_tensors(path, dtype=None):
    """(name, tensor) for each tensor of a .safetensors file, read with plain reads in file order and floats cast to
    `dtype` as they come: no memory map stays alive, so a 2 GB fp16 file loads into bf16 in 2 GB, not 4."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                f.seek(8 + n + start)
                data = bytearray(f.read(end - start))
                if len(data) != end - start:
                    raise ValueError(f"{name} is cut short")
                t = torch.frombuffer(data, dtype=_DTYPES[info["dtype"]]) if data else torch.empty(0, dtype=_DTYPES[info["dtype"]])
                t = t.reshape(info["shape"])
                yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path} is unreadable or truncated ({e}): re-create or re-download it") from None


def read_checkpoint(path, dtype=None) -> dict:
    """All tensors of a .safetensors file (streamed), or of a .ckpt through the weights-only unpickler (never plain
    pickle); floating-point tensors cast to `dtype` when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        import pickle
        import zipfile

        try:
            with torch.serialization.safe_globals(_ckpt_globals()):
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path} cannot be read safely ({first}): convert it to .safetensors "
                             "with a tool you trust, or re-download it") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise ValueError(f"checkpoint {path} holds no state dict")
        return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return dict(stream_tensors(path, dtype))


def _rename(key, rules, inner=()):
    """Rename by the first (prefix, replacement) rule that matches, then the rest by the `inner` rules."""
    for a, b in rules:
        if key.startswith(a):
            rest = key[len(a):]
            return b + next((d + rest[len(c):] for c, d in inner if rest.startswith(c)), rest)
    return key


def diffusers_names(kind: str, model) -> dict:
    """Our parameter names -> diffusers' for a UNet ("unet") or an Autoencoder ("vae") of any size."""
    rules = []
    if kind == "unet":
        c = model.cfg
        levels, nrb = len(c.channel_mult), c.num_res_blocks
        rules += [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                  ("label_emb.", "class_embedding."), ("input_blocks.0.0.", "conv_in."),
                  ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
                  ("middle_block.2.", "mid_block.resnets.1."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
        for lv in range(levels):
            for j in range(nrb):
                i = 1 + lv * (nrb + 1) + j
                rules += [(f"input_blocks.{i}.0.", f"down_blocks.{lv}.resnets.{j}."),
                          (f"input_blocks.{i}.1.", f"down_blocks.{lv}.attentions.{j}.")]
            rules.append((f"input_blocks.{1 + lv * (nrb + 1) + nrb}.0.op.", f"down_blocks.{lv}.downsamplers.0.conv."))
            for j in range(nrb + 1):
                i = lv * (nrb + 1) + j
                rules += [(f"output_blocks.{i}.0.", f"up_blocks.{lv}.resnets.{j}."),
                          (f"output_blocks.{i}.1.conv.", f"up_blocks.{lv}.upsamplers.0.conv."),
                          (f"output_blocks.{i}.2.conv.", f"up_blocks.{lv}.upsamplers.0.conv."),
                          (f"output_blocks.{i}.1.", f"up_blocks.{lv}.attentions.{j}.")]
        inner = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
    else:
        levels = len(model.cfg.ch_mult)
        for part in ("encoder", "decoder"):
            rules += [(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
                      (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1."),
                      (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."),
                      (f"{part}.norm_out.", f"{part}.conv_norm_out.")]
        for lv in range(levels):
            up = levels - 1 - lv  # diffusers counts the decoder's levels from the bottom
            rules += [(f"encoder.down.{lv}.downsample.", f"encoder.down_blocks.{lv}.downsamplers.0."),
                      (f"decoder.up.{lv}.upsample.", f"decoder.up_blocks.{up}.upsamplers.0.")]
            rules += [(f"encoder.down.{lv}.block.{j}.", f"encoder.down_blocks.{lv}.resnets.{j}.")
                      for j in range(model.cfg.num_res_blocks)]
            rules += [(f"decoder.up.{lv}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.")
                      for j in range(model.cfg.num_res_blocks + 1)]
        inner = [("nin_shortcut.", "conv_shortcut."), ("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."),
                 ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    return {k: _rename(k, rules, inner) for k in model.state_dict()}


def _levels(tensors, pattern):
    """The distinct integers N in keys matching `pattern` (a regex with one group)."""
    import re

    return sorted({int(m.group(1)) for k in tensors for m in [re.match(pattern, k)] if m})


def infer_sd(parts: dict, where: str):
    """The SD v1 architecture (U-Net, VAE, CLIP text encoder configs) from the tensors' shapes."""
    from .autoencoder import AutoencoderConfig
    from .text import CLIPTextConfig
    from .unet import UNetConfig

    u, v, t = parts["unet"], parts["vae"], parts["text_encoder"]
    for name, part, key in (("U-Net", u, "input_blocks.0.0.weight"), ("VAE", v, "encoder.conv_in.weight"),
                            ("text encoder", t, "embeddings.token_embedding.weight")):
        if key not in part:
            raise ValueError(f"{where} is not a Stable Diffusion v1 checkpoint: no {name} ({key} is missing)")
    proj = next((w for k, w in u.items() if k.endswith("proj_in.weight")), None)
    if proj is not None and proj.ndim != 4:
        raise ValueError(f"{where} is not a Stable Diffusion v1 checkpoint (its transformers project with linear "
                         "layers, as SD 2.x and SDXL do): nanosd loads SD v1.x")
    mc = u["input_blocks.0.0.weight"].shape[0]
    blocks = _levels(u, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in u]
    nrb = downs[0] - 1 if downs else len(blocks) - 1
    levels = len(downs) + 1
    mult = [u[f"input_blocks.{1 + lv * (nrb + 1)}.0.out_layers.3.weight"].shape[0] // mc for lv in range(levels)]
    attn = [lv for lv in range(levels) if f"input_blocks.{1 + lv * (nrb + 1)}.1.proj_in.weight" in u]
    ctx = next((w.shape[1] for k, w in u.items() if k.endswith("attn2.to_k.weight")), None)
    depth = len(_levels(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    in_ch = u["input_blocks.0.0.weight"].shape[1]
    z = v["post_quant_conv.weight"].shape[0]
    unet = UNetConfig(in_channels=u["out.2.weight"].shape[0], cond_channels=in_ch - u["out.2.weight"].shape[0],
                      model_channels=mc, channel_mult=mult, num_res_blocks=nrb, attention_levels=attn,
                      num_heads=8, transformer_depth=depth or 1, context_dim=ctx)  # SD v1: 8 heads at every level
    ch = v["encoder.conv_in.weight"].shape[0]
    vlevels = len(_levels(v, r"encoder\.down\.(\d+)\."))
    vae = AutoencoderConfig(in_channels=v["encoder.conv_in.weight"].shape[1], ch=ch, z_channels=z,
                            ch_mult=[v[f"encoder.down.{lv}.block.0.conv1.weight"].shape[0] // ch for lv in range(vlevels)],
                            num_res_blocks=len(_levels(v, r"encoder\.down\.0\.block\.(\d+)\.")))
    width = t["embeddings.token_embedding.weight"].shape[1]
    text = CLIPTextConfig(vocab_size=t["embeddings.token_embedding.weight"].shape[0], width=width,
                          layers=len(_levels(t, r"encoder\.layers\.(\d+)\.")), heads=width // 64,
                          max_length=t["embeddings.position_embedding.weight"].shape[0],
                          intermediate=t["encoder.layers.0.mlp.fc1.weight"].shape[0])
    return unet, vae, text


def split_single_file(tensors: dict, ema=False) -> dict:
    """The original layout's tensors by part, under our names (the EMA U-Net when asked and present)."""
    parts = {name: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for name, p in PREFIXES.items()}
    if not parts["text_encoder"]:  # older files: cond_stage_model.transformer.* without text_model.
        p = "cond_stage_model.transformer."
        parts["text_encoder"] = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    parts["text_encoder"].pop("embeddings.position_ids", None)
    if ema:  # LitEma keeps model_ema.<name without dots>
        flat = {("diffusion_model." + k).replace(".", ""): k for k in parts["unet"]}
        found = {flat[k[len("model_ema."):]]: v for k, v in tensors.items()
                 if k.startswith("model_ema.") and k[len("model_ema."):] in flat}
        if len(found) != len(parts["unet"]):
            raise ValueError(f"this checkpoint has no EMA weights for the U-Net ({len(found)} of {len(parts['unet'])} "
                             "model_ema.* tensors): load it without ema")
        parts["unet"] = found
    return parts


def diffusers_configs(folder: Path):
    """The architecture a diffusers folder's config files describe: (unet, vae, text) configs, the scheduler's
    settings, the VAE's scale factor and the default image size."""
    from .autoencoder import AutoencoderConfig
    from .text import CLIPTextConfig
    from .unet import UNetConfig

    def config(sub, name="config.json"):
        f = folder / sub / name
        if not f.is_file():
            raise FileNotFoundError(f"diffusers folder {folder} has no {sub}/{name}")
        return json.loads(f.read_text())

    uc, vc, tc = config("unet"), config("vae"), config("text_encoder")
    if uc.get("use_linear_projection") or uc.get("addition_embed_type") or uc.get("class_embed_type") or \
            isinstance(uc.get("cross_attention_dim"), list):
        raise ValueError(f"{folder}/unet is not an SD v1-style U-Net (linear projections or added embeddings): "
                         "nanosd loads SD v1.x")
    boc, types = uc["block_out_channels"], uc["down_block_types"]
    heads = uc.get("num_attention_heads") or uc.get("attention_head_dim", 8)
    unet = UNetConfig(in_channels=uc.get("out_channels", 4), cond_channels=uc["in_channels"] - uc.get("out_channels", 4),
                      model_channels=boc[0], channel_mult=[c // boc[0] for c in boc],
                      num_res_blocks=uc.get("layers_per_block", 2),
                      attention_levels=[i for i, name in enumerate(types) if name.startswith("CrossAttn")],
                      num_heads=list(heads) if isinstance(heads, (list, tuple)) else heads,
                      transformer_depth=uc.get("transformer_layers_per_block", 1) or 1,
                      context_dim=uc.get("cross_attention_dim", 768), norm_groups=uc.get("norm_num_groups", 32))
    vb = vc["block_out_channels"]
    vae = AutoencoderConfig(in_channels=vc.get("in_channels", 3), ch=vb[0], ch_mult=[c // vb[0] for c in vb],
                            num_res_blocks=vc.get("layers_per_block", 1), z_channels=vc.get("latent_channels", 4),
                            norm_groups=vc.get("norm_num_groups", 32))
    text = CLIPTextConfig(vocab_size=tc["vocab_size"], width=tc["hidden_size"], layers=tc["num_hidden_layers"],
                          heads=tc["num_attention_heads"], max_length=tc["max_position_embeddings"],
                          act=tc.get("hidden_act", "quick_gelu"), eps=tc.get("layer_norm_eps", 1e-5),
                          intermediate=tc.get("intermediate_size", 0))
    sched = config("scheduler", "scheduler_config.json") if (folder / "scheduler").is_dir() else {}
    return (unet, vae, text), sched, vc.get("scaling_factor", 0.18215), uc.get("sample_size", 64) * vae.factor


def read_diffusers(folder: Path, configs, dtype=None) -> dict:
    """A diffusers folder's weights (fp16 variants and shards alike), by part, under our names."""
    from .autoencoder import Autoencoder
    from .unet import UNet

    def weights(sub):
        files = sorted((folder / sub).glob("*.safetensors")) or sorted((folder / sub).glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"diffusers folder {folder} has no weights in {sub}/")
        out = {}
        for f in files:
            out.update(read_checkpoint(f, dtype))
        return out

    unet_cfg, vae_cfg, _ = configs
    parts = {"unet": weights("unet"), "vae": weights("vae"), "text_encoder": weights("text_encoder")}
    with torch.device("meta"):
        models = {"unet": UNet(unet_cfg), "vae": Autoencoder(vae_cfg)}
    for name, model in models.items():
        back = {theirs: ours for ours, theirs in diffusers_names(name, model).items()}
        parts[name] = {back.get(k, k): w for k, w in parts[name].items()}
    parts["text_encoder"] = {k.removeprefix("text_model."): w for k, w in parts["text_encoder"].items()
                             if not k.endswith("position_ids")}
    return parts


def fit_shapes(model: torch.nn.Module, tensors: dict) -> dict:
    """The VAE's attention projections as the model holds them: 1x1 convolutions ([C, C, 1, 1]) from linear
    layers' [C, C] (diffusers-made files), and back."""
    own = model.state_dict()
    return {k: v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and v.numel() == own[k].numel()
            and v.ndim in (2, 4) and k.split(".")[-2] in ("q", "k", "v", "proj_out") else v for k, v in tensors.items()}


def write_diffusers(folder, pipe, weights=True):
    """A diffusers folder (configs, weights under diffusers' names, tokenizer, scheduler) for an SD pipeline;
    weights=False writes the configs alone (what diffusers' from_single_file takes as `config`)."""
    cfg, u, d = pipe.cfg, pipe.cfg.unet, pipe.cfg.diffusion
    levels = range(len(u.channel_mult))
    heads = [u.heads(lv) for lv in levels]
    vae = pipe.autoencoder.cfg
    t = pipe.text_encoder.cfg
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", "in_channels": u.in_channels + u.cond_channels,
                 "out_channels": u.in_channels, "block_out_channels": [u.model_channels * m for m in u.channel_mult],
                 "layers_per_block": u.num_res_blocks, "cross_attention_dim": u.context_dim,
                 "down_block_types": ["CrossAttnDownBlock2D" if lv in u.attention_levels else "DownBlock2D" for lv in levels],
                 "up_block_types": ["CrossAttnUpBlock2D" if lv in u.attention_levels else "UpBlock2D" for lv in reversed(levels)],
                 "attention_head_dim": heads if len(set(heads)) > 1 else heads[0], "norm_num_groups": u.norm_groups,
                 "transformer_layers_per_block": u.transformer_depth, "sample_size": cfg.data.size // vae.factor},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": vae.in_channels, "out_channels": vae.in_channels,
                "block_out_channels": [vae.ch * m for m in vae.ch_mult], "layers_per_block": vae.num_res_blocks,
                "latent_channels": vae.z_channels, "down_block_types": ["DownEncoderBlock2D"] * len(vae.ch_mult),
                "up_block_types": ["UpDecoderBlock2D"] * len(vae.ch_mult), "norm_num_groups": vae.norm_groups,
                "scaling_factor": d.scale_factor, "sample_size": cfg.data.size},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
                         "hidden_size": t.width, "intermediate_size": t.intermediate or 4 * t.width,
                         "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                         "max_position_embeddings": t.max_length, "hidden_act": t.act, "layer_norm_eps": t.eps,
                         "bos_token_id": pipe.tokenizer.bos, "eos_token_id": pipe.tokenizer.eos, "pad_token_id": 1},
    }
    names = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    beta_start, beta_end = (1e-4, 0.02) if d.schedule == "linear" else (0.00085, 0.012)  # the schedules' own
    scheduler = {"_class_name": "PNDMScheduler", "beta_schedule": names[d.schedule], "num_train_timesteps": d.timesteps,
                 "beta_start": d.beta_start or beta_start, "beta_end": d.beta_end or beta_end,
                 "steps_offset": d.steps_offset, "set_alpha_to_one": d.set_alpha_to_one, "skip_prk_steps": True,
                 "clip_sample": False, "prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[d.prediction]}
    index = {"_class_name": "StableDiffusionInpaintPipeline" if u.cond_channels else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    tensors = {"unet": {diffusers_names("unet", pipe.unet)[k]: v for k, v in pipe.unet.state_dict().items()},
               "vae": {diffusers_names("vae", pipe.autoencoder)[k]: v.flatten(1) if v.ndim == 4 and v.shape[-1] == 1
                       and k.split(".")[-2] in ("q", "k", "v", "proj_out") else v
                       for k, v in pipe.autoencoder.state_dict().items()},
               "text_encoder": {"text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}}
    with atomic_path(folder) as tmp:
        for part, conf in configs.items():
            (tmp / part).mkdir(parents=True)
            (tmp / part / "config.json").write_text(json.dumps(conf, indent=2))
            name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
            if weights:
                save_file({k: v.contiguous() for k, v in tensors[part].items()}, tmp / part / name)
        pipe.tokenizer.save(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
