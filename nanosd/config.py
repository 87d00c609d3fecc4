"""Configs are small dataclasses read from TOML files, with `section.key=value` overrides on the command line."""
import dataclasses
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .autoencoder import AutoencoderConfig
from .condition import ConditionConfig
from .schedule import PREDICTIONS, SCHEDULES
from .unet import UNetConfig


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist, fashion-mnist, emoji, a folder of images, or tar shards (a folder, a brace
    # pattern such as "data/{00000..00127}.tar", URLs: https://, s3://, pipe:CMD; several joined by "::")
    size: int = 28  # MNIST-like sets: 28 as is, or 32 as the 28 px image zero-padded by 2
    crop: str = "center"  # images of other shapes: resized to cover size x size, then cropped: center or random
    buckets: bool = False  # shards: aspect-ratio buckets of about size^2 pixels instead of square crops
    shuffle: int = 1000  # shards: the stream's shuffle buffer, in samples


@dataclass
class DiffusionConfig:
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"  # what the U-Net predicts: eps, v or x0
    loss_weighting: str = "none"  # none (L_simple) or min_snr (Hang et al. 2023, gamma 5)
    scale_factor: float = 0.0  # latent models: z = scale_factor * E(x); 0: 1/std of the data's latents
    beta_start: float = 0.0  # 0: the schedule's own (1e-4 linear, 0.00085 scaled_linear)
    beta_end: float = 0.0  # 0: the schedule's own (0.02 linear, 0.012 scaled_linear)
    steps_offset: int = 0  # added to leading-spaced timesteps (1 in SD v1's scheduler config)
    set_alpha_to_one: bool = True  # alpha-bar after the last step: 1, or alpha-bar_0 (SD v1: false)
    timestep_spacing: str = ""  # "": each sampler's diffusers default; leading, linspace or trailing for every sampler
    zero_snr: bool = False  # betas rescaled to zero terminal SNR (diffusers' rescale_betas_zero_snr)

    def validate(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule {self.schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction {self.prediction!r} is unknown: choose one of {', '.join(PREDICTIONS)}")
        if self.timestep_spacing not in ("", "leading", "linspace", "trailing"):
            raise ValueError(f"diffusion.timestep_spacing {self.timestep_spacing!r} is unknown: choose leading, "
                             "linspace or trailing (or none: each sampler's default)")
        if self.loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"diffusion.loss_weighting {self.loss_weighting!r} is unknown: choose none or min_snr")


@dataclass
class TrainConfig:
    batch_size: int = 64  # the global batch, whatever the number of processes
    micro_batch: int = 0  # images per forward pass (gradient accumulation below the batch); 0: batch / processes
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_decay: str = "cosine"  # "cosine" to lr * lr_min_ratio over the budget (steps or minutes), or "constant"
    lr_min_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    guide_at: float = 0.0  # > 0: at this fraction of the budget the EMA weights are kept (guide.safetensors) for autoguidance
    steps: int = 0  # 0: no step limit (use minutes)
    minutes: float = 0.0  # wall-clock budget (with steps: a cap); 0: no time limit (use steps)
    bf16: bool | str = "auto"  # bf16 autocast: true, false, or auto: where this CPU does bf16 faster (as
    # nanosd.load's precision="auto"; 1.6-2x the images/s of fp32 on AMD Zen 5, slower on Intel without AMX), and
    # on GPUs with bf16; under torchrun only if every rank chose it
    checkpointing: bool = False  # gradient checkpointing: the U-Net's blocks recomputed in the backward pass
    # (SD 1.5 at 256², batch 1: a fifth more time; the activations' memory, which grows with the micro-batch)
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 500

    def validate(self):
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"train.lr_decay {self.lr_decay!r} is unknown: choose cosine or constant")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"train.bf16 = {self.bf16!r}: give true, false or \"auto\" (bf16 where this CPU is faster)")
        if not 0 <= self.guide_at < 1:
            raise ValueError(f"train.guide_at {self.guide_at} must be a fraction of the budget in [0, 1) (0: no guide)")


@dataclass
class SampleConfig:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    clip_x0: bool = False  # clip the predicted x_0 to [-1, 1] while sampling (pixel models)
    inpaint_blend: bool = False  # inpainting U-Nets also blend the known latents in after each step (as others must)
    autoguidance: float = 1.0  # w > 1: guide + w (out - guide), the run's early weights as the guide; 1: off
    inpaint_overlay: bool = False  # paste the original pixels back outside the mask after decoding (A1111's overlay)
    n: int = 64  # images in the grids written during training
    prompts: list[str] = field(default_factory=list)  # conditioned models: the grids' prompts (default: one per class)


@dataclass
class LoraConfig:
    base: str = ""  # the run folder whose U-Net the LoRA patches (frozen); its autoencoder and conditioner too
    rank: int = 8
    alpha: float = 8.0  # the deltas are scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: ["attn", "ff", "proj_", "in_layers", "out_layers"])  # module
    # names containing one of these get a delta (attention, feed-forward, projections, the ResBlocks' convolutions)
    embedding: str = ""  # set: textual inversion instead, this new token's vectors learn (the U-Net frozen too)
    vectors: int = 1  # textual inversion: how many vectors the token stands for
    init: str = "*"  # textual inversion: the word whose embedding the vectors start from


@dataclass
class ControlNetConfig:
    base: str = ""  # the frozen model it steers: a run folder or a Stable Diffusion file or folder
    kind: str = "canny"  # the preprocessor that makes each training image's control (canny, scribble, tile)
    a: float | None = None  # its thresholds (None: its defaults)
    b: float | None = None
    drop_prob: float = 0.5  # prompts dropped to "" (the paper's 50%): the control alone must carry the image


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig | None = None  # present: a latent diffusion model over this autoencoder
    autoencoder_train: TrainConfig | None = None  # how to train that autoencoder when none is given
    condition: ConditionConfig | None = None  # present: a conditioned model (text or class labels)
    lora: LoraConfig | None = None  # present: train a LoRA on lora.base (a run folder) instead of a model
    controlnet: ControlNetConfig | None = None  # present: train a ControlNet on controlnet.base instead
    init: str = ""  # fine-tune this model (an SD file or diffusers folder, or a run): its U-Net learns, its text
    # encoders and autoencoder stay frozen; the recipe gives the data and training (TOML: before any [table])

    def validate(self):
        if sum(map(bool, (self.lora, self.controlnet, self.init))) > 1:
            raise ValueError("a recipe fine-tunes a model (init), trains a LoRA ([lora]) or a ControlNet "
                             "([controlnet]): keep one")
        self.unet.validate()
        self.diffusion.validate()
        self.train.validate()
        if self.condition:
            self.condition.validate()
        factor = self.factor
        if self.autoencoder:
            self.autoencoder.validate()
        if self.data.size % factor:
            raise ValueError(f"data.size {self.data.size} is not divisible by the model's factor {factor} "
                             f"(2^(levels-1) of the U-Net{' times the autoencoder' if self.autoencoder else ''}): "
                             f"use a multiple of {factor}, or fewer levels")
        return self

    @property
    def factor(self):
        """Image sides must be divisible by this: the U-Net's factor times the autoencoder's."""
        return self.unet.factor * (self.autoencoder.factor if self.autoencoder else 1)

    @property
    def latent_size(self):
        return self.data.size // (self.autoencoder.factor if self.autoencoder else 1)


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key {where}{unknown[0]!r}: known keys are {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = known[name].type
        if isinstance(sub, types.UnionType):  # an optional section: `X | None`
            sub = next(a for a in sub.__args__ if a is not type(None))
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{name} must be a table [{name}]")
            kwargs[name] = _build(sub, value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        *path, last = key.strip().split(".")
        node = values
        for p in path:
            node = node.setdefault(p, {})
        node[last] = _parse_value(text.strip())
    return values


def load_config(path=None, overrides=(), values: dict | None = None) -> Config:
    if values is None:
        values = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} not found: pass a TOML file such as configs/mnist-pixel.toml")
            try:
                values = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    return _build(Config, apply_overrides(values, list(overrides)), "").validate()


def _drop_none(d: dict) -> dict:  # TOML has no null: an absent key means the default None
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def dump_config(cfg) -> str:
    return tomli_w.dumps(_drop_none(dataclasses.asdict(cfg)))
