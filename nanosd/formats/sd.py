"""Stable Diffusion's original single-file layout (what A1111 and ComfyUI load): one key table and one config preset
per family. Our modules carry the original names, so a family's table is the prefix of each part."""
import re
from dataclasses import dataclass, field

from ..io import read_checkpoint


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: dict  # part -> the prefix of its keys in the single file
    legacy: dict = field(default_factory=dict)  # part -> an older prefix some files use instead
    heads: int | None = 8  # attention heads at every level (None: 64 channels a head)
    latent_rgb: tuple = ()  # latent channels -> RGB, a linear map good enough for a preview (the VAE costs seconds)


SD1 = Family("sd1", {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                     "text_encoder": "cond_stage_model.transformer.text_model."},
             legacy={"text_encoder": "cond_stage_model.transformer."},
             latent_rgb=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                         (-0.2120, -0.2616, -0.7177)))
FAMILIES = {f.name: f for f in (SD1,)}


def detect(parts: dict, where: str) -> Family:
    """The family from the tensors' shapes (one place for every family)."""
    u = parts["unet"]
    for name, part, key in (("U-Net", u, "input_blocks.0.0.weight"), ("VAE", parts["vae"], "encoder.conv_in.weight"),
                            ("text encoder", parts["text_encoder"], "embeddings.token_embedding.weight")):
        if key not in part:
            raise ValueError(f"{where} is not a Stable Diffusion v1 checkpoint: no {name} ({key} is missing)")
    proj = next((w for k, w in u.items() if k.endswith("proj_in.weight")), None)
    if proj is not None and proj.ndim != 4:
        raise ValueError(f"{where} is not a Stable Diffusion v1 checkpoint (its transformers project with linear "
                         "layers, as SD 2.x and SDXL do): nanosd loads SD v1.x")
    return SD1


def split(tensors: dict, family: Family = SD1, ema=False) -> dict:
    """The single file's tensors by part, under our names (the EMA U-Net when asked and present)."""
    parts = {}
    for part, prefix in family.prefixes.items():
        parts[part] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not parts[part] and part in family.legacy:
            old = family.legacy[part]
            parts[part] = {k[len(old):]: v for k, v in tensors.items() if k.startswith(old)}
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


def join(parts: dict, family: Family = SD1) -> dict:
    """Parts' state dicts (our names) as one single-file state dict."""
    return {family.prefixes[name] + k: v for name, sd in parts.items() for k, v in sd.items()}


def vae_tensors(tensors: dict, family: Family = SD1) -> dict:
    """A VAE file's tensors with or without the single file's VAE prefix (and without its training extras)."""
    prefix = family.prefixes["vae"]
    return {k.removeprefix(prefix): v for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}


def _levels(tensors, pattern):
    """The distinct integers N in keys matching `pattern` (a regex with one group)."""
    return sorted({int(m.group(1)) for k in tensors for m in [re.match(pattern, k)] if m})


def infer(parts: dict, family: Family):
    """The U-Net, VAE and CLIP text encoder configs from the tensors' shapes."""
    from ..autoencoder import AutoencoderConfig
    from ..text import CLIPTextConfig
    from ..unet import UNetConfig

    u, v, t = parts["unet"], parts["vae"], parts["text_encoder"]
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
                      num_heads=family.heads, transformer_depth=depth or 1, context_dim=ctx)
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


def read(path, dtype=None, ema=False):
    """(family, parts) of a single file, floats cast as read (one copy in memory)."""
    parts = split(read_checkpoint(path, dtype), SD1, ema)  # a family with other prefixes would split again
    return detect(parts, str(path)), parts


def config(unet_cfg, vae_cfg, text_cfg, scheduler: dict, scale_factor=0.18215, size=512):
    """A Stable Diffusion model as a nanosd config: a latent, CLIP-conditioned model (concat "inpaint" for the
    9-channel inpainting U-Net), with its scheduler's settings (SD v1.5's when the file carries none)."""
    from ..condition import ConditionConfig
    from ..config import Config, DataConfig, DiffusionConfig, SampleConfig

    schedules = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    kind = scheduler.get("beta_schedule", "scaled_linear")
    if kind not in schedules:
        raise ValueError(f"scheduler beta_schedule {kind!r} is not supported: nanosd has {', '.join(schedules)}")
    diffusion = DiffusionConfig(
        schedule=schedules[kind], timesteps=scheduler.get("num_train_timesteps", 1000),
        prediction={"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.get("prediction_type", "epsilon")],
        scale_factor=scale_factor, beta_start=scheduler.get("beta_start", 0.00085),
        beta_end=scheduler.get("beta_end", 0.012), steps_offset=scheduler.get("steps_offset", 1),
        set_alpha_to_one=scheduler.get("set_alpha_to_one", False))
    condition = ConditionConfig(encoder="clip", concat="inpaint" if unet_cfg.cond_channels else "", drop_prob=0.0,
                                guidance=7.5, clip=text_cfg)
    return Config(data=DataConfig(name="", size=size), unet=unet_cfg, diffusion=diffusion,
                  sample=SampleConfig(sampler="dpmpp_2m", steps=20), autoencoder=vae_cfg, condition=condition)


def preset(family="sd1", inpainting=False):
    """A family's published architecture as a config. SD v1.x: the U-Net (320 channels, 1,2,4,4, attention at the
    first three levels, 8 heads, context 768), the f = 8 VAE (scale 0.18215) and CLIP ViT-L/14's text transformer."""
    from ..autoencoder import AutoencoderConfig
    from ..text import CLIPTextConfig
    from ..unet import UNetConfig

    if family != "sd1":
        raise ValueError(f"unknown family {family!r}: nanosd has {', '.join(FAMILIES)}")
    unet = UNetConfig(in_channels=4, cond_channels=5 if inpainting else 0, model_channels=320, channel_mult=[1, 2, 4, 4],
                      num_res_blocks=2, attention_levels=[0, 1, 2], num_heads=8, context_dim=768)
    vae = AutoencoderConfig(in_channels=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    return config(unet, vae, CLIPTextConfig(), {})
