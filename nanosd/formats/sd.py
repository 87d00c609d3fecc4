"""Stable Diffusion's original single-file layout (what A1111 and ComfyUI load): one row per family, one function
that tells the families apart, one preset per family. Our modules carry the original names, so a family's table
is the prefix of each part; OpenCLIP's text towers (SD 2.x, SDXL) are renamed to CLIP's in one table."""
import re
from dataclasses import dataclass, field, replace

import torch

from ..io import read_checkpoint

UNET, VAE = "model.diffusion_model.", "first_stage_model."


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: dict  # part -> the prefix of its keys in the single file
    legacy: dict = field(default_factory=dict)  # part -> an older prefix some files use instead
    heads: int | None = 8  # attention heads at every level (None: 64 channels a head)
    latent_rgb: tuple = ()  # latent channels -> RGB, a linear map good enough for a preview (the VAE costs seconds)
    openclip: tuple = ()  # text parts stored in OpenCLIP's layout (fused q/k/v), renamed to CLIP's on reading
    text: dict = field(default_factory=dict)  # text part -> how it is read (CLIPTextConfig fields beyond shapes)
    pooled: str = ""  # the text part whose projected pooled output conditions the U-Net (SDXL)
    micro: str = ""  # SDXL's micro-conditioning ids: "size", or the refiner's "aesthetic"
    scale: float = 0.18215  # the VAE's latent scale factor
    size: int = 512  # the native image size
    zero_negative: bool = False  # no negative prompt: zeros, as diffusers' SDXL pipeline does

    @property
    def texts(self):
        return [p for p in self.prefixes if p.startswith("text_encoder")]


SD_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
XL_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
BIG_G = {"act": "gelu", "skip": 1, "final_norm": False}  # SDXL reads OpenCLIP bigG at its penultimate layer
SD1 = Family("sd1", {"unet": UNET, "vae": VAE, "text_encoder": "cond_stage_model.transformer.text_model."},
             legacy={"text_encoder": "cond_stage_model.transformer."}, latent_rgb=SD_RGB, text={"text_encoder": {}})
SD2 = Family("sd2", {"unet": UNET, "vae": VAE, "text_encoder": "cond_stage_model.model."}, heads=None,
             latent_rgb=SD_RGB, openclip=("text_encoder",),
             text={"text_encoder": {"act": "gelu", "skip": 1}})  # ViT-H's penultimate layer, then its final norm
SDXL = Family("sdxl", {"unet": UNET, "vae": VAE, "text_encoder": "conditioner.embedders.0.transformer.text_model.",
                       "text_encoder_2": "conditioner.embedders.1.model."}, heads=None, latent_rgb=XL_RGB,
              openclip=("text_encoder_2",), text={"text_encoder": {"skip": 1, "final_norm": False},
                                                  "text_encoder_2": BIG_G},
              pooled="text_encoder_2", micro="size", scale=0.13025, size=1024, zero_negative=True)
SDXL_REFINER = Family("sdxl-refiner", {"unet": UNET, "vae": VAE, "text_encoder": "conditioner.embedders.0.model."},
                      heads=None, latent_rgb=XL_RGB, openclip=("text_encoder",), text={"text_encoder": BIG_G},
                      pooled="text_encoder", micro="aesthetic", scale=0.13025, size=1024)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, SDXL_REFINER)}

# what other files look like, for one-line refusals: (a key fragment, what the file is)
SUPPORTED = "nanosd loads SD 1.x, SD 2.x, SDXL and the SDXL refiner"
ADAPTER = "not a whole checkpoint (adapters do not load yet)"
OTHERS = (("joint_blocks.", "a Stable Diffusion 3 checkpoint"), ("double_blocks.", "a Flux checkpoint"),
          ("double_layers.", "an AuraFlow checkpoint (Pony v7 and kin)"), ("cond_seq_linear", "an AuraFlow checkpoint"),
          ("lora_unet_", f"a LoRA, {ADAPTER}"), ("lora_te", f"a LoRA, {ADAPTER}"), (".lora_down.", f"a LoRA, {ADAPTER}"),
          ("lora_A", f"a LoRA, {ADAPTER}"), (".hada_w1", f"a LyCORIS LoHa, {ADAPTER}"),
          (".lokr_w1", f"a LyCORIS LoKr, {ADAPTER}"), ("string_to_param", "an embedding, not a whole checkpoint"),
          ("emb_params", "an embedding, not a whole checkpoint"), ("clip_g", "an SDXL embedding, not a whole checkpoint"),
          ("control_model.", "a ControlNet, not a whole checkpoint"),
          ("input_hint_block.", "a ControlNet, not a whole checkpoint"))


def detect(tensors: dict, where: str) -> Family:
    """The family of a single file's tensors, from its key layout (one place for every family); files that are
    something else get one line saying what they are."""
    def has(prefix):
        return any(k.startswith(prefix) for k in tensors)

    for family in (SDXL, SDXL_REFINER, SD2, SD1):
        text = family.prefixes[family.texts[-1]]
        if has(UNET) and (has(text) or has(family.legacy.get(family.texts[-1], text))):
            return family
    for fragment, what in OTHERS:
        if any(fragment in k for k in tensors):
            raise ValueError(f"{where} is {what}: {SUPPORTED}")
    if has(UNET) or has("input_blocks.") or has("down_blocks."):
        raise ValueError(f"{where} holds a U-Net alone (no text encoder): {SUPPORTED} as whole checkpoints")
    if has(VAE) or has("encoder.conv_in.") or has("decoder.conv_in."):
        raise ValueError(f"{where} is a VAE, not a checkpoint: give it as --vae / vae= beside a checkpoint")
    raise ValueError(f"{where} is not a Stable Diffusion checkpoint (no model.diffusion_model.* U-Net with a known "
                     f"text encoder): {SUPPORTED}")


# OpenCLIP's text tower -> transformers' CLIP names (ours); the fused in_proj is split into q, k and v
OPENCLIP = (("token_embedding.", "embeddings.token_embedding."), ("ln_final.", "final_layer_norm."),
            (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".mlp.c_fc.", ".mlp.fc1."),
            (".mlp.c_proj.", ".mlp.fc2."), (".attn.out_proj.", ".self_attn.out_proj."),
            ("transformer.resblocks.", "encoder.layers."))


def from_openclip(tensors: dict) -> dict:
    out = {}
    for k, v in tensors.items():
        if k == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif k == "text_projection":  # used as x @ P: a Linear's weight is its transpose
            out["text_projection.weight"] = v.T.contiguous()
        elif k.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            stem, kind = k.rsplit(".attn.in_proj_", 1)
            for name, part in zip("qkv", v.chunk(3)):
                out[_rename(f"{stem}.self_attn.{name}_proj.{kind}")] = part
        elif k not in ("logit_scale", "attn_mask"):
            out[_rename(k)] = v
    return out


def to_openclip(tensors: dict) -> dict:
    out, fused = {}, {}
    for k, v in tensors.items():
        if k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif m := re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        else:
            out[_rename(k, back=True)] = v
    for (stem, kind), qkv in fused.items():
        out[_rename(stem, back=True) + f".attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def _rename(key, back=False):
    for a, b in OPENCLIP:
        a, b = (b, a) if back else (a, b)
        key = key.replace(a, b) if (a.startswith(".") or key.startswith(a)) else key
    return key


def split(tensors: dict, family: Family = SD1, ema=False) -> dict:
    """The single file's tensors by part, under our names (the EMA U-Net when asked and present)."""
    parts = {}
    for part, prefix in family.prefixes.items():
        parts[part] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not parts[part] and part in family.legacy:
            old = family.legacy[part]
            parts[part] = {k[len(old):]: v for k, v in tensors.items() if k.startswith(old)}
        if part in family.openclip:
            parts[part] = from_openclip(parts[part])
        if part.startswith("text_encoder"):
            parts[part].pop("embeddings.position_ids", None)
            if part != family.pooled:  # SD 2.x's ViT-H has a projection nothing reads
                parts[part].pop("text_projection.weight", None)
    if ema:  # LitEma keeps model_ema.<name without dots>
        flat = {("diffusion_model." + k).replace(".", ""): k for k in parts["unet"]}
        found = {flat[k[len("model_ema."):]]: v for k, v in tensors.items()
                 if k.startswith("model_ema.") and k[len("model_ema."):] in flat}
        if len(found) != len(parts["unet"]):
            raise ValueError(f"this checkpoint has no EMA weights for the U-Net ({len(found)} of {len(parts['unet'])} "
                             "model_ema.* tensors): load it without ema")
        parts["unet"] = found
    return parts


def join(parts: dict, family: Family = SD1) -> dict:
    """Parts' state dicts (our names) as one single-file state dict."""
    return {family.prefixes[name] + k: v for name, sd in parts.items()
            for k, v in (to_openclip(sd) if name in family.openclip else sd).items()}


def vae_tensors(tensors: dict, family: Family = SD1) -> dict:
    """A VAE file's tensors with or without the single file's VAE prefix (and without its training extras)."""
    if any(k.startswith(UNET) for k in tensors):
        raise ValueError("this VAE file is a whole checkpoint (it has a U-Net): give the VAE alone, or load the "
                         "checkpoint itself")
    prefix = family.prefixes["vae"]
    return {k.removeprefix(prefix): v for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}


def _levels(tensors, pattern):
    """The distinct integers N in keys matching `pattern` (a regex with one group)."""
    return sorted({int(m.group(1)) for k in tensors for m in [re.match(pattern, k)] if m})


def infer(parts: dict, family: Family):
    """The U-Net, VAE and text encoders' configs (text, text_2 or None) from the tensors' shapes."""
    from ..autoencoder import AutoencoderConfig

    unet, v = infer_unet(parts["unet"], family), parts["vae"]
    ch = v["encoder.conv_in.weight"].shape[0]
    vlevels = len(_levels(v, r"encoder\.down\.(\d+)\."))
    vae = AutoencoderConfig(in_channels=v["encoder.conv_in.weight"].shape[1], ch=ch, z_channels=v["post_quant_conv.weight"].shape[0],
                            ch_mult=[v[f"encoder.down.{lv}.block.0.conv1.weight"].shape[0] // ch for lv in range(vlevels)],
                            num_res_blocks=len(_levels(v, r"encoder\.down\.0\.block\.(\d+)\.")))
    texts = [_text_config(parts[p], family.text[p]) for p in family.texts]
    return unet, vae, texts[0], texts[1] if len(texts) > 1 else None


def infer_unet(u: dict, family: Family):
    """A U-Net's (or a ControlNet's encoder copy's: no output blocks) config from its tensors' shapes."""
    from ..unet import UNetConfig

    mc = u["input_blocks.0.0.weight"].shape[0]
    blocks = _levels(u, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in u]
    nrb = downs[0] - 1 if downs else len(blocks) - 1
    levels = len(downs) + 1
    first = [1 + lv * (nrb + 1) for lv in range(levels)]  # each level's first input block
    mult = [u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first]
    attn = [lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in u]
    depth = [len(_levels(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) or 1 for i in first]
    ctx = next((w.shape[1] for k, w in u.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((w for k, w in u.items() if k.endswith("proj_in.weight")), None)
    in_ch = u["input_blocks.0.0.weight"].shape[1]
    out_ch = u["out.2.weight"].shape[0] if "out.2.weight" in u else in_ch
    return UNetConfig(in_channels=out_ch, cond_channels=in_ch - out_ch,
                      model_channels=mc, channel_mult=mult, num_res_blocks=nrb, attention_levels=attn,
                      num_heads=family.heads or [max(1, mc * m // 64) for m in mult],
                      transformer_depth=depth if len({depth[lv] for lv in attn}) > 1 else depth[attn[0]] if attn else 1,
                      context_dim=ctx, linear_proj=proj is not None and proj.ndim == 2,
                      adm_in_channels=u["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in u else None)


def _text_config(t: dict, reading: dict):
    from ..text import CLIPTextConfig

    width = t["embeddings.token_embedding.weight"].shape[1]
    return CLIPTextConfig(vocab_size=t["embeddings.token_embedding.weight"].shape[0], width=width,
                          layers=len(_levels(t, r"encoder\.layers\.(\d+)\.")), heads=width // 64,
                          max_length=t["embeddings.position_embedding.weight"].shape[0],
                          intermediate=t["encoder.layers.0.mlp.fc1.weight"].shape[0],
                          projection=t["text_projection.weight"].shape[0] if "text_projection.weight" in t else 0,
                          **reading)


def read(path, dtype=None, ema=False):
    """(family, parts) of a single file, floats cast as read (one copy in memory)."""
    tensors = read_checkpoint(path, dtype)
    found = detect(tensors, str(path))
    parts = split(tensors, found, ema)
    for part, prefix in found.prefixes.items():
        if not parts[part]:
            raise ValueError(f"{path} is an {found.name} checkpoint without its {part} ({prefix}* keys): the file is "
                             "incomplete; use a whole checkpoint")
    return found, parts


def config(unet_cfg, vae_cfg, text_cfg, text2_cfg, scheduler: dict, scale_factor=None, size=None, family=SD1):
    """A Stable Diffusion model as a nanosd config: a latent, CLIP-conditioned model (concat "inpaint" for the
    9-channel inpainting U-Net), with its scheduler's settings (SD v1.5's when the file carries none)."""
    from ..condition import MICRO, ConditionConfig
    from ..config import Config, DataConfig, DiffusionConfig, SampleConfig

    if unet_cfg.cond_channels not in (0, unet_cfg.in_channels + 1):  # depth, upscaler, pix2pix U-Nets
        raise ValueError(f"this {family.name} U-Net reads {unet_cfg.cond_channels} extra input channels (a depth, "
                         "upscaler or instruct-pix2pix model): nanosd loads text-to-image and 9-channel inpainting models")
    schedules = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if kind not in schedules:
        raise ValueError(f"scheduler beta_schedule {kind!r} is not supported: nanosd has {', '.join(schedules)}")
    prediction = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.get("prediction_type", "epsilon")]
    diffusion = DiffusionConfig(
        schedule=schedules[kind], timesteps=scheduler.get("num_train_timesteps", 1000), prediction=prediction,
        scale_factor=scale_factor or family.scale, beta_start=scheduler.get("beta_start", 0.00085),
        beta_end=scheduler.get("beta_end", 0.012), steps_offset=scheduler.get("steps_offset", 1),
        set_alpha_to_one=scheduler.get("set_alpha_to_one", False),
        timestep_spacing=scheduler.get("timestep_spacing", ""), zero_snr=scheduler.get("rescale_betas_zero_snr", False))
    pooled = (text2_cfg or text_cfg).projection
    micro_dim = (unet_cfg.adm_in_channels - pooled) // MICRO[family.micro] if family.micro else 256
    condition = ConditionConfig(encoder="clip", concat="inpaint" if unet_cfg.cond_channels else "", drop_prob=0.0,
                                guidance=7.5 if family.name in ("sd1", "sd2") else 5.0, clip=text_cfg,
                                clip2=text2_cfg, micro=family.micro, micro_dim=micro_dim,
                                zero_negative=family.zero_negative, micro_lowres=0.0)  # (LoRA) training: sizes as they are
    size = size or (768 if family.name == "sd2" and prediction == "v" else family.size)
    return Config(data=DataConfig(name="", size=size), unet=unet_cfg, diffusion=diffusion,
                  sample=SampleConfig(sampler="dpmpp_2m", steps=20), autoencoder=vae_cfg, condition=condition)


def preset(family="sd1", inpainting=False, prediction="eps"):
    """A family's published architecture as a config. SD v1.x: the U-Net (320 channels, 1,2,4,4, attention at the
    first three levels, 8 heads, context 768), the f = 8 VAE (scale 0.18215) and CLIP ViT-L/14's text transformer;
    SD 2.x: linear projections, 64-channel heads, OpenCLIP ViT-H/14 (context 1024); SDXL: 1,2,4 with 1, 2 and 10
    transformer blocks, CLIP ViT-L + OpenCLIP ViT-bigG (context 2048), pooled text and size ids (2816)."""
    from ..autoencoder import AutoencoderConfig
    from ..text import CLIPTextConfig
    from ..unet import UNetConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: nanosd has {', '.join(FAMILIES)}")
    f = FAMILIES[family]
    vit_l, vit_h = CLIPTextConfig(intermediate=3072), CLIPTextConfig(width=1024, layers=24, heads=16, intermediate=4096)
    big_g = CLIPTextConfig(width=1280, layers=32, heads=20, intermediate=5120, projection=1280, **BIG_G)
    base = dict(in_channels=4, cond_channels=5 if inpainting else 0, num_res_blocks=2, num_heads=f.heads or
                [5, 10, 20, 20])
    unet, texts = {
        "sd1": (dict(model_channels=320, channel_mult=[1, 2, 4, 4], attention_levels=[0, 1, 2], context_dim=768),
                (vit_l, None)),
        "sd2": (dict(model_channels=320, channel_mult=[1, 2, 4, 4], attention_levels=[0, 1, 2], context_dim=1024,
                     linear_proj=True), (replace(vit_h, **f.text["text_encoder"]), None)),
        "sdxl": (dict(model_channels=320, channel_mult=[1, 2, 4], attention_levels=[1, 2], num_heads=[5, 10, 20],
                      transformer_depth=[1, 2, 10], context_dim=2048, linear_proj=True, adm_in_channels=2816),
                 (replace(vit_l, **f.text["text_encoder"]), big_g)),
        "sdxl-refiner": (dict(model_channels=384, channel_mult=[1, 2, 4, 4], attention_levels=[1, 2],
                              num_heads=[6, 12, 24, 24], transformer_depth=4, context_dim=1280, linear_proj=True,
                              adm_in_channels=2560), (big_g, None)),
    }[family]
    vae = AutoencoderConfig(in_channels=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    scheduler = {"prediction_type": "v_prediction"} if prediction == "v" else {}
    return config(UNetConfig(**{**base, **unet}), vae, *texts, scheduler, family=f)
