"""diffusers folders: the configs that describe the architecture, and the renaming of our (the original
checkpoint's) parameter names to diffusers' module names, spelled out once in `names` and used both ways."""
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io import atomic_path, read_checkpoint
from . import sd


def _rename(key, rules, inner=()):
    """Rename by the first (prefix, replacement) rule that matches, then the rest by the `inner` rules."""
    for a, b in rules:
        if key.startswith(a):
            rest = key[len(a):]
            return b + next((d + rest[len(c):] for c, d in inner if rest.startswith(c)), rest)
    return key


def names(kind: str, model) -> dict:
    """Our parameter names -> diffusers' for a UNet ("unet"), a ControlNet ("controlnet") or an Autoencoder
    ("vae") of any size."""
    rules = []
    if kind == "controlnet":
        hint = len(model.input_hint_block) - 1  # the zero conv; convolutions at the even places before it
        rules += [("input_hint_block.0.", "controlnet_cond_embedding.conv_in."),
                  (f"input_hint_block.{hint}.", "controlnet_cond_embedding.conv_out."),
                  ("middle_block_out.0.", "controlnet_mid_block.")]
        rules += [(f"input_hint_block.{i}.", f"controlnet_cond_embedding.blocks.{i // 2 - 1}.")
                  for i in range(2, hint, 2)]
        rules += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(len(model.zero_convs))]
    if kind in ("unet", "controlnet"):
        c = model.cfg
        levels, nrb = len(c.channel_mult), c.num_res_blocks
        rules += [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                  ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
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


def text_folders(family: sd.Family) -> dict:
    """Our text parts -> the folders diffusers keeps them in (the refiner has only the second encoder)."""
    return {"text_encoder": "text_encoder_2"} if family.name == "sdxl-refiner" else \
        {p: p for p in family.texts}


def family_of(folder: Path, index: dict, unet: dict, texts: dict) -> sd.Family:
    """A folder's family: SDXL by its second text encoder, SD 2.x by OpenCLIP's GELU, else SD 1.x."""
    if "text_encoder_2" in texts:
        family = sd.SDXL if "text_encoder" in texts else sd.SDXL_REFINER
        return dataclasses.replace(family, zero_negative=index.get("force_zeros_for_empty_prompt", family.zero_negative))
    if unet.get("addition_embed_type") or unet.get("class_embed_type") or isinstance(unet.get("cross_attention_dim"), list):
        raise ValueError(f"{folder}/unet has added embeddings without SDXL's second text encoder: {sd.SUPPORTED}")
    return sd.SD2 if texts["text_encoder"].get("hidden_act") == "gelu" else sd.SD1


def configs(folder: Path):
    """The architecture a diffusers folder's config files describe: (unet, vae, text, text_2) configs, the
    scheduler's settings, the VAE's scale factor, the default image size and the family."""
    from ..autoencoder import AutoencoderConfig
    from ..text import CLIPTextConfig

    def config(sub, name="config.json"):
        f = folder / sub / name
        if not f.is_file():
            raise FileNotFoundError(f"diffusers folder {folder} has no {sub}/{name}")
        return json.loads(f.read_text())

    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    uc, vc = config("unet"), config("vae")
    texts = {sub: config(sub) for sub in ("text_encoder", "text_encoder_2") if (folder / sub).is_dir()}
    if not texts:
        raise FileNotFoundError(f"diffusers folder {folder} has no text_encoder/")
    family = family_of(folder, index, uc, texts)
    unet = unet_config(uc, micro=bool(family.micro))
    vb = vc["block_out_channels"]
    vae = AutoencoderConfig(in_channels=vc.get("in_channels", 3), ch=vb[0], ch_mult=[c // vb[0] for c in vb],
                            num_res_blocks=vc.get("layers_per_block", 1), z_channels=vc.get("latent_channels", 4),
                            norm_groups=vc.get("norm_num_groups", 32))

    def text(part):
        tc, reading = texts[text_folders(family)[part]], family.text[part]
        return CLIPTextConfig(vocab_size=tc["vocab_size"], width=tc["hidden_size"], heads=tc["num_attention_heads"],
                              layers=tc["num_hidden_layers"] + _dropped(family, part), max_length=tc["max_position_embeddings"],
                              act=tc.get("hidden_act", "quick_gelu"), eps=tc.get("layer_norm_eps", 1e-5),
                              intermediate=tc.get("intermediate_size", 0),
                              projection=tc.get("projection_dim", 0) if part == family.pooled else 0,
                              **{k: v for k, v in reading.items() if k != "act"})

    archs = (unet, vae, *[text(p) for p in family.texts], None)[:4]
    sched = config("scheduler", "scheduler_config.json") if (folder / "scheduler").is_dir() else {}
    return archs, sched, vc.get("scaling_factor", family.scale), uc.get("sample_size", 64) * vae.factor, family


def unet_config(uc: dict, micro=True, controlnet=False):
    """Our UNetConfig from a diffusers UNet2DConditionModel's (or ControlNetModel's) config.json."""
    from ..unet import UNetConfig

    boc, types = uc["block_out_channels"], uc["down_block_types"]
    heads = uc.get("num_attention_heads") or uc.get("attention_head_dim", 8)
    depth = uc.get("transformer_layers_per_block", 1) or 1
    out = uc["in_channels"] if controlnet else uc.get("out_channels", 4)
    return UNetConfig(in_channels=out, cond_channels=uc["in_channels"] - out,
                      model_channels=boc[0], channel_mult=[c // boc[0] for c in boc],
                      num_res_blocks=uc.get("layers_per_block", 2),
                      attention_levels=[i for i, name in enumerate(types) if name.startswith("CrossAttn")],
                      num_heads=list(heads) if isinstance(heads, (list, tuple)) else heads,
                      transformer_depth=list(depth) if isinstance(depth, (list, tuple)) else depth,
                      context_dim=uc.get("cross_attention_dim", 768), norm_groups=uc.get("norm_num_groups", 32),
                      linear_proj=uc.get("use_linear_projection", False),
                      adm_in_channels=uc.get("projection_class_embeddings_input_dim") if micro else None)


def unet_json(u, micro_dim=256, sample_size=64) -> dict:
    """A diffusers UNet2DConditionModel config.json for our UNetConfig."""
    levels = range(len(u.channel_mult))
    heads = [u.heads(lv) for lv in levels]
    out = {"_class_name": "UNet2DConditionModel", "in_channels": u.in_channels + u.cond_channels,
           "out_channels": u.in_channels, "block_out_channels": [u.model_channels * m for m in u.channel_mult],
           "layers_per_block": u.num_res_blocks, "cross_attention_dim": u.context_dim,
           "down_block_types": ["CrossAttnDownBlock2D" if lv in u.attention_levels else "DownBlock2D" for lv in levels],
           "up_block_types": ["CrossAttnUpBlock2D" if lv in u.attention_levels else "UpBlock2D" for lv in reversed(levels)],
           "attention_head_dim": heads if len(set(heads)) > 1 else heads[0], "norm_num_groups": u.norm_groups,
           "transformer_layers_per_block": u.transformer_depth, "use_linear_projection": u.linear_proj,
           "sample_size": sample_size}
    if u.adm_in_channels:
        out.update(addition_embed_type="text_time", addition_time_embed_dim=micro_dim,
                   projection_class_embeddings_input_dim=u.adm_in_channels)
    return out


def write_controlnet(folder, net):
    """A diffusers ControlNetModel folder (config.json, diffusion_pytorch_model.safetensors)."""
    conf = unet_json(net.cfg)
    for k in ("out_channels", "up_block_types", "sample_size"):
        conf.pop(k)
    conf.update({"_class_name": "ControlNetModel", "conditioning_channels": net.hint_channels,
                 "conditioning_embedding_out_channels": list(net.widths),
                 "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False})
    tensors = {names("controlnet", net)[k]: v.contiguous() for k, v in net.state_dict().items()}
    with atomic_path(Path(folder)) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2))
        save_file(tensors, tmp / "diffusion_pytorch_model.safetensors")
    return folder


def _dropped(family, part) -> int:
    """Top layers diffusers drops from a text encoder read below its top through the final norm (SD 2.x's ViT-H:
    its converter keeps 23 of 24); nanosd keeps the original's count, the dropped layers zero (they are never read)."""
    reading = family.text[part]
    return reading.get("skip", 0) if reading.get("final_norm", True) else 0


def read_weights(folder: Path, dtype=None) -> dict:
    """A diffusers model folder's tensors under diffusers' names (fp16 variants and shards alike)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"diffusers folder {folder.parent} has no weights in {folder.name}/")
    out = {}
    for f in files:
        out.update(read_checkpoint(f, dtype))
    return out


def read_named(folder: Path, kind: str, model, dtype=None) -> dict:
    """A diffusers model folder's tensors under our names, for `model` of `kind` (see names)."""
    back = {theirs: ours for ours, theirs in names(kind, model).items()}
    return {back.get(k, k): w for k, w in read_weights(folder, dtype).items()}


def read(folder: Path, archs, dtype=None, family: sd.Family = sd.SD1) -> dict:
    """A diffusers folder's weights (fp16 variants and shards alike), by part, under our names."""
    from ..autoencoder import Autoencoder
    from ..unet import UNet

    unet_cfg, vae_cfg, *texts = archs
    with torch.device("meta"):
        models = {"unet": UNet(unet_cfg), "vae": Autoencoder(vae_cfg)}
    parts = {name: read_named(folder / name, name, model, dtype) for name, model in models.items()}
    for (part, sub), cfg in zip(text_folders(family).items(), texts):
        t = {k.removeprefix("text_model."): w for k, w in read_weights(folder / sub, dtype).items()
             if not k.endswith("position_ids")}
        if part != family.pooled:
            t.pop("text_projection.weight", None)
        for i in range(cfg.layers - _dropped(family, part), cfg.layers):  # the dropped top layers, as zeros
            like = {k.split(".", 3)[3]: w for k, w in t.items() if k.startswith("encoder.layers.0.")}
            t.update({f"encoder.layers.{i}.{k}": torch.zeros_like(w) for k, w in like.items()})
        parts[part] = t
    return parts


def fit_shapes(model: torch.nn.Module, tensors: dict) -> dict:
    """The VAE's attention projections as the model holds them: 1x1 convolutions ([C, C, 1, 1]) from linear
    layers' [C, C] (diffusers-made files), and back."""
    own = model.state_dict()
    return {k: v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and v.numel() == own[k].numel()
            and v.ndim in (2, 4) and k.split(".")[-2] in ("q", "k", "v", "proj_out") else v for k, v in tensors.items()}


def write(folder, pipe, weights=True):
    """A diffusers folder (configs, weights under diffusers' names, tokenizers, scheduler) for an SD pipeline of any
    family; weights=False writes the configs alone (what diffusers' from_single_file takes as `config`)."""
    cfg, u, d, family = pipe.cfg, pipe.cfg.unet, pipe.cfg.diffusion, pipe.layout or sd.SD1
    vae = pipe.autoencoder.cfg
    unet = unet_json(u, cfg.condition.micro_dim, cfg.data.size // vae.factor)
    configs = {
        "unet": unet,
        "vae": {"_class_name": "AutoencoderKL", "in_channels": vae.in_channels, "out_channels": vae.in_channels,
                "block_out_channels": [vae.ch * m for m in vae.ch_mult], "layers_per_block": vae.num_res_blocks,
                "latent_channels": vae.z_channels, "down_block_types": ["DownEncoderBlock2D"] * len(vae.ch_mult),
                "up_block_types": ["UpDecoderBlock2D"] * len(vae.ch_mult), "norm_num_groups": vae.norm_groups,
                "scaling_factor": d.scale_factor, "sample_size": cfg.data.size},
    }
    tensors = {"unet": {names("unet", pipe.unet)[k]: v for k, v in pipe.unet.state_dict().items()},
               "vae": {names("vae", pipe.autoencoder)[k]: v.flatten(1) if v.ndim == 4 and v.shape[-1] == 1
                       and k.split(".")[-2] in ("q", "k", "v", "proj_out") else v
                       for k, v in pipe.autoencoder.state_dict().items()}}
    tokenizers, encoders = {}, pipe.conditioner.encoders()
    for part, sub in text_folders(family).items():
        model, t, tok = encoders[part].model, encoders[part].model.cfg, encoders[part].tokenizer
        keep = t.layers - _dropped(family, part)
        projected = part == family.pooled
        configs[sub] = {"architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
                        "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": t.intermediate or 4 * t.width, "num_hidden_layers": keep,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.max_length, "hidden_act": t.act,
                        "layer_norm_eps": t.eps, "bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": 1,
                        **({"projection_dim": t.projection} if projected else {})}
        tensors[sub] = {k if k.startswith("text_projection") else "text_model." + k: v
                        for k, v in model.state_dict().items()
                        if not any(k.startswith(f"encoder.layers.{i}.") for i in range(keep, t.layers))}
        tokenizers[sub.replace("text_encoder", "tokenizer")] = tok
    betas = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    beta_start, beta_end = (1e-4, 0.02) if d.schedule == "linear" else (0.00085, 0.012)  # the schedules' own
    scheduler = {"_class_name": "EulerDiscreteScheduler" if family.micro else "PNDMScheduler",
                 "beta_schedule": betas[d.schedule], "num_train_timesteps": d.timesteps,
                 "beta_start": d.beta_start or beta_start, "beta_end": d.beta_end or beta_end,
                 "steps_offset": d.steps_offset, "set_alpha_to_one": d.set_alpha_to_one, "skip_prk_steps": True,
                 "clip_sample": False, "prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[d.prediction],
                 **({"timestep_spacing": d.timestep_spacing} if d.timestep_spacing else {}),
                 **({"rescale_betas_zero_snr": True} if d.zero_snr else {})}
    inpainting = "Inpaint" if u.cond_channels else ""
    index = {"_class_name": {"sdxl": f"StableDiffusionXL{inpainting}Pipeline",
                             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}.get(family.name,
                                                                                     f"StableDiffusion{inpainting}Pipeline"),
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler["_class_name"]]}
    for sub in ("text_encoder", "text_encoder_2"):
        if sub in configs:
            index[sub] = ["transformers", configs[sub]["architectures"][0]]
            index[sub.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        elif family.micro:
            index[sub], index[sub.replace("text_encoder", "tokenizer")] = [None, None], [None, None]
    if family.micro:
        index.update(force_zeros_for_empty_prompt=cfg.condition.zero_negative,
                     **({"requires_aesthetics_score": True} if family.micro == "aesthetic" else {}))
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with atomic_path(folder) as tmp:
        for part, conf in configs.items():
            (tmp / part).mkdir(parents=True)
            (tmp / part / "config.json").write_text(json.dumps(conf, indent=2))
            name = "model.safetensors" if part.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
            if weights:
                save_file({k: v.contiguous() for k, v in tensors[part].items()}, tmp / part / name)
        for sub, tokenizer in tokenizers.items():
            tokenizer.save(tmp / sub)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
